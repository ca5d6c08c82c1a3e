"""Training through Ray Train on a real local cluster (2 CPU workers, gloo): exact disjoint epochs,
identical DDP replicas, checkpoints on S3, continuing a stopped run, recovering from a killed
worker, and ``ray job submit``. These are the suite's few cluster-level tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pyarrow.fs import FileSelector

from sm_model.checkpoint import load_model
from sm_train.__main__ import main as sm_train_main
from sm_train.config import TrainConfig, load_config
from sm_train.trainer import build_trainer

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.backbone=resnet18",
    "model.image_size=64",
    "model.finetune=full",
    "model.decoder_channels=16",
    "model.decoder_dropout=0.0",
    "model.window_size=5",
    "model.coarse_window_sizes=[null, 3]",
    "model.multiscale=true",
    "data.loader_workers=0",
    "data.shuffle_buffer=8",
    "data.val_batch_size=12",
    "train.batch_size=4",
    "train.log_every_steps=1",
]


def _config(shards: Path, storage: str, *overrides: str) -> TrainConfig:
    return load_config(None, [*TINY, f"data.shards={shards}", f"run.storage_path={storage}", *overrides])


def test_two_workers_exact_epochs_identical_replicas_s3_and_continue(
    ray_cluster: str, demo_shards: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    storage = f"{s3_bucket}/runs"
    settings = ["run.name=two", "run.num_workers=2", f"run.s3_endpoint_url={s3_endpoint}"]
    first = build_trainer(_config(demo_shards, storage, *settings, "train.epochs=1")).fit()
    metrics = first.metrics
    # 300 training pairs over 2 workers x batch 4: 37 steps, 296 pairs seen, each once.
    assert metrics["step"] == 37 and metrics["epoch"] == 1
    assert metrics["data/pairs_seen"] == 296 and metrics["data/pairs_repeated"] == 0
    assert metrics["ddp/replica_max_abs_diff"] == 0.0
    assert metrics["val/pairs"] == 30 and 0.0 <= metrics["val/pck@0.1"] <= 1.0
    assert first.checkpoint.path.startswith(storage.removeprefix("s3://"))

    # The same name and storage path continue the run: one more (short) epoch, not a fresh start.
    more = ["train.epochs=2", "train.max_steps_per_epoch=3"]
    second = build_trainer(_config(demo_shards, storage, *settings, *more)).fit()
    assert second.metrics["step"] == 40 and second.metrics["epoch"] == 2 and second.metrics["resumes"] == 1
    with second.checkpoint.as_directory() as directory:
        model = load_model(Path(directory) / "model.pt")
        assert model.config.backbone == "resnet18"
    events = second.checkpoint.filesystem.get_file_info(FileSelector(f"{storage.removeprefix('s3://')}/two/tensorboard"))
    assert any("tfevents" in info.path for info in events)


def test_killed_worker_resumes_mid_epoch_from_its_checkpoint(
    ray_cluster: str, demo_shards: Path, tmp_path: Path
) -> None:
    import ray.util.state

    config = _config(
        demo_shards,
        str(tmp_path),
        "run.name=killed",
        "run.num_workers=2",
        "run.max_failures=1",
        "train.epochs=1",
        "train.max_steps_per_epoch=6",
        "train.checkpoint_every_steps=2",
    )
    results = {}
    fit = threading.Thread(target=lambda: results.setdefault("result", build_trainer(config).fit()))
    fit.start()
    # Kill once the controller has registered the first mid-epoch checkpoint (its snapshot names
    # it), i.e. while the workers run steps 3 and 4 of epoch 0.
    snapshot = tmp_path / "killed" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while not (snapshot.exists() and "epoch=0000-step=000002" in snapshot.read_text()):
        assert time.monotonic() < deadline and fit.is_alive(), "no mid-epoch checkpoint was registered"
        time.sleep(0.1)
    workers = ray.util.state.list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    os.kill(workers[0].pid, signal.SIGKILL)
    fit.join(timeout=600)
    result = results["result"]
    assert result.error is None
    assert result.metrics["resumes"] == 1
    assert result.metrics["step"] == 6 and result.metrics["epoch"] == 1
    assert result.metrics["data/pairs_repeated"] == 0


def test_ray_job_submit_runs_sm_train(ray_cluster: str, demo_shards: Path, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        ray_cluster,
        "--working-dir",
        str(REPO_ROOT),
        "--",
        "python",
        "-m",
        "sm_train",
        "--config",
        "configs/demo.yaml",
        *TINY,
        f"data.shards={demo_shards}",
        f"run.storage_path={tmp_path}",
        "run.name=submitted",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "data.loader_workers=1",  # decoding in a forkserver process inside the Ray worker
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Job 'raysubmit_" in done.stdout + done.stderr and "succeeded" in done.stdout + done.stderr
    assert (tmp_path / "submitted" / "epoch=0001-step=000000" / "model.pt").exists()


def test_help_documents_the_config_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI in this process (``python -m sm_train`` itself runs in the job-submit test)."""
    path = str(REPO_ROOT / "configs/demo.yaml")
    with pytest.raises(SystemExit) as done:
        sm_train_main(["--help"])
    shown = capsys.readouterr().out
    assert done.value.code == 0 and "model.image_size" in shown and "--config" in shown
    assert sm_train_main(["--config", path, "--print-config", "optim.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert sm_train_main(["--config", path, "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
