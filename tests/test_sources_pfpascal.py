"""PF-PASCAL reader: generated fixtures in the release layout, then the real NCNet pair CSVs."""

from __future__ import annotations

import csv
import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipelines import checks
from pipelines.schema import ImageRef, PairRecord, Reject
from pipelines.sources import get_source, pfpascal
from pipelines.storage import Location
from tests.pf_format import ImageFiles, float_list, only_reject, pascal_csv_image, write_csv, write_pascal_mat

NAN = np.nan
MAT_HEADER = ["source_image", "target_image", "class", "flip"]
INLINE_HEADER = ["source_image", "target_image", "class", "XA", "YA", "XB", "YB"]

# Hand-made "bird" (class 3) annotations, MATLAB 1-based. Rows annotated in both: 0 and 3.
SRC_KPS = np.array([[10.0, 20.0], [NAN, NAN], [30.0, 40.0], [50.5, 60.25]])
TRG_KPS = np.array([[11.0, 21.0], [12.0, 22.0], [NAN, NAN], [51.0, 61.0]])
SRC_BBOX = np.array([5.0, 6.0, 100.0, 90.0])
TRG_BBOX = np.array([1.0, 1.0, 120.0, 80.0])


def read_all(root: Path, split: str) -> list[PairRecord | Reject]:
    return list(pfpascal.read_pairs(Location(str(root)), split))


@pytest.fixture
def bird_root(tmp_path: Path) -> Path:
    """Two bird images with .mat files; CSVs are written by each test."""
    images = ImageFiles()
    for stem in ("2008_000001", "2008_000002"):
        images.write(tmp_path / "JPEGImages" / f"{stem}.jpg", (150, 100))
    write_pascal_mat(tmp_path / "Annotations/bird/2008_000001.mat", SRC_KPS, SRC_BBOX)
    write_pascal_mat(tmp_path / "Annotations/bird/2008_000002.mat", TRG_KPS, TRG_BBOX)
    return tmp_path


def bird_row(flip: int | str = 0, class_id: int | str = 3, src: str = "2008_000001", trg: str = "2008_000002") -> list[object]:
    return [pascal_csv_image(src), pascal_csv_image(trg), class_id, flip]


def test_mat_keypoints_keep_rows_annotated_in_both_images_shifted_to_zero_based(bird_root: Path) -> None:
    write_csv(bird_root / "trn_pairs.csv", MAT_HEADER, [bird_row()])
    [pair] = read_all(bird_root, "trn")
    assert isinstance(pair, PairRecord)
    assert pair.key == "2008_000001_2008_000002"
    assert (pair.dataset, pair.split, pair.category, pair.group, pair.threshold) == ("pfpascal", "trn", "bird", "bird", "img")
    assert pair.src == ImageRef("2008_000001", "JPEGImages/2008_000001.jpg", None)
    assert pair.trg == ImageRef("2008_000002", "JPEGImages/2008_000002.jpg", None)
    np.testing.assert_array_equal(pair.kps_ids, [0, 3])
    np.testing.assert_array_equal(pair.src_kps, [[9.0, 19.0], [49.5, 59.25]])
    np.testing.assert_array_equal(pair.trg_kps, [[10.0, 20.0], [50.0, 60.0]])
    np.testing.assert_array_equal(pair.src_bbox, [4.0, 5.0, 99.0, 89.0])
    np.testing.assert_array_equal(pair.trg_bbox, [0.0, 0.0, 119.0, 79.0])
    assert pair.src_kps.dtype == pair.src_bbox.dtype == np.float64 and pair.kps_ids.dtype == np.int64
    assert pair.src_kps.shape == (2, 2) and pair.src_bbox.shape == (4,)
    assert pair.origin == "trn_pairs.csv:2"
    assert pair.extras == {"csv": "trn_pairs.csv", "class_id": 3, "flip": 0}
    assert checks.check_pair(pair) == []
    assert checks.check_against_images(pair, (150, 100), (150, 100)) == []


