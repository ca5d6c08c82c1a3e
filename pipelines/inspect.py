"""Look inside a shard directory: counts per split and a PNG of a few pairs with their keypoints.

    python -m pipelines.inspect data/demo-shards --split val --pairs 6 --out preview.png

Each row of the picture is one pair, source left and target right, with a line from every source
keypoint to its ground-truth target keypoint, one colour per keypoint id: the quickest way to see
that keypoints, images and the pairing survived sharding.
"""

from __future__ import annotations

import argparse
import colorsys
import itertools
import json
import logging
import sys

import numpy as np
from PIL import Image, ImageDraw

from pipelines.reader import pair_dataset, split_shards
from pipelines.schema import PairSample
from pipelines.storage import Location

log = logging.getLogger("pipelines.inspect")


def _colour(kp_id: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((kp_id * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_pair(sample: PairSample, height: int = 240) -> Image.Image:
    """Source and target side by side, scaled to ``height``, keypoints joined by lines."""
    scales = [height / sample.src_image.shape[0], height / sample.trg_image.shape[0]]
    src, trg = (
        Image.fromarray(image).resize((round(image.shape[1] * s), height))
        for image, s in zip((sample.src_image, sample.trg_image), scales)
    )
    canvas = Image.new("RGB", (src.width + trg.width, height))
    canvas.paste(src, (0, 0))
    canvas.paste(trg, (src.width, 0))
    draw = ImageDraw.Draw(canvas)
    for kp_id, (sx, sy), (tx, ty) in zip(sample.kps_ids, sample.src_kps, sample.trg_kps):
        # Pixel centres sit at integer coordinates: scale (x + 0.5), not x.
        a = ((sx + 0.5) * scales[0] - 0.5, (sy + 0.5) * scales[0] - 0.5)
        b = ((tx + 0.5) * scales[1] - 0.5 + src.width, (ty + 0.5) * scales[1] - 0.5)
        colour = _colour(int(kp_id))
        draw.line([a, b], fill=colour, width=1)
        for x, y in (a, b):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour, width=2)
    draw.text((4, 4), f"{sample.category} {sample.key}", fill=(255, 255, 255))
    return canvas


def preview(shards: Location, split: str, pairs: int) -> Image.Image:
    """A picture of the first ``pairs`` pairs of ``split``, one pair per row."""
    samples = list(itertools.islice(pair_dataset(shards, split_shards(shards, split)), pairs))
    if not samples:
        raise ValueError(f"{shards.url}: split {split!r} has no pairs")
    rows = [draw_pair(sample) for sample in samples]
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)))
    for offset, row in zip(np.cumsum([0] + [r.height for r in rows]), rows):
        sheet.paste(row, (0, int(offset)))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="shard directory or s3://bucket/prefix")
    parser.add_argument("--split", required=True, help="split to preview")
    parser.add_argument("--pairs", type=int, default=6, help="pairs to draw (default 6)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--s3-endpoint-url", default=None, help="endpoint of an S3-compatible store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shards = Location(args.shards, args.s3_endpoint_url)
    summary = json.loads(shards.read_text("summary.json"))
    for split, counts in summary.items():
        print(f"{split}: {counts['written_pairs']} pairs in {counts['shards']} shards, {counts['rejected_pairs']} rejected")
    preview(shards, args.split, args.pairs).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
