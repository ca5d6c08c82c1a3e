"""One evaluation end to end: plan the split, predict with each checkpoint (in this process or on
Ray workers), aggregate, and write the outputs.

``--out`` (a local directory or ``s3://`` prefix) receives

=======================  ==================================================================
``predictions.parquet``  per-keypoint records in index order (a ``model`` column first when
                         several checkpoints are compared): anyone can recompute any metric
``report.json``          every number (overall, per category, per flag; per image and per
                         keypoint) in both frames (original image and resized ``S x S``), the
                         protocol, the data, the checkpoints, the run; written last
``report.md``            the per-category table, the alpha table, the per-flag table, both frames
``pck_curve.png``        PCK against alpha: a line per category, or per model when several
``matches/*.png``        a sample of pairs with their predicted matches
=======================  ==================================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.reader import pair_dataset
from pipelines.schema import PairSample, safe_key
from pipelines.storage import Location, is_s3
from sm_eval import figures
from sm_eval.checkpoints import CheckpointFile, OfficialSettings, resolve_models
from sm_eval.pck import FRAMES, RULES, KeypointRecords, frame_square, keypoint_hits, records_in_frame
from sm_eval.plan import SplitPlan, read_split_plan, sample_pairs
from sm_eval.report import (
    build_report,
    model_results,
    non_finite_words,
    predictions_table,
    protocol_statement,
    render_markdown,
    table_alpha,
)
from sm_eval.runner import BatchClock, EvalSettings, local_device, predict_split
from sm_model.config import ModelConfig, from_dict
from sm_model.inputs import InputSpec
from sm_model.pixels import from_resized_square

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.01, 0.05, 0.1, 0.15)
PREDICTIONS = "predictions.parquet"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PCK_CURVE = "pck_curve.png"
MATCHES_DIR = "matches"
MAX_ALPHA = 1.0
"""The largest PCK threshold, as a fraction of the base (the target's box or image side)."""


@dataclass(frozen=True)
class EvalRequest:
    """Everything one evaluation needs. ``checkpoints``: files or directories holding
    ``model.pt`` (local or ``s3://``); ``shards``: a shard directory (local or ``s3://``);
    ``workers``: 0 for this process, N for N Ray workers (Ray initialised by the caller);
    ``gpus_per_worker``: ``None`` means 1 when the Ray cluster has GPUs, else 0; ``device``
    (this process only): ``auto``, ``cpu`` or ``cuda``; ``matches``: how many pairs to draw;
    ``frame``: the frame of the PCK curve and of the match pictures' colours (the reports always
    hold both frames); ``official``: how released ``best_model.pth`` checkpoints are converted
    (:class:`~sm_eval.checkpoints.OfficialSettings`). Every field is checked here, before any work:
    ``ValueError`` says what is wrong."""

    checkpoints: tuple[str, ...]
    shards: str
    out: str
    split: str = "test"
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    rule: str = "<="
    frame: str = "original"
    settings: EvalSettings = field(default_factory=EvalSettings)
    device: str = "auto"
    workers: int = 0
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    matches: int = 8
    endpoint_url: str | None = None
    progress: bool = True
    official: OfficialSettings = field(default_factory=OfficialSettings)

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("at least one checkpoint is needed")
        check_alphas(self.alphas)
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {RULES}")
        if self.frame not in FRAMES:
            raise ValueError(f"unknown frame {self.frame!r}; expected one of {FRAMES}")
        if self.workers < 0 or self.matches < 0:
            raise ValueError(f"workers ({self.workers}) and matches ({self.matches}) must not be negative")
        check_output_dir(self.out)


def check_alphas(alphas: Sequence[float]) -> None:
    """Raise ``ValueError`` unless ``alphas`` are distinct numbers in ``(0, MAX_ALPHA]`` (NaN and
    infinity are not)."""
    if not alphas or not all(0 < a <= MAX_ALPHA for a in alphas) or len(set(alphas)) != len(alphas):
        raise ValueError(f"alphas must be distinct positive numbers of at most {MAX_ALPHA:g}, got {list(alphas)}")


def check_output_dir(out: str) -> None:
    """Raise ``ValueError`` when the local directory ``out`` cannot be created or written: it or
    a parent is a file or a dangling link, or the nearest existing one is not writable. An
    ``s3://`` output is checked by its first write."""
    if is_s3(out):
        return
    path = Path(out).expanduser().absolute()
    for existing in (path, *path.parents):
        if existing.is_symlink() and not existing.exists():
            raise ValueError(f"output directory {out}: {existing} is a link to nothing")
        if existing.exists():
            break
    if not existing.is_dir():
        raise ValueError(f"output directory {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {out}: {existing} is not writable")


def evaluate(request: EvalRequest) -> dict[str, Any]:
    """Run ``request`` and write its outputs; returns the ``report.json`` document."""
    shards = Location(request.shards, request.endpoint_url)
    out = Location(request.out, request.endpoint_url)
    plan = read_split_plan(shards, request.split)
    log.info(
        "%s split %s: %d pairs in %d shards, datasets %s",
        shards.url,
        plan.split,
        plan.num_pairs,
        len(plan.shard_counts),
        list(plan.datasets),
    )
    # Every model is built here once, with the run's overrides (a bad one fails before any work),
    # and shipped with its effective config: workers and the report use exactly that.
    overrides = request.settings.model_overrides()
    checkpoints = resolve_models(request.checkpoints, request.endpoint_url, request.official, overrides)
    configs = {file.name: from_dict(ModelConfig, file.config, f"{file.name} config") for file in checkpoints}
    settings, gpus = _resolve_device(request)
    records: dict[str, KeypointRecords] = {}
    timings: dict[str, float] = {}
    clocks: dict[str, BatchClock] = {}
    for checkpoint in checkpoints:
        started = time.perf_counter()
        clocks[checkpoint.name] = BatchClock()
        records[checkpoint.name] = predict_split(
            checkpoint,
            plan,
            settings,
            workers=request.workers,
            gpus_per_worker=gpus,
            cpus_per_worker=request.cpus_per_worker,
            progress=request.progress,
            on_batch=clocks[checkpoint.name],
        )
        timings[checkpoint.name] = time.perf_counter() - started
        log.info("%s: %d pairs in %.1f s", checkpoint.name, plan.num_pairs, timings[checkpoint.name])
    # The report is built before the first file is written: a failure in it leaves --out as it was.
    keys = sample_pairs(plan.pair_keys, plan.categories, request.matches)
    match_files = {
        name: [match_file(rank, key, name if len(records) > 1 else None) for rank, key in enumerate(keys)]
        for name in records
    }
    drawn = [p for f in match_files.values() for p in f]
    report = _report(request, plan, checkpoints, configs, records, timings, settings, gpus, drawn, clocks)
    _write_matches(out, plan, records, request, keys, match_files)
    _write_outputs(out, records, report)
    return report


def _resolve_device(request: EvalRequest) -> tuple[EvalSettings, float]:
    """The settings with a concrete device, and the GPUs per Ray worker."""
    if request.workers > 0:
        import ray

        if not ray.is_initialized():
            raise RuntimeError(f"workers={request.workers} needs Ray: call ray.init() first (or use workers=0)")
        gpus = request.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        return replace(request.settings, device="cuda" if gpus > 0 else "cpu"), gpus
    return replace(request.settings, device=local_device(request.device)), 0.0


def _report(
    request: EvalRequest,
    plan: SplitPlan,
    checkpoints: Sequence[CheckpointFile],
    configs: Mapping[str, ModelConfig],
    records: Mapping[str, KeypointRecords],
    timings: Mapping[str, float],
    settings: EvalSettings,
    gpus: float,
    match_files: list[str],
    clocks: Mapping[str, BatchClock],
) -> dict[str, Any]:
    first = next(iter(records.values()))
    models = [
        {
            "name": checkpoint.name,
            "checkpoint": checkpoint.path,
            "source": checkpoint.source,
            "config": checkpoint.config,
            "kind": configs[checkpoint.name].kind,
            "localizer": configs[checkpoint.name].localizer_method,
            "image_size": InputSpec.of(configs[checkpoint.name]).size,  # the input side, the resized frame's
            "seconds": round(timings[checkpoint.name], 3),
            "pairs_per_second": round(plan.num_pairs / timings[checkpoint.name], 3),
            # Start-up (model loading, loader processes, the first batch) apart from the steady rate.
            "first_batch_seconds": _rounded(clocks[checkpoint.name].first_batch_seconds),
            "steady_pairs_per_second": _rounded(clocks[checkpoint.name].steady_pairs_per_second()),
            "results": model_results(records[checkpoint.name], request.alphas, request.rule),
            "non_finite_predictions": non_finite_count(records[checkpoint.name]),
        }
        for checkpoint in checkpoints
    ]
    data = {
        "shards": plan.shards.url,
        "split": plan.split,
        "datasets": list(plan.datasets),
        "pairs": plan.num_pairs,
        "keypoints": len(first),
        "categories": sorted(set(plan.categories)),
        "shards_read": len(plan.shard_counts),
    }
    run = {
        "workers": request.workers,
        "gpus_per_worker": gpus,
        **asdict(settings),
    }
    files = {"predictions": PREDICTIONS, "report_md": REPORT_MD, "pck_curve": PCK_CURVE, "matches": match_files}
    protocol = protocol_statement(request.rule, plan.threshold_kinds, request.frame)
    return build_report(data=data, protocol=protocol, alphas=request.alphas, models=models, run=run, files=files)


def non_finite_count(records: KeypointRecords) -> int:
    """Predictions that are not finite numbers: a broken model's, never a silent 0 %."""
    count = int(np.count_nonzero(~(np.isfinite(records.pred_x) & np.isfinite(records.pred_y))))
    if count:
        log.warning("%s", non_finite_words(count, len(records.pred_x)))
    return count


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _write_outputs(out: Location, records: Mapping[str, KeypointRecords], report: Mapping[str, Any]) -> None:
    out.put_bytes(PREDICTIONS, _parquet_bytes(records))
    out.put_bytes(PCK_CURVE, figures.png_bytes(_curve_image(report)))
    out.put_bytes(REPORT_MD, render_markdown(report).encode())
    out.put_bytes(REPORT_JSON, (json.dumps(report, indent=1) + "\n").encode())
    log.info("wrote %s, %s, %s and %s in %s", PREDICTIONS, REPORT_JSON, REPORT_MD, PCK_CURVE, out.url)


def _parquet_bytes(records: Mapping[str, KeypointRecords]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(predictions_table(records), sink)
    return sink.getvalue().to_pybytes()


def _curve_image(report: Mapping[str, Any]):
    models, frame = report["models"], report["protocol"]["figure_frame"]
    curve_alphas = models[0]["results"][frame]["curve"]["alphas"]
    if len(models) > 1:
        series = {model["name"]: model["results"][frame]["curve"]["overall"]["per_image"] for model in models}
        emphasised = None
    else:
        curve = models[0]["results"][frame]["curve"]
        series = {"all": curve["overall"]["per_image"]}
        series |= {category: values["per_image"] for category, values in sorted(curve["per_category"].items())}
        emphasised = "all"
    data, protocol = report["data"], report["protocol"]
    title = (
        f"PCK per image vs alpha: {', '.join(data['datasets'])} {data['split']} "
        f"({protocol['rule']}, {frame} frame, {'/'.join(protocol['threshold_kinds'])} threshold)"
    )
    return figures.pck_curve_image(curve_alphas, series, title, emphasised=emphasised)


# ---- match pictures ----------------------------------------------------------------------------


def match_file(rank: int, key: str, model: str | None = None) -> str:
    """The path, relative to ``--out``, of the match picture of the ``rank``-th drawn pair (of
    ``model`` when several are compared). The pair key comes from a shard, so it enters the name
    only as :func:`~pipelines.schema.safe_key` makes it (letters, digits, ``_()+-``: an ordinary
    key is unchanged, ``../x`` becomes ``___x``), shortened with a digest when very long: the name
    can never point elsewhere."""
    name = safe_key(key)
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
    return f"{MATCHES_DIR}/{f'{model}-' if model else ''}{rank:02d}-{name}.png"


def _write_matches(
    out: Location,
    plan: SplitPlan,
    records: Mapping[str, KeypointRecords],
    request: EvalRequest,
    keys: Sequence[str],
    files: Mapping[str, Sequence[str]],
) -> None:
    """Draw the pairs ``keys`` for every model into ``files[model]`` (paths relative to ``out``,
    parallel to ``keys``). Stale pictures of an earlier run in ``matches/`` are removed first."""
    samples = read_pairs(plan, keys) if keys else {}
    for stale in out.list_files(MATCHES_DIR):
        if stale.endswith(".png"):
            out.remove(stale)
    alpha = table_alpha(request.alphas)
    for name, model_records in records.items():
        model_records = records_in_frame(model_records, request.frame)
        rows = _rows_by_pair(model_records)
        for key, path in zip(keys, files[name]):
            picture = match_picture(samples[key], model_records.take(rows[key]), alpha, request.rule, name)
            out.put_bytes(path, figures.png_bytes(picture))


def read_pairs(plan: SplitPlan, keys: Sequence[str]) -> dict[str, PairSample]:
    """The pairs ``keys`` of ``plan``, read from their shards (only the runs of pairs that cover
    them are decoded). Raises ``ValueError`` when a shard lacks one of them."""
    wanted = set(keys)
    samples = pair_dataset(plan.shards, plan.slices_of(keys), split_nodes=False)
    found = {sample.key: sample for sample in samples if sample.key in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        shards = [plan.shard_of[key] for key in missing[:3]]
        raise ValueError(f"pairs {missing[:3]} are not where index.parquet puts them (shards {shards})")
    return found


def _rows_by_pair(records: KeypointRecords) -> dict[str, np.ndarray]:
    keys = records.pair_key.astype(str)
    order = np.argsort(keys, kind="stable")
    unique, starts = np.unique(keys[order], return_index=True)
    return {key: rows for key, rows in zip(unique.tolist(), np.split(order, starts[1:]))}


def match_picture(
    sample: PairSample, records: KeypointRecords, alpha: float, rule: str, model: str, height: int = 320
):
    """The match picture of one pair from its records (any frame): correctness as the report
    counts it, positions drawn in original pixels, both images ``height`` pixels tall."""
    pred = np.stack([records.pred_x, records.pred_y], axis=1).astype(np.float64)
    gt = np.stack([records.gt_x, records.gt_y], axis=1).astype(np.float64)
    correct = keypoint_hits(pred, gt, records.threshold_base.astype(np.float64), [alpha], rule)[0]
    square = frame_square(str(records.frame[0]))
    if square is not None:
        pred = from_resized_square(pred, sample.trg_size, square)
    row_of = {int(kp_id): row for row, kp_id in enumerate(sample.kps_ids)}
    rows = [row_of[int(kp_id)] for kp_id in records.kp_id]
    caption = (
        f"{model} | {sample.category} | {sample.key} | {int(correct.sum())}/{len(correct)} correct "
        f"at alpha {alpha:g}"
    )
    return figures.matches_image(
        sample.src_image, sample.trg_image, sample.src_kps[rows], pred, sample.trg_kps[rows], correct, caption, height
    )