def test_flip_rows_get_a_flip_key_and_exact_repeats_the_same_key(bird_root: Path) -> None:
    rows = [bird_row(0), bird_row(1), bird_row(0), bird_row(0, src="2008_000002", trg="2008_000001")]
    write_csv(bird_root / "trn_pairs.csv", MAT_HEADER, rows)
    pairs = read_all(bird_root, "trn")
    assert [pair.key for pair in pairs] == [
        "2008_000001_2008_000002",
        "2008_000001_2008_000002_flip",
        "2008_000001_2008_000002",
        "2008_000002_2008_000001",
    ]
    assert [pair.extras["flip"] for pair in pairs] == [0, 1, 0, 0]
    assert [pair.origin for pair in pairs] == [f"trn_pairs.csv:{line}" for line in (2, 3, 4, 5)]
    # flip is only recorded: the keypoints are not mirrored by the reader.
    np.testing.assert_array_equal(pairs[1].src_kps, pairs[0].src_kps)
    np.testing.assert_array_equal(pairs[3].kps_ids, [0, 3])


def test_inline_keypoints_come_from_the_csv_with_positional_ids_and_bbox_from_the_mat(bird_root: Path) -> None:
    xa, ya, xb, yb = [1.5, 140.25, 3.0], [2.0, 99.0, 50.125], [10.0, 20.0, 30.0], [1.0, 2.0, 3.0]
    row = [pascal_csv_image("2008_000001"), pascal_csv_image("2008_000002"), 3, *map(float_list, (xa, ya, xb, yb))]
    write_csv(bird_root / "test_pairs.csv", INLINE_HEADER, [row])
    [pair] = read_all(bird_root, "test")
    np.testing.assert_array_equal(pair.src_kps, [[0.5, 1.0], [139.25, 98.0], [2.0, 49.125]])
    np.testing.assert_array_equal(pair.trg_kps, [[9.0, 0.0], [19.0, 1.0], [29.0, 2.0]])
    np.testing.assert_array_equal(pair.kps_ids, [0, 1, 2])
    np.testing.assert_array_equal(pair.src_bbox, [4.0, 5.0, 99.0, 89.0])
    assert pair.extras == {"csv": "test_pairs.csv", "class_id": 3}


def test_nan_and_out_of_image_values_pass_through_for_the_shard_stage(bird_root: Path) -> None:
    cells = map(float_list, ([NAN, 500.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]))
    same_image = [pascal_csv_image("2008_000001"), pascal_csv_image("2008_000001"), 3, *cells]
    write_csv(bird_root / "test_pairs.csv", INLINE_HEADER, [same_image])
    [pair] = read_all(bird_root, "test")
    assert isinstance(pair, PairRecord)
    assert np.isnan(pair.src_kps[0, 0]) and pair.src_kps[1, 0] == 499.0
    reasons = {reject.reason for reject in checks.check_pair(pair)}
    assert reasons == {checks.NAN_KEYPOINTS, checks.SAME_IMAGE}


def test_csv_lookup_takes_the_first_existing_name_per_split(bird_root: Path) -> None:
    root = Location(str(bird_root))
    with pytest.raises(FileNotFoundError, match="trn_pairs.csv, train_pairs.csv, trn_pairs_pf_pascal.csv, train_pairs_pf_pascal.csv"):
        pfpascal.find_pairs_csv(root, "trn")
    with pytest.raises(ValueError, match="no split 'train'"):
        pfpascal.find_pairs_csv(root, "train")
    write_csv(bird_root / "train_pairs_pf_pascal.csv", MAT_HEADER, [bird_row()])
    assert pfpascal.find_pairs_csv(root, "trn") == "train_pairs_pf_pascal.csv"
    write_csv(bird_root / "train_pairs.csv", MAT_HEADER, [bird_row()])
    assert pfpascal.find_pairs_csv(root, "trn") == "train_pairs.csv"
    [pair] = read_all(bird_root, "trn")
    assert pair.extras["csv"] == "train_pairs.csv" and pair.origin == "train_pairs.csv:2"
    write_csv(bird_root / "val_pairs_pf_pascal.csv", MAT_HEADER[:3], [bird_row()[:3]])
    [pair] = read_all(bird_root, "val")
    assert pair.extras == {"csv": "val_pairs_pf_pascal.csv", "class_id": 3}
    assert get_source("pfpascal").splits == ("trn", "val", "test")


