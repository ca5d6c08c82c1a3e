"""``sm_eval.match``: matching points on one's own images with any model, as a Python API and as
``python -m sm_eval.match``. Random weights only (nothing is downloaded): with the same image as
source and target and the argmax localizer, a point at a feature-cell centre finds its own cell,
whatever the weights, so it maps back onto itself."""

from __future__ import annotations

import io
import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pipelines.storage import Location
from sm_eval import figures
from sm_eval.match import (
    MATCHES_JSON,
    MATCHES_PNG,
    build_parser,
    check_points,
    grid_points,
    load_match_model,
    main,
    match_points,
    parse_points,
    points_from_text,
    read_image,
    read_points_file,
)
from sm_model.checkpoint import save_checkpoint
from sm_model.config import ModelConfig
from sm_model.matcher import MatchModel
from sm_model.registry import build_model
from sm_model.simplematch import SimpleMatchOptions

SIZE = (320, 256)
"""(W, H) of the test image: within the picture's height range, so matches.png keeps it unscaled."""
ZERO_SHOT = ("zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size", "56")
"""ViT-S/14 at 56 pixels: a 4 x 4 token map, stride 14."""
MATCH_KEYS = {"source_x", "source_y", "target_x", "target_y", "score"}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.fromarray(data.chelsea()).resize(SIZE, Image.BILINEAR))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, image: np.ndarray) -> dict[str, Path]:
    """The test image as PNG, a smaller JPEG of another photo, a tiny random SimpleMatch checkpoint."""
    root = tmp_path_factory.mktemp("match")
    Image.fromarray(image).save(root / "cat.png")
    Image.fromarray(data.astronaut()).resize((200, 150)).save(root / "person.jpg", quality=90)
    config = ModelConfig(backbone="resnet18", image_size=64, finetune="frozen", window_size=5, options=SimpleMatchOptions(decoder_channels=32, decoder_dropout=0.0))
    torch.manual_seed(0)
    save_checkpoint(build_model(config), root / "tiny.pt")
    return {"cat": root / "cat.png", "person": root / "person.jpg", "checkpoint": root / "tiny.pt"}


@pytest.fixture(scope="module")
def zero_shot() -> MatchModel:
    model, _ = load_match_model(ZERO_SHOT[0], backbone_weights="random", image_size=56, localizer="argmax")
    return model


def _finest_map(model: MatchModel, image: np.ndarray) -> tuple[float, int]:
    """(stride in input pixels, side in cells) of ``model``'s finest feature map."""
    size = model.input_spec.size
    x = model.prepare(image)[None]
    with torch.no_grad():
        finest = model.eval()(x, x, torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool))[-1]
    assert finest.scores.shape[-1] == finest.scores.shape[-2] == round(size / finest.stride)
    return finest.stride, finest.scores.shape[-1]


def _cell_centres(stride: float, cells: int, size: int, width: int, height: int) -> np.ndarray:
    """The centres of the feature cells in original pixels, in the center convention, row by row."""
    input_pixels = stride * np.arange(cells) + (stride - 1) / 2
    xs = (input_pixels + 0.5) * width / size - 0.5
    ys = (input_pixels + 0.5) * height / size - 0.5
    return np.array([(x, y) for y in ys for x in xs])


def _models(files: dict[str, Path]) -> dict[str, tuple[str, ...]]:
    return {"zero-shot": ZERO_SHOT, "simplematch": (str(files["checkpoint"]),)}


