"""The Ray Train ``TorchTrainer`` for a :class:`~sm_train.config.TrainConfig`: scaling, storage
(local or ``s3://``, custom endpoints included), checkpoint retention and failure handling."""

from __future__ import annotations

import os

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.storage import arrow_filesystem
from sm_train.config import SELECTION_METRIC, TrainConfig, to_dict
from sm_train.loop import train_loop_per_worker


def build_trainer(config: TrainConfig, callbacks: list | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` running :func:`sm_train.loop.train_loop_per_worker` as ``config`` says;
    ``callbacks`` are Ray Train ``UserCallback`` objects (Tune's ``TuneReportCallback``)."""
    run = config.run
    storage_path, filesystem = arrow_filesystem(run.storage_path, run.s3_endpoint_url)
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


FORWARDED_PREFIXES = ("AWS_",)


def forwarded_environment() -> dict[str, str]:
    """The driver's S3 settings (``AWS_*``: credentials, region, endpoint, checksum mode), passed
    on to the training workers, which read shards with boto3 wherever they run."""
    return {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_PREFIXES)}
