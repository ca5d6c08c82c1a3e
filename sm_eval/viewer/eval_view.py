"""The Evaluation tab without the browser: an ``sm_eval`` output folder opened, its pairs listed with
category, difficulty flags and per-pair PCK (filtered and sorted), per-category figures computed
from ``predictions.parquet`` exactly as ``report.json``'s were (:func:`sm_eval.pck.summarize` of
the records in the chosen frame) and checked against it, and one pair drawn with its source
keypoints, ground truth and predictions marked correct or wrong at the chosen alpha, in the
chosen frame (:func:`sm_eval.evaluate.match_picture`, the picture ``sm_eval`` draws).

The folder (local or ``s3://``) must lie under the viewer's roots; inside it only ``report.json``
and ``predictions.parquet`` are read, through a :class:`~pipelines.storage.Location` of the folder
and within :data:`~sm_eval.viewer.access.MAX_REPORT_BYTES` and
:data:`~sm_eval.viewer.access.MAX_PREDICTIONS_BYTES`. The pairs' images come from the shard set
the report names (``data.shards``, or another one the user gives), which must lie under the roots
too, read by :mod:`pipelines.reader` (every pair checked against its index).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage import Location, StorageError
from sm_eval.evaluate import PREDICTIONS, REPORT_JSON, match_picture, read_pairs
from sm_eval.pck import FLAG_COLUMNS, FRAMES, KeypointRecords, keypoint_hits, records_in_frame, summarize
from sm_eval.plan import SplitPlan, read_split_plan
from sm_eval.viewer.access import MAX_PREDICTIONS_BYTES, MAX_REPORT_BYTES, Roots

AVERAGES = ("per_image", "per_keypoint")
MAX_TABLE_ROWS = 5000
"""Pairs shown in the table at once (filter to see others)."""
PAIR_PICTURE_HEIGHT = 420
PAIR_COLUMN = "pair"
PCK_COLUMN = "PCK (%)"


class FolderError(ValueError):
    """An evaluation folder that cannot be shown; the message says why."""


@dataclass
class EvalFolder:
    """An opened ``sm_eval`` output folder: ``report`` (``report.json``), the original-frame
    records of each model (``predictions.parquet``), and the split plans of the shard sets read
    so far (by URL)."""

    url: str
    report: dict[str, Any]
    records: dict[str, KeypointRecords]
    endpoint_url: str | None = None
    plans: dict[str, SplitPlan] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return [model["name"] for model in self.report["models"]]

    @property
    def alphas(self) -> list[float]:
        return [float(alpha) for alpha in self.report["alphas"]]

    @property
    def table_alpha(self) -> float:
        return float(self.report["table_alpha"])

    @property
    def rule(self) -> str:
        return str(self.report["protocol"]["rule"])

    @property
    def flags(self) -> list[str]:
        """The difficulty flags the records carry (SPair-71k's), in :data:`FLAG_COLUMNS` order."""
        first = next(iter(self.records.values()))
        return [name for name in FLAG_COLUMNS if getattr(first, name) is not None]

    @property
    def categories(self) -> list[str]:
        return sorted({str(c) for records in self.records.values() for c in np.unique(records.category.astype(str))})

    def model_report(self, model: str) -> dict[str, Any]:
        return next(entry for entry in self.report["models"] if entry["name"] == model)


def open_folder(url: str, roots: Roots, endpoint_url: str | None = None) -> EvalFolder:
    """The ``sm_eval`` output folder at ``url`` (local or ``s3://``, under ``roots``):
    :class:`FolderError` (or :class:`~sm_eval.viewer.access.AccessRefused`) saying what is wrong."""
    checked = roots.check(url, "evaluation folder")
    folder = Location(checked, endpoint_url)
    report = _read_report(folder)
    table = _read_predictions(folder)
    names = [str(model["name"]) for model in report["models"]]
    columns = table.to_pydict()
    try:
        if "model" in columns:
            model_column = np.asarray(columns.pop("model"), dtype=object)
            everything = KeypointRecords.from_dict(columns)
            records = {name: everything.take(model_column == name) for name in names}
        else:
            if len(names) != 1:
                raise FolderError(
                    f"{folder.full(PREDICTIONS)} has no model column but the report names {len(names)} models"
                )
            records = {names[0]: KeypointRecords.from_dict(columns)}
    except TypeError as error:  # an unknown or missing column
        raise FolderError(f"{folder.full(PREDICTIONS)}: not sm_eval's per-keypoint records ({error})") from None
    empty = [name for name, part in records.items() if len(part) == 0]
    if empty:
        raise FolderError(f"{folder.full(PREDICTIONS)} holds no records of the models {empty}")
    return EvalFolder(folder.url, report, records, endpoint_url)


def _read_report(folder: Location) -> dict[str, Any]:
    try:
        data = folder.read_bytes(REPORT_JSON, max_bytes=MAX_REPORT_BYTES)
    except FileNotFoundError:
        raise FolderError(
            f"{folder.url}: no {REPORT_JSON} there: not an sm_eval output folder (or not finished)"
        ) from None
    except (OSError, StorageError) as error:
        raise FolderError(f"{folder.full(REPORT_JSON)}: cannot be read ({error})") from None
    try:
        report = json.loads(data)
        models = report["models"]
        ok = (
            isinstance(models, list)
            and models
            and all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in models)
        )
        ok = ok and all(isinstance(a, (int, float)) and 0 < a <= 1 for a in report["alphas"])
        ok = ok and isinstance(report["protocol"]["rule"], str) and isinstance(report["data"], dict)
        ok = ok and isinstance(report["table_alpha"], (int, float))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise FolderError(f"{folder.full(REPORT_JSON)} is not an sm_eval report")
    return report


