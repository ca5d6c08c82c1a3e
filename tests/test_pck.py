"""The PCK protocol (sm_eval.pck) on hand-computed pairs."""

from __future__ import annotations

import numpy as np
import pytest

from sm_eval.pck import (
    KeypointRecords,
    keypoint_hits,
    records_for_pair,
    summarize,
    threshold_base,
)
from sm_model.pixels import to_resized_square

NO_KPS = np.zeros((0, 2))
NO_VALID = np.zeros(0, dtype=bool)


def pair(key: str, category: str, offsets: list[float], base_side: float = 100.0, **flags: int) -> KeypointRecords:
    """One pair with target bbox ``(0, 0, base_side, base_side / 2)``, so the bbox base is
    ``base_side``. Ground-truth keypoints lie on a row, and the predictions are shifted in x by
    ``offsets``."""
    gt = np.array([[10.0 * i, 5.0] for i in range(len(offsets))])
    pred = gt + np.array([[dx, 0.0] for dx in offsets])
    return records_for_pair(
        key,
        category,
        pred,
        gt,
        np.ones(len(offsets), dtype=bool),
        np.arange(len(offsets)),
        "bbox",
        np.array([0.0, 0.0, base_side, base_side / 2]),
        (640, 480),
        flags=flags or None,
    )


# ---- threshold bases ---------------------------------------------------------------------------


def test_bbox_base_is_max_side_without_plus_one() -> None:
    assert threshold_base("bbox", np.array([10.0, 20.0, 50.0, 100.0]), (640, 480), NO_KPS, NO_VALID) == 80.0
    assert threshold_base("bbox", np.array([10.0, 20.0, 130.0, 100.0]), (640, 480), NO_KPS, NO_VALID) == 120.0


def test_img_base_is_max_side_of_target_image() -> None:
    assert threshold_base("img", np.zeros(4), (500, 375), NO_KPS, NO_VALID) == 500.0
    assert threshold_base("img", np.zeros(4), (300, 420), NO_KPS, NO_VALID) == 420.0


def test_bbox_kp_base_ignores_padding_unlike_official_pf_willow() -> None:
    kps = np.array([[10.0, 20.0], [40.0, 60.0], [-1.0, -1.0]])
    valid = np.array([True, True, False])
    assert threshold_base("bbox-kp", np.zeros(4), (640, 480), kps, valid) == 40.0  # max(40-10, 60-20)
    # The official code took min/max over the padded rows: max(40 - -1, 60 - -1) = 61.
    assert threshold_base("bbox-kp", np.zeros(4), (640, 480), kps, np.ones(3, dtype=bool)) == 61.0
    # A 5-pixel miss at alpha 0.1 is wrong under the correct base (4.0) but right under the buggy one (6.1).
    recs = records_for_pair("p", "c", kps + [[3.0, 4.0]], kps, valid, np.arange(3), "bbox-kp", np.zeros(4), (640, 480))
    assert len(recs) == 2 and recs.threshold_base.tolist() == [40.0, 40.0]
    assert summarize(recs, [0.1])["overall"]["per_keypoint"] == [0.0]
    assert keypoint_hits(kps[:2] + [[3.0, 4.0]], kps[:2], 61.0, [0.1]).tolist() == [[True, True]]


def test_bbox_kp_without_valid_keypoints_and_unknown_kind_raise() -> None:
    with pytest.raises(ValueError, match="valid"):
        threshold_base("bbox-kp", np.zeros(4), (1, 1), np.array([[1.0, 2.0]]), np.array([False]))
    with pytest.raises(ValueError, match="'bbox_kp'"):
        threshold_base("bbox_kp", np.zeros(4), (1, 1), NO_KPS, NO_VALID)


# ---- hits --------------------------------------------------------------------------------------


