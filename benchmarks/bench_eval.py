"""Evaluation throughput (sm_eval) beside the model's own predict rate on the same data, in one run.

    .venv/bin/python benchmarks/bench_eval.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
                                              [--shards DIR --split test] [--threads N]

Random weights (``weights=None``); the official DINOv2 ViT-B/14 LoRA config at ``--size`` 252, or
with ``--quick`` ViT-S/14 at 56 px on a small data set (a one-minute smoke run). Without
``--shards``, a demo test split is generated and sharded in a temporary directory (images at
400 x 300, like the benchmarks' photos).

Measured, each on every pair of the split with the same batches (cut per shard, ``--batch``):

1. predict-only: the batches decoded, resized and moved to the device beforehand, then only
   ``sm_eval.predict.predict_batch`` (the model's ``predict``) is timed;
2. evaluation in this process, on 1 Ray worker and on 2 Ray workers: ``predict_split`` (model
   loaded from the checkpoint bytes, shards read, JPEGs decoded and resized by ``--loader-workers``
   DataLoader processes per worker, prediction, per-keypoint records, gathering, coverage check,
   index order) plus ``summarize``. Each is run once untimed first (worker processes and their
   imports warm, as in any but the first evaluation on a cluster), then timed.

Printed: pairs/s, seconds, seconds until the first batch came back (start-up: model loading,
loader processes), and each rate over the predict-only rate. Goal: evaluation with 1 worker at
least 0.8 x predict-only. With 2 workers on one GPU each worker gets half of it; on the CPU each
worker gets ``--threads`` threads (``os.cpu_count()`` is the budget to compare against).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipelines.builders.demo import generate
from pipelines.shard import shard_dataset
from pipelines.storage import Location
from sm_eval.checkpoints import resolve_model
from sm_eval.pck import summarize
from sm_eval.plan import SplitPlan, read_split_plan
from sm_eval.predict import eval_batches, predict_batch
from sm_eval.runner import DTYPES, EvalSettings, predict_split, torch_threads
from sm_model.checkpoint import save_checkpoint
from sm_model.config import ModelConfig
from sm_model.factory import create_model
from sm_model.matcher import MatchModel
from sm_model.simplematch import SimpleMatchOptions

ALPHAS = (0.01, 0.05, 0.1, 0.15)


def make_demo_shards(work: Path, pairs_per_category: int) -> Path:
    """A demo test split of ``5 x pairs_per_category`` pairs, sharded (128 KiB bound: several shards)."""
    held_out = 2
    while held_out * (held_out - 1) < pairs_per_category:
        held_out += 1
    raw = generate(
        work / "demo",
        images_per_category=5 * held_out,
        pairs_per_category={"test": pairs_per_category},
        size=(400, 300),
    )
    out = work / "shards"
    shard_dataset("demo", Location(str(raw)), Location(str(out)), splits=["test"], max_shard_bytes=128 * 1024)
    return out


def predict_only(model: MatchModel, plan: SplitPlan, settings: EvalSettings, repeats: int) -> float:
    """Pairs/s of ``predict_batch`` alone over the split's batches, decoded onto the device beforehand."""
    device = torch.device(settings.device)
    batches = [
        batch.to(device)
        for batch in eval_batches(
            plan.shards, list(plan.shard_counts), plan.shard_of, spec=model.input_spec,
            batch_size=settings.batch_size,
        )
    ]  # fmt: skip
    dtype = DTYPES[settings.dtype]

    def one_pass() -> float:
        _sync(device)
        started = time.perf_counter()
        for batch in batches:
            predict_batch(model, batch, dtype)
        _sync(device)
        return time.perf_counter() - started

    with torch_threads(settings.threads):
        one_pass()  # warm-up
        seconds = statistics.median(one_pass() for _ in range(repeats))
    return plan.num_pairs / seconds


