"""sm_eval on Ray workers (the session's local cluster, ``ray_cluster`` in conftest): 2 workers give
the single process's predictions.parquet bit for bit, in the library and as a ``ray job submit``
of the CLI, and a worker's error arrives as the worker raised it, naming the shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.storage import Location
from sm_eval.checkpoints import OfficialSettings
from sm_eval.evaluate import EvalRequest, evaluate
from sm_eval.plan import read_split_plan
from sm_eval.runner import EvalSettings
from sm_model.factory import RANDOM_WEIGHTS
from tests.conftest import REPO_ROOT
from tests.test_eval import save_tiny

ALPHAS = (0.05, 0.1, 0.15)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


def run(
    checkpoint: Path | str, shards: Path, out: Path, workers: int, loader_workers: int, **settings: object
) -> dict:
    """``evaluate`` of one model (a checkpoint path or a ``zero-shot:`` spec, random weights) on
    the test split; ``settings``: further :class:`EvalSettings` fields."""
    eval_settings = EvalSettings(batch_size=4, loader_workers=loader_workers, threads=1, **settings)
    request = EvalRequest(
        checkpoints=(str(checkpoint),), shards=str(shards), out=str(out), alphas=ALPHAS, settings=eval_settings,
        device="cpu", workers=workers, gpus_per_worker=0.0, matches=2, progress=False,
        official=OfficialSettings(backbone_weights=RANDOM_WEIGHTS),
    )  # fmt: skip
    return evaluate(request)


@pytest.fixture(scope="module")
def single(demo_shards: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("single")
    return out, run(checkpoint, demo_shards, out, workers=0, loader_workers=0)


def test_two_ray_workers_equal_the_single_process_bit_for_bit(
    ray_cluster: str, single: tuple[Path, dict], demo_shards: Path, checkpoint: Path, tmp_path: Path
) -> None:
    assert len(read_split_plan(Location(str(demo_shards)), "test").shard_counts) >= 4  # both workers get shards
    # Workers decode with a DataLoader process each; the single process decoded in itself.
    report = run(checkpoint, demo_shards, tmp_path, workers=2, loader_workers=1)
    assert (tmp_path / "predictions.parquet").read_bytes() == (single[0] / "predictions.parquet").read_bytes()
    assert report["models"][0]["results"] == single[1]["models"][0]["results"]
    assert report["run"]["workers"] == 2 and report["run"]["device"] == "cpu"
    assert (tmp_path / "report.md").read_text() == (single[0] / "report.md").read_text()


def test_zero_shot_on_two_ray_workers_equals_in_process_bit_for_bit(
    ray_cluster: str, demo_shards: Path, tmp_path: Path
) -> None:
    """The driver builds the zero-shot model once (random weights here) and ships its weights, so
    the workers predict with exactly the in-process model's weights."""
    zero_shot = {"image_size": 56, "localizer": "kernel", "model_options": ("kernel_sigma=2", "beta=0.04")}
    local = run("zero-shot:dinov2_vits14", demo_shards, tmp_path / "local", workers=0, loader_workers=0, **zero_shot)
    remote = run("zero-shot:dinov2_vits14", demo_shards, tmp_path / "ray", workers=2, loader_workers=1, **zero_shot)
    parquet = "predictions.parquet"
    assert (tmp_path / "ray" / parquet).read_bytes() == (tmp_path / "local" / parquet).read_bytes()
    assert remote["models"][0]["results"] == local["models"][0]["results"]
    model = remote["models"][0]
    assert (model["name"], model["kind"], model["localizer"], model["image_size"]) == (
        "zero-shot-dinov2_vits14", "zero-shot", "kernel", 56
    )
    assert model["config"]["finetune"] == "frozen" and model["config"]["final_norm"] is True
    assert remote["run"]["workers"] == 2 and tuple(remote["run"]["model_options"]) == ("kernel_sigma=2", "beta=0.04")


def test_corrupt_shard_error_comes_through_ray_naming_the_shard(
    ray_cluster: str, demo_shards: Path, checkpoint: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(demo_shards, copy)
    name = list(read_split_plan(Location(str(copy)), "test").shard_counts)[1]
    (copy / name).write_bytes((copy / name).read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"corrupt shard {copy / name}") as raised:
        run(checkpoint, copy, tmp_path / "out", workers=2, loader_workers=0)
    assert "RayTaskError" in type(raised.value.__cause__).__name__  # the remote traceback is kept as the cause


def test_ray_job_submit_of_the_cli_matches_the_single_process(
    ray_cluster: str, single: tuple[Path, dict], demo_shards: Path, checkpoint: Path, tmp_path: Path
) -> None:
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster,
        "--working-dir", str(REPO_ROOT), "--",
        "python", "-m", "sm_eval", "--checkpoint", str(checkpoint), "--shards", str(demo_shards),
        "--out", str(tmp_path), "--workers", "2", "--gpus-per-worker", "0", "--threads", "1", "--batch-size", "4",
        "--loader-workers", "0", "--alphas", "0.05,0.1,0.15", "--matches", "2", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr and "per keypoint" in done.stdout
    assert (tmp_path / "predictions.parquet").read_bytes() == (single[0] / "predictions.parquet").read_bytes()
    assert json.loads((tmp_path / "report.json").read_text())["run"]["workers"] == 2
