"""The viewer's click: its handler's time, and its round trip in the browser beside Gradio's own.

A zero-shot DINOv2 ViT-S/14 (random weights: the cost does not depend on them) at 448 px on two
photos at 640 x 480 and 500 x 375 (the sizes of benchmarks/bench_match.py), measured side by side:

1. the click handler in this process, as the Match tab runs it: the click mapped to source pixels,
   one ``match`` against the pair encoded once (with the score map), the picture redrawn (both
   images, every point, the heat map) and the points table (goal: at most 50 ms);
2. in headless Chromium (Debian's ``chromium`` through Playwright), against ``python -m
   sm_eval.viewer`` in its own process: a click's round trip (from the click to the new match
   shown and its picture loaded) beside the round trip of a handler that does nothing, taking
   turns (goal: at most 50 ms more), with the handler's own time as the page reports it.

    python benchmarks/bench_viewer.py [--size 448] [--clicks 30] [--threads N]

The last line is one JSON document of the figures (the browser's are null when no Chromium is found).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.viewer_page drives the browser

from sm_eval.match import load_match_model  # noqa: E402
from sm_eval.viewer import match_view  # noqa: E402
from tests.viewer_page import (  # noqa: E402
    CHROMIUM_ARGS,
    ViewerPage,
    find_chromium,
    free_port,
    handler_ms,
    running_viewer,
)

HANDLER_GOAL_MS = 50.0
EXTRA_ROUND_TRIP_GOAL_MS = 50.0


def images() -> tuple[np.ndarray, np.ndarray]:
    """Two photos (scikit-image's coffee and cat) at 640 x 480 and 500 x 375: the picture sent per
    click is a JPEG of them, whose size (and so the round trip) depends on the content, unlike the
    model's cost; noise would make it several times larger than any photo's."""
    from skimage import data

    return (
        np.asarray(Image.fromarray(data.coffee()).resize((640, 480), Image.BILINEAR)),
        np.asarray(Image.fromarray(data.chelsea()).resize((500, 375), Image.BILINEAR)),
    )


def click_positions(count: int, width: int, height: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(1)
    return [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(count)]


def handler_in_process(size: int, clicks: int) -> dict[str, float]:
    model = load_match_model("zero-shot:dinov2_vits14", backbone_weights="random", image_size=size)[0]
    src, trg = images()
    session = match_view.load_pair(model, src, trg)
    match_view.warm_up()
    times = []
    for x, y in click_positions(clicks + 1, *session.src_display_size):
        started = time.perf_counter()
        point = match_view.click_point(session, (x, y))
        match_view.add_points(model, session, point[None])
        match_view.session_image(session, heat_map=True)
        pd.DataFrame(match_view.points_table(session))
        match_view.describe_point(session.points[-1])
        times.append(time.perf_counter() - started)
    return {"handler_ms": statistics.median(times[1:]) * 1e3, "encode_ms": session.encode_seconds * 1e3}


def browser_round_trips(size: int, clicks: int, threads: int | None) -> dict[str, float] | None:
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found (Debian's chromium, or $CHROMIUM): the browser round trips are not measured")
        return None
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as folder:
        root = Path(folder)
        paths = [root / "source.png", root / "target.png"]
        for path, image in zip(paths, images()):
            Image.fromarray(image).save(path)
        port = free_port()
        args = ["--model", "zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size", str(size),
                "--root", str(root), *(["--threads", str(threads)] if threads else [])]  # fmt: skip
        with running_viewer(args, port, root / "viewer.log"), sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(120_000)
                viewer = ViewerPage(page, f"http://127.0.0.1:{port}/")
                viewer.open()
                viewer.load_pair(str(paths[0]), str(paths[1]))
                viewer.click_source(320, 240)  # warm-up
                viewer.round_trip_ms("noop")
                noop, click, handler = [], [], []
                for x, y in click_positions(clicks, 640, 480):
                    noop.append(viewer.round_trip_ms("noop"))
                    click.append(viewer.round_trip_ms("click", x, y))
                    handler.append(handler_ms(viewer.match_status() + viewer.last_match()))
            finally:
                browser.close()
    return {
        "noop_round_trip_ms": statistics.median(noop),
        "click_round_trip_ms": statistics.median(click),
        "page_handler_ms": statistics.median(handler),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=448, help="network input side (default 448)")
    parser.add_argument("--clicks", type=int, default=30, help="clicks measured (default 30)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    local = handler_in_process(args.size, args.clicks)
    print(f"zero-shot dinov2_vits14 at {args.size} px, {torch.get_num_threads()} threads, CPU")
    print(
        f"1. click handler in this process: {local['handler_ms']:.1f} ms (goal <= {HANDLER_GOAL_MS:.0f} ms); "
        f"encoding the pair once: {local['encode_ms']:.0f} ms"
    )
    browser = browser_round_trips(args.size, args.clicks, args.threads)
    figures = {"size": args.size, "threads": torch.get_num_threads(), "clicks": args.clicks,
               "handler_ms": round(local["handler_ms"], 1), "encode_ms": round(local["encode_ms"], 1)}  # fmt: skip
    if browser is None:
        figures |= {"noop_round_trip_ms": None, "click_round_trip_ms": None, "extra_round_trip_ms": None,
                    "page_handler_ms": None}  # fmt: skip
    else:
        extra = browser["click_round_trip_ms"] - browser["noop_round_trip_ms"]
        print(
            f"2. in Chromium: a click's round trip {browser['click_round_trip_ms']:.0f} ms, a no-op handler's "
            f"{browser['noop_round_trip_ms']:.0f} ms: {extra:.0f} ms more (goal <= {EXTRA_ROUND_TRIP_GOAL_MS:.0f} ms); "
            f"the handler as the page reports it: {browser['page_handler_ms']:.1f} ms"
        )
        figures |= {key: round(value, 1) for key, value in browser.items()} | {"extra_round_trip_ms": round(extra, 1)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