def test_header_without_the_pair_columns_is_a_usage_error(bird_root: Path) -> None:
    write_csv(bird_root / "test_pairs.csv", ["source_image", "target_image"], [["a.jpg", "b.jpg"]])
    with pytest.raises(ValueError, match="lacks \\['class'\\]"):
        read_all(bird_root, "test")
    write_csv(bird_root / "test_pairs.csv", ["source_image", "target_image", "class", "XA", "YA"], [])
    with pytest.raises(ValueError, match="keypoint columns"):
        read_all(bird_root, "test")


@pytest.mark.parametrize(
    ("row", "detail"),
    [
        (bird_row(class_id=0), "class '0' is not an integer in 1..20"),
        (bird_row(class_id=21), "class '21' is not an integer in 1..20"),
        (bird_row(class_id="bird"), "class 'bird'"),
        (bird_row(flip=2), "flip '2' is not 0 or 1"),
        (bird_row()[:3], "trn_pairs.csv:2 has 3 fields, the header 4"),
        (["", pascal_csv_image("2008_000002"), 3, 0], "empty image path"),
    ],
)
def test_malformed_rows_are_rejected_with_their_line(bird_root: Path, row: list[object], detail: str) -> None:
    write_csv(bird_root / "trn_pairs.csv", MAT_HEADER, [row])
    reject = only_reject(read_all(bird_root, "trn"))
    assert (reject.reason, reject.file, reject.item) == (checks.MALFORMED_ANNOTATION, "trn_pairs.csv", "trn_pairs.csv:2")
    assert detail in reject.detail


def test_missing_mat_is_a_missing_annotation_in_the_class_folder(bird_root: Path) -> None:
    # Class 4 (boat) has no .mat for these images: the bird folder does not count.
    write_csv(bird_root / "trn_pairs.csv", MAT_HEADER, [bird_row(class_id=4)])
    reject = only_reject(read_all(bird_root, "trn"))
    assert (reject.reason, reject.file) == (checks.MISSING_ANNOTATION, "Annotations/boat/2008_000001.mat")
    assert reject.item == "2008_000001_2008_000002"


@pytest.mark.parametrize(
    ("kps", "bbox", "content", "detail"),
    [
        (None, None, b"not a mat file at all", "is not a readable MAT file"),
        (None, TRG_BBOX, None, "'kps' is missing"),
        (np.zeros((4, 3)), TRG_BBOX, None, "'kps' is a 4 x 3 float64 array"),
        (TRG_KPS, None, None, "'bbox' is missing"),
        (TRG_KPS, np.array([1.0, 2.0, 3.0]), None, "'bbox' is a 1 x 3 float64 array"),
    ],
)
def test_malformed_mat_files_are_rejected(bird_root: Path, kps, bbox, content: bytes | None, detail: str) -> None:
    mat_path = bird_root / "Annotations/bird/2008_000002.mat"
    if content is None:
        write_pascal_mat(mat_path, kps, bbox)
    else:
        mat_path.write_bytes(content)
    write_csv(bird_root / "trn_pairs.csv", MAT_HEADER, [bird_row()])
    reject = only_reject(read_all(bird_root, "trn"))
    assert (reject.reason, reject.file) == (checks.MALFORMED_ANNOTATION, "Annotations/bird/2008_000002.mat")
    assert detail in reject.detail


