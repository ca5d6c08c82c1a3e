"""Reports from per-keypoint records: ``report.json`` (every number), ``report.md`` (the tables a
paper shows) and the predictions table. Pure functions; :mod:`sm_eval.evaluate` writes the files.

Numbers in ``report.json`` are fractions in ``[0, 1]``; ``report.md`` shows the same numbers as
percentages with one decimal (:func:`percent`), the way papers print PCK.

Every model's numbers come in both frames of :mod:`sm_eval.pck` side by side (``results`` keyed by
frame in ``report.json``, a ``frame`` column in every ``report.md`` table): the original image, and
the resized ``S x S`` network input in which the SimpleMatch paper and the survey report PCK.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from sm_eval.pck import FRAMES, KeypointRecords, records_in_frame, summarize

REPORT_VERSION = 2
AVERAGES = ("per_image", "per_keypoint")
AVERAGE_LABELS = {"per_image": "per image", "per_keypoint": "per keypoint"}
THRESHOLD_DEFINITIONS = {
    "bbox": "max side of the target's bounding box (no +1)",
    "img": "max side of the target image",
    "bbox-kp": "max side of the box around the target's real keypoints (padding never counts)",
}
FRAME_DEFINITIONS = {
    "original": "distances and thresholds in original-image pixels",
    "resized": "distances and thresholds in the anisotropically resized S x S network input (bbox base on the "
    "resized box, img base = S): the frame of the SimpleMatch paper's tables and of the survey",
}
PAPER_COMPARISON = "resized frame, per image, hit rule <=: the SimpleMatch paper's tables and the survey's"


def percent(fraction: float) -> str:
    """A PCK fraction as ``report.md`` prints it: percent with one decimal (``0.8413 -> "84.1"``)."""
    return f"{100 * fraction:.1f}"


def table_alpha(alphas: Sequence[float]) -> float:
    """The alpha of the per-category and per-flag tables and of the match figures: 0.1 (the
    benchmarks' standard) when requested, else the largest requested alpha."""
    return float(next((a for a in alphas if np.isclose(a, 0.1)), max(alphas)))


def curve_alphas(alphas: Sequence[float], step: float = 0.01) -> list[float]:
    """The alphas of the PCK curve: ``step`` to ``max(0.2, max(alphas))`` every ``step``, plus the
    requested ones, sorted and unique (rounded to 6 decimals)."""
    top = max(0.2, *alphas)
    grid = np.arange(1, int(round(top / step)) + 1) * step
    return sorted({round(float(a), 6) for a in [*grid, *alphas]})


def model_results(records: KeypointRecords, alphas: Sequence[float], rule: str) -> dict[str, Any]:
    """One model's numbers in every frame of :data:`~sm_eval.pck.FRAMES`, keyed by frame name:
    :func:`frame_results` of the original-frame ``records`` moved into that frame
    (:func:`~sm_eval.pck.records_in_frame`; the records need their resize columns)."""
    return {frame: frame_results(records_in_frame(records, frame), alphas, rule) for frame in FRAMES}


def frame_results(records: KeypointRecords, alphas: Sequence[float], rule: str) -> dict[str, Any]:
    """The numbers of records in one frame: :func:`sm_eval.pck.summarize` at ``alphas`` and, for the
    curve, the overall and per-category per-image and per-keypoint PCK at :func:`curve_alphas`."""
    summary = summarize(records, alphas, rule)
    grid = curve_alphas(alphas)
    dense = summarize(records, grid, rule)
    curve = {
        "alphas": grid,
        "overall": {average: dense["overall"][average] for average in AVERAGES},
        "per_category": {
            category: {average: scores[average] for average in AVERAGES}
            for category, scores in dense["per_category"].items()
        },
    }
    return {**summary, "curve": curve}


def frame_label(frame: str, image_size: int) -> str:
    """How ``report.md`` names a frame: ``original`` or ``resized 252x252``."""
    return "original" if frame == "original" else f"{frame} {image_size}x{image_size}"


def protocol_statement(rule: str, threshold_kinds: Sequence[str], figure_frame: str = "original") -> dict[str, Any]:
    """What was measured, in words and in fields: rule, both frames, threshold kinds, averages.
    ``figure_frame`` is the frame of the PCK curve and of the match pictures' colours."""
    if figure_frame not in FRAMES:
        raise ValueError(f"unknown frame {figure_frame!r}; expected one of {FRAMES}")
    return {
        "rule": rule,
        "correct_when": f"||pred - gt||_2 {rule} alpha * threshold_base",
        "frames": {frame: FRAME_DEFINITIONS[frame] for frame in FRAMES},
        "figure_frame": figure_frame,
        "record_frame": "original",
        "compare_with_paper": PAPER_COMPARISON,
        "threshold_kinds": list(threshold_kinds),
        "threshold_definitions": {kind: THRESHOLD_DEFINITIONS[kind] for kind in threshold_kinds},
        "threshold_image": "target",
        "averages": {
            "per_image": "mean over pairs of each pair's fraction of correct keypoints",
            "per_keypoint": "total correct keypoints / total keypoints",
        },
        "per_category": "the same averages over the pairs of each category",
    }


def build_report(
    *,
    data: Mapping[str, Any],
    protocol: Mapping[str, Any],
    alphas: Sequence[float],
    models: Sequence[Mapping[str, Any]],
    run: Mapping[str, Any],
    files: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``report.json`` document. ``models`` entries hold ``name``, ``checkpoint``, ``config``
    and ``results`` (:func:`model_results`)."""
    return {
        "report_version": REPORT_VERSION,
        "protocol": dict(protocol),
        "alphas": [float(a) for a in alphas],
        "table_alpha": table_alpha(alphas),
        "data": dict(data),
        "models": [dict(model) for model in models],
        "run": dict(run),
        "files": dict(files),
    }


def predictions_table(records_by_model: Mapping[str, KeypointRecords]) -> pa.Table:
    """The per-keypoint records of every model as one table, with a leading ``model`` column when
    there are several models (each model's records keep their order; models in the given order)."""
    names = list(records_by_model)
    columns = [records_by_model[name].to_dict() for name in names]
    merged = {key: np.concatenate([part[key] for part in columns]) for key in columns[0]}
    table = pa.table({key: pa.array(values) for key, values in merged.items()})
    if len(names) > 1:
        model = np.concatenate([np.full(len(records_by_model[name]), name, dtype=object) for name in names])
        table = table.add_column(0, "model", pa.array(model, type=pa.string()))
    return table


# ---- markdown ----------------------------------------------------------------------------------


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: protocol, data, then the per-category table at the table alpha (one row per
    model, frame and average, like the paper's per-category table), the alpha table, the per-flag
    table where the dataset has difficulty flags, and the figures. Every table shows both frames."""
    data, protocol, models = report["data"], report["protocol"], report["models"]
    alpha = report["table_alpha"]
    lines = [f"# PCK evaluation: {', '.join(data['datasets'])} / {data['split']}", ""]
    lines += _protocol_lines(protocol, report["alphas"]) + [""]
    lines += _data_lines(data, models) + [""]
    lines += [f"## PCK@{alpha:g} per category (%)", ""]
    column = report["alphas"].index(alpha)
    lines += _category_table(models, column) + [""]
    lines += ["## PCK per alpha over all pairs (%)", ""]
    lines += _alpha_table(models, report["alphas"]) + [""]
    if any(model["results"][FRAMES[0]]["per_flag"] for model in models):
        lines += [f"## PCK@{alpha:g} per difficulty flag (%)", ""]
        lines += _flag_table(models, column) + [""]
    files = report["files"]
    lines += ["## Figures", "", f"![PCK against alpha]({files['pck_curve']})", ""]
    if files.get("matches"):
        lines += [
            (
                f"Matches ({len(files['matches'])} pairs): a line from each source keypoint to its prediction, "
                f"green when correct at alpha {alpha:g} in the {protocol['figure_frame']} frame, red when not; "
                "the ground truth is the white ring."
            ),
            "",
        ]
        lines += [f"- [{path}]({path})" for path in files["matches"]]
        lines.append("")
    return "\n".join(lines)


def _protocol_lines(protocol: Mapping[str, Any], alphas: Sequence[float]) -> list[str]:
    kinds = "; ".join(f"`{kind}` = {text}" for kind, text in protocol["threshold_definitions"].items())
    listed = ", ".join(f"{a:g}" for a in alphas)
    return [
        (
            "**Protocol.** A keypoint is correct when "
            f"`{protocol['correct_when']}` (hit rule `{protocol['rule']}`), alpha in {listed}. "
            f"Threshold base from the target image: {kinds}. Averages: *per image* = "
            f"{protocol['averages']['per_image']}; *per keypoint* = {protocol['averages']['per_keypoint']}."
        ),
        "",
        "**Frames**, side by side in every table: "
        + "; ".join(f"*{frame}* = {text}" for frame, text in protocol["frames"].items())
        + f". To compare with published numbers read the {protocol['compare_with_paper']}. "
        f"The PCK curve and the match pictures use the {protocol['figure_frame']} frame.",
    ]


def _data_lines(data: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        f"**Data.** `{data['shards']}`, split `{data['split']}`: {data['pairs']} pairs, {data['keypoints']} keypoints, "
        f"{len(data['categories'])} categories, {data['shards_read']} shards.",
        "",
        "**Models.**",
        "",
    ]
    for model in models:
        config = model["config"]
        lines.append(
            f"- `{model['name']}`: `{model['checkpoint']}` ({model['kind']} on {config.get('backbone')}, "
            f"{model['image_size']} px input, {model['localizer']} localizer)"
        )
        if model.get("non_finite_predictions"):
            lines[-1] += f". **{non_finite_words(model['non_finite_predictions'], data['keypoints'])}**"
    return lines


def non_finite_words(count: int, keypoints: int) -> str:
    """How the report states a model's predictions that are not finite numbers."""
    return f"{count:,} of {keypoints:,} predictions are NaN or infinite (counted as misses)"


def _model_frames(models: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], str, Mapping[str, Any]]]:
    """``(model, frame label, that frame's results)`` for every model and frame, in table order."""
    return [
        (model, frame_label(frame, model["image_size"]), model["results"][frame])
        for model in models
        for frame in FRAMES
    ]


def _category_table(models: Sequence[Mapping[str, Any]], column: int) -> list[str]:
    first = models[0]["results"][FRAMES[0]]
    categories = sorted(first["per_category"])
    counts = [str(first["per_category"][c]["n_pairs"]) for c in categories]
    rows = [["", "", "pairs", *counts, str(first["overall"]["n_pairs"])]]
    for model, label, results in _model_frames(models):
        for average in AVERAGES:
            cells = [percent(results["per_category"][c][average][column]) for c in categories]
            cells.append(percent(results["overall"][average][column]))
            rows.append([model["name"], label, AVERAGE_LABELS[average], *cells])
    return markdown_table(["model", "frame", "average", *categories, "all"], rows)


def _alpha_table(models: Sequence[Mapping[str, Any]], alphas: Sequence[float]) -> list[str]:
    rows = [
        [model["name"], label, AVERAGE_LABELS[average], *(percent(v) for v in results["overall"][average])]
        for model, label, results in _model_frames(models)
        for average in AVERAGES
    ]
    return markdown_table(["model", "frame", "average", *(f"PCK@{a:g}" for a in alphas)], rows)


def _flag_table(models: Sequence[Mapping[str, Any]], column: int) -> list[str]:
    """One row per value of each difficulty flag and frame; per model a per-image and a per-keypoint
    column."""
    flags = models[0]["results"][FRAMES[0]]["per_flag"]
    names = [f"{model['name']} {AVERAGE_LABELS[average]}" for model in models for average in AVERAGES]
    rows = []
    for flag in flags:
        for value in sorted(flags[flag]):
            for frame in FRAMES:
                labels = {frame_label(frame, model["image_size"]) for model in models}
                cells = [
                    percent(model["results"][frame]["per_flag"][flag][value][average][column])
                    for model in models
                    for average in AVERAGES
                ]
                rows.append([flag, str(value), str(flags[flag][value]["n_pairs"]), " / ".join(sorted(labels)), *cells])
    return markdown_table(["flag", "value", "pairs", "frame", *names], rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: ``header``, the separator, one line per row of cells."""
    return [_row(header), _row(["---"] * len(header)), *(_row(row) for row in rows)]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
