"""python -m sm_eval.viewer in a real headless Chromium (Debian's ``chromium``, driven by
Playwright with the system browser as its executable; ``.ci/run`` installs it when missing).

One viewer for the module: a random zero-shot ViT-S/14 at 56 px, an upload cap of 1 MiB, the
session's temporary directory as its only root. The tests click a source point at a feature-cell
centre and check the match shown against ``sm_eval.match``; open an evaluation made by ``sm_eval``
on the demo shards and check the per-category PCK shown against ``report.json``; feed it a
non-image, a decompression bomb, an oversized upload and paths outside its root and check it says
so and still answers clicks; time a click's round trip beside the framework's no-op round trip;
and save screenshots (``$SM_VIEWER_SCREENSHOTS`` when set, else a temporary folder). They skip only
when no Chromium can be found."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.imageio import MAX_IMAGE_PIXELS
from sm_eval.__main__ import main as sm_eval_main
from sm_eval.match import load_match_model, match_points
from sm_eval.viewer.eval_view import percent
from tests.viewer_page import CHROMIUM_ARGS, ViewerPage, find_chromium, free_port, handler_ms, running_viewer

pytestmark = pytest.mark.browser

CELL = (55, 45)
"""One feature cell of the 220 x 180 test image at 56 px (4 x 4 cells), in original pixels."""
ROUND_TRIPS = 8


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("no Chromium found (install Debian's chromium, or set CHROMIUM): the browser tests need one")
    return found


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test's inputs, in a folder under the viewer's root."""
    folder = tmp_path_factory.mktemp("viewer-files")
    rng = np.random.default_rng(0)
    paths = {name: folder / name for name in ("noise.png", "notes.png", "bomb.png", "big.png")}
    Image.fromarray(rng.integers(0, 256, (180, 220, 3), dtype=np.uint8)).save(paths["noise.png"])
    paths["notes.png"].write_text("a text file named like an image\n")
    Image.new("1", (12_000, MAX_IMAGE_PIXELS // 12_000 + 1)).save(paths["bomb.png"])  # 13 kB, 90 Mpixel
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(paths["big.png"])  # 1.4 MB
    assert paths["big.png"].stat().st_size > 2**20
    return paths


@pytest.fixture(scope="module")
def evaluation(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("viewer-eval") / "eval"
    argv = ["--model", "zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size", "56",
            "--shards", str(demo_shards), "--out", str(out), "--split", "test", "--threads", "2",
            "--loader-workers", "0", "--matches", "0", "--no-progress", "--log-level", "WARNING"]  # fmt: skip
    assert sm_eval_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("SM_VIEWER_SCREENSHOTS") or tmp_path_factory.mktemp("viewer-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def viewer(chromium, files, tmp_path_factory: pytest.TempPathFactory):
    """The page of a running viewer, one browser for the module."""
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.getbasetemp()
    port = free_port()
    args = ["--model", "zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size", "56",
            "--root", str(root), "--max-upload-mb", "1", "--threads", "2"]  # fmt: skip
    with running_viewer(args, port, root / "viewer.log"), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            viewer = ViewerPage(page, f"http://127.0.0.1:{port}/")
            viewer.open()
            yield viewer
        finally:
            browser.close()


def _save(viewer: ViewerPage, folder: Path, name: str) -> Path:
    path = folder / name
    viewer.page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def test_a_click_shows_the_match_sm_eval_match_gives(viewer: ViewerPage, files, screenshots: Path) -> None:
    image = str(files["noise.png"])
    # The same image as source (uploaded) and target (by path).
    status = viewer.load_pair(upload=image, target=image)
    assert "Loaded noise.png (220 x 180)" in status
    model = load_match_model("zero-shot:dinov2_vits14", backbone_weights="random", image_size=56)[0]
    pixels = np.asarray(Image.open(image).convert("RGB"))
    for cell in ((1, 1), (3, 0)):  # cell centres: x = 55 j + 27, y = 45 i + 22
        click = (CELL[0] * cell[0] + 27, CELL[1] * cell[1] + 22)
        sx, sy, tx, ty, score = viewer.click_source(*click)
        assert (sx, sy) == click
        expected = match_points(model, pixels, pixels, np.array([[sx, sy]]))
        assert (tx, ty) == tuple(np.round(expected.target_points[0], 2))
        assert score == round(float(expected.scores[0]), 4)
        assert abs(tx - click[0]) <= CELL[0] and abs(ty - click[1]) <= CELL[1]
        assert handler_ms(viewer.match_status()) > 0
    rows = viewer.table_rows("#match-table")
    assert [row[:2] for row in rows] == [["1", "blue"], ["2", "orange"]]
    _save(viewer, screenshots, "viewer-match.png")

    # The click's round trip beside the framework's own, for a handler that does nothing.
    noop, clicks, handlers = [], [], []
    for index in range(ROUND_TRIPS):
        noop.append(viewer.round_trip_ms("noop"))
        clicks.append(viewer.round_trip_ms("click", 10 + 25 * index, 170 - 20 * index))
        handlers.append(handler_ms(viewer.match_status()))
    figures = {
        "image_size": 56,
        "noop_round_trip_ms": round(statistics.median(noop), 1),
        "click_round_trip_ms": round(statistics.median(clicks), 1),
        "click_handler_ms": round(statistics.median(handlers), 1),
    }
    (screenshots / "viewer-round-trips.json").write_text(json.dumps(figures) + "\n")
    print(f"\nviewer round trips at 56 px: {json.dumps(figures)}")
    assert all(0 < value < 10_000 for value in noop + clicks)

    viewer.page.click("#clear-points")
    viewer.page.wait_for_function("() => document.querySelectorAll('#match-table .virtual-row').length === 0")


def test_the_evaluation_tab_shows_report_json_figures(viewer: ViewerPage, evaluation: Path, screenshots: Path) -> None:
    report = json.loads((evaluation / "report.json").read_text())
    status = viewer.open_evaluation(str(evaluation))
    assert status.startswith("Opened"), status
    column = report["alphas"].index(report["table_alpha"])
    for frame in ("original", "resized"):
        if frame == "resized":
            viewer.page.get_by_label("resized").check()
            viewer.page.wait_for_function(
                "() => document.querySelector('#category-note').innerText.includes('results.resized')"
            )
        rows = {row[0]: row for row in viewer.table_rows("#category-table")}
        reported = report["models"][0]["results"][frame]
        assert set(rows) == {*reported["per_category"], "all"}
        for category in ("cat", "all"):
            scores = reported["overall"] if category == "all" else reported["per_category"][category]
            assert rows[category][3] == percent(scores["per_image"][column])
            assert rows[category][4] == percent(scores["per_keypoint"][column])
            assert rows[category][5] == "equal"
        assert "every figure equals report.json's" in viewer.status("#category-note")

    # Filter the pairs by category, then draw one.
    viewer.page.click("#filter-category input")
    viewer.page.get_by_role("option", name="cup", exact=True).click()
    viewer.page.wait_for_function(
        "() => { const cells = document.querySelectorAll('#pairs-table [role=gridcell][data-col=\"1\"]'); "
        "return cells.length > 0 && Array.from(cells).every(c => c.innerText.trim() === 'cup'); }"
    )
    pairs = viewer.table_rows("#pairs-table")
    assert len(pairs) == report["models"][0]["results"]["resized"]["per_category"]["cup"]["n_pairs"]
    viewer.click_cell("#pairs-table", 0, 0)
    viewer.page.wait_for_function(
        "(key) => document.querySelector('#pair-key input, #pair-key textarea').value === key", arg=pairs[0][0]
    )
    viewer.page.wait_for_function(
        "() => { const i = document.querySelector('#pair-view img'); return i && i.complete && i.naturalWidth > 0; }"
    )
    _save(viewer, screenshots, "viewer-evaluation.png")


def test_bad_input_is_refused_and_the_server_stays_up(
    viewer: ViewerPage, files, evaluation: Path, screenshots: Path
) -> None:
    viewer.page.get_by_role("tab", name="Match").click()
    image = str(files["noise.png"])
    viewer.load_pair(source=image, target=image)
    for name, words in (("notes.png", "not an image"), ("bomb.png", "decompression bomb")):
        viewer.upload_source(str(files[name]))
        status = viewer.wait_match_status(f"({name})")
        assert name in status and words in status, status
    viewer.upload_source(str(files["big.png"]))  # over the 1 MiB cap: refused before it is sent
    viewer.page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.toast-body')).some(t => t.innerText.includes('exceed'))"
    )
    _save(viewer, screenshots, "viewer-refused.png")
    viewer.page.fill(
        "#source-path :is(input, textarea)", str(files["noise.png"].parent / ".." / ".." / ".." / "etc" / "passwd")
    )
    viewer.page.click("#load-pair")
    assert "outside the viewer's roots" in viewer.wait_match_status("outside")
    # The pair loaded before still answers clicks.
    sx, sy, tx, ty, _ = viewer.click_source(27, 22)
    assert (sx, sy) == (27, 22) and abs(tx - 27) <= CELL[0] and abs(ty - 22) <= CELL[1]

    viewer.page.get_by_role("tab", name="Evaluation").click()
    for folder, words in (("/", "outside the viewer's roots"), (str(files["noise.png"].parent), "no report.json")):
        assert words in viewer.open_evaluation(folder)
    assert viewer.open_evaluation(str(evaluation)).startswith("Opened")
