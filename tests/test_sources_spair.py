"""The SPair-71k reader on fixtures written in the real layout (no SPair file is public)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipelines import checks
from pipelines.schema import ImageRef, PairRecord, Reject
from pipelines.sources import get_source, spair
from pipelines.storage import Location
from tests.spair_format import PAIR_NAME, pair_document, write_layout, write_pair

ORIGIN = f"PairAnnotation/trn/{PAIR_NAME}.json"


def read_one(root: Path, doc: dict | str, split: str = "trn") -> PairRecord | Reject:
    write_layout(root, split, f"{PAIR_NAME}\n")
    write_pair(root, split, PAIR_NAME, doc)
    items = list(spair.read_pairs(Location(str(root)), split))
    assert len(items) == 1
    return items[0]


def test_registered_with_the_contract():
    source = get_source("spair")
    assert source.splits == ("trn", "val", "test")
    assert source.summary.startswith("SPair-71k")
    assert "0-based" in spair.__doc__


def test_pair_values_parsed_exactly(tmp_path):
    pair = read_one(tmp_path, pair_document())

    assert isinstance(pair, PairRecord)
    assert pair.key == "000009-2008_001546-2009_000327_aeroplane"
    assert (pair.dataset, pair.split, pair.category, pair.group, pair.threshold) == ("spair", "trn", "aeroplane", "aeroplane", "bbox")
    assert pair.src == ImageRef("aeroplane_2008_001546", "JPEGImages/aeroplane/2008_001546.jpg", (500, 375))
    assert pair.trg == ImageRef("aeroplane_2009_000327", "JPEGImages/aeroplane/2009_000327.jpg", (500, 333))
    assert pair.src_kps.dtype == np.float64 and pair.src_kps.shape == (3, 2)
    np.testing.assert_array_equal(pair.src_kps, [[100.0, 150.0], [230.0, 120.0], [410.0, 200.0]])
    np.testing.assert_array_equal(pair.trg_kps, [[90.0, 140.0], [250.0, 130.0], [400.0, 210.0]])
    assert pair.kps_ids.dtype == np.int64
    np.testing.assert_array_equal(pair.kps_ids, [0, 7, 11])
    assert pair.src_bbox.dtype == np.float64
    np.testing.assert_array_equal(pair.src_bbox, [12.0, 97.0, 487.0, 290.0])
    np.testing.assert_array_equal(pair.trg_bbox, [44.0, 51.0, 460.0, 262.0])
    assert pair.origin == ORIGIN
    assert pair.extras == {
        "viewpoint_variation": 1,
        "scale_variation": 0,
        "truncation": 2,
        "occlusion": 0,
        "src_pose": "Left",
        "trg_pose": "Frontal",
        "mirror": 0,
    }
    assert checks.check_pair(pair) == []
    assert checks.check_against_images(pair, (500, 375), (500, 333)) == []


def test_string_ids_float_coordinates_and_numeric_poses(tmp_path):
    doc = pair_document(kps_ids=["0", "7", "11"], src_kps=[[100.5, 150.25], [230, 120], [410, 200]], src_pose=2)
    del doc["mirror"]
    pair = read_one(tmp_path, doc)
    np.testing.assert_array_equal(pair.kps_ids, [0, 7, 11])
    np.testing.assert_array_equal(pair.src_kps[0], [100.5, 150.25])
    assert pair.extras["src_pose"] == 2
    assert "mirror" not in pair.extras


def test_null_keypoints_pass_as_nan_for_the_shard_stage(tmp_path):
    pair = read_one(tmp_path, pair_document(src_kps=[[100, None], None, [410, 200]]))
    assert math.isnan(pair.src_kps[0, 1]) and np.isnan(pair.src_kps[1]).all()
    assert pair.src_kps[0, 0] == 100.0
    assert [r.reason for r in checks.check_pair(pair)] == [checks.NAN_KEYPOINTS]


def test_out_of_image_values_are_not_filtered(tmp_path):
    pair = read_one(tmp_path, pair_document(src_kps=[[100, 150], [600, 120], [410, 200]], src_bndbox=[487, 97, 12, 290]))
    np.testing.assert_array_equal(pair.src_kps[1], [600.0, 120.0])
    np.testing.assert_array_equal(pair.src_bbox, [487.0, 97.0, 12.0, 290.0])
    assert [r.reason for r in checks.check_pair(pair)] == [checks.INVERTED_BBOX]


def spair_key(name: str) -> str:
    return name.replace(":", "_")


def test_every_nonblank_line_is_a_pair_last_line_without_newline_included(tmp_path):
    names = [PAIR_NAME, "000010-2008_001546-2010_000001:aeroplane", "000011-2009_000327-2008_001546:aeroplane"]
    write_layout(tmp_path, "val", f"{names[0]}\n\n{names[1]}\r\n   \n{names[2]}")
    for name in names:
        src, trg = name.split(":")[0].split("-")[1:]
        write_pair(tmp_path, "val", name, pair_document(src_imname=f"{src}.jpg", trg_imname=f"{trg}.jpg"))

    items = list(spair.read_pairs(Location(str(tmp_path)), "val"))

    assert [item.key for item in items] == [spair_key(name) for name in names]
    assert all(isinstance(item, PairRecord) for item in items)
    assert items[2].origin == f"PairAnnotation/val/{names[2]}.json"


def test_one_item_per_line_rejects_included(tmp_path):
    good, missing = PAIR_NAME, "000002-2008_000001-2008_000002:aeroplane"
    write_layout(tmp_path, "test", f"{good}\n{missing}\n{good}\n")
    write_pair(tmp_path, "test", good, pair_document())

    items = list(spair.read_pairs(Location(str(tmp_path)), "test"))

    assert [type(item).__name__ for item in items] == ["PairRecord", "Reject", "PairRecord"]
    # The same listed pair gets the same key, so the shard stage can flag the duplicate.
    assert items[0].key == items[2].key


def test_missing_layout_is_a_usage_error_raised_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Layout/large/trn\.txt"):
        spair.read_pairs(Location(str(tmp_path)), "trn")


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'train'"):
        spair.read_pairs(Location(str(tmp_path)), "train")


def test_demo_label(tmp_path):
    write_layout(tmp_path, "trn", f"{PAIR_NAME}\n")
    write_pair(tmp_path, "trn", PAIR_NAME, pair_document())
    (pair,) = spair.read_spair_layout(Location(str(tmp_path)), "trn", dataset="demo")
    assert pair.dataset == "demo"


def test_missing_annotation(tmp_path):
    write_layout(tmp_path, "trn", f"{PAIR_NAME}\n")
    (reject,) = spair.read_pairs(Location(str(tmp_path)), "trn")
    assert reject == Reject(
        item="000009-2008_001546-2009_000327_aeroplane",
        file=ORIGIN,
        reason=checks.MISSING_ANNOTATION,
        detail=f"{ORIGIN} does not exist (Layout line 1)",
    )


def test_malformed_layout_line(tmp_path):
    write_layout(tmp_path, "trn", "2008_001546 2009_000327 aeroplane\n")
    (reject,) = spair.read_pairs(Location(str(tmp_path)), "trn")
    assert (reject.reason, reject.file) == (checks.MALFORMED_ANNOTATION, "Layout/large/trn.txt")
    assert "line 1" in reject.detail


def without(key: str) -> dict:
    doc = pair_document()
    del doc[key]
    return doc


@pytest.mark.parametrize(
    ("doc", "reason", "detail"),
    [
        ('{"category": "aeroplane", ', checks.MALFORMED_ANNOTATION, "not valid JSON"),
        ("[1, 2]", checks.MALFORMED_ANNOTATION, "top level is a list"),
        (without("trg_bndbox"), checks.MALFORMED_ANNOTATION, "'trg_bndbox' is missing"),
        (without("kps_ids"), checks.MALFORMED_ANNOTATION, "'kps_ids' is missing"),
        (without("occlusion"), checks.MALFORMED_ANNOTATION, "'occlusion' is missing"),
        (pair_document(category=5), checks.MALFORMED_ANNOTATION, "'category' is 5"),
        (pair_document(src_imsize="500x375"), checks.MALFORMED_ANNOTATION, "'src_imsize'"),
        (pair_document(trg_imsize=[500.5, 333, 3]), checks.MALFORMED_ANNOTATION, "'trg_imsize'"),
        (pair_document(src_bndbox=[12, 97, 487]), checks.MALFORMED_ANNOTATION, "'src_bndbox'"),
        (pair_document(trg_bndbox=[44, "51", 460, 262]), checks.MALFORMED_ANNOTATION, "'trg_bndbox'"),
        (pair_document(src_kps=[[100, 150], [230], [410, 200]]), checks.MALFORMED_ANNOTATION, "src_kps[1]"),
        (pair_document(trg_kps=[[90, 140], [250, "130"], [400, 210]]), checks.MALFORMED_ANNOTATION, "trg_kps[1]"),
        (pair_document(kps_ids="0,7,11"), checks.MALFORMED_ANNOTATION, "'kps_ids'"),
        (pair_document(viewpoint_variation="1"), checks.MALFORMED_ANNOTATION, "'viewpoint_variation'"),
        (pair_document(truncation=True), checks.MALFORMED_ANNOTATION, "'truncation'"),
        (pair_document(trg_pose=None), checks.MALFORMED_ANNOTATION, "'trg_pose'"),
        (pair_document(mirror="0"), checks.MALFORMED_ANNOTATION, "'mirror'"),
        (pair_document(category="bicycle"), checks.INCONSISTENT_ANNOTATION, "category 'bicycle'"),
        (pair_document(src_imname="2008_001547.jpg"), checks.INCONSISTENT_ANNOTATION, "src_imname '2008_001547.jpg'"),
        (pair_document(trg_imname="2008_001546.jpg"), checks.INCONSISTENT_ANNOTATION, "trg_imname"),
        (pair_document(kps_ids=[0, 7, 30]), checks.INCONSISTENT_ANNOTATION, "kps_ids[2] is 30"),
        (pair_document(kps_ids=[-1, 7, 11]), checks.INCONSISTENT_ANNOTATION, "kps_ids[0] is -1"),
        (pair_document(kps_ids=[0, 7.5, 11]), checks.INCONSISTENT_ANNOTATION, "kps_ids[1] is 7.5"),
        (pair_document(kps_ids=["0", "seven", "11"]), checks.INCONSISTENT_ANNOTATION, "kps_ids[1] is 'seven'"),
        (pair_document(kps_ids=[0, True, 11]), checks.INCONSISTENT_ANNOTATION, "kps_ids[1] is True"),
        (pair_document(kps_ids=[0, 7, "7"]), checks.INCONSISTENT_ANNOTATION, "repeat [7]"),
        (pair_document(kps_ids=[0, 7]), checks.KEYPOINT_COUNT_MISMATCH, "3 src_kps, 3 trg_kps, 2 kps_ids"),
        (pair_document(trg_kps=[[90, 140]]), checks.KEYPOINT_COUNT_MISMATCH, "3 src_kps, 1 trg_kps, 3 kps_ids"),
    ],
)
def test_rejects(tmp_path, doc, reason, detail):
    reject = read_one(tmp_path, doc)
    assert isinstance(reject, Reject)
    assert (reject.item, reject.file, reject.reason, reject.kind) == ("000009-2008_001546-2009_000327_aeroplane", ORIGIN, reason, "pair")
    assert detail in reject.detail
    assert reject.reason in checks.REASONS
