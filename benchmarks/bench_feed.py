"""Feeding the device: the data path from shards to batches beside its floor, in one process and
with loader processes, and on a GPU training and evaluation fed by it beside the model alone.

    .venv/bin/python benchmarks/bench_feed.py [--processes P] [--size 252] [--batch 8] [--repeats 3]
    .venv/bin/python benchmarks/bench_feed.py --device cuda     # a GPU machine (no Ray needed)

Demo shards are generated and sharded into a temporary directory (``--images-per-category``,
``--pairs-per-category``: by default 4,000 training pairs of 400 x 300 views in 5 shards, each
image in about 27 pairs, as in the demo set of 910 pairs; ``--shards DIR --split trn`` reads
others). Measured in one run, each figure the median of ``--repeats`` timed passes over the same
pairs (those of one epoch of :func:`sm_train.data.plan_epoch`, shuffle buffer 256); the passes of
(2) and (3) take turns, so that a busy machine slows both alike:

1. the floor: each distinct image of a shard decoded once (bytes read beforehand) and resized
   once to ``--size``, and the two resized images of each pair copied into batch tensors of
   ``--batch`` (time per pair of each of the three printed);
2. in one process: :func:`sm_train.data.pair_batches` with no loader process (reading, checking,
   decoding, resizing, batching), from the call to the last batch;
3. the same with ``P`` loader processes (``--processes``, default: the machine's cores) into a
   main process that only moves each batch to ``--device``; the loader processes' forkserver is
   started by an untimed pass first, as it is for every epoch but the first; the time to the first
   batch is printed apart (and included in the rate);
4. with ``--device cuda`` (or ``--model-figures`` anywhere, ``--quick`` for a tiny model):
   :func:`sm_train.loop.train_step` (official SPair config: DINOv2-B/14 LoRA, random weights,
   ``--size``, bfloat16 on a GPU, batch ``--train-batch``) on one batch kept on the device against
   the same steps fed by (3) with at most ``--train-processes`` loader processes, steady state (the
   first step excluded); and ``sm_eval``'s prediction loop (:func:`sm_eval.runner.worker_records`:
   model loaded from checkpoint bytes, batches cut per shard, records) at steady state (first
   batch excluded) against :func:`sm_eval.predict.predict_batch` alone on batches already on the
   device.

Digest verification (:mod:`pipelines.reader` hashes every member a pair uses against the digest
``index.parquet`` records; on by default) is measured beside reading without it
(``verify=False``), each pair of passes taking turns (every other round in reverse order): the
reader alone (``--reader-repeats`` passes each), (2) in one process (sm_feed's ``read_entry``
called with ``verify=False`` in this process), and the loader processes' reading alone with ``P``
processes; beside the pairs/s, this process's CPU per pair. Goal: verification costs at most
10 % of (2)'s pairs/s.

Bounds printed beside the goals (CPU: (2) >= 0.8 x (1), (3) with P = 2 >= 1.7 x (2); GPU: fed /
resident >= 0.95, eval / predict >= 0.9): for (2), the reader alone (tar, bounded JSON, index and
sharder checks, decoding each image once; no resizing, no batches) plus the floor's resizing and
copying; for (3), the lower of (a) the cores over the CPU the loader path spends per pair (this
process's, measured in (3), plus the loader processes' reading alone, measured apart) against the
CPU of (2), and (b) how much faster ``P`` processes that only read (no batches, nothing shipped)
are than one, here and now (what the machine gives to ``P`` busy processes). Ends with one JSON
line of every figure. Never imports Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import sm_feed.batches
from pipelines.imageio import decode_rgb
from pipelines.reader import entry_name, index_rows, read_entry, split_shards
from pipelines.shard import shard_dataset
from pipelines.storage import Location
from sm_feed.batches import PieceReader, piece_chunks, plan_pieces, stream_loader
from sm_model.inputs import InputSpec
from sm_train.data import pair_batches, plan_epoch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHUFFLE_BUFFER = 256


def make_shards(work: Path, images_per_category: int, pairs_per_category: int, size: tuple[int, int]) -> Location:
    # Imported here: loader processes fork from a server that has imported this script, and with
    # scipy.linalg (the demo builder's) there each one starts 0.15 s later on the 2-core machine.
    from pipelines.builders.demo import generate

    root = generate(
        work / "demo",
        images_per_category=images_per_category,
        pairs_per_category={"trn": pairs_per_category},
        size=size,
    )
    shard_dataset("demo", Location(str(root)), Location(str(work / "shards")), splits=["trn"], workers=2)
    return Location(str(work / "shards"))


def median_time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The median seconds of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


# ---- (1) the floor -----------------------------------------------------------------------------


def floor(shards: Location, entries: list, index: dict, size: int, batch: int, pairs: int, repeats: int) -> dict:
    """Decode each distinct image of a shard once, resize it once, copy each pair's two images into
    batches: the first ``pairs`` pairs of ``entries``, in their order. Seconds of each phase."""
    spec = InputSpec(size)
    jobs = []  # (encoded images by key, [(src key, trg key)]) per entry
    left = pairs
    for entry in entries:
        rows = list(index[shards.full(entry_name(entry))].values())[entry.start : entry.stop][:left]
        left -= len(rows)
        wanted = {row["src_image"] for row in rows} | {row["trg_image"] for row in rows}
        with tarfile.open(shards.full(entry.name)) as tar:
            encoded = {
                name.split(".")[0]: tar.extractfile(name).read()
                for name in tar.getnames()
                if name.split(".")[0] in wanted and name.endswith((".jpg", ".png"))
            }
        jobs.append((encoded, [(row["src_image"], row["trg_image"]) for row in rows]))

    def one_pass() -> dict[str, float]:
        phases = dict.fromkeys(("decode", "resize", "copy"), 0.0)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        for encoded, pair_keys in jobs:
            started = time.perf_counter()
            decoded = {key: decode_rgb(data) for key, data in encoded.items()}
            phases["decode"] += time.perf_counter() - started
            started = time.perf_counter()
            resized = {key: spec.resize(image) for key, image in decoded.items()}
            phases["resize"] += time.perf_counter() - started
            started = time.perf_counter()
            for src, trg in pair_keys:
                pending.append((resized[src], resized[trg]))
                if len(pending) == batch:
                    torch.stack([p[0] for p in pending]), torch.stack([p[1] for p in pending])
                    pending = []
            phases["copy"] += time.perf_counter() - started
        return phases

    one_pass()  # warm-up
    runs = [one_pass() for _ in range(repeats)]
    return {phase: statistics.median(run[phase] for run in runs) for phase in runs[0]}


# ---- (2), (3): the data path -------------------------------------------------------------------


def feed(shards: Location, entries: list, args: argparse.Namespace, steps: int, processes: int, device: str) -> dict:
    """One pass of pair_batches: seconds to the first batch and in all, this process's CPU seconds."""
    started, cpu = time.perf_counter(), time.process_time()
    first = None
    batches = pair_batches(
        shards, entries, spec=InputSpec(args.size), batch_size=args.batch, loader_workers=processes,
        shuffle_buffer=SHUFFLE_BUFFER, split_nodes=False, max_batches=steps, device=device,
    )  # fmt: skip
    for batch in batches:
        batch.to(device, non_blocking=True)
        if first is None:
            first = time.perf_counter() - started
    _sync(device)
    return {"seconds": time.perf_counter() - started, "first": first, "cpu": time.process_time() - cpu}


