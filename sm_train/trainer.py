"""The Ray Train ``TorchTrainer`` for a :class:`~sm_train.config.TrainConfig`: scaling, storage
(local or ``s3://``, custom endpoints included), checkpoint retention and failure handling."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from sm_train.config import SELECTION_METRIC, TrainConfig, to_dict
from sm_train.loop import train_loop_per_worker


def build_trainer(config: TrainConfig, callbacks: list | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` running :func:`sm_train.loop.train_loop_per_worker` as ``config`` says;
    ``callbacks`` are Ray Train ``UserCallback`` objects (Tune's ``TuneReportCallback``)."""
    run = config.run
    storage_path, filesystem = storage_location(run.storage_path, run.storage_endpoint_url)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config)},
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=run.max_failures),
            worker_runtime_env={"env_vars": forwarded_environment()},
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=run.keep_checkpoints,
                checkpoint_score_attribute=SELECTION_METRIC,
                checkpoint_score_order="max",
            ),
        ),
    )


def storage_location(path: str, endpoint_url: str | None) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``RunConfig`` storage arguments for a local directory or an ``s3://`` prefix. A custom
    endpoint needs an explicit pyarrow filesystem, and then the path loses its ``s3://``."""
    if not path.startswith("s3://") or endpoint_url is None:
        return path, None
    endpoint = urlparse(endpoint_url)
    # Explicit keys travel with the pickled filesystem to Ray's controller and workers.
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint.netloc or endpoint.path,
        scheme=endpoint.scheme or "https",
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
    )
    return path.removeprefix("s3://"), filesystem


FORWARDED_PREFIXES = ("AWS_",)


def forwarded_environment() -> dict[str, str]:
    """The driver's S3 settings (``AWS_*``: credentials, region, endpoint, checksum mode), passed
    on to the training workers, which read shards with boto3 wherever they run."""
    return {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_PREFIXES)}


def resolve_paths(config: TrainConfig, base: Path) -> TrainConfig:
    """Make local shard, storage and weight-file paths absolute against ``base`` (Ray workers
    run in their own directories); URLs and ``weights: hub`` are kept as they are."""

    def absolute(path: str) -> str:
        return path if "://" in path else str((base / path).resolve())

    weights = config.model.weights
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, weights=weights if weights in (None, "hub") else absolute(weights)),
        data=dataclasses.replace(config.data, shards=absolute(config.data.shards)),
        run=dataclasses.replace(config.run, storage_path=absolute(config.run.storage_path)),
    )
