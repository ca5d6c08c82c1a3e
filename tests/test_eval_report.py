"""Reports (sm_eval.report) and figures (sm_eval.figures) from hand-made records: report.md shows
exactly report.json's numbers in both frames, both frames recomputed by hand, the predictions table
round-trips, the pictures are drawn."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sm_eval import figures
from sm_eval.pck import FRAMES, KeypointRecords, records_for_pair, records_in_frame, summarize
from sm_eval.report import (
    AVERAGE_LABELS,
    AVERAGES,
    build_report,
    curve_alphas,
    frame_label,
    model_results,
    percent,
    predictions_table,
    protocol_statement,
    render_markdown,
    table_alpha,
)
from tests.report_tables import markdown_table

ALPHAS = [0.05, 0.1, 0.15]
S = 28


def pair(key: str, category: str, misses: list[float], **flags: int) -> KeypointRecords:
    """Target bbox 100 px wide (base 100); ground truth on a row, predictions ``misses`` px off in x;
    network input ``S``."""
    gt = np.array([[10.0 * i, 5.0] for i in range(len(misses))])
    pred = gt + np.array([[m, 0.0] for m in misses])
    return records_for_pair(
        key, category, pred, gt, np.ones(len(misses), bool), np.arange(len(misses)), "bbox",
        np.array([0.0, 0.0, 100.0, 50.0]), (640, 480), square=S, flags=flags or None,
    )  # fmt: skip


def two_models() -> dict[str, KeypointRecords]:
    base = [
        pair("A", "cat", [1.0, 7.0, 30.0], viewpoint_variation=0, occlusion=1),
        pair("B", "dog", [12.0, 3.0], viewpoint_variation=2, occlusion=0),
        pair("C", "dog", [16.0], viewpoint_variation=2, occlusion=0),
    ]
    better = [
        pair("A", "cat", [1.0, 2.0, 3.0], viewpoint_variation=0, occlusion=1),
        pair("B", "dog", [4.0, 3.0], viewpoint_variation=2, occlusion=0),
        pair("C", "dog", [9.0], viewpoint_variation=2, occlusion=0),
    ]
    return {"base": KeypointRecords.concat(base), "better": KeypointRecords.concat(better)}


def report_for(records: Mapping[str, KeypointRecords]) -> dict[str, Any]:
    models = [
        {"name": name, "checkpoint": f"/ckpt/{name}.pt", "config": {"backbone": "dinov2_vits14"}, "kind": "simplematch", "localizer": "window", "image_size": S,
         "results": model_results(recs, ALPHAS, "<=")}
        for name, recs in records.items()
    ]  # fmt: skip
    data = {"shards": "/shards", "split": "test", "datasets": ["spair"], "pairs": 3, "keypoints": 6,
            "categories": ["cat", "dog"], "shards_read": 2}  # fmt: skip
    return build_report(
        data=data,
        protocol=protocol_statement("<=", ["bbox"]),
        alphas=ALPHAS,
        models=models,
        run={"workers": 0},
        files={"pck_curve": "pck_curve.png", "matches": ["matches/base-00-A.png"]},
    )


def test_model_results_hold_summary_and_a_dense_curve() -> None:
    recs = two_models()["base"]
    both = model_results(recs, ALPHAS, "<=")
    assert list(both) == list(FRAMES) == ["original", "resized"]
    for frame in FRAMES:
        in_frame = records_in_frame(recs, frame)
        assert {k: v for k, v in both[frame].items() if k != "curve"} == summarize(in_frame, ALPHAS, "<=")
    assert both["resized"]["protocol"]["frame"] == f"resized-{S}"
    results = both["original"]
    # Threshold 10 at alpha 0.1: A hits 1 and 7 (2/3), B hits 3 (1/2), C misses (0).
    assert results["overall"]["per_image"][1] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert results["overall"]["per_keypoint"][1] == 3 / 6
    curve = results["curve"]
    assert curve["alphas"] == curve_alphas(ALPHAS)
    assert curve["alphas"][:2] == [0.01, 0.02] and curve["alphas"][-1] == 0.2
    at = curve["alphas"].index(0.1)
    assert curve["overall"]["per_image"][at] == results["overall"]["per_image"][1]
    assert curve["per_category"]["dog"]["per_keypoint"][at] == results["per_category"]["dog"]["per_keypoint"][1]


def test_both_frames_recomputed_by_hand_on_two_pairs() -> None:
    # Network input 100 x 100. Pair A: img threshold, target 200 x 100 (x halves in the resized
    # frame, y stays). Pair B: bbox threshold, target 100 x 400 (x stays, y quarters).
    a_gt = np.array([[99.5, 49.5], [49.5, 29.5], [149.5, 79.5]])
    a_pred = a_gt + [[30.0, 0.0], [0.0, 15.0], [40.0, 0.0]]  # off by 30, 15, 40 px
    b_gt = np.array([[10.0, 100.0], [30.0, 50.0]])
    b_pred = b_gt + [[0.0, 22.0], [8.0, 0.0]]  # off by 22 px in y, 8 px in x
    a = records_for_pair("A", "cat", a_pred, a_gt, np.ones(3, bool), np.arange(3), "img", np.zeros(4), (200, 100),
                         square=100)  # fmt: skip
    b = records_for_pair("B", "dog", b_pred, b_gt, np.ones(2, bool), np.arange(2), "bbox",
                         np.array([0.0, 0.0, 60.0, 200.0]), (100, 400), square=100)  # fmt: skip
    records = KeypointRecords.concat([a, b])
    resized = records_in_frame(records, "resized")
    # Bases: original A max(200, 100) = 200, B the box's max side 200; resized A = S = 100, B the
    # resized box 60 x 50 -> 60.
    assert records.threshold_base.tolist() == [200.0] * 5
    assert resized.threshold_base.tolist() == [100.0] * 3 + [60.0] * 2
    # Distances: original 30, 15, 40 | 22, 8; resized 15, 15, 20 | 5.5, 8.
    assert resized.pred_x.tolist()[:3] == [64.5, 24.5, 94.5] and resized.gt_x.tolist()[:3] == [49.5, 24.5, 74.5]
    assert resized.pred_y.tolist()[3:] == [30.125, 12.125] and resized.gt_y.tolist()[3:] == [24.625, 12.125]

    both = model_results(records, [0.1, 0.2], "<=")
    original, square = both["original"]["overall"], both["resized"]["overall"]
    # alpha 0.1, original thresholds 20 | 20: A hits 15 (1/3), B hits 8 (1/2).
    # alpha 0.1, resized thresholds 10 | 6: A hits none (0/3), B hits 5.5 (1/2).
    # alpha 0.2 (40 | 40 and 20 | 12): every keypoint, the ties 40 <= 40 and 20 <= 20 included.
    assert original["per_image"] == [pytest.approx((1 / 3 + 1 / 2) / 2), 1.0]
    assert original["per_keypoint"] == [2 / 5, 1.0]
    assert square["per_image"] == [pytest.approx((0 + 1 / 2) / 2), 1.0] and square["per_keypoint"] == [1 / 5, 1.0]
    assert both["resized"]["per_category"]["dog"]["per_image"] == [0.5, 1.0]
    # The strict rule drops exactly the ties (A's third keypoint in both frames).
    strict = model_results(records, [0.2], "<")
    assert strict["original"]["overall"]["per_keypoint"] == strict["resized"]["overall"]["per_keypoint"] == [4 / 5]

    # report.md shows both frames side by side, as percentages.
    report = build_report(
        data={"shards": "/s", "split": "test", "datasets": ["x"], "pairs": 2, "keypoints": 5,
              "categories": ["cat", "dog"], "shards_read": 1},
        protocol=protocol_statement("<=", ["img", "bbox"], figure_frame="resized"),
        alphas=[0.1, 0.2],
        models=[{"name": "m", "checkpoint": "m.pt", "config": {}, "kind": "baseline", "localizer": "kernel", "image_size": 100, "results": both}],
        run={}, files={"pck_curve": "pck_curve.png"},
    )  # fmt: skip
    rows = markdown_table(render_markdown(report), "PCK per alpha over all pairs (%)")
    assert rows[1:] == [
        ["m", "original", "per image", "41.7", "100.0"],
        ["m", "original", "per keypoint", "40.0", "100.0"],
        ["m", "resized 100x100", "per image", "25.0", "100.0"],
        ["m", "resized 100x100", "per keypoint", "20.0", "100.0"],
    ]
    assert report["protocol"]["figure_frame"] == "resized"
    with pytest.raises(ValueError, match="unknown frame"):
        protocol_statement("<=", ["bbox"], figure_frame="square")


def test_records_without_the_network_side_score_in_the_original_frame_only() -> None:
    args = ("A", "cat", np.zeros((1, 2)), np.zeros((1, 2)), np.ones(1, bool), np.arange(1), "img", np.zeros(4), (64, 32))  # fmt: skip
    recs = records_for_pair(*args)
    assert records_in_frame(recs, "original") is recs
    with pytest.raises(ValueError, match="make them with square=S"):
        records_in_frame(recs, "resized")
    resized = records_in_frame(records_for_pair(*args, square=16), "resized")
    assert records_in_frame(resized, "resized") is resized and resized.threshold_base.tolist() == [16.0]
    with pytest.raises(ValueError, match="cannot be moved back"):
        records_in_frame(resized, "original")


def test_curve_alphas_and_table_alpha() -> None:
    assert curve_alphas([0.1, 0.3])[-3:] == [0.28, 0.29, 0.3]
    assert 0.125 in curve_alphas([0.125])
    assert table_alpha([0.05, 0.1, 0.15]) == 0.1 and table_alpha([0.05, 0.2]) == 0.2


def test_report_markdown_shows_report_json_numbers() -> None:
    report = report_for(two_models())
    markdown = render_markdown(report)
    assert "`||pred - gt||_2 <= alpha * threshold_base`" in markdown
    assert "*original* = distances and thresholds in original-image pixels" in markdown
    assert "*resized* = distances and thresholds in the anisotropically resized S x S" in markdown
    assert "read the resized frame, per image, hit rule <=" in markdown
    assert "`bbox` = max side of the target's bounding box" in markdown

    categories = markdown_table(markdown, "PCK@0.1 per category (%)")
    assert categories[0] == ["model", "frame", "average", "cat", "dog", "all"]
    assert categories[1] == ["", "", "pairs", "1", "2", "3"]
    assert len(categories) == 2 + 2 * len(FRAMES) * len(AVERAGES)
    for model in report["models"]:
        for frame in FRAMES:
            results, label = model["results"][frame], frame_label(frame, S)
            for average in AVERAGES:
                row = next(r for r in categories if r[:3] == [model["name"], label, AVERAGE_LABELS[average]])
                expected = [results["per_category"][c][average][1] for c in ("cat", "dog")]
                assert row[3:] == [percent(v) for v in [*expected, results["overall"][average][1]]]
    assert categories[2] == ["base", "original", "per image", "66.7", "25.0", "38.9"]  # (2/3 + 1/2 + 0) / 3
    assert categories[4][:3] == ["base", f"resized {S}x{S}", "per image"]

    alphas = markdown_table(markdown, "PCK per alpha over all pairs (%)")
    assert alphas[0] == ["model", "frame", "average", "PCK@0.05", "PCK@0.1", "PCK@0.15"]
    better = report["models"][1]["results"]
    original_row = [percent(v) for v in better["original"]["overall"]["per_image"]]
    assert alphas[5] == ["better", "original", "per image", *original_row]
    assert alphas[8] == ["better", f"resized {S}x{S}", "per keypoint",
                         *(percent(v) for v in better["resized"]["overall"]["per_keypoint"])]  # fmt: skip

    flags = markdown_table(markdown, "PCK@0.1 per difficulty flag (%)")
    assert flags[0] == [
        "flag", "value", "pairs", "frame", "base per image", "base per keypoint", "better per image",
        "better per keypoint",
    ]  # fmt: skip
    per_flag = report["models"][0]["results"]["original"]["per_flag"]
    assert flags[1] == ["viewpoint_variation", "0", "1", "original",
                        percent(per_flag["viewpoint_variation"][0]["per_image"][1]),
                        percent(per_flag["viewpoint_variation"][0]["per_keypoint"][1]), "100.0", "100.0"]  # fmt: skip
    assert [row[:4] for row in flags[1:]] == [
        [flag, value, pairs, frame]
        for flag, value, pairs in (("viewpoint_variation", "0", "1"), ("viewpoint_variation", "2", "2"),
                                   ("occlusion", "0", "2"), ("occlusion", "1", "1"))
        for frame in ("original", f"resized {S}x{S}")
    ]  # fmt: skip
    assert "[matches/base-00-A.png](matches/base-00-A.png)" in markdown


def test_no_flag_table_without_flags() -> None:
    markdown = render_markdown(report_for({"m": pair("A", "cat", [1.0])}))
    assert "difficulty flag" not in markdown


def test_predictions_table_adds_a_model_column_only_for_several_models() -> None:
    records = two_models()
    single = predictions_table({"base": records["base"]})
    assert single.column_names[:3] == ["pair_key", "kp_id", "category"] and "model" not in single.column_names
    assert single.schema.field("pair_key").type == pa.string()
    both = predictions_table(records)
    assert both.column_names[0] == "model" and both.num_rows == 12
    assert both.column("model").to_pylist() == ["base"] * 6 + ["better"] * 6
    back = KeypointRecords.from_dict({k: v for k, v in both.slice(6).to_pydict().items() if k != "model"})
    assert summarize(back, ALPHAS) == summarize(records["better"], ALPHAS)


def test_pck_curve_image_grows_for_a_long_legend() -> None:
    alphas = curve_alphas(ALPHAS)
    series = {"all": np.linspace(0, 0.8, len(alphas))}
    series |= {f"c{i}": np.linspace(0, i / 40, len(alphas)) for i in range(30)}
    image = figures.pck_curve_image(alphas, series, "title", emphasised="all")
    assert image.size == (900, 90 + 18 * 31)
    assert image.getpixel((5, 5)) == (255, 255, 255)
    small = figures.pck_curve_image(alphas, {"m1": series["all"]}, "t")
    assert small.size == (900, 560)
    assert Image.open(io.BytesIO(figures.png_bytes(small))).size == small.size


def test_matches_image_colours_correct_green_and_wrong_red() -> None:
    src = np.full((50, 100, 3), 128, np.uint8)
    trg = np.full((100, 100, 3), 128, np.uint8)
    kps = np.array([[10.0, 10.0], [80.0, 40.0]])
    picture = figures.matches_image(src, trg, kps, kps * 2, kps * 2, np.array([True, False]), "caption", height=200)
    header = 26
    assert picture.size == (400 + 8 + 200, header + 200)
    # Source keypoint dots scaled by 4 (height 50 -> 200): (10, 10) -> (41.5, 41.5).
    assert picture.getpixel((41, header + 41)) == figures.CORRECT
    assert picture.getpixel((321, header + 161)) == figures.WRONG
