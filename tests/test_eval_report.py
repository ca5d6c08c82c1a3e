"""Reports (sm_eval.report) and figures (sm_eval.figures) from hand-made records: report.md shows
exactly report.json's numbers, the predictions table round-trips, the pictures are drawn."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sm_eval import figures
from sm_eval.pck import KeypointRecords, records_for_pair, summarize
from sm_eval.report import (
    AVERAGE_LABELS,
    AVERAGES,
    build_report,
    curve_alphas,
    model_results,
    percent,
    predictions_table,
    protocol_statement,
    render_markdown,
    table_alpha,
)
from tests.report_tables import markdown_table

ALPHAS = [0.05, 0.1, 0.15]


def pair(key: str, category: str, misses: list[float], **flags: int) -> KeypointRecords:
    """Target bbox 100 px wide (base 100); ground truth on a row, predictions ``misses`` px off in x."""
    gt = np.array([[10.0 * i, 5.0] for i in range(len(misses))])
    pred = gt + np.array([[m, 0.0] for m in misses])
    return records_for_pair(
        key, category, pred, gt, np.ones(len(misses), bool), np.arange(len(misses)), "bbox",
        np.array([0.0, 0.0, 100.0, 50.0]), (640, 480), flags=flags or None,
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
        {"name": name, "checkpoint": f"/ckpt/{name}.pt", "config": {"backbone": "dinov2_vits14"}, "image_size": 28,
         "results": model_results(recs, ALPHAS, "<=")}
        for name, recs in records.items()
    ]  # fmt: skip
    data = {"shards": "/shards", "split": "test", "datasets": ["spair"], "pairs": 3, "keypoints": 6,
            "categories": ["cat", "dog"], "shards_read": 2}  # fmt: skip
    return build_report(
        data=data,
        protocol=protocol_statement("<=", "original", ["bbox"], "original"),
        alphas=ALPHAS,
        models=models,
        run={"workers": 0},
        files={"pck_curve": "pck_curve.png", "matches": ["matches/base-00-A.png"]},
    )


def test_model_results_hold_summary_and_a_dense_curve() -> None:
    recs = two_models()["base"]
    results = model_results(recs, ALPHAS, "<=")
    assert {k: v for k, v in results.items() if k != "curve"} == summarize(recs, ALPHAS, "<=")
    # Threshold 10 at alpha 0.1: A hits 1 and 7 (2/3), B hits 3 (1/2), C misses (0).
    assert results["overall"]["per_image"][1] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert results["overall"]["per_keypoint"][1] == 3 / 6
    curve = results["curve"]
    assert curve["alphas"] == curve_alphas(ALPHAS)
    assert curve["alphas"][:2] == [0.01, 0.02] and curve["alphas"][-1] == 0.2
    at = curve["alphas"].index(0.1)
    assert curve["overall"]["per_image"][at] == results["overall"]["per_image"][1]
    assert curve["per_category"]["dog"]["per_keypoint"][at] == results["per_category"]["dog"]["per_keypoint"][1]


def test_curve_alphas_and_table_alpha() -> None:
    assert curve_alphas([0.1, 0.3])[-3:] == [0.28, 0.29, 0.3]
    assert 0.125 in curve_alphas([0.125])
    assert table_alpha([0.05, 0.1, 0.15]) == 0.1 and table_alpha([0.05, 0.2]) == 0.2


def test_report_markdown_shows_report_json_numbers() -> None:
    report = report_for(two_models())
    markdown = render_markdown(report)
    assert "`||pred - gt||_2 <= alpha * threshold_base`" in markdown and "Frame: original" in markdown
    assert "`bbox` = max side of the target's bounding box" in markdown

    categories = markdown_table(markdown, "PCK@0.1 per category (%)")
    assert categories[0] == ["model", "average", "cat", "dog", "all"]
    assert categories[1] == ["", "pairs", "1", "2", "3"]
    for model in report["models"]:
        results = model["results"]
        for average in AVERAGES:
            row = next(r for r in categories if r[:2] == [model["name"], AVERAGE_LABELS[average]])
            expected = [results["per_category"][c][average][1] for c in ("cat", "dog")]
            assert row[2:] == [percent(v) for v in [*expected, results["overall"][average][1]]]
    assert categories[2] == ["base", "per image", "66.7", "25.0", "38.9"]  # (2/3 + 1/2 + 0) / 3

    alphas = markdown_table(markdown, "PCK per alpha over all pairs (%)")
    assert alphas[0] == ["model", "average", "PCK@0.05", "PCK@0.1", "PCK@0.15"]
    better = report["models"][1]["results"]["overall"]
    assert alphas[3] == ["better", "per image", *(percent(v) for v in better["per_image"])]

    flags = markdown_table(markdown, "PCK@0.1 per difficulty flag (%)")
    assert flags[0] == [
        "flag", "value", "pairs", "base per image", "base per keypoint", "better per image", "better per keypoint"
    ]  # fmt: skip
    per_flag = report["models"][0]["results"]["per_flag"]
    assert flags[1] == ["viewpoint_variation", "0", "1", percent(per_flag["viewpoint_variation"][0]["per_image"][1]),
                        percent(per_flag["viewpoint_variation"][0]["per_keypoint"][1]), "100.0", "100.0"]  # fmt: skip
    assert [row[:3] for row in flags[1:]] == [
        ["viewpoint_variation", "0", "1"], ["viewpoint_variation", "2", "2"],
        ["occlusion", "0", "2"], ["occlusion", "1", "1"],
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