@contextlib.contextmanager
def unverified_reads() -> Iterator[None]:
    """sm_feed's reads in this process without digest verification (``read_entry(verify=False)``);
    loader processes import their own sm_feed and still verify."""
    verified = sm_feed.batches.read_entry
    sm_feed.batches.read_entry = functools.partial(verified, verify=False)
    try:
        yield
    finally:
        sm_feed.batches.read_entry = verified


def unverified_feed(shards: Location, entries: list, args: argparse.Namespace, steps: int, device: str) -> dict:
    """(2) with digests not verified."""
    with unverified_reads():
        return feed(shards, entries, args, steps, 0, device)


def median_feeds(shards, entries, args, steps, device) -> tuple[dict, dict, dict]:
    """(2), (3) and (2) without digest verification, their passes taking turns (a busy machine
    slows all alike; every other round in reverse order, so none always comes first), medians."""
    passes = (
        lambda: feed(shards, entries, args, steps, 0, device),
        lambda: feed(shards, entries, args, steps, args.processes, device),
        lambda: unverified_feed(shards, entries, args, steps, device),
    )
    runs = [_in_turns(passes, turn) for turn in range(args.repeats)]
    return tuple({key: statistics.median(run[at][key] for run in runs) for key in runs[0][at]} for at in (0, 1, 2))