def _read_predictions(folder: Location) -> pa.Table:
    try:
        data = folder.read_bytes(PREDICTIONS, max_bytes=MAX_PREDICTIONS_BYTES)
    except FileNotFoundError:
        raise FolderError(f"{folder.url}: no {PREDICTIONS} there") from None
    except (OSError, StorageError) as error:
        raise FolderError(f"{folder.full(PREDICTIONS)}: cannot be read ({error})") from None
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as error:
        raise FolderError(f"{folder.full(PREDICTIONS)}: not a readable parquet file ({error})") from None


def parse_alpha(text: str | float) -> float:
    """An alpha in ``(0, 1]`` from the tab's field; ``ValueError`` otherwise."""
    try:
        alpha = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in (0, 1], got {text!r}") from None
    if not (0 < alpha <= 1):
        raise ValueError(f"alpha must be a number in (0, 1], got {text!r}")
    return alpha


def _records(folder: EvalFolder, model: str, frame: str) -> KeypointRecords:
    if model not in folder.records:
        raise ValueError(f"no model {model!r} in this evaluation (models: {folder.models})")
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; expected one of {FRAMES}")
    return records_in_frame(folder.records[model], frame)


def percent(fraction: float) -> str:
    """A PCK fraction as the tab shows it: percent with two decimals."""
    return f"{100 * fraction:.2f}"


def category_rows(folder: EvalFolder, model: str, frame: str, alpha: float) -> tuple[list[list[Any]], str]:
    """The per-category figures at ``alpha`` in ``frame``: rows ``[category, pairs, keypoints, PCK
    per image (%), PCK per keypoint (%), report.json]`` (categories sorted, then ``all``), and a line
    saying whether they equal ``report.json``'s (when ``alpha`` is one of its alphas) to the last bit."""
    summary = summarize(_records(folder, model, frame), [alpha], folder.rule)
    groups = [(c, summary["per_category"][c]) for c in sorted(summary["per_category"])] + [("all", summary["overall"])]
    reported = folder.model_report(model).get("results", {}).get(frame)
    column = next((i for i, a in enumerate(folder.alphas) if a == alpha), None)
    rows, differing, compared = [], [], column is not None and reported is not None
    for name, scores in groups:
        check = ""
        if compared:
            source = reported["overall"] if name == "all" else reported.get("per_category", {}).get(name)
            same = source is not None and all(
                source[average][column] == scores[average][0] and source["n_pairs"] == scores["n_pairs"]
                for average in AVERAGES
            )
            check = "equal" if same else "DIFFERS"
            if not same:
                differing.append(name)
        rows.append([name, scores["n_pairs"], scores["n_keypoints"], percent(scores["per_image"][0]),
                     percent(scores["per_keypoint"][0]), check])  # fmt: skip
    if not compared:
        listed = ", ".join(f"{a:g}" for a in folder.alphas)
        note = f"alpha {alpha:g} is not one of report.json's ({listed}): computed here only"
    elif differing:
        note = (
            f"**these figures differ from report.json's for {', '.join(differing)}**: "
            "predictions.parquet and report.json disagree"
        )
    else:
        where = f"models[{folder.models.index(model)}].results.{frame}"
        note = f"every figure equals report.json's (`{where}`, alpha {alpha:g})"
    return rows, note


