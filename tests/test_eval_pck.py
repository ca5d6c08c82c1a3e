"""PCK on hand-computed cases that tests/test_pck.py leaves out: the ``img`` and ``bbox-kp``
kinds through both averages, mixed kinds, the frame inverse, and padding through a real padded
batch (sm_eval.predict.batch_records), which is how training validation and sm_eval score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sm_eval.pck import (
    KeypointRecords,
    frame_square,
    records_for_pair,
    summarize,
)
from sm_eval.predict import batch_records
from sm_feed.batches import PairMeta
from sm_model.inputs import InputSpec
from sm_model.pixels import from_resized_square, to_resized_square
from tests.per_pair import PreparedPair, collate_pairs


def row_pair(key: str, category: str, kind: str, distances: list[float], size=(640, 480), bbox=(0, 0, 10, 10)):
    """A pair whose ground truth lies on a row and whose predictions miss by ``distances`` along y."""
    gt = np.array([[20.0 * i, 40.0] for i in range(len(distances))])
    pred = gt + np.array([[0.0, d] for d in distances])
    ids = np.arange(len(distances))
    valid = np.ones(len(distances), bool)
    return records_for_pair(key, category, pred, gt, valid, ids, kind, np.array(bbox, float), size)


def test_img_threshold_both_averages_and_both_rules() -> None:
    # A: target 300 x 200 -> base 300, threshold 30 at alpha 0.1: misses 10, 30, 31 -> hit, hit (<=), miss.
    # B: target 150 x 250 -> base 250, threshold 25: misses 24, 26 -> hit, miss.
    recs = KeypointRecords.concat(
        [
            row_pair("A", "cat", "img", [10, 30, 31], size=(300, 200)),
            row_pair("B", "cat", "img", [24, 26], size=(150, 250)),
        ]
    )
    assert recs.threshold_base.tolist() == [300.0] * 3 + [250.0] * 2
    out = summarize(recs, [0.1])["overall"]
    assert out["per_image"] == [pytest.approx((2 / 3 + 1 / 2) / 2)]  # 7/12
    assert out["per_keypoint"] == [3 / 5]
    strict = summarize(recs, [0.1], rule="<")["overall"]
    assert strict["per_image"] == [pytest.approx((1 / 3 + 1 / 2) / 2)]  # 30 is no longer a hit
    assert strict["per_keypoint"] == [2 / 5]


def test_bbox_kp_threshold_both_averages() -> None:
    # Target keypoints (0,0), (40,10), (20,30): box 40 x 30 -> base 40; alpha 0.25 -> threshold 10.
    gt = np.array([[0.0, 0.0], [40.0, 10.0], [20.0, 30.0]])
    pred = gt + [[6, 8], [0, 10], [0, 11]]
    a = records_for_pair("A", "duck", pred, gt, np.ones(3, bool), np.arange(3), "bbox-kp", np.zeros(4), (300, 300))
    # Target keypoints (0,0), (0,80): box 0 x 80 -> base 80; threshold 20: misses 20 (hit), 0 (hit).
    gt_b = np.array([[0.0, 0.0], [0.0, 80.0]])
    b = records_for_pair(
        "B", "duck", gt_b + [[12, 16], [0, 0]], gt_b, np.ones(2, bool), np.arange(2), "bbox-kp", np.zeros(4), (300, 300)
    )
    recs = KeypointRecords.concat([a, b])
    assert recs.threshold_base.tolist() == [40.0] * 3 + [80.0] * 2
    out = summarize(recs, [0.25])["overall"]
    assert out["per_image"] == [pytest.approx((2 / 3 + 1.0) / 2)]  # A: 10, 10 hit, 11 miss
    assert out["per_keypoint"] == [4 / 5]


def test_mixed_threshold_kinds_keep_their_own_base_per_category() -> None:
    recs = KeypointRecords.concat(
        [
            row_pair("A", "aeroplane", "bbox", [5.0, 15.0], bbox=(0, 0, 100, 50)),  # base 100: hit, miss
            row_pair("B", "willow", "img", [5.0, 15.0], size=(200, 100)),  # base 200: hit, hit
        ]
    )
    out = summarize(recs, [0.1])
    assert out["per_category"]["aeroplane"]["per_keypoint"] == [0.5]
    assert out["per_category"]["willow"]["per_keypoint"] == [1.0]
    assert out["overall"]["per_image"] == [0.75] and out["overall"]["per_keypoint"] == [0.75]


def test_from_resized_square_inverts_to_resized_square_and_frame_names() -> None:
    points = np.array([[0.0, 0.0], [199.5, 99.5], [-0.5, 37.25]])
    there = to_resized_square(points, (200, 100), 56)
    np.testing.assert_allclose(from_resized_square(there, (200, 100), 56), points, rtol=0, atol=1e-12)
    assert frame_square("original") is None and frame_square("resized-252") == 252
    with pytest.raises(ValueError, match="'resized-'"):
        frame_square("resized-")


class FixedPredictions:
    """Stands in for SimpleMatch in batch_records: predicts the given ``[B, N, 2]`` points."""

    def __init__(self, pred: torch.Tensor) -> None:
        self.pred = pred
        self.input_spec = InputSpec(28)

    def predict(self, src, trg, src_kps, valid, src_sizes, trg_sizes) -> torch.Tensor:
        assert src_kps.shape == self.pred.shape and valid.shape == self.pred.shape[:2]
        return self.pred


def prepared(key: str, trg_kps: np.ndarray, threshold: str, trg_size=(300, 300)) -> PreparedPair:
    count = len(trg_kps)
    meta = PairMeta(key, "pfwillow", "duck", threshold, np.arange(count), trg_kps, np.zeros(4), trg_size, {})
    image = torch.zeros(3, 28, 28, dtype=torch.uint8)
    kps = torch.from_numpy(trg_kps).float()
    size = torch.tensor(trg_size)
    return PreparedPair(image, image, kps, kps, torch.zeros(4), torch.zeros(4), size, size, meta)


def test_padding_in_a_real_batch_never_enters_the_bbox_kp_threshold() -> None:
    # Pair P has 2 keypoints and is padded to 4 by its batch neighbour Q. Its real keypoint box is
    # 30 x 40 -> base 40, threshold 4 at alpha 0.1. The official code's box over the -1 padding
    # is (40 + 1) x (50 + 1) -> base 51, threshold 5.1, under which a 5-pixel miss is a hit.
    p_kps = np.array([[10.0, 10.0], [40.0, 50.0]])
    q_kps = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 50.0], [100.0, 50.0]])
    batch = collate_pairs([prepared("P", p_kps, "bbox-kp"), prepared("Q", q_kps, "bbox-kp")])
    assert batch.valid.tolist() == [[True, True, False, False], [True] * 4]
    pred = torch.full((2, 4, 2), -7.0)  # padded rows hold junk, as the model's do
    pred[0, :2] = torch.from_numpy(p_kps + [[3.0, 4.0], [0.0, 0.0]]).float()  # misses 5 and 0
    pred[1] = torch.from_numpy(q_kps).float()
    recs = batch_records(FixedPredictions(pred), batch)
    assert recs.pair_key.tolist() == ["P", "P", "Q", "Q", "Q", "Q"]
    assert recs.threshold_base.tolist() == [40.0, 40.0, 100.0, 100.0, 100.0, 100.0]
    out = summarize(recs, [0.1])
    assert out["per_category"]["duck"]["per_image"] == [pytest.approx((1 / 2 + 1.0) / 2)]
    padded = np.vstack([p_kps, [[-1.0, -1.0], [-1.0, -1.0]]])
    official_base = float(np.max(padded.max(axis=0) - padded.min(axis=0)))
    assert official_base == 51.0 and 5.0 <= 0.1 * official_base  # the bug would have counted the miss
