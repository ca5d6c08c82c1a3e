"""sm_eval.viewer without a browser: the match helper against sm_eval.match, the security rules
(roots, uploads, decompression bombs, the host), the Match tab's logic, the Evaluation tab's
figures against report.json, and the command line: it binds 127.0.0.1 and nothing else.
tests/test_viewer_browser.py drives the same viewer in headless Chromium."""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.imageio import MAX_IMAGE_PIXELS
from sm_eval.__main__ import main as sm_eval_main
from sm_eval.match import encode_pair, load_match_model, match_encoded, match_encoded_with_maps, match_points
from sm_eval.viewer import eval_view, match_view
from sm_eval.viewer.access import (
    AccessRefused,
    Roots,
    host_warning,
    is_loopback,
    parse_upload_cap,
    read_image_at,
    read_upload,
)
from tests.viewer_page import free_port, running_viewer

EVAL_ARGS = ["--split", "test", "--threads", "2", "--loader-workers", "0", "--matches", "0", "--no-progress",
             "--log-level", "WARNING"]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return load_match_model("zero-shot:dinov2_vits14", backbone_weights="random", image_size=56)[0]


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """220 x 180: with a 56-pixel input (4 x 4 cells of 14 pixels) the cell centres fall on whole
    pixels, x = 55 j + 27 and y = 45 i + 22."""
    return np.random.default_rng(0).integers(0, 256, (180, 220, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def evaluation(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sm_eval output folder of a random zero-shot ViT-S/14 at 56 px on the demo shards."""
    out = tmp_path_factory.mktemp("viewer-eval") / "eval"
    argv = ["--model", "zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size", "56",
            "--shards", str(demo_shards), "--out", str(out), *EVAL_ARGS]  # fmt: skip
    assert sm_eval_main(argv) == 0
    return out


# ---- the match helper ----------------------------------------------------------------------------


def test_match_with_maps_equals_match_encoded(model, noise) -> None:
    pair = encode_pair(model, noise, noise[::-1].copy())
    points = np.array([[27.0, 22.0], [82.0, 67.0], [100.3, 5.9], [-0.5, 179.5]])
    expected = match_encoded(model, pair, points)
    result, maps = match_encoded_with_maps(model, pair, points)
    np.testing.assert_array_equal(result.target_points, expected.target_points)
    np.testing.assert_array_equal(result.scores, expected.scores)
    assert maps.shape == (4, 4, 4) and maps.dtype == np.float32
    np.testing.assert_array_equal(maps.reshape(4, -1).max(axis=1), result.scores.astype(np.float32))
    with pytest.raises(ValueError, match="outside the source image"):
        match_encoded_with_maps(model, pair, [[220.0, 0.0]])


# ---- security rules ------------------------------------------------------------------------------


def test_roots_refuse_paths_that_climb_out(tmp_path: Path) -> None:
    inside = tmp_path / "root"
    (inside / "a").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (inside / "a" / "link").symlink_to(tmp_path / "secret.png")
    roots = Roots.of([str(inside), "s3://bucket/evals"])
    assert roots.check(str(inside / "a" / ".." / "a")) == str(inside / "a")
    for bad in (str(inside / ".." / "secret.png"), str(inside / "a" / "link"), "/etc/passwd", f"{inside}/../root2"):
        with pytest.raises(AccessRefused, match="outside the viewer's roots"):
            roots.check(bad, "image")
    assert roots.check("s3://bucket/evals/run1") == "s3://bucket/evals/run1"
    assert roots.check("s3://bucket/evals") == "s3://bucket/evals"
    for bad in ("s3://bucket/evals2/x", "s3://other/evals/x", "s3://bucket/x"):
        with pytest.raises(AccessRefused, match="outside"):
            roots.check(bad)
    with pytest.raises(AccessRefused, match="'..'"):
        roots.check("s3://bucket/evals/../secret")
    with pytest.raises(AccessRefused, match="NUL"):
        roots.check(f"{inside}/a\0b")
    with pytest.raises(AccessRefused, match="no image given"):
        roots.check("  ", "image")
    assert Roots.of([]).local == (Path.cwd().resolve(),)


def test_host_warning_only_off_loopback() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host) and host_warning(host) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert not is_loopback(host)
        assert "reachable from other machines" in host_warning(host)


def test_uploads_are_bounded_and_decoded_within_the_image_bounds(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    good = uploads / "good.png"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(good)
    assert read_upload(str(good), uploads, 2**20, "source image").shape == (20, 30, 3)
    text = uploads / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"source image \(notes.png\): not an image"):
        read_upload(str(text), uploads, 2**20, "source image")
    bomb = uploads / "bomb.png"  # a few kB declaring more pixels than pipelines.imageio allows
    Image.new("1", (12_000, MAX_IMAGE_PIXELS // 12_000 + 1)).save(bomb)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ValueError, match="too large.*decompression bomb"):
        read_upload(str(bomb), uploads, 2**20, "source image")
    with pytest.raises(ValueError, match="more than the 10 allowed"):
        read_upload(str(good), uploads, 10, "source image")
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(outside)
    with pytest.raises(AccessRefused, match="not an upload"):
        read_upload(str(outside), uploads, 2**20, "source image")
    assert parse_upload_cap(1) == 2**20
    with pytest.raises(ValueError):
        parse_upload_cap(0)


def test_images_by_path_are_read_under_the_roots_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    Image.fromarray(np.full((5, 6, 3), 7, dtype=np.uint8)).save(root / "a.png")
    (tmp_path / "b.png").write_bytes((root / "a.png").read_bytes())
    roots = Roots.of([str(root)])
    assert read_image_at(str(root / "a.png"), roots, None, "source image").shape == (5, 6, 3)
    with pytest.raises(AccessRefused):
        read_image_at(str(root / ".." / "b.png"), roots, None, "source image")
    with pytest.raises(ValueError, match="no such file"):
        read_image_at(str(root / "missing.png"), roots, None, "source image")
    with pytest.raises(ValueError, match="cannot be read"):
        read_image_at(str(root), roots, None, "source image")  # a directory


# ---- the Match tab's logic ---------------------------------------------------------------------


def test_a_click_at_a_cell_centre_matches_as_sm_eval_match(model, noise) -> None:
    session = match_view.load_pair(model, noise, noise)
    assert session.src_display.shape == noise.shape  # shown pixel for pixel
    point = match_view.click_point(session, (82, 67))
    np.testing.assert_array_equal(point, [82.0, 67.0])
    result = match_view.add_points(model, session, point[None])
    expected = match_points(model, noise, noise, point[None])
    np.testing.assert_array_equal(result.target_points, expected.target_points)
    np.testing.assert_array_equal(result.target_points, [[82.0, 67.0]])  # the same image: its own cell
    assert match_view.describe_point(session.points[0]) == (
        f"point 1: source (82.00, 67.00) -> target (82.00, 67.00), score {expected.scores[0]:.4f}"
    )
    match_view.add_points(model, session, np.array([[27.0, 22.0]]))
    picture, heat = match_view.session_picture(session, heat_map=True)
    assert picture.shape == (180, 220 + match_view.GAP + 220, 3)
    assert heat is not None and heat[1] == pytest.approx(session.points[-1].score, abs=1e-6)
    rows = match_view.points_table(session)
    assert [row[:2] for row in rows] == [[1, "blue"], [2, "orange"]]
    assert match_view.click_point(session, (220 + match_view.GAP + 5, 10)) is None  # a click on the target
    match_view.clear_points(session)
    assert match_view.points_table(session) == [] and session.last_map is None


def test_a_large_pair_is_shown_smaller_and_clicks_map_back(model) -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    trg = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    session = match_view.load_pair(model, src, trg)
    assert session.src_display.shape[0] == session.trg_display.shape[0] == match_view.DISPLAY_HEIGHT
    point = match_view.click_point(session, (0, 0))
    scale = 1600 / session.src_display.shape[1]
    np.testing.assert_allclose(point, [0.5 * scale - 0.5, 0.5 * 1200 / match_view.DISPLAY_HEIGHT - 0.5])
    back = match_view.original_to_display(point, session.source_size, session.src_display_size)
    np.testing.assert_allclose(back, [0, 0], atol=1e-9)
    with pytest.raises(ValueError, match="at most"):
        match_view.add_points(model, session, np.zeros((match_view.MAX_POINTS + 1, 2)))


# ---- the Evaluation tab's logic ------------------------------------------------------------------


def test_category_figures_equal_report_json(evaluation: Path, tmp_path: Path) -> None:
    roots = Roots.of([str(evaluation.parent)])
    folder = eval_view.open_folder(str(evaluation), roots)
    report = json.loads((evaluation / "report.json").read_text())
    assert folder.models == ["zero-shot-dinov2_vits14"] and folder.flags == list(eval_view.FLAG_COLUMNS)
    for frame in ("original", "resized"):
        for column, alpha in enumerate(report["alphas"]):
            rows, note = eval_view.category_rows(folder, folder.models[0], frame, alpha)
            assert note.startswith("every figure equals report.json's"), note
            reported = report["models"][0]["results"][frame]
            for name, pairs, _, per_image, per_keypoint, check in rows:
                scores = reported["overall"] if name == "all" else reported["per_category"][name]
                assert (pairs, per_image, per_keypoint, check) == (
                    scores["n_pairs"], eval_view.percent(scores["per_image"][column]),
                    eval_view.percent(scores["per_keypoint"][column]), "equal",
                )  # fmt: skip
    rows, note = eval_view.category_rows(folder, folder.models[0], "original", 0.07)
    assert "not one of report.json's" in note and {row[-1] for row in rows} == {""}

    # Per-pair PCK: its mean is the per-image average of the report.
    pairs = eval_view.pair_frame(folder, folder.models[0], "resized", 0.1)
    assert len(pairs) == report["data"]["pairs"]
    column = report["alphas"].index(0.1)
    overall = report["models"][0]["results"]["resized"]["overall"]["per_image"][column]
    assert (pairs["correct"] / pairs["keypoints"]).mean() == pytest.approx(overall, abs=1e-12)
    cats = eval_view.filter_pairs(pairs, category="cat", sort_by=eval_view.PCK_COLUMN, descending=True)
    assert set(cats["category"]) == {"cat"} and list(cats[eval_view.PCK_COLUMN]) == sorted(
        cats[eval_view.PCK_COLUMN], reverse=True
    )
    flagged = eval_view.filter_pairs(pairs, flags={"scale_variation": "1"}, pck_min=0, pck_max=50)
    assert set(flagged["scale_variation"]) <= {1} and (flagged[eval_view.PCK_COLUMN] <= 50).all()

    # A pair drawn from the shards the report names.
    key = str(pairs.iloc[0][eval_view.PAIR_COLUMN])
    with pytest.raises(AccessRefused, match="shard set"):  # the demo shards lie outside these roots
        eval_view.pair_picture(folder, folder.models[0], "original", 0.1, key, roots)
    shards = report["data"]["shards"]
    wider = Roots.of([str(evaluation.parent), shards])
    picture = eval_view.pair_picture(folder, folder.models[0], "original", 0.1, key, wider)
    assert picture.ndim == 3 and picture.shape[0] > eval_view.PAIR_PICTURE_HEIGHT
    with pytest.raises(ValueError, match="no pair"):
        eval_view.pair_picture(folder, folder.models[0], "original", 0.1, "nope", wider)


def test_bad_evaluation_folders_are_refused_with_a_message(evaluation: Path, tmp_path: Path) -> None:
    roots = Roots.of([str(tmp_path)])
    with pytest.raises(AccessRefused, match="outside the viewer's roots"):
        eval_view.open_folder(str(evaluation), roots)
    with pytest.raises(AccessRefused):
        eval_view.open_folder(str(tmp_path / ".." / evaluation.parent.name / "eval"), roots)
    with pytest.raises(eval_view.FolderError, match="no report.json"):
        eval_view.open_folder(str(tmp_path), roots)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.json").write_text('{"models": "nope"}')
    with pytest.raises(eval_view.FolderError, match="not an sm_eval report"):
        eval_view.open_folder(str(broken), roots)
    (broken / "report.json").write_bytes((evaluation / "report.json").read_bytes())
    (broken / "predictions.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(eval_view.FolderError, match="not a readable parquet file"):
        eval_view.open_folder(str(broken), roots)
    with pytest.raises(ValueError, match="alpha"):
        eval_view.parse_alpha("1.5")


# ---- the command line ----------------------------------------------------------------------------


def test_the_command_line_launches_on_loopback_without_a_share_link(monkeypatch, capsys) -> None:
    import gradio

    from sm_eval.viewer.__main__ import main

    calls = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: calls.append(kwargs))
    base = ["--model", "zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size", "56"]
    assert main([*base, "--port", "7999", "--max-upload-mb", "2"]) == 0
    launch = calls[-1]
    assert (launch["server_name"], launch["server_port"], launch["share"], launch["max_file_size"]) == (
        "127.0.0.1",
        7999,
        False,
        2 * 2**20,
    )
    assert launch["enable_monitoring"] is False and launch["mcp_server"] is False and launch["footer_links"] == []
    assert "warning" not in capsys.readouterr().err
    assert main([*base, "--host", "0.0.0.0"]) == 0
    assert calls[-1]["server_name"] == "0.0.0.0"
    assert "warning: binding 0.0.0.0: the viewer is reachable from other machines" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--port", "70000"])


def test_the_viewer_mounts_on_another_asgi_host_as_ray_serve_does() -> None:
    """Ray Serve's GradioServer builds the app with gradio.routes.App.create_app(blocks): the Blocks
    from viewer_blocks carry the upload cap and no footer links, and the app answers."""
    from fastapi.testclient import TestClient
    from gradio.routes import App

    from sm_eval.viewer.__main__ import viewer_blocks

    blocks = viewer_blocks(["--model", "zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size",
                            "56", "--max-upload-mb", "3"])  # fmt: skip
    assert blocks.max_file_size == 3 * 2**20 and blocks.config["footer_links"] == []
    with TestClient(App.create_app(blocks)) as client:
        page = client.get("/")
        assert page.status_code == 200 and "gradio" in page.text.lower()
        config = client.get("/config").json()
        assert config["max_file_size"] == 3 * 2**20
    with pytest.raises(SystemExit):
        viewer_blocks(["--model", "zero-shot:nope"])


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port`` (/proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    words = [bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8)]
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net")
def test_the_viewer_answers_on_127_0_0_1_and_listens_nowhere_else(tmp_path: Path) -> None:
    """The outside check: the command as a user types it answers HTTP on 127.0.0.1 and listens on
    no other interface (read from the kernel's socket table, and a connection to another loopback
    address, 127.0.0.2, is refused)."""
    port = free_port()
    args = ["--model", "zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size", "56"]
    with running_viewer(args, port, tmp_path / "viewer.log"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
            assert answer.status == 200 and b"gradio" in answer.read().lower()
        assert _listening_addresses(port) == {"127.0.0.1"}
        with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), timeout=5):
            pass
    assert "sm_eval.viewer: zero-shot-dinov2_vits14 on http://127.0.0.1:" in (tmp_path / "viewer.log").read_text()