def test_rule_at_distance_exactly_equal_to_threshold() -> None:
    pred, gt = np.array([[3.0, 4.0], [0.0, 6.0]]), np.zeros((2, 2))  # distances 5 and 6
    alphas = [0.25, 0.5]  # thresholds 5 and 10 with base 20, exact in binary
    assert keypoint_hits(pred, gt, 20.0, alphas, "<=").tolist() == [[True, False], [True, True]]
    assert keypoint_hits(pred, gt, 20.0, alphas, "<").tolist() == [[False, False], [True, True]]
    with pytest.raises(ValueError, match="'=<'"):
        keypoint_hits(pred, gt, 20.0, alphas, "=<")


def test_per_keypoint_base_broadcasts() -> None:
    pred, gt = np.array([[3.0, 4.0], [3.0, 4.0]]), np.zeros((2, 2))
    assert keypoint_hits(pred, gt, np.array([10.0, 50.0]), [0.1]).tolist() == [[False, True]]


# ---- averages and breakdowns -------------------------------------------------------------------


def test_per_image_and_per_keypoint_averages_differ() -> None:
    # Bbox base 100, alpha 0.1: the threshold is 10. A is 1/1 correct; B is 1/3 correct
    # (B's 10-pixel offset counts as a hit under <=).
    recs = KeypointRecords.concat([pair("A", "cat", [1.0]), pair("B", "cat", [10.0, 11.0, 30.0])])
    out = summarize(recs, [0.1])
    assert out["overall"]["per_image"] == [pytest.approx((1.0 + 1 / 3) / 2)]  # 2/3
    assert out["overall"]["per_keypoint"] == [2 / 4]
    assert (out["overall"]["n_pairs"], out["overall"]["n_keypoints"]) == (2, 4)
    strict = summarize(recs, [0.1], rule="<")
    assert strict["overall"]["per_image"] == [0.5] and strict["overall"]["per_keypoint"] == [1 / 4]
    assert "<=" in out["protocol"]["rule"] and "<=" not in strict["protocol"]["rule"]
    assert out["protocol"]["frame"] == "original"


def test_per_category_and_per_flag_breakdown() -> None:
    recs = KeypointRecords.concat(
        [
            pair("A", "cat", [1.0, 50.0], viewpoint_variation=0, scale_variation=1, truncation=0, occlusion=0),
            pair("B", "dog", [1.0, 2.0, 3.0, 50.0], viewpoint_variation=2, scale_variation=1, truncation=1, occlusion=0),
            pair("C", "dog", [50.0], viewpoint_variation=2, scale_variation=0, truncation=1, occlusion=0),
        ]
    )
    out = summarize(recs, [0.1, 1.0])
    cats = out["per_category"]
    assert sorted(cats) == ["cat", "dog"]
    assert cats["cat"]["per_image"] == [0.5, 1.0] and cats["cat"]["per_keypoint"] == [0.5, 1.0]
    assert cats["dog"]["per_image"] == [pytest.approx(0.375), 1.0]  # (3/4 + 0/1) / 2
    assert cats["dog"]["per_keypoint"] == [3 / 5, 1.0]
    assert (cats["dog"]["n_pairs"], cats["dog"]["n_keypoints"]) == (2, 5)
    view = out["per_flag"]["viewpoint_variation"]
    assert sorted(view) == [0, 2]
    assert view[0]["per_image"][0] == 0.5 and view[2]["per_keypoint"][0] == 3 / 5
    scale = out["per_flag"]["scale_variation"]
    assert scale[1]["per_image"][0] == pytest.approx(0.625) and scale[1]["per_keypoint"][0] == 4 / 6  # A + B
    assert scale[0]["per_image"][0] == 0.0
    assert list(out["per_flag"]["occlusion"]) == [0]
    assert out["overall"]["per_image"][0] == pytest.approx((0.5 + 0.75 + 0.0) / 3)


def test_no_flag_breakdown_without_flag_columns() -> None:
    assert summarize(pair("A", "cat", [1.0]), [0.1])["per_flag"] == {}