def test_mat_keypoint_row_counts_must_agree(bird_root: Path) -> None:
    write_pascal_mat(bird_root / "Annotations/bird/2008_000002.mat", TRG_KPS[:3], TRG_BBOX)
    write_csv(bird_root / "trn_pairs.csv", MAT_HEADER, [bird_row()])
    reject = only_reject(read_all(bird_root, "trn"))
    assert reject.reason == checks.KEYPOINT_COUNT_MISMATCH
    assert "has 4 keypoint rows" in reject.detail and "2008_000002.mat 3" in reject.detail


@pytest.mark.parametrize(
    ("cells", "reason", "detail"),
    [
        (("1;2", "1;2", "1;2", "1"), checks.KEYPOINT_COUNT_MISMATCH, "{'XA': 2, 'YA': 2, 'XB': 2, 'YB': 1}"),
        (("1;2", "1;two", "1;2", "1;2"), checks.MALFORMED_ANNOTATION, "YA '1;two' is not a ';'-separated list"),
        (("1;;2", "1;2;3", "1;2;3", "1;2;3"), checks.MALFORMED_ANNOTATION, "XA '1;;2'"),
    ],
)
def test_inline_keypoint_lists_must_parse_and_agree(bird_root: Path, cells: tuple[str, ...], reason: str, detail: str) -> None:
    row = [pascal_csv_image("2008_000001"), pascal_csv_image("2008_000002"), 3, *cells]
    write_csv(bird_root / "test_pairs.csv", INLINE_HEADER, [row])
    reject = only_reject(read_all(bird_root, "test"))
    assert (reject.reason, reject.file, reject.item) == (reason, "test_pairs.csv", "2008_000001_2008_000002")
    assert detail in reject.detail and "test_pairs.csv:2" in reject.detail