def pair_frame(folder: EvalFolder, model: str, frame: str, alpha: float) -> pd.DataFrame:
    """One row per pair, in index order: pair key, category, each difficulty flag, keypoints,
    correct keypoints and the pair's PCK (%) at ``alpha`` in ``frame`` (the fraction of its keypoints
    within ``alpha`` times its threshold base, the per-image average's term)."""
    records = _records(folder, model, frame)
    pred = np.stack([records.pred_x, records.pred_y], axis=1).astype(np.float64)
    gt = np.stack([records.gt_x, records.gt_y], axis=1).astype(np.float64)
    hits = keypoint_hits(pred, gt, records.threshold_base.astype(np.float64), [alpha], folder.rule)[0]
    keys = records.pair_key.astype(str)
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    total = np.bincount(inverse, minlength=len(unique))
    correct = np.bincount(inverse, weights=hits.astype(np.float64), minlength=len(unique)).astype(np.int64)
    order = np.argsort(first, kind="stable")
    columns: dict[str, Any] = {
        PAIR_COLUMN: unique[order],
        "category": records.category.astype(str)[first[order]],
    }
    for flag in folder.flags:
        columns[flag] = np.asarray(getattr(records, flag))[first[order]].astype(np.int64)
    columns["keypoints"] = total[order]
    columns["correct"] = correct[order]
    columns[PCK_COLUMN] = np.round(100 * correct[order] / total[order], 2)
    return pd.DataFrame(columns)


def filter_pairs(
    pairs: pd.DataFrame,
    *,
    category: str = "all",
    flags: dict[str, str] | None = None,
    pck_min: float | None = None,
    pck_max: float | None = None,
    sort_by: str = PAIR_COLUMN,
    descending: bool = False,
) -> pd.DataFrame:
    """``pairs`` (:func:`pair_frame`) of ``category`` (``"all"``: any), with each flag at its value
    (``"any"``: any), PCK within ``[pck_min, pck_max]`` (%), sorted by ``sort_by`` (ties in index
    order)."""
    keep = np.ones(len(pairs), dtype=bool)
    if category and category != "all":
        keep &= (pairs["category"] == category).to_numpy()
    for flag, value in (flags or {}).items():
        if value not in (None, "", "any") and flag in pairs:
            keep &= (pairs[flag] == int(value)).to_numpy()
    if pck_min is not None and math.isfinite(pck_min):
        keep &= (pairs[PCK_COLUMN] >= pck_min).to_numpy()
    if pck_max is not None and math.isfinite(pck_max):
        keep &= (pairs[PCK_COLUMN] <= pck_max).to_numpy()
    chosen = pairs[keep]
    if sort_by not in chosen.columns:
        raise ValueError(f"cannot sort by {sort_by!r}; columns: {list(chosen.columns)}")
    return chosen.sort_values(sort_by, ascending=not descending, kind="stable")


def flag_values(folder: EvalFolder, flag: str) -> list[str]:
    """The values a difficulty flag takes in the records, as the filter offers them."""
    values = set()
    for records in folder.records.values():
        column = getattr(records, flag)
        if column is not None:
            values |= {int(v) for v in np.unique(column)}
    return ["any", *(str(v) for v in sorted(values))]


def shard_plan(folder: EvalFolder, roots: Roots, shards: str | None = None) -> SplitPlan:
    """The split plan of the shard set holding the evaluation's pairs: ``shards`` when given, else
    the report's ``data.shards``; it must lie under ``roots``."""
    url = (shards or "").strip() or str(folder.report["data"].get("shards") or "")
    if not url:
        raise FolderError("report.json names no shard set: give one")
    checked = roots.check(url, "shard set")
    split = str(folder.report["data"].get("split") or "test")
    key = f"{checked}\n{split}"
    if key not in folder.plans:
        try:
            folder.plans[key] = read_split_plan(Location(checked, folder.endpoint_url), split)
        except (OSError, ValueError, StorageError) as error:
            raise FolderError(f"the pairs' shard set {url}: {error}") from None
    return folder.plans[key]


def pair_picture(
    folder: EvalFolder,
    model: str,
    frame: str,
    alpha: float,
    key: str,
    roots: Roots,
    shards: str | None = None,
) -> np.ndarray:
    """The pair ``key`` drawn as ``sm_eval`` draws its match pictures: source keypoints, a line to
    each prediction, green when correct at ``alpha`` in ``frame`` and red when not, the ground
    truth as a white ring. ``ValueError`` (or :class:`~sm_eval.viewer.access.AccessRefused`) when
    the pair or its shards cannot be read."""
    records = _records(folder, model, frame)
    rows = records.pair_key.astype(str) == key
    if not rows.any():
        raise ValueError(f"no pair {key!r} in this evaluation")
    plan = shard_plan(folder, roots, shards)
    if key not in plan.shard_of:
        raise FolderError(f"pair {key!r} is not in split {plan.split!r} of {plan.shards.url}")
    try:
        sample = read_pairs(plan, [key])[key]
        picture = match_picture(sample, records.take(rows), alpha, folder.rule, f"{model} ({frame} frame)",
                                height=PAIR_PICTURE_HEIGHT)  # fmt: skip
    except KeyError as error:
        raise FolderError(f"pair {key!r}: its records name keypoint {error} that the shard's pair lacks") from None
    except (OSError, ValueError, StorageError) as error:
        raise FolderError(f"pair {key!r} from {plan.shards.url}: {error}") from None
    return np.asarray(picture)