def evaluation(checkpoint, plan: SplitPlan, settings: EvalSettings, workers: int, gpus: float) -> dict[str, float]:
    """Seconds of one evaluation (predict_split + summarize) and until its first batch arrived."""
    first: list[float] = []
    started = time.perf_counter()

    def on_batch(_: int) -> None:
        if not first:
            first.append(time.perf_counter() - started)

    records = predict_split(
        checkpoint, plan, settings, workers=workers, gpus_per_worker=gpus, cpus_per_worker=1, progress=False,
        on_batch=on_batch,
    )  # fmt: skip
    summarize(records, ALPHAS)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "first_batch": first[0], "pairs_per_s": plan.num_pairs / seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: ViT-S/14 at 56 px, 64 channels, 60 pairs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype")
    parser.add_argument("--size", type=int, default=252, help="network input side")
    parser.add_argument("--batch", type=int, default=8, help="pairs per batch")
    parser.add_argument("--pairs-per-category", type=int, default=40, help="demo pairs per category (5 categories)")
    parser.add_argument("--shards", help="evaluate this shard directory instead of a generated demo split")
    parser.add_argument("--split", default="test")
    threads = max(1, (os.cpu_count() or 2) // 2)
    parser.add_argument("--threads", type=int, default=threads, help="torch threads per worker (default: %(default)s)")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per worker")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of predict-only (median)")
    args = parser.parse_args()

    config = ModelConfig(image_size=args.size)
    pairs_per_category = args.pairs_per_category
    if args.quick:
        config = ModelConfig(backbone="dinov2_vits14", image_size=56, window_size=7, options=SimpleMatchOptions(decoder_channels=64))
        pairs_per_category = 12
    settings = EvalSettings(
        batch_size=args.batch,
        loader_workers=args.loader_workers,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
    )

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as scratch:
        work = Path(scratch)
        if args.shards:
            shards = Location(args.shards)
        else:
            print("generating and sharding a demo test split ...", flush=True)
            shards = Location(str(make_demo_shards(work, pairs_per_category)))
        plan = read_split_plan(shards, args.split)
        torch.manual_seed(0)
        model = create_model(config).eval()
        save_checkpoint(model, work / "model.pt")
        checkpoint = resolve_model(str(work / "model.pt"), "bench")
        model = model.to(args.device)

        print(
            f"backbone {config.backbone} ({config.finetune}), {config.image_size} px, "
            f"decoder {config.options.decoder_channels} ch, "
            f"batch {args.batch}, device {args.device}, {args.dtype}, {args.threads} threads per worker, "
            f"{args.loader_workers} loader processes per worker"
        )
        print(f"data: {shards.url} split {args.split}: {plan.num_pairs} pairs in {len(plan.shard_counts)} shards\n")
        rates = {"predict only (decoded batches)": {"pairs_per_s": predict_only(model, plan, settings, args.repeats)}}

        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        cpus = max(2, os.cpu_count() or 2)
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        runs = {  # name: (workers, GPUs per worker); two workers share one GPU
            "eval, in this process": (0, 0.0),
            "eval, 1 Ray worker": (1, min(1.0, gpus)),
            "eval, 2 Ray workers": (2, min(1.0, gpus / 2)),
        }
        for name, (workers, gpus_each) in runs.items():
            evaluation(checkpoint, plan, settings, workers, gpus_each)  # warm-up
            rates[name] = evaluation(checkpoint, plan, settings, workers, gpus_each)
        ray.shutdown()

    base = rates["predict only (decoded batches)"]["pairs_per_s"]
    print(f"{'':34} {'pairs/s':>9} {'seconds':>8} {'first batch s':>14} {'x predict-only':>15}")
    for name, rate in rates.items():
        seconds = f"{rate['seconds']:8.2f}" if "seconds" in rate else " " * 8
        first = f"{rate['first_batch']:14.2f}" if "first_batch" in rate else " " * 14
        print(f"{name:34} {rate['pairs_per_s']:9.2f} {seconds} {first} {rate['pairs_per_s'] / base:15.2f}")
    ratio = rates["eval, 1 Ray worker"]["pairs_per_s"] / base
    print(f"\neval (1 worker) / predict-only = {ratio:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