def test_one_item_per_row_and_each_mat_read_once(bird_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [bird_row(0), bird_row(1), bird_row(0, class_id=4), bird_row(1, class_id=4), bird_row(class_id=99)]
    write_csv(bird_root / "trn_pairs.csv", MAT_HEADER, rows)
    with (bird_root / "trn_pairs.csv").open("a") as csv_file:
        csv_file.write("\n")  # a trailing blank line is no pair
    reads = Counter()
    original = Location.read_bytes

    def counting_read_bytes(self: Location, rel: str, *args, **kwargs) -> bytes:
        reads[rel] += 1
        return original(self, rel, *args, **kwargs)

    monkeypatch.setattr(Location, "read_bytes", counting_read_bytes)
    items = read_all(bird_root, "trn")
    assert [type(item).__name__ for item in items] == ["PairRecord", "PairRecord", "Reject", "Reject", "Reject"]
    assert [item.reason for item in items[2:]] == [checks.MISSING_ANNOTATION, checks.MISSING_ANNOTATION, checks.MALFORMED_ANNOTATION]
    assert all(count == 1 for count in reads.values()), reads


# ---------------------------------------------------------------- real NCNet pair lists

REAL_CSVS = ("train_pairs.csv", "val_pairs.csv", "test_pairs.csv")
REAL_IMAGE_SIZE = (500, 375)  # larger than every keypoint of the lists (x <= 300, y <= 300)
TEST_PAIRS_PER_CLASS = (15, 30, 10, 6, 8, 32, 19, 27, 13, 3, 8, 24, 9, 27, 12, 7, 1, 13, 20, 15)


def synthetic_kps(class_id: int, stem: str) -> np.ndarray:
    """A deterministic ``(8 + class_id % 5, 2)`` 1-based keypoint array with some NaN rows."""
    seed = int.from_bytes(hashlib.sha256(stem.encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    kps = rng.uniform(1.0, 300.0, size=(8 + class_id % 5, 2))
    kps[rng.random(len(kps)) < 0.3] = NAN
    return kps


def real_rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as csv_file:
        return list(csv.DictReader(csv_file))


def stem_of(csv_image: str) -> str:
    return csv_image.rsplit("/", 1)[-1].rsplit(".", 1)[0]


@pytest.fixture(scope="module")
def real_pascal_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pair CSVs beside generated JPEGs and ``.mat`` files for every image they name."""
    root = tmp_path_factory.mktemp("pf-pascal")
    images = ImageFiles()
    annotated: set[tuple[int, str]] = set()
    for name in REAL_CSVS:
        shutil.copyfile(shared_data / "pf-pascal-pairs" / name, root / name)
        for row in real_rows(root / name):
            for column in ("source_image", "target_image"):
                annotated.add((int(row["class"]), stem_of(row[column])))
    for class_id, stem in sorted(annotated):
        class_name = pfpascal.CLASS_NAMES[class_id - 1]
        write_pascal_mat(root / pfpascal.annotation_path(class_name, stem), synthetic_kps(class_id, stem), np.array([10.0, 20.0, 400.0, 300.0]))
        images.write(root / "JPEGImages" / f"{stem}.jpg", REAL_IMAGE_SIZE)
    return root


def test_real_test_list_keypoints_round_trip_exactly(real_pascal_root: Path) -> None:
    items = read_all(real_pascal_root, "test")
    rows = real_rows(real_pascal_root / "test_pairs.csv")
    assert len(items) == len(rows) == 299
    assert all(isinstance(item, PairRecord) for item in items)
    for pair, row in zip(items, rows):
        expected = {column: np.array([float(v) for v in row[column].split(";")]) - 1.0 for column in ("XA", "YA", "XB", "YB")}
        np.testing.assert_array_equal(pair.src_kps, np.column_stack([expected["XA"], expected["YA"]]))
        np.testing.assert_array_equal(pair.trg_kps, np.column_stack([expected["XB"], expected["YB"]]))
        np.testing.assert_array_equal(pair.kps_ids, np.arange(len(expected["XA"])))
        assert "flip" not in pair.extras
        assert checks.check_pair(pair) == []
        assert checks.check_against_images(pair, REAL_IMAGE_SIZE, REAL_IMAGE_SIZE) == []
    per_class = Counter(pair.extras["class_id"] for pair in items)
    assert tuple(per_class[class_id] for class_id in range(1, 21)) == TEST_PAIRS_PER_CLASS
    assert sum(len(pair.kps_ids) for pair in items) == 2414
    root = Location(str(real_pascal_root))
    assert all(root.exists(pair.src.path) and root.exists(pair.trg.path) for pair in items)


def test_real_train_list_flips_and_duplicate_rows(real_pascal_root: Path) -> None:
    items = read_all(real_pascal_root, "trn")
    rows = real_rows(real_pascal_root / "train_pairs.csv")
    assert len(items) == len(rows) == 2940
    assert all(isinstance(item, PairRecord) for item in items)
    assert Counter(pair.extras["flip"] for pair in items) == {0: 1470, 1: 1470}
    assert all(pair.extras["csv"] == "train_pairs.csv" for pair in items)
    assert len({pair.key for pair in items}) == 2452
    key_of_row: dict[tuple[str, ...], str] = {}
    for pair, row in zip(items, rows):
        # Identical rows share one key; distinct rows never do.
        assert key_of_row.setdefault(tuple(row.values()), pair.key) == pair.key
        src_kps = synthetic_kps(int(row["class"]), stem_of(row["source_image"]))
        trg_kps = synthetic_kps(int(row["class"]), stem_of(row["target_image"]))
        both = np.flatnonzero(~np.isnan(src_kps[:, 0]) & ~np.isnan(trg_kps[:, 0]))
        np.testing.assert_array_equal(pair.kps_ids, both)
        np.testing.assert_array_equal(pair.src_kps, src_kps[both] - 1.0)
        np.testing.assert_array_equal(pair.trg_bbox, [9.0, 19.0, 399.0, 299.0])
    assert len(key_of_row) == 2452


def test_real_val_list(real_pascal_root: Path) -> None:
    items = read_all(real_pascal_root, "val")
    assert len(items) == 308
    assert all(isinstance(item, PairRecord) and item.extras["flip"] == 0 for item in items)
    assert len({pair.key for pair in items}) == 308