def test_summary_is_independent_of_record_order() -> None:
    rng = np.random.default_rng(0)
    parts = [
        pair(f"p{i:03d}", f"c{i % 7}", list(rng.uniform(0, 30, size=int(rng.integers(1, 9)))), viewpoint_variation=i % 3)
        for i in range(200)
    ]
    recs = KeypointRecords.concat(parts)
    shuffled = KeypointRecords.concat(parts[::-1]).take(rng.permutation(len(recs)))
    alphas = [0.01, 0.05, 0.1, 0.15]
    assert summarize(shuffled, alphas) == summarize(recs, alphas)


def test_records_round_trip_through_a_dict_of_arrays() -> None:
    recs = pair("A", "cat", [1.0, 2.0], viewpoint_variation=1)
    columns = {name: values.tolist() for name, values in recs.to_dict().items()}  # as pyarrow's to_pydict gives
    assert "truncation" not in columns
    back = KeypointRecords.from_dict(columns)
    assert summarize(back, [0.1]) == summarize(recs, [0.1])
    with pytest.raises(ValueError, match="flag columns"):
        KeypointRecords.concat([recs, pair("B", "cat", [1.0])])


# ---- resized-square frame ----------------------------------------------------------------------


def test_to_resized_square_uses_pixel_centres() -> None:
    out = to_resized_square(np.array([[49.5, 49.5], [-0.5, -0.5], [199.5, 99.5]]), (200, 100), 100)
    assert out.tolist() == [[24.5, 49.5], [-0.5, -0.5], [99.5, 99.5]]  # image edges stay edges


def test_resized_frame_distorts_threshold_and_distance() -> None:
    # The target is 200 x 100 and is resized to 100 x 100: x is halved and y is kept.
    # The bbox (9.5, 19.5, 109.5, 59.5) is 100 x 40 originally and 50 x 40 in the resized frame.
    gt = np.array([[49.5, 49.5], [49.5, 49.5]])
    pred = np.array([[89.5, 49.5], [49.5, 69.5]])  # 40 px right, 20 px down
    bbox = np.array([9.5, 19.5, 109.5, 59.5])
    args = ("p", "c", pred, gt, np.ones(2, dtype=bool), np.arange(2), "bbox", bbox, (200, 100))
    original = records_for_pair(*args, square=100)  # carries S, so it concatenates with the resized records
    resized = records_for_pair(*args, frame="resized", square=100)
    assert original.threshold_base.tolist() == [100.0, 100.0]
    assert resized.threshold_base.tolist() == [50.0, 50.0]
    assert resized.pred_x.tolist() == [44.5, 24.5] and resized.gt_y.tolist() == [49.5, 49.5]
    # alpha 0.2 original: threshold 20, distances 40 and 20 -> [miss, hit].
    # resized: threshold 10, distances 20 and 20 -> [miss, miss].
    assert summarize(original, [0.2])["overall"]["per_keypoint"] == [0.5]
    out = summarize(resized, [0.2, 0.4])
    assert out["overall"]["per_keypoint"] == [0.0, 1.0] and out["protocol"]["frame"] == "resized-100"
    with pytest.raises(ValueError, match="mix frames"):
        summarize(KeypointRecords.concat([original, resized]), [0.1])


def test_resized_frame_img_and_bbox_kp_bases() -> None:
    kps = np.array([[19.5, 9.5], [119.5, 29.5], [-1.0, -1.0]])
    valid = np.array([True, True, False])
    common = ("p", "c", kps, kps, valid, np.arange(3))
    img = records_for_pair(*common, "img", np.zeros(4), (200, 100), frame="resized", square=64)
    assert img.threshold_base.tolist() == [64.0, 64.0]
    kp = records_for_pair(*common, "bbox-kp", np.zeros(4), (200, 100), frame="resized", square=100)
    assert kp.threshold_base.tolist() == [50.0, 50.0]  # x extent 100 -> 50, y extent 20 -> 20
    with pytest.raises(ValueError, match="square"):
        records_for_pair(*common, "img", np.zeros(4), (200, 100), frame="resized")
