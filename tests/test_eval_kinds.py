"""sm_eval with model kinds and localizers: checkpoints of every kind side by side, a zero-shot
model evaluated without a checkpoint, a localizer chosen at evaluation, model options checked
against the config before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sm_eval.__main__ import main
from sm_eval.pck import KeypointRecords, records_in_frame
from sm_model.checkpoint import save_checkpoint
from sm_model.config import ModelConfig
from sm_model.registry import build_model, zero_shot_config
from tests.test_eval import save_tiny

COMMON = ["--split", "test", "--alphas", "0.05,0.1", "--threads", "2", "--loader-workers", "0", "--matches", "0",
          "--no-progress", "--log-level", "WARNING"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


def resized_predictions(out: Path) -> np.ndarray:
    """``[K, 2]`` predictions of ``out``'s records in the resized ``S x S`` frame."""
    records = records_in_frame(KeypointRecords.from_dict(pq.read_table(out / "predictions.parquet").to_pydict()), "resized")
    return np.stack([records.pred_x, records.pred_y], axis=1)


def test_zero_shot_evaluates_without_a_checkpoint(demo_shards: Path, tmp_path: Path) -> None:
    argv = ["--model", "zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size", "56",
            "--shards", str(demo_shards), "--out", str(tmp_path), *COMMON]  # fmt: skip
    assert main(argv) == 0
    model = json.loads((tmp_path / "report.json").read_text())["models"][0]
    assert (model["name"], model["kind"], model["localizer"], model["image_size"]) == (
        "zero-shot-dinov2_vits14", "zero-shot", "argmax", 56
    )
    # Nearest neighbour on the 4 x 4 patch grid: every prediction is a cell centre 14 j + 6.5.
    cells = (resized_predictions(tmp_path) - 6.5) / 14
    np.testing.assert_allclose(cells, np.round(cells), atol=1e-4)
    assert ((-1e-4 <= cells) & (cells <= 3 + 1e-4)).all()
    assert "zero-shot on dinov2_vits14, 56 px input, argmax localizer" in (tmp_path / "report.md").read_text()


def test_the_localizer_is_chosen_at_evaluation(demo_shards: Path, checkpoint: Path, tmp_path: Path) -> None:
    """The same SimpleMatch checkpoint, its own window soft-argmax against nearest neighbour."""
    base = ["--checkpoint", str(checkpoint), "--shards", str(demo_shards), *COMMON]
    assert main([*base, "--out", str(tmp_path / "window")]) == 0
    assert main([*base, "--out", str(tmp_path / "argmax"), "--localizer", "argmax"]) == 0
    assert main([*base, "--out", str(tmp_path / "kernel"), "--localizer", "kernel", "--set", "kernel_sigma=2"]) == 0
    models = {name: json.loads((tmp_path / name / "report.json").read_text())["models"][0] for name in
              ("window", "argmax", "kernel")}  # fmt: skip
    assert [models[name]["localizer"] for name in ("window", "argmax", "kernel")] == ["window", "argmax", "kernel"]
    # The report holds the config each model predicted with: the checkpoint's, with the override.
    assert models["window"]["config"]["localizer"] is None and models["argmax"]["config"]["localizer"] == "argmax"
    assert {**models["window"]["config"], "localizer": "argmax"} == models["argmax"]["config"]
    window, argmax = resized_predictions(tmp_path / "window"), resized_predictions(tmp_path / "argmax")
    assert not np.allclose(window, argmax)
    # Nearest neighbour on the stride-4 map of the 28-pixel input: cell centres 4 j + 1.5.
    cells = (argmax - 1.5) / 4
    np.testing.assert_allclose(cells, np.round(cells), atol=1e-4)


def test_an_unknown_model_option_is_an_error_naming_it(
    demo_shards: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--checkpoint", str(checkpoint), "--shards", str(demo_shards), "--out", str(tmp_path / "o"), *COMMON]
    assert main([*argv, "--set", "windw_size=3"]) == 1
    assert "unknown key 'windw_size' (did you mean 'window_size'?)" in capsys.readouterr().err
    assert main([*argv, "--set", "beta=-1"]) == 1
    assert "beta must be a finite number above 0, got -1" in capsys.readouterr().err
    assert main([*argv, "--set", "decoder_channels=32"]) == 1  # an architecture field: the weights would not fit
    assert "saved from another architecture: simplematch.decoder_channels" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--set", "beta"])
    assert usage.value.code == 2
    assert "model option 'beta' is not of the form key=value" in capsys.readouterr().err


def test_an_unknown_zero_shot_backbone_names_the_registered_ones(
    demo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", "zero-shot:dinov3_vitb16", "--shards", str(demo_shards), "--out", str(tmp_path), *COMMON]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "zero-shot:dinov3_vitb16: unknown backbone 'dinov3_vitb16'; registered: dinov2_vits14" in error


def test_checkpoints_of_every_kind_evaluate_side_by_side(demo_shards: Path, checkpoint: Path, tmp_path: Path) -> None:
    """A saved zero-shot model and a saved (untrained) baseline evaluate beside a SimpleMatch
    checkpoint on the same pairs; each keeps its kind and its own localizer."""
    torch.manual_seed(0)
    zero_shot = zero_shot_config("zero-shot:dinov2_vits14", weights=None, image_size=56)
    baseline = ModelConfig(kind="baseline", backbone="dinov2_vits14", image_size=56, finetune="last_blocks",
                           finetune_blocks=2, final_norm=True, beta=0.04)  # fmt: skip
    for name, config in (("zero_shot.pt", zero_shot), ("baseline.pt", baseline)):
        save_checkpoint(build_model(config), tmp_path / name)
    argv = ["--model", str(checkpoint), "--model", str(tmp_path / "zero_shot.pt"), "--model", str(tmp_path / "baseline.pt"),
            "--shards", str(demo_shards), "--out", str(tmp_path / "out"), *COMMON]  # fmt: skip
    assert main(argv) == 0
    models = json.loads((tmp_path / "out" / "report.json").read_text())["models"]
    assert [(m["name"], m["kind"], m["localizer"]) for m in models] == [
        ("tiny", "simplematch", "window"), ("zero_shot", "zero-shot", "argmax"), ("baseline", "baseline", "kernel")
    ]
    for model in models:
        per_image = model["results"]["resized"]["overall"]["per_image"]
        assert len(per_image) == 2 and all(0 <= value <= 1 for value in per_image)
