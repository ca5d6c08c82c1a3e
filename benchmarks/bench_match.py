"""Encode once, match many: what a point costs once a pair is encoded.

A zero-shot DINOv2 ViT-S/14 (random weights: the cost does not depend on them) at 448 px on two
synthetic images, measured side by side in one run:

1. ``match_points`` with a 30 x 30 grid over ``match_points`` with a 3 x 3 grid (goal: at most 1.3),
   both encoding the pair once;
2. one ``match`` call for one point against the cached encoding (goal: at most 50 ms on the CPU),
   beside the time to encode the pair.

    python benchmarks/bench_match.py [--size 448] [--repeats 5] [--threads N]

The last line is one JSON document of the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from sm_eval.match import encode_pair, grid_points, match_encoded, match_points
from sm_model.factory import RANDOM_WEIGHTS, create_model

GRID_RATIO_GOAL = 1.3
ONE_POINT_GOAL_MS = 50.0


def median_seconds(runs: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each of ``runs`` (name -> callable) over ``repeats`` calls, after one
    warm-up call each; the calls take turns, so that a busy machine slows all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=448, help="network input side (default 448)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_model("zero-shot:dinov2_vits14", backbone_weights=RANDOM_WEIGHTS, image_size=args.size).eval()
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    trg = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    width, height = src.shape[1], src.shape[0]
    small, large = grid_points(width, height, 3), grid_points(width, height, 30)

    pair = encode_pair(model, src, trg)
    one_point = np.array([[width / 2, height / 2]])
    seconds = median_seconds(
        {
            "small": lambda: match_points(model, src, trg, small),
            "large": lambda: match_points(model, src, trg, large),
            "encode": lambda: encode_pair(model, src, trg),
        },
        args.repeats,
    )
    small_s, large_s, encode_s = seconds["small"], seconds["large"], seconds["encode"]
    match_s = median_seconds({"one": lambda: match_encoded(model, pair, one_point)}, max(args.repeats, 20))["one"]

    ratio = large_s / small_s
    print(f"zero-shot dinov2_vits14 at {args.size} px, {torch.get_num_threads()} threads, CPU")
    print(
        f"1. match_points, 30 x 30 grid: {large_s * 1e3:.0f} ms; 3 x 3 grid: {small_s * 1e3:.0f} ms; "
        f"ratio {ratio:.3f} (goal <= {GRID_RATIO_GOAL})"
    )
    print(
        f"2. one point against the cached encoding: {match_s * 1e3:.1f} ms (goal <= {ONE_POINT_GOAL_MS:.0f} ms); "
        f"encoding the pair: {encode_s * 1e3:.0f} ms"
    )
    figures = {
        "size": args.size,
        "threads": torch.get_num_threads(),
        "grid30_ms": round(large_s * 1e3, 1),
        "grid3_ms": round(small_s * 1e3, 1),
        "grid_ratio": round(ratio, 3),
        "one_point_match_ms": round(match_s * 1e3, 2),
        "encode_ms": round(encode_s * 1e3, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
