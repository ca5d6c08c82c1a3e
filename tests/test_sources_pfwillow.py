"""PF-WILLOW reader: generated fixtures in the release layout, then the real 900-pair set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipelines import checks
from pipelines.schema import ImageRef, PairRecord, Reject
from pipelines.sources import get_source, pfwillow
from pipelines.storage import Location
from tests.pf_format import ImageFiles, only_reject, willow_header, willow_row, write_csv, write_willow_mat

# Hand-made 1-based keypoints (x, y) of two car(G) images; in the schema frame each is 1.0 less.
PTS_A = np.array([[float(10 + 3 * i), float(50 - 2 * i)] for i in range(10)])  # x 10..37, y 32..50
PTS_B = np.array([[1.0, 1.0], [300.0, 200.0]] + [[float(100 + i), float(100 + i)] for i in range(8)])
IMAGE_A = "PF-dataset-WILLOW/car(G)/Cars_006a.png"
IMAGE_B = "PF-dataset-WILLOW/car(G)/Cars_007a.png"


def read_all(root: Path, split: str = "test") -> list[PairRecord | Reject]:
    return list(pfwillow.read_pairs(Location(str(root)), split))


@pytest.fixture
def willow_root(tmp_path: Path) -> Path:
    """Two car(G) images (PNG + pts_coord .mat) under PF-dataset-WILLOW/; CSVs are written per test."""
    images = ImageFiles()
    for listed, pts in ((IMAGE_A, PTS_A), (IMAGE_B, PTS_B)):
        images.write(tmp_path / listed, (300, 200))
        write_willow_mat((tmp_path / listed).with_suffix(".mat"), pts)
    return tmp_path


def write_pairs(root: Path, rows: list[list[object]], name: str = "test_pairs.csv") -> None:
    write_csv(root / name, willow_header(), rows)


def test_keypoints_shift_to_zero_based_and_bbox_is_the_keypoint_box(willow_root: Path) -> None:
    write_pairs(willow_root, [willow_row(IMAGE_A, IMAGE_B, PTS_A, PTS_B)])
    [pair] = read_all(willow_root)
    assert isinstance(pair, PairRecord)
    assert pair.key == "car(G)_Cars_006a_Cars_007a"
    assert (pair.dataset, pair.split, pair.category, pair.group, pair.threshold) == ("pfwillow", "test", "car", "car(G)", "bbox-kp")
    assert pair.src == ImageRef("car(G)_Cars_006a", IMAGE_A, None)
    assert pair.trg == ImageRef("car(G)_Cars_007a", IMAGE_B, None)
    np.testing.assert_array_equal(pair.src_kps, PTS_A - 1.0)
    np.testing.assert_array_equal(pair.trg_kps[:2], [[0.0, 0.0], [299.0, 199.0]])
    np.testing.assert_array_equal(pair.kps_ids, np.arange(10))
    np.testing.assert_array_equal(pair.src_bbox, [9.0, 31.0, 36.0, 49.0])
    np.testing.assert_array_equal(pair.trg_bbox, [0.0, 0.0, 299.0, 199.0])
    assert pair.src_kps.shape == (10, 2) and pair.src_kps.dtype == np.float64 and pair.kps_ids.dtype == np.int64
    assert pair.origin == "test_pairs.csv:2"
    assert pair.extras == {"subclass": "car(G)"}
    assert checks.check_pair(pair) == []
    assert checks.check_against_images(pair, (300, 200), (300, 200)) == []


def test_image_paths_fall_back_to_the_renamed_release_folders(tmp_path: Path) -> None:
    images = ImageFiles()
    images.write(tmp_path / "PF-WILLOW/duck(S)/060_0005.png", (300, 200))
    images.write(tmp_path / "PF-dataset/duck(S)/060_0007.png", (300, 200))
    images.write(tmp_path / "PF-WILLOW/duck(S)/060_0007.png", (300, 200))
    rows = [
        willow_row("PF-dataset-WILLOW/duck(S)/060_0005.png", "PF-dataset-WILLOW/duck(S)/060_0007.png", PTS_A, PTS_B),
        willow_row("PF-dataset-WILLOW/duck(S)/060_0005.png", "PF-dataset-WILLOW/duck(S)/060_0009.png", PTS_A, PTS_B),
    ]
    write_pairs(tmp_path, rows, "test_pairs_pf.csv")
    first, second = read_all(tmp_path)
    assert (first.src.path, first.trg.path) == ("PF-WILLOW/duck(S)/060_0005.png", "PF-dataset/duck(S)/060_0007.png")
    # Nothing found: the path stays as listed, for the shard stage to report the missing image.
    assert second.trg.path == "PF-dataset-WILLOW/duck(S)/060_0009.png"
    assert (first.category, first.origin) == ("duck", "test_pairs_pf.csv:2")


def test_the_same_file_name_in_two_subclasses_is_two_images(willow_root: Path) -> None:
    rows = [
        willow_row(IMAGE_A, IMAGE_B, PTS_A, PTS_B),
        willow_row("PF-dataset-WILLOW/car(M)/Cars_006a.png", "PF-dataset-WILLOW/car(M)/Cars_007a.png", PTS_A, PTS_B),
    ]
    write_pairs(willow_root, rows)
    first, second = read_all(willow_root)
    assert first.src.key != second.src.key and first.key != second.key
    assert (second.src.key, second.group) == ("car(M)_Cars_006a", "car(M)")


def test_nan_keypoints_pass_through_to_the_shard_stage(willow_root: Path) -> None:
    pts = PTS_A.copy()
    pts[3, 1] = np.nan
    write_pairs(willow_root, [willow_row(IMAGE_A, IMAGE_B, pts, PTS_B)])
    [pair] = read_all(willow_root)
    assert np.isnan(pair.src_kps[3, 1]) and np.isnan(pair.src_bbox[1])
    assert checks.NAN_KEYPOINTS in {reject.reason for reject in checks.check_pair(pair)}


def test_csv_lookup_split_and_header_errors_are_usage_errors(willow_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="test_pairs.csv, test_pairs_pf.csv"):
        read_all(willow_root)
    write_pairs(willow_root, [])
    write_pairs(willow_root, [willow_row(IMAGE_A, IMAGE_B, PTS_A, PTS_B)], "test_pairs_pf.csv")
    assert read_all(willow_root) == []  # test_pairs.csv wins, even when empty
    with pytest.raises(ValueError, match="no split 'trn'"):
        read_all(willow_root, "trn")
    write_csv(willow_root / "test_pairs.csv", willow_header()[:-1], [])
    with pytest.raises(ValueError, match="lacks \\['YB10'\\]"):
        read_all(willow_root)
    assert get_source("pfwillow").splits == ("test",)


def bad_number_row() -> list[object]:
    row = willow_row(IMAGE_A, IMAGE_B, PTS_A, PTS_B)
    row[2 + 10] = "n/a"  # YA1
    return row


@pytest.mark.parametrize(
    ("row", "reason", "item", "detail"),
    [
        (bad_number_row(), checks.MALFORMED_ANNOTATION, "car(G)_Cars_006a_Cars_007a", "not numbers: {'YA1': 'n/a'}"),
        (willow_row(IMAGE_A, IMAGE_B, PTS_A, PTS_B)[:-1], checks.MALFORMED_ANNOTATION, "test_pairs.csv:2", "test_pairs.csv:2: 41 fields, the header has 42"),
        (
            willow_row(IMAGE_A, "PF-dataset-WILLOW/car(M)/Cars_007a.png", PTS_A, PTS_B),
            checks.INCONSISTENT_ANNOTATION,
            "test_pairs.csv:2",
            "within one subclass",
        ),
        (
            willow_row("PF-dataset-WILLOW/dog(M)/a.png", "PF-dataset-WILLOW/dog(M)/b.png", PTS_A, PTS_B),
            checks.MALFORMED_ANNOTATION,
            "test_pairs.csv:2",
            "'dog(M)' is not a PF-WILLOW subclass",
        ),
        (willow_row("Cars_006a.png", IMAGE_B, PTS_A, PTS_B), checks.MALFORMED_ANNOTATION, "test_pairs.csv:2", "is not [<folder>/]<subclass>/<name>"),
    ],
)
def test_rows_that_contradict_the_format_are_rejected(willow_root: Path, row: list[object], reason: str, item: str, detail: str) -> None:
    write_pairs(willow_root, [row])
    reject = only_reject(read_all(willow_root))
    assert (reject.reason, reject.file, reject.item) == (reason, "test_pairs.csv", item)
    assert detail in reject.detail


def test_one_item_per_row_in_file_order(willow_root: Path) -> None:
    rows = [willow_row(IMAGE_A, IMAGE_B, PTS_A, PTS_B), bad_number_row(), willow_row(IMAGE_B, IMAGE_A, PTS_B, PTS_A)]
    write_pairs(willow_root, rows)
    with (willow_root / "test_pairs.csv").open("a") as csv_file:
        csv_file.write("\n")  # a trailing blank line is no pair
    items = read_all(willow_root)
    assert [type(item).__name__ for item in items] == ["PairRecord", "Reject", "PairRecord"]
    assert items[2].key == "car(G)_Cars_007a_Cars_006a" and items[2].origin == "test_pairs.csv:4"


# ---------------------------------------------------------------- the real PF-WILLOW set


def test_real_set_matches_the_mat_files_exactly(shared_data: Path) -> None:
    root_dir = shared_data / "pf-willow"
    root = Location(str(root_dir))
    items = list(pfwillow.read_pairs(root, "test"))
    assert len(items) == 900
    assert all(isinstance(item, PairRecord) for item in items)
    assert len({pair.key for pair in items}) == 900
    paths = {ref.path for pair in items for ref in (pair.src, pair.trg)}
    assert len(paths) == len({ref.key for pair in items for ref in (pair.src, pair.trg)}) == 100
    assert all(root.exists(path) for path in paths)
    pts_of = {path: scipy.io.loadmat(root_dir / path.replace(".png", ".mat"))["pts_coord"] for path in paths}
    size_of = {path: Image.open(root_dir / path).size for path in paths}
    for pair in items:
        for ref, kps, bbox in ((pair.src, pair.src_kps, pair.src_bbox), (pair.trg, pair.trg_kps, pair.trg_bbox)):
            np.testing.assert_array_equal(kps, pts_of[ref.path].T - 1.0)
            np.testing.assert_array_equal(bbox, [*kps.min(axis=0), *kps.max(axis=0)])
        assert pair.group == pair.extras["subclass"] == pair.src.path.split("/")[1]
        assert checks.check_pair(pair) == []
        assert checks.check_against_images(pair, size_of[pair.src.path], size_of[pair.trg.path]) == []
    assert {pair.category for pair in items} == {"car", "duck", "motorbike", "winebottle"}
    assert {pair.group for pair in items} == set(pfwillow.SUBCLASSES)