def _in_turns(passes: tuple[Callable[[], Any], ...], turn: int) -> list[Any]:
    """The results of ``passes``, in their order, run in that order in even rounds and in
    reverse in odd ones."""
    order = range(len(passes)) if turn % 2 == 0 else reversed(range(len(passes)))
    results = {at: passes[at]() for at in order}
    return [results[at] for at in range(len(passes))]


class ReadOnly(PieceReader):
    """The loader processes' work alone: pieces read, checked and resized, chunks built and
    counted; each process sends its pid, the pairs and its CPU seconds so far, nothing else."""

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        for chunk in super().__iter__():
            yield os.getpid(), len(chunk.keys), time.process_time()


class UnverifiedReadOnly(ReadOnly):
    """:class:`ReadOnly` with digests not verified (``read_entry(verify=False)``)."""

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for piece in range(worker, len(self.pieces), workers):
            samples = read_entry(self.shards, self.pieces[piece], self.index, image_map=self.spec.resize, verify=False)
            for chunk in piece_chunks(samples, piece, self.spec.size, self.chunk_pairs):
                yield os.getpid(), len(chunk.keys), time.process_time()


def read_only(
    shards: Location, entries: list, index: dict, args, processes: int, verify: bool = True, repeats: int | None = None
) -> tuple[float, float]:
    """Median seconds of the loader processes' work alone, and their CPU seconds in all."""
    kind = ReadOnly if verify else UnverifiedReadOnly
    reader = kind(shards, plan_pieces(shards, entries, index, processes, args.size), index, InputSpec(args.size))

    def one_pass() -> float:
        cpu = {pid: seconds for pid, _, seconds in stream_loader(reader, processes)}
        return sum(cpu.values())

    seconds, cpu = median_time(one_pass, repeats or args.repeats)
    return seconds, cpu


def read_only_both(shards: Location, entries: list, index: dict, args, processes: int) -> tuple[float, float]:
    """Median seconds of the loader processes' work alone with digest verification and without,
    their passes taking turns."""
    passes = (
        lambda: read_only(shards, entries, index, args, processes, repeats=1)[0],
        lambda: read_only(shards, entries, index, args, processes, verify=False, repeats=1)[0],
    )
    runs = [_in_turns(passes, turn) for turn in range(args.repeats)]
    return statistics.median(run[0] for run in runs), statistics.median(run[1] for run in runs)


def reader_seconds(shards: Location, entries: list, index: dict, repeats: int) -> dict[bool, dict[str, float]]:
    """The reader alone in this process: every pair checked, each image decoded once, no resize;
    ``{verify: {"seconds", "cpu"}}`` medians with digest verification and without, their passes
    taking turns (every other round in reverse order)."""
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for turn in range(repeats):
        for verify in (True, False) if turn % 2 == 0 else (False, True):
            started, cpu = time.perf_counter(), time.process_time()
            for entry in entries:
                for _ in read_entry(shards, entry, index, verify=verify):
                    pass
            runs[verify].append((time.perf_counter() - started, time.process_time() - cpu))
    return {
        verify: {"seconds": statistics.median(r[0] for r in run), "cpu": statistics.median(r[1] for r in run)}
        for verify, run in runs.items()
    }


# ---- (4) the device: training and evaluation ---------------------------------------------------


