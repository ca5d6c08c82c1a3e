"""Training throughput of the Ray Train loop with 1 worker against a plain single-process loop on
the same data, side by side in one run.

    .venv/bin/python benchmarks/bench_train.py [--quick] [--config configs/demo.yaml] [key=value ...]

Both run the same :func:`sm_train.loop.train_step` (augmentation on the device, forward, loss,
backward, optimizer and LR schedule) over the same planned epoch of the same shards, with the
same loader processes and CPU threads; the rate is training pairs per second from the start of the epoch's data
stream to its last step, so model building and Ray's start-up are not counted in either. The
Ray figure is the ``train/pairs_per_s`` the loop reports. Goal: Ray / plain at least 0.9.

The data is a generated demo set (``--pairs`` training pairs) sharded into a temporary directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from pipelines.builders.demo import CATEGORIES, generate
from pipelines.reader import split_shards
from pipelines.shard import shard_dataset
from pipelines.storage import Location
from sm_model.factory import create_model
from sm_train.augment import PairAugmentation
from sm_train.config import TrainConfig, load_config, resolve_paths
from sm_train.data import pair_batches, plan_epoch
from sm_train.loop import autocast_dtype_for, build_optimizer, build_scheduler, train_step
from sm_train.trainer import build_trainer

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_shards(directory: Path, pairs: int) -> Path:
    per_category = -(-pairs // len(CATEGORIES))
    root = generate(directory / "demo", images_per_category=20, pairs_per_category={"trn": per_category}, size=(320, 240))
    out = directory / "shards"
    shard_dataset("demo", Location(str(root)), Location(str(out)), splits=["trn"], workers=2)
    return out


def plain_rate(config: TrainConfig, steps: int) -> float:
    """Pairs/s of the same steps in this process, with no Ray and no DDP, on as many CPU threads
    as a Ray worker gets (Ray sets ``OMP_NUM_THREADS`` to the worker's CPUs)."""
    device = torch.device("cuda" if config.run.use_gpu else "cpu")
    torch.set_num_threads(max(1, int(config.run.cpus_per_worker)))
    torch.manual_seed(config.train.seed)
    model = create_model(config.model).to(device)  # any model.kind the config names
    optimizer = build_optimizer(config.optim, model)
    scheduler = build_scheduler(config.optim, optimizer)
    augment = PairAugmentation(config.augment).to(device)
    shards = Location(config.data.shards)
    plan = plan_epoch(split_shards(shards, config.data.train_split), 1, config.train.batch_size, config.train.seed, 0)
    autocast_dtype = autocast_dtype_for(config.train.precision, device)
    start, done = time.perf_counter(), 0
    for batch in pair_batches(
        shards,
        plan.ranks[0],
        spec=model.input_spec,
        batch_size=config.train.batch_size,
        loader_workers=config.data.loader_workers,
        shuffle_buffer=config.data.shuffle_buffer,
        seed=config.train.seed,
        split_nodes=False,
        max_batches=min(steps, plan.steps),
        device=device,
    ):
        loss = train_step(model, model, augment, optimizer, batch.to(device, non_blocking=True), config, autocast_dtype)
        if config.optim.lr_schedule == "iterations":
            scheduler.step()  # an epoch schedule steps after the epoch: not within these steps
        done += 1
    float(loss)  # wait for the device
    return done * config.train.batch_size / (time.perf_counter() - start)


def ray_rate(config: TrainConfig) -> float:
    import ray

    if not ray.is_initialized():
        # No dashboard: its agents would take a share of a small machine from the one worker.
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    result = build_trainer(config).fit()
    return float(result.metrics["train/pairs_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs/demo.yaml")
    parser.add_argument("--pairs", type=int, default=800, help="training pairs to generate")
    parser.add_argument("--steps", type=int, default=60, help="training steps measured per loop")
    parser.add_argument("--shards", type=Path, help="use these shards instead of generating a demo set")
    parser.add_argument("--quick", action="store_true", help="fewer pairs and steps (a smoke run)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.steps = 200, 12
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as directory:
        shards = args.shards or make_shards(Path(directory), args.pairs)
        overrides = [
            f"data.shards={shards}",
            "data.val_split=null",
            f"run.storage_path={directory}/runs",
            "run.name=bench",
            "run.num_workers=1",
            "train.epochs=1",
            f"train.max_steps_per_epoch={args.steps}",
            f"train.log_every_steps={args.steps}",
            *args.overrides,
        ]
        config = resolve_paths(load_config(args.config, overrides), Path.cwd())
        print(f"model {config.model.kind} {config.model.backbone} at {config.model.image_size}, "
              f"batch {config.train.batch_size}, {args.steps} steps, loader workers {config.data.loader_workers}, "
              f"gpu {config.run.use_gpu}")
        plain = plain_rate(config, args.steps)
        print(f"plain single-process loop : {plain:8.2f} pairs/s")
        distributed = ray_rate(config)
        print(f"Ray Train loop, 1 worker  : {distributed:8.2f} pairs/s")
        print(f"ratio Ray / plain         : {distributed / plain:8.3f}   (goal >= 0.9)")


if __name__ == "__main__":
    main()
