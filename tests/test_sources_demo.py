"""The demo dataset: generated in the SPair-71k layout, exact ground truth, deterministic, not trivial; read, never generated, by its reader."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import checks
from pipelines.builders import demo as builder
from pipelines.schema import PairRecord
from pipelines.sources import demo, get_source
from pipelines.storage import Location

TINY = {
    "images_per_category": 10,
    "pairs_per_category": {"trn": 8, "val": 2, "test": 2},
    "size": (200, 150),
    "categories": ("cat", "cup", "motorbike"),
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return builder.generate(tmp_path_factory.mktemp("demo") / "data", **TINY)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_root) -> dict[str, list]:
    return {split: list(demo.read_pairs(Location(str(tiny_root)), split)) for split in demo.SPLITS}


def test_registered_with_the_contract():
    source = get_source("demo")
    assert source.splits == ("trn", "val", "test")
    assert source.summary.startswith("Demo")
    assert "pixel" in demo.__doc__


def test_tiny_set_parses_without_rejects(tiny_root, tiny_pairs):
    root = Location(str(tiny_root))
    assert {split: len(pairs) for split, pairs in tiny_pairs.items()} == {"trn": 24, "val": 6, "test": 6}
    for split, pairs in tiny_pairs.items():
        for pair in pairs:
            assert isinstance(pair, PairRecord), pair
            assert (pair.dataset, pair.split, pair.threshold, pair.group) == ("demo", split, "bbox", pair.category)
            assert len(pair.kps_ids) >= builder.MIN_COMMON_KEYPOINTS
            sizes = [Image.open(io.BytesIO(root.read_bytes(ref.path))).size for ref in (pair.src, pair.trg)]
            assert sizes == [pair.src.declared_size, pair.trg.declared_size]
            assert all(160 <= w <= 200 and 120 <= h <= 150 for w, h in sizes)
            assert checks.check_pair(pair) + checks.check_against_images(pair, *sizes) == []


def test_splits_use_disjoint_images(tiny_pairs):
    images = {split: {ref.key for pair in pairs for ref in (pair.src, pair.trg)} for split, pairs in tiny_pairs.items()}
    assert not images["trn"] & images["val"] and not images["trn"] & images["test"] and not images["val"] & images["test"]


def test_pair_fields_agree_with_the_image_annotations(tiny_root):
    for name in (tiny_root / "Layout/large/trn.txt").read_text().splitlines():
        pair = json.loads((tiny_root / f"PairAnnotation/trn/{name}.json").read_text())
        category = pair["category"]
        assert name.endswith(f":{category}")
        src, trg = (json.loads((tiny_root / f"ImageAnnotation/{category}/{pair[f'{side}_imname'][:-4]}.json").read_text()) for side in ("src", "trg"))
        assert len(src["kps"]) == builder.KEYPOINT_SLOTS
        assert pair["src_kps"] == [src["kps"][str(i)] for i in pair["kps_ids"]]
        assert pair["trg_kps"] == [trg["kps"][str(i)] for i in pair["kps_ids"]]
        assert pair["kps_ids"] == [i for i in range(builder.KEYPOINT_SLOTS) if src["kps"][str(i)] and trg["kps"][str(i)]]
        assert pair["truncation"] == src["truncated"] + 2 * trg["truncated"]
        assert pair["src_imsize"] == [src["image_width"], src["image_height"], 3]
        assert pair["src_bndbox"] == src["bndbox"]
        assert pair["viewpoint_variation"] in (0, 1, 2) and pair["scale_variation"] in (0, 1, 2)
        assert (pair["occlusion"], pair["mirror"], pair["src_pose"], pair["trg_pose"]) == (0, 0, "Unspecified", "Unspecified")


def test_every_photo_gets_10_to_16_keypoints_inside_its_outline():
    for obj in builder.DEMO_OBJECTS:
        _, keypoints = builder.photo_and_keypoints(obj)
        low, high = obj.outline_array.min(axis=0), obj.outline_array.max(axis=0)
        assert 10 <= len(keypoints) <= 16, obj.category
        assert ((keypoints >= low) & (keypoints <= high)).all(), obj.category


def marked_photo(points: np.ndarray, shape=(160, 240), sigma: float = 2.0) -> np.ndarray:
    """A black photo with a bright Gaussian spot centred on each ``(x, y)`` of ``points``."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    spots = sum(np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2)) for x, y in points)
    return np.repeat((250 * spots)[..., None], 3, axis=2).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("size", "scale", "rotation", "tilt"),
    [((400, 300), 1.3, 30.0, (0.1, -0.1)), ((200, 150), 0.6, -40.0, (-0.1, 0.05))],
    ids=["magnified", "shrunk"],
)
def test_keypoints_land_on_the_marked_warped_pixels(size, scale, rotation, tilt):
    marks = np.array([[40.0, 40.0], [200.0, 40.0], [120.0, 80.0], [40.0, 120.0], [199.0, 121.0]])
    outline = np.array([[20.0, 20.0], [220.0, 20.0], [220.0, 140.0], [20.0, 140.0]])
    view = builder.View(size, rotation, scale, (0.05, -0.03), tilt, (1.0, 1.0, 1.0), 0.0, 0)

    image, truth = builder.render_view(marked_photo(marks), outline, marks, view)

    assert truth.visible.all()
    brightness = image[..., 0].astype(np.float64)
    for x, y in truth.keypoints:
        col, row, radius = round(x), round(y), 10
        window = brightness[row - radius : row + radius + 1, col - radius : col + radius + 1]
        rows, cols = np.mgrid[row - radius : row + radius + 1, col - radius : col + radius + 1]
        centroid = np.array([(window * cols).sum(), (window * rows).sum()]) / window.sum()
        np.testing.assert_allclose(centroid, [x, y], atol=0.1)
        peak_row, peak_col = np.unravel_index(window.argmax(), window.shape)
        assert abs(cols[peak_row, peak_col] - x) <= 1 and abs(rows[peak_row, peak_col] - y) <= 1