@pytest.mark.parametrize("kind", ["zero-shot", "simplematch"])
def test_same_image_maps_cell_centres_onto_themselves(
    kind: str, files: dict[str, Path], image: np.ndarray, request: pytest.FixtureRequest
) -> None:
    if kind == "zero-shot":
        model = request.getfixturevalue("zero_shot")
    else:
        model, _ = load_match_model(str(files["checkpoint"]), localizer="argmax")
    assert model.config.kind == kind and model.config.localizer_method == "argmax"
    stride, cells = _finest_map(model, image)
    assert (stride, cells) == ((14, 4) if kind == "zero-shot" else (4, 16))
    width, height = SIZE
    points = grid_points(width, height, cells)
    np.testing.assert_allclose(points, _cell_centres(stride, cells, model.config.image_size, width, height), atol=1e-9)

    result = match_points(model, image, image, points)
    assert result.target_points.shape == (cells * cells, 2) and result.scores.shape == (cells * cells,)
    error = np.abs(result.target_points - points)
    one_cell = stride * np.array([width, height]) / model.config.image_size
    assert (error <= one_cell).all()  # the bound: within one cell
    assert error.max() < 1e-3  # argmax finds the cell itself: exact up to float error
    np.testing.assert_allclose(result.scores, 1.0, atol=1e-4)  # each point matched its own feature
    assert result.model == {
        "kind": kind, "backbone": model.config.backbone, "localizer": "argmax", "image_size": model.config.image_size,
        "pixel_convention": "center", "image_resize": "antialiased",
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["zero-shot", "simplematch"])
def test_cli_writes_matches_json_and_png(kind: str, files: dict[str, Path], tmp_path: Path, capsys) -> None:
    source, *options = _models(files)[kind]
    cells, size = (4, 56) if kind == "zero-shot" else (16, 64)
    out = tmp_path / "out"
    argv = ["--model", source, *options, str(files["cat"]), str(files["cat"]), "--grid", str(cells)]
    assert main([*argv, "--localizer", "argmax", "--out", str(out), "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"{cells * cells} matches" in printed and "matches.png" in printed and "matches.json" in printed

    document = json.loads((out / MATCHES_JSON).read_text())
    assert document["count"] == len(document["matches"]) == cells * cells
    assert document["model"]["kind"] == kind and document["model"]["localizer"] == "argmax"
    assert document["model"]["image_size"] == size and document["model"]["source"] == source
    width, height = SIZE
    assert document["source_image"] == {"path": str(files["cat"]), "width": width, "height": height}
    assert document["target_image"]["width"] == width
    matches = document["matches"]
    assert all(set(match) == MATCH_KEYS for match in matches)
    assert all(math.isfinite(value) for match in matches for value in match.values())
    assert all(-1 <= match["score"] <= 1 for match in matches)
    stride = size / cells
    for match in matches:  # every grid point within one cell of itself (exactly, up to rounding)
        assert abs(match["target_x"] - match["source_x"]) <= min(1e-3, stride * width / size)
        assert abs(match["target_y"] - match["source_y"]) <= min(1e-3, stride * height / size)

    picture = Image.open(out / MATCHES_PNG)
    assert picture.format == "PNG"
    assert 2 * width <= picture.width <= 2 * width + 16  # both images side by side at their own size
    assert picture.height > height


def test_points_and_points_file(files: dict[str, Path], tmp_path: Path) -> None:
    np.testing.assert_array_equal(parse_points("10,20; 30.5 40;\n-0.5,7"), [[10, 20], [30.5, 40], [-0.5, 7]])
    with pytest.raises(ValueError, match="point 2"):
        parse_points("10,20;30")
    with pytest.raises(ValueError, match="no points"):
        parse_points(" ; ")
    with pytest.raises(ValueError, match="not finite"):
        parse_points("nan,1")
    text = "# x y\n10,20\n\n 30.5   40  # a comment\n"
    np.testing.assert_array_equal(points_from_text(text), [[10, 20], [30.5, 40]])
    np.testing.assert_array_equal(points_from_text("[[1, 2], [3.5, 4]]"), [[1, 2], [3.5, 4]])
    with pytest.raises(ValueError, match="f.txt, line 2"):
        points_from_text("1,2\n3,4,5\n", "f.txt")
    with pytest.raises(ValueError, match="item 2"):
        points_from_text("[[1, 2], [3]]")

    points_file = tmp_path / "points.txt"
    points_file.write_text("12,30\n199 149\n")
    np.testing.assert_array_equal(read_points_file(str(points_file)), [[12, 30], [199, 149]])
    out = tmp_path / "from-file"
    model = str(files["checkpoint"])  # the tiny SimpleMatch: the quickest model to load
    argv = [model, str(files["person"]), str(files["cat"]), "--points-file", str(points_file)]
    assert main(["--model", *argv, "--out", str(out)]) == 0
    document = json.loads((out / MATCHES_JSON).read_text())
    assert [(m["source_x"], m["source_y"]) for m in document["matches"]] == [(12, 30), (199, 149)]
    assert document["source_image"]["width"] == 200 and document["target_image"]["width"] == SIZE[0]
    picture = Image.open(out / MATCHES_PNG)
    assert picture.width == round(200 * SIZE[1] / 150) + 8 + SIZE[0]  # the source scaled to the taller target's height

    out = tmp_path / "inline"
    argv = [model, str(files["cat"]), str(files["cat"]), "--points", "0,0; 319.5 255.5", "--out", str(out)]
    assert main(["--model", *argv]) == 0
    document = json.loads((out / MATCHES_JSON).read_text())
    assert [(m["source_x"], m["source_y"]) for m in document["matches"]] == [(0, 0), (319.5, 255.5)]
    assert document["model"]["localizer"] == "window"  # SimpleMatch's own


def test_bounds_and_chunks(zero_shot: MatchModel, image: np.ndarray) -> None:
    width, height = SIZE
    corners = np.array([[-0.5, -0.5], [width - 0.5, height - 0.5]])
    assert check_points(corners, SIZE).shape == (2, 2)
    for bad in ([width - 0.5 + 1e-6, 0], [0, -0.51], [np.nan, 3]):
        with pytest.raises(ValueError, match=r"point 2 .* outside the source image \(320 x 256"):
            check_points(np.array([[1.0, 1.0], bad]), SIZE)
    with pytest.raises(ValueError, match="outside"):
        match_points(zero_shot, image, image, [[400.0, 10.0]])
    points = np.random.default_rng(0).uniform(-0.5, [width - 0.5, height - 0.5], size=(23, 2))
    whole = match_points(zero_shot, image, image[::2, ::3].copy(), points)
    chunked = match_points(zero_shot, image, image[::2, ::3].copy(), points, chunk_size=5)
    np.testing.assert_array_equal(whole.target_points, chunked.target_points)
    np.testing.assert_allclose(whole.scores, chunked.scores, atol=1e-6)  # another matrix shape, other rounding
    assert whole.target_size == (107, 128)
    assert (whole.target_points >= -0.5).all() and (whole.target_points <= [106.5, 127.5]).all()


def test_errors_name_the_file_or_the_point(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture\n")
    out = str(tmp_path / "out")
    cat = str(files["cat"])

    assert main(["--model", *ZERO_SHOT, str(not_an_image), cat, "--grid", "2", "--out", out]) == 1
    error = capsys.readouterr().err
    assert "source image" in error and str(not_an_image) in error and "not a readable image" in error
    assert main(["--model", *ZERO_SHOT, cat, str(tmp_path / "missing.png"), "--grid", "2", "--out", out]) == 1
    error = capsys.readouterr().err
    assert "target image" in error and "missing.png: no such file" in error
    with pytest.raises(ValueError, match="notes.jpg"):
        read_image(str(not_an_image))

    assert main(["--model", *ZERO_SHOT, cat, cat, "--points", "10,10;400,20", "--out", out]) == 1
    error = capsys.readouterr().err
    assert "point 2 (400, 20) lies outside the source image" in error and "320 x 256" in error
    assert not Path(out).exists()  # nothing written before the points are checked

    bad_file = tmp_path / "points.txt"
    bad_file.write_text("1,2\nthree,4\n")
    assert main(["--model", *ZERO_SHOT, cat, cat, "--points-file", str(bad_file), "--out", out]) == 1
    assert f"points file {bad_file}, line 2" in capsys.readouterr().err

    for usage in (
        [cat, cat, "--grid", "2", "--points", "1,1", "--out", out],  # two ways of giving points
        [cat, cat, "--out", out],  # none
        [cat, cat, "--points", "1;2", "--out", out],  # malformed
        [cat, cat, "--grid", "0", "--out", out],
        [cat, cat, "--grid", "2", "--out", str(files["cat"])],  # --out is a file
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", *ZERO_SHOT, *usage])
        assert exit_info.value.code == 2, usage
    capsys.readouterr()


def test_s3_images_and_outputs(files: dict[str, Path], s3_bucket: str, s3_endpoint: str, capsys) -> None:
    bucket = Location(s3_bucket, s3_endpoint)
    bucket.put_bytes("in/cat.png", files["cat"].read_bytes())
    bucket.put_bytes("in/points.txt", b"5,5\n100,60\n")
    base = ["--model", str(files["checkpoint"]), "--s3-endpoint-url", s3_endpoint]
    cat = f"{s3_bucket}/in/cat.png"
    assert main([*base, cat, cat, "--points-file", f"{s3_bucket}/in/points.txt", "--out", f"{s3_bucket}/out"]) == 0
    assert f"{s3_bucket}/out/matches.json" in capsys.readouterr().out
    document = json.loads(bucket.read_bytes("out/matches.json"))
    assert document["count"] == 2 and document["source_image"]["path"] == cat
    assert Image.open(io.BytesIO(bucket.read_bytes("out/matches.png"))).format == "PNG"
    assert main([*base, f"{s3_bucket}/in/nothing.png", cat, "--grid", "2", "--out", f"{s3_bucket}/out"]) == 1
    assert "nothing.png: no such file" in capsys.readouterr().err
    assert main([*base, "s3://no-such-bucket-here/a.png", cat, "--grid", "2", "--out", f"{s3_bucket}/out"]) == 2
    assert "no-such-bucket-here" in capsys.readouterr().err


def test_score_colours_and_picture() -> None:
    assert figures.score_colour(0.0) == figures.SCORE_COLOURS[0][1] == figures.score_colour(-0.7)
    assert figures.score_colour(1.0) == figures.SCORE_COLOURS[-1][1]
    assert figures.score_colour(0.5) == figures.SCORE_COLOURS[1][1]
    assert figures.score_colour(float("nan")) == (128, 128, 128)
    src = np.zeros((300, 200, 3), np.uint8)
    trg = np.zeros((600, 300, 3), np.uint8)
    picture = figures.scored_matches_image(
        src, trg, np.array([[50.0, 100.0]]), np.array([[100.0, 300.0]]), np.array([1.0]), "caption"
    )
    assert picture.size == (400 + 8 + 300, 26 + 600 + 38)  # the taller image's height, the other scaled to it
    assert picture.getpixel((100, 26 + 200)) == figures.SCORE_COLOURS[-1][1]  # the source end of the line, x 2


def test_documented_commands_parse(capsys) -> None:
    """Every ``python -m sm_eval.match`` command quoted in the READMEs, the notebook README and
    this module's help passes the real parser; --help documents the points, outputs and score."""
    root = Path(__file__).resolve().parents[1]
    texts = [(root / name).read_text() for name in ("sm_eval/README.md", "notebooks/README.md")]
    texts.append(build_parser().epilog)
    commands = []
    for text in texts:
        joined = re.sub(r"\\\n\s*", " ", text)
        for line in joined.splitlines():
            for span in re.findall(r"`([^`]*)`", line) if "`" in line else [line]:
                if "-m sm_eval.match " in span:
                    commands.append(shlex.split(span.split("-m sm_eval.match ", 1)[1].split("  #")[0]))
    assert len(commands) >= 4
    parser = build_parser()
    for args in commands:
        if args == ["--help"]:
            continue
        parser.parse_args(args)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for words in ("--points-file", "--grid", "matches.json", "matches.png", "cosine similarity", "exit status"):
        assert words in help_text
