"""Sweeps: search-space parsing and checking, and a real Ray Tune sweep on the demo shards (4 trials,
2 at a time, ASHA stopping the hopeless ones) whose best config trains when given back to sm_train."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sm_train.config import ConfigError, load_config
from sm_train.trainer import build_trainer
from sm_train.tune import load_space, param_space, run_sweep, summarize_results, trial_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO_ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_spaces_fit_their_configs(path: Path) -> None:
    config = REPO_ROOT / "configs" / ("demo.yaml" if path.stem == "demo" else "ibot_vitb16_256_spair.yaml")
    spec = load_space(path, load_config(config))
    assert spec.space and set(param_space(spec)["values"]) == set(spec.space)


def test_space_errors_name_file_and_key(tmp_path: Path) -> None:
    base = load_config(None)
    path = tmp_path / "space.yaml"
    for text, message in [
        ("space:\n  model.windw_size: {grid: [5]}\n", r"space\.model\.windw_size is not a config key"),
        ("space:\n  model.window_size: {sample: [5]}\n", r"must be one sampler of"),
        ("space:\n  optim.lr: {loguniform: [1]}\n", r"loguniform needs \[low, high\]"),
        ("space:\n  model.window_size: {grid: [five]}\n", r"space\.model\.window_size='five'.*must be an integer"),
        ("space:\n  pair:\n    grid: [{model.image_sise: 5}]\n", r"unknown key 'model\.image_sise'"),
        ("spaces: {}\n", r"expected a non-empty 'space' mapping"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_space(path, base)


def test_trial_config_applies_values_and_bundles() -> None:
    base = load_config(None)
    config = trial_config(base, {"optim.lr": 0.5, "variant": {"model.image_size": 448, "model.window_size": 9}}, "t1")
    assert (config.optim.lr, config.model.image_size, config.model.window_size, config.run.name) == (0.5, 448, 9, "t1")


def test_sweep_with_asha_results_and_best_config(ray_cluster: str, demo_shards: Path, tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    # Two sensible trials first, then two hopeless ones (a near-uniform dense soft-argmax predicts
    # the map centre), which ASHA must stop at their first rung.
    space.write_text(
        "space:\n"
        "  localization:\n"
        "    grid:\n"
        "      - {model.window_size: 5, model.beta: 0.02}\n"
        "      - {model.window_size: 9, model.beta: 0.02}\n"
        "      - {model.window_size: null, model.beta: 1000.0}\n"
        "      - {model.window_size: null, model.beta: 2000.0}\n"
        "asha: {grace_period: 1, reduction_factor: 2}\n"
        "overrides: [train.epochs=2]\n"
    )
    overrides = [
        f"data.shards={demo_shards}",
        f"run.storage_path={tmp_path / 'runs'}",
        "model.image_size=64",
        "model.decoder_channels=16",
        "model.coarse_window_sizes=[null, 3]",
        "data.loader_workers=0",
        "train.max_steps_per_epoch=2",
        "train.batch_size=4",
    ]
    base = load_config(REPO_ROOT / "configs/demo.yaml", [*overrides, "train.epochs=2"])
    spec = load_space(space, base)
    results = run_sweep(base, spec, "sweep", num_samples=1, max_concurrent=2)
    assert len(results) == 4 and results.num_errors == 0
    out = tmp_path / "out"
    best = summarize_results(results, base, spec, out)

    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 4 and table["best_pck@0.1"].notna().all()
    hopeless = table[table["localization"].str.contains("beta=1000|beta=2000")]
    assert (hopeless["epochs"] < 2).all(), table  # ASHA stopped them early
    assert "beta=0.02" in best["localization"]
    assert (out / "results.md").read_text().count("\n") == 6
    assert (out / "pck_vs_localization.png").stat().st_size > 0

    best_config = load_config(out / "best_config.yaml", ["train.epochs=1", "train.max_steps_per_epoch=1", f"run.storage_path={tmp_path / 'again'}"])
    assert best_config.model.beta == 0.02
    assert build_trainer(best_config).fit().metrics["epoch"] == 1


def test_results_are_published_to_remote_storage(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    from pipelines.storage import Location
    from sm_train.tune import publish_results

    (tmp_path / "results.md").write_text("| trial |\n")
    base = load_config(None, [f"run.storage_path={s3_bucket}/runs", f"run.s3_endpoint_url={s3_endpoint}"])
    where = publish_results(tmp_path, base, "sweep")
    assert where == f"{s3_bucket}/runs/sweep/results"
    assert Location(where, s3_endpoint).read_text("results.md") == "| trial |\n"