def test_warp_convention_integer_shift_is_exact():
    photo = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3)).astype(np.uint8)
    shift = np.array([[1.0, 0, 3], [0, 1, 5], [0, 0, 1]])
    warped = builder.warp_image(photo, shift, (40, 30), fill=7)
    np.testing.assert_array_equal(warped[5:, 3:], photo[:-5, :-3])
    assert (warped[:5] == 7).all() and (warped[:, :3] == 7).all()
    np.testing.assert_array_equal(builder.project_points(shift, np.array([[0.0, 0.0], [39.0, 29.0]])), [[3, 5], [42, 34]])


def test_bbox_is_the_clipped_projected_outline():
    outline = np.array([[20.0, 20.0], [220.0, 20.0], [220.0, 140.0], [20.0, 140.0]])
    view = builder.View((200, 150), 0.0, 1.3, (0.25, 0.0), (0.0, 0.0), (1.0, 1.0, 1.0), 0.0, 0)
    _, truth = builder.render_view(np.zeros((160, 240, 3), np.uint8), outline, outline, view)
    # Radius 0.35 * 150 * 1.3 = 68.25 px for a half side of 100; centre (99.5 + 50, 74.5).
    np.testing.assert_allclose(truth.bbox, [149.5 - 68.25, 74.5 - 0.6 * 68.25, 199.0, 74.5 + 0.6 * 68.25], atol=0.005)
    assert np.isnan(truth.keypoints[[1, 2]]).all() and truth.visible.tolist() == [True, False, False, True]


def test_generation_is_byte_identical(tmp_path):
    args = {"images_per_category": 8, "pairs_per_category": {"trn": 3, "val": 2, "test": 2}, "size": (120, 90), "categories": ["rocket"]}
    first, second = builder.generate(tmp_path / "a", **args), builder.generate(tmp_path / "b", **args)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert len(files) == 8 * 2 + (3 + 2 + 2) + 3
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    other_seed = builder.generate(tmp_path / "c", **args, seed=1)
    assert (other_seed / files[0]).read_bytes() != (first / files[0]).read_bytes()


def test_identity_guess_scores_low_pck(tiny_pairs):
    """Predicting target = source keypoint scaled by the size ratio must fail: the warps are real."""
    scores = []
    for pair in (pair for pairs in tiny_pairs.values() for pair in pairs):
        (src_w, src_h), (trg_w, trg_h) = pair.src.declared_size, pair.trg.declared_size
        guess = pair.src_kps * [trg_w / src_w, trg_h / src_h]
        threshold = 0.1 * max(pair.trg_bbox[2] - pair.trg_bbox[0], pair.trg_bbox[3] - pair.trg_bbox[1])
        scores.append(np.mean(np.linalg.norm(guess - pair.trg_kps, axis=1) <= threshold))
    assert np.mean(scores) < 0.25


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_reader_never_generates(tmp_path, state):
    root = tmp_path / "demo"
    if state == "empty":
        root.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        demo.read_pairs(Location(str(root)), "val")
    message = str(error.value)
    assert str(root) in message and "python -m pipelines.builders.demo --out" in message
    assert sorted(tmp_path.rglob("*")) == ([root] if state == "empty" else [])


def test_generate_refuses_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError):
        builder.generate(tmp_path / "full")
    with pytest.raises(ValueError, match="at least 6 images"):
        builder.generate(tmp_path / "few", images_per_category=5)
    with pytest.raises(ValueError, match="unknown demo categories"):
        builder.generate(tmp_path / "dog", categories=["dog"])
    with pytest.raises(ValueError, match="unknown splits"):
        builder.generate(tmp_path / "train", pairs_per_category={"train": 3})


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    arguments = ["--out", str(out), "--images-per-category", "8", "--pairs-per-category", "trn=3,val=1,test=2",
                 "--categories", "cat", "--size", "120x90", "--seed", "4"]
    assert builder.main(arguments) == 0
    lines = {split: (out / f"Layout/large/{split}.txt").read_text().splitlines() for split in demo.SPLITS}
    assert {split: len(names) for split, names in lines.items()} == {"trn": 3, "val": 1, "test": 2}
    assert lines["trn"][0].startswith("000001-cat_") and lines["trn"][0].endswith(":cat")
    assert builder.main(arguments) == 2  # refuses to overwrite a dataset
    with pytest.raises(SystemExit) as exit_info:
        builder.main(["--help"])
    assert exit_info.value.code == 0 and "--pairs-per-category" in capsys.readouterr().out