def model_figures(shards: Location, entries: list, args: argparse.Namespace, device: torch.device) -> dict:
    from sm_eval.plan import read_split_plan
    from sm_eval.predict import eval_batches, predict_batch
    from sm_eval.runner import DTYPES, EvalSettings, worker_records
    from sm_model.checkpoint import save_checkpoint
    from sm_model.factory import create_model
    from sm_train.augment import PairAugmentation
    from sm_train.config import load_config
    from sm_train.loop import autocast_dtype_for, build_optimizer, train_step

    overrides = ["model.weights=null", f"model.image_size={args.size}", f"train.batch_size={args.train_batch}"]
    if args.quick:
        overrides += ["model.backbone=dinov2_vits14", "model.simplematch.decoder_channels=32", "model.window_size=7"]
    config = load_config(REPO_ROOT / "configs/dinov2_vitb14_252_spair.yaml", overrides)
    dtype = autocast_dtype_for(config.train.precision, device)
    torch.manual_seed(0)
    model = create_model(config.model).to(device)
    optimizer = build_optimizer(config.optim, model)
    augment = PairAugmentation(config.augment).to(device)
    plan = plan_epoch(split_shards(shards, args.split), 1, config.train.batch_size, 0, 0)
    steps = min(plan.steps, args.train_steps + 1)
    processes = min(args.train_processes, os.cpu_count() or 1)

    def step(batch) -> torch.Tensor:
        return train_step(model, model, augment, optimizer, batch, config, dtype)

    def batches(count: int, loader_workers: int):
        return pair_batches(
            shards, plan.ranks[0], spec=model.input_spec, batch_size=config.train.batch_size,
            loader_workers=loader_workers, shuffle_buffer=SHUFFLE_BUFFER,
            split_nodes=False, max_batches=count, device=device,
        )  # fmt: skip

    resident = next(iter(batches(1, 0)))
    for _ in range(3):
        step(resident)  # warm-up: kernels, autotuning, the allocator
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps - 1):
        step(resident)
    _sync(device)
    resident_rate = (steps - 1) * config.train.batch_size / (time.perf_counter() - started)

    stamps = []
    for batch in batches(steps, processes):
        step(batch)
        stamps.append(time.perf_counter())
    _sync(device)
    stamps[-1] = time.perf_counter()
    fed_rate = (len(stamps) - 1) * config.train.batch_size / (stamps[-1] - stamps[0])

    split = read_split_plan(shards, args.split)
    settings = EvalSettings(
        batch_size=args.eval_batch, loader_workers=processes, threads=torch.get_num_threads(),
        device=device.type, dtype="bfloat16" if dtype is not None else "float32",
    )  # fmt: skip
    names = list(split.shard_counts)
    model.eval()
    resident_batches = list(
        eval_batches(
            shards, names, split.shard_of, spec=model.input_spec, batch_size=args.eval_batch, device=device,
        )
    )  # fmt: skip
    with torch.no_grad():
        for batch in resident_batches[:2]:
            predict_batch(model, batch, DTYPES[settings.dtype])  # warm-up
        _sync(device)
        started = time.perf_counter()
        for batch in resident_batches:
            predict_batch(model, batch, DTYPES[settings.dtype])
        _sync(device)
    predict_rate = split.num_pairs / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as scratch:
        save_checkpoint(model, Path(scratch) / "model.pt")
        checkpoint = (Path(scratch) / "model.pt").read_bytes()
    started, stamps, pairs = time.perf_counter(), [], []
    for records in worker_records(checkpoint, shards, names, split.shard_of, settings):
        stamps.append(time.perf_counter())
        pairs.append(len(set(records.pair_key.tolist())))
    eval_rate = (sum(pairs) - pairs[0]) / (stamps[-1] - stamps[0])
    return {
        "train_batch": config.train.batch_size,
        "train_processes": processes,
        "train_steps": steps,
        "resident_pairs_per_s": resident_rate,
        "fed_pairs_per_s": fed_rate,
        "fed_over_resident": fed_rate / resident_rate,
        "predict_pairs_per_s": predict_rate,
        "eval_pairs_per_s": eval_rate,
        "eval_over_predict": eval_rate / predict_rate,
        "eval_first_batch_s": stamps[0] - started,
        "eval_batch": args.eval_batch,
        "precision": str(dtype).replace("torch.", "") if dtype is not None else "float32",
    }


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2, help="loader processes in (3)")
    parser.add_argument("--size", type=int, default=252, help="network input side")
    parser.add_argument("--batch", type=int, default=8, help="pairs per batch in (1)-(3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per figure (median)")
    parser.add_argument(
        "--reader-repeats", type=int, default=7, help="timed passes of the reader alone, with and without verification"
    )
    parser.add_argument("--images-per-category", type=int, default=100)
    parser.add_argument("--pairs-per-category", type=int, default=800, help="training pairs per category (5)")
    parser.add_argument("--shards", help="read these shards instead of generating a demo set")
    parser.add_argument("--split", default="trn")
    parser.add_argument("--model-figures", action="store_true", help="measure (4) on --device even on the CPU")
    parser.add_argument("--quick", action="store_true", help="a small demo set and, for (4), a tiny model")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=30, help="timed training steps in (4)")
    parser.add_argument("--train-processes", type=int, default=8, help="loader processes in (4), at most")
    parser.add_argument("--eval-batch", type=int, default=32)
    args = parser.parse_args()
    if args.quick:
        args.images_per_category, args.pairs_per_category = 20, 60
        args.train_batch, args.train_steps, args.eval_batch, args.size = 4, 4, 4, 56
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(1)  # (1)-(3) do no tensor maths worth threads; a loader process has one too

    with tempfile.TemporaryDirectory(prefix="bench-feed-") as scratch:
        if args.shards:
            shards = Location(args.shards)
        else:
            print("generating and sharding a demo training split ...", flush=True)
            size = (400, 300)
            shards = make_shards(Path(scratch), args.images_per_category, args.pairs_per_category, size)
        counts = split_shards(shards, args.split)
        plan = plan_epoch(counts, 1, args.batch, seed=0, epoch=0)
        entries, pairs = plan.ranks[0], plan.steps * args.batch
        index = index_rows(shards, {name: shards.full(name) for name in counts})
        images = sum(
            len({r["src_image"] for r in rows.values()} | {r["trg_image"] for r in rows.values()})
            for rows in index.values()
        )
        print(
            f"{shards.url} split {args.split}: {pairs} pairs of {images} images in {len(counts)} shards; "
            f"{args.size} px, batch {args.batch}, {args.repeats} passes each (median); "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before"
        )
        phases = floor(shards, entries, index, args.size, args.batch, pairs, args.repeats)
        floor_s = sum(phases.values())
        reader = reader_seconds(shards, entries, index, args.reader_repeats)
        reader_s, reader_unverified_s = reader[True]["seconds"], reader[False]["seconds"]
        feed(shards, entries, args, 2, args.processes, device)  # starts the forkserver (untimed)
        in_process, loader, in_unverified = median_feeds(shards, entries, args, plan.steps, device)
        read_one, _ = read_only(shards, entries, index, args, 0)
        read_many, workers_cpu = read_only(shards, entries, index, args, args.processes)
        read_many_verified, read_many_unverified = read_only_both(shards, entries, index, args, args.processes)
        load_after = os.getloadavg()[0]
        gpu = (
            model_figures(shards, entries, args, torch.device(device)) if device == "cuda" or args.model_figures else {}
        )

    rate = {
        name: pairs / seconds
        for name, seconds in (
            ("floor", floor_s),
            ("in", in_process["seconds"]),
            ("loader", loader["seconds"]),
            ("in_unverified", in_unverified["seconds"]),
        )
    }
    verify_cost = {
        "reader": 1 - reader_unverified_s / reader_s,
        "in_process": 1 - rate["in"] / rate["in_unverified"],
        "read_only_processes": 1 - read_many_unverified / read_many_verified,
        # CPU seconds in this process: less at the mercy of other load than the wall clock.
        "reader_cpu": 1 - reader[False]["cpu"] / reader[True]["cpu"],
        "in_process_cpu": 1 - in_unverified["cpu"] / in_process["cpu"],
    }
    verify_us = {name: (seconds / pairs * 1e6) for name, seconds in (
        ("reader_cpu", reader[True]["cpu"]), ("reader_unverified_cpu", reader[False]["cpu"]),
        ("in_process_cpu", in_process["cpu"]), ("in_process_unverified_cpu", in_unverified["cpu"]),
    )}  # fmt: skip
    bound_in = floor_s / (reader_s + phases["resize"] + phases["copy"])
    us = {phase: seconds / pairs * 1e6 for phase, seconds in phases.items()}
    checks_us = (reader_s - phases["decode"]) / pairs * 1e6
    steady = (pairs - args.batch) / (loader["seconds"] - loader["first"])
    # (3) on C cores does at most C x the work (2) does per second: its CPU per pair is this
    # process's plus the loader processes' (their reading alone, measured apart: a lower bound).
    cores = min(os.cpu_count() or 1, args.processes + 1)
    loader_cpu = loader["cpu"] + workers_cpu
    bound_loader = min(cores * in_process["cpu"] / loader_cpu, read_one / read_many)
    print(f"\n{'':52} {'pairs/s':>9}  {'ratio':>6}  goal      bound")
    print(
        f"(1) floor: decode + resize each image once, copy pairs {rate['floor']:9.0f}  "
        f"         decode {us['decode']:.0f} + resize {us['resize']:.0f} + copy {us['copy']:.0f} us/pair"
    )
    print(
        f"(2) in one process (pair_batches, no loader process)  {rate['in']:9.0f}  {rate['in'] / rate['floor']:6.2f}"
        f"  >= 0.8    <= {bound_in:.2f}: the reader alone takes {reader_s / pairs * 1e6:.0f} us/pair, "
        f"{checks_us:.0f} of them beyond decoding (tar, JSON, index, sharder checks)"
    )
    print(
        f"(3) {args.processes} loader processes -> batches -> {device:4}              {rate['loader']:9.0f}  "
        f"{rate['loader'] / rate['in']:6.2f}  >= 1.7    <= {bound_loader:.2f}: it spends "
        f"{loader_cpu / pairs * 1e6:.0f} us CPU per pair (this process {loader['cpu'] / pairs * 1e6:.0f}, loader "
        f"processes >= {workers_cpu / pairs * 1e6:.0f}) against {in_process['cpu'] / pairs * 1e6:.0f} in one process, "
        f"on {cores} cores; {args.processes} processes that only read reach {read_one / read_many:.2f} x one here "
        f"(load average {load_after:.2f} after)"
    )
    print(
        f"    first batch {loader['first']:.2f} s (in one process {in_process['first']:.2f} s); after it "
        f"{steady:.0f} pairs/s"
    )
    print(
        f"digest verification (on by default) against verify=False, pairs/s: the reader alone "
        f"{pairs / reader_s:.0f} vs {pairs / reader_unverified_s:.0f} ({verify_cost['reader']:.1%}); "
        f"(2) {rate['in']:.0f} vs {rate['in_unverified']:.0f} ({verify_cost['in_process']:.1%}, goal <= 10%); "
        f"{args.processes} loader processes reading alone {pairs / read_many_verified:.0f} vs "
        f"{pairs / read_many_unverified:.0f} ({verify_cost['read_only_processes']:.1%})"
    )
    print(
        f"    CPU in this process: the reader alone {verify_us['reader_cpu']:.0f} vs "
        f"{verify_us['reader_unverified_cpu']:.0f} us/pair ({verify_cost['reader_cpu']:.1%}), (2) "
        f"{verify_us['in_process_cpu']:.0f} vs {verify_us['in_process_unverified_cpu']:.0f} us/pair "
        f"({verify_cost['in_process_cpu']:.1%})"
    )
    if gpu:
        print(
            f"(4) train_step, batch {gpu['train_batch']}, {gpu['precision']}: resident {gpu['resident_pairs_per_s']:.1f}, "
            f"fed by {gpu['train_processes']} loader processes {gpu['fed_pairs_per_s']:.1f} pairs/s: "
            f"{gpu['fed_over_resident']:.3f} (goal >= 0.95)"
        )
        print(
            f"    sm_eval prediction loop {gpu['eval_pairs_per_s']:.1f} pairs/s after its first batch "
            f"({gpu['eval_first_batch_s']:.2f} s), predict_batch alone {gpu['predict_pairs_per_s']:.1f}: "
            f"{gpu['eval_over_predict']:.3f} (goal >= 0.9)"
        )
    figures = {
        "device": device,
        "cores": os.cpu_count(),
        "pairs": pairs,
        "images": images,
        "shards": len(counts),
        "size": args.size,
        "batch": args.batch,
        "floor_pairs_per_s": rate["floor"],
        "floor_us_per_pair": us,
        "reader_pairs_per_s": pairs / reader_s,
        "reader_unverified_pairs_per_s": pairs / reader_unverified_s,
        "reader_verify_cost": verify_cost["reader"],
        "in_process_unverified_pairs_per_s": rate["in_unverified"],
        "in_process_verify_cost": verify_cost["in_process"],
        "read_only_processes_pairs_per_s": pairs / read_many_verified,
        "read_only_processes_unverified_pairs_per_s": pairs / read_many_unverified,
        "read_only_processes_verify_cost": verify_cost["read_only_processes"],
        "reader_verify_cost_cpu": verify_cost["reader_cpu"],
        "in_process_verify_cost_cpu": verify_cost["in_process_cpu"],
        "verify_cpu_us_per_pair": verify_us,
        "in_process_pairs_per_s": rate["in"],
        "in_process_over_floor": rate["in"] / rate["floor"],
        "in_process_bound_over_floor": bound_in,
        "in_process_first_batch_s": in_process["first"],
        "loader_pairs_per_s": rate["loader"],
        "loader_processes": args.processes,
        "loader_over_in_process": rate["loader"] / rate["in"],
        "loader_bound_over_in_process": bound_loader,
        "loader_cpu_us_per_pair": loader_cpu / pairs * 1e6,
        "in_process_cpu_us_per_pair": in_process["cpu"] / pairs * 1e6,
        "read_only_speedup": read_one / read_many,
        "loader_first_batch_s": loader["first"],
        "loader_steady_pairs_per_s": steady,
        "loader_main_cpu_us_per_pair": loader["cpu"] / pairs * 1e6,
        "load_average": [round(os.getloadavg()[0], 2), round(load_after, 2)],
        **gpu,
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    assert "ray" not in sys.modules, "bench_feed must run where Ray is not installed"


if __name__ == "__main__":
    main()
