"""Sharding and reading throughput, each measured beside its baseline in one run.

    .venv/bin/python benchmarks/bench_shard.py [--images-per-category 60] [--trn-pairs 1200] [--workers 2]

1. Sharding: ``python -m pipelines.shard demo --workers N`` against ``tar -cf`` of the same raw
   folder (both as fresh processes, page cache warm), as MB/s of input and pairs/s.
   Goal: at least 0.8 of tar's rate with ``--workers 2``. Beside it, the bound any Python sharder
   that validates and rewrites each pair has on this machine: interpreter start with the
   project's imports, plus the least per-pair work (read the annotation file, ``json.loads``,
   ``json.dumps``; no validation, no images, no tar) spread perfectly over the workers.
2. Stored bytes against self-contained pairs (both images inside every pair) on the demo set, an
   SPair-like layout with many pairs per image. Goal: at most 0.1.
3. Reading: the shard reader's pairs/s against decoding the same images straight from the raw
   files with PIL alone, in two ways: both images of every pair (what a loader over the raw
   layout does), and each distinct image of each shard once (the decode work the reader itself
   does: the floor, which leaves out all per-pair work). Goal: at least 0.8. The reader is timed
   with digest verification (every member it uses hashed against ``index.parquet``, the default)
   and without (``verify=False``), the two taking turns (every other round in reverse order), best
   of ``--reader-repeats`` passes each: the difference is a few microseconds per pair, which a
   busy machine easily hides in fewer passes.

Ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.builders.demo import generate
from pipelines.imageio import decode_rgb
from pipelines.reader import pair_dataset, split_shards
from pipelines.storage import Location


def _folder_bytes(root: Path) -> int:
    """Bytes of every file under ``root``; reading them also warms the page cache."""
    return sum(len(p.read_bytes()) for p in root.rglob("*") if p.is_file())


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def python_floor_seconds(raw: Path) -> tuple[float, int]:
    """Seconds this process takes to read, ``json.loads`` and ``json.dumps`` every pair
    annotation under ``raw`` (best of 3), and how many there are."""
    paths = sorted((raw / "PairAnnotation").rglob("*.json"))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for path in paths:
            json.dumps(json.loads(path.read_bytes()))
        best = min(best, time.perf_counter() - start)
    return best, len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-category", type=int, default=60)
    parser.add_argument("--trn-pairs", type=int, default=1200, help="trn pairs per category")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the best counts")
    parser.add_argument(
        "--reader-repeats", type=int, default=7, help="timed reader passes with and without verification; the best counts"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    raw = work / "demo"
    print(f"generating the demo set in {raw} ...", flush=True)
    generate(raw, images_per_category=args.images_per_category, pairs_per_category={"trn": args.trn_pairs, "val": 100, "test": 100})
    input_bytes = _folder_bytes(raw)
    input_files = sum(1 for p in raw.rglob("*") if p.is_file())

    tar_times, shard_times = [], []
    for repeat in range(args.repeats):
        tar_times.append(_timed(["tar", "-cf", str(work / f"raw-{repeat}.tar"), "-C", str(raw), "."]))
        out = work / f"shards-{repeat}"
        shard_times.append(
            _timed([sys.executable, "-m", "pipelines.shard", "demo", "--root", str(raw), "--out", str(out), "--workers", str(args.workers)])
        )
    startup_s = min(_timed([sys.executable, "-c", "import pipelines.shard"]) for _ in range(args.repeats))
    floor_s, annotations = python_floor_seconds(raw)
    out = work / "shards-0"
    summary = json.loads((out / "summary.json").read_text())
    pairs = sum(s["input_pairs"] for s in summary.values())
    tar_s, shard_s = min(tar_times), min(shard_times)

    shards = Location(str(out))
    names = split_shards(shards, "trn")
    reader_times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(args.reader_repeats):  # verified and unverified take turns: a busy machine slows both alike
        for verify in (True, False) if repeat % 2 == 0 else (False, True):
            start = time.perf_counter()
            read_pairs = sum(1 for _ in pair_dataset(shards, names, verify=verify))
            reader_times[verify].append(time.perf_counter() - start)
    reader_s, unverified_s = min(reader_times[True]), min(reader_times[False])
    index = pq.read_table(out / "index.parquet").to_pandas().query("split == 'trn'")
    paths = {}
    for shard, group in index.groupby("shard"):
        for key in set(group.src_image) | set(group.trg_image):
            category, stem = key.split("_", 1)
            paths.setdefault(shard, []).append(raw / "JPEGImages" / category / f"{stem}.jpg")
    start = time.perf_counter()
    for shard_paths in paths.values():
        for path in shard_paths:
            decode_rgb(path.read_bytes())
    pil_once_s = time.perf_counter() - start
    start = time.perf_counter()
    for src_key, trg_key in zip(index.src_image, index.trg_image):
        for key in (src_key, trg_key):
            category, stem = key.split("_", 1)
            decode_rgb((raw / "JPEGImages" / category / f"{stem}.jpg").read_bytes())
    pil_pairs_s = time.perf_counter() - start

    trn = summary["trn"]
    mb = input_bytes / 1e6
    print(f"\ninput: {mb:.1f} MB in {input_files} files, {pairs} pairs (best of {args.repeats} runs each)")
    print(f"{'':28}{'seconds':>10}{'MB/s':>10}{'pairs/s':>10}")
    print(f"{'tar -cf (raw folder)':28}{tar_s:10.2f}{mb / tar_s:10.1f}{pairs / tar_s:10.0f}")
    print(f"{f'pipelines.shard --workers {args.workers}':28}{shard_s:10.2f}{mb / shard_s:10.1f}{pairs / shard_s:10.0f}")
    print(f"shard / tar throughput ratio: {tar_s / shard_s:.2f}   (goal >= 0.8)")
    bound_s = startup_s + floor_s / args.workers
    print(
        f"bound for a Python sharder: start + imports {startup_s:.2f} s, read + json.loads + json.dumps of "
        f"{annotations} annotations {floor_s:.2f} s in one process ({1e6 * floor_s / annotations:.0f} us each, "
        f"tar: {1e6 * tar_s / input_files:.0f} us per file);\n"
        f"  spread perfectly over {args.workers} workers: {bound_s:.2f} s, ratio at most {tar_s / bound_s:.2f}"
    )
    print(
        f"\nstored / self-contained bytes (trn): {trn['payload_bytes_stored'] / 1e6:.1f} MB / "
        f"{trn['payload_bytes_selfcontained'] / 1e6:.1f} MB = {trn['stored_over_selfcontained']:.3f}   (goal <= 0.1)"
    )
    print(f"\n{'':36}{'seconds':>10}{'pairs/s':>10}")
    print(f"{'PIL, both images per pair':36}{pil_pairs_s:10.2f}{read_pairs / pil_pairs_s:10.0f}")
    print(f"{'PIL, each shard image once':36}{pil_once_s:10.2f}{read_pairs / pil_once_s:10.0f}")
    print(f"{'pipelines.reader':36}{reader_s:10.2f}{read_pairs / reader_s:10.0f}")
    print(f"{'pipelines.reader, verify=False':36}{unverified_s:10.2f}{read_pairs / unverified_s:10.0f}")
    print(f"reader / PIL per pair: {pil_pairs_s / reader_s:.2f}   (goal >= 0.8)")
    print(f"reader / PIL each image once: {pil_once_s / reader_s:.2f}   (the decode floor; the rest is per-pair work)")
    verify_cost = 1 - unverified_s / reader_s
    print(
        f"digest verification costs the reader {verify_cost:.1%} of its pairs/s "
        f"({1e6 * (reader_s - unverified_s) / read_pairs:.0f} us per pair)"
    )
    figures = {
        "input_mb": mb,
        "input_files": input_files,
        "pairs": pairs,
        "workers": args.workers,
        "tar_s": tar_s,
        "shard_s": shard_s,
        "shard_over_tar": tar_s / shard_s,
        "python_sharder_bound_over_tar": tar_s / bound_s,
        "stored_over_selfcontained": trn["stored_over_selfcontained"],
        "read_pairs": read_pairs,
        "pil_pairs_per_s": read_pairs / pil_pairs_s,
        "pil_once_pairs_per_s": read_pairs / pil_once_s,
        "reader_pairs_per_s": read_pairs / reader_s,
        "reader_unverified_pairs_per_s": read_pairs / unverified_s,
        "reader_verify_cost": verify_cost,
        "reader_over_pil": pil_pairs_s / reader_s,
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
