"""Run a checkpoint over a split: in this process, or across Ray workers, with identical results.

Each worker (:func:`worker_records`) loads the model from the checkpoint bytes, reads its whole
shards, and yields per-keypoint records batch by batch, never averages. The driver
(:func:`predict_split`) gathers them, checks that every shard yielded exactly the pairs the index
lists, and puts the records into the index order. The result is the same to the last bit for any
worker count because

* a batch never spans two shards (:func:`sm_eval.predict.eval_batches`), so a pair is always
  predicted in the same batch, and a batch holds the same bytes for any number of loader processes;
* every worker and the single process use the same number of torch CPU threads
  (``EvalSettings.threads``), the same device type and dtype;
* records are sorted into index order before anything is written or averaged.

(Different CPU or GPU models may still differ in the last bits; so may different library builds.)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipelines.storage import Location
from sm_eval.checkpoints import CheckpointFile
from sm_eval.pck import KeypointRecords
from sm_eval.plan import SplitPlan, assign_shards, canonical_order, check_coverage
from sm_eval.predict import eval_batches, stream_records
from sm_model.checkpoint import load_model
from sm_model.config import parse_override

log = logging.getLogger(__name__)

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EvalSettings:
    """How models predict. ``image_size`` ``None`` keeps the checkpoint's; ``localizer`` ``None``
    the model's (:data:`sm_model.localizers.LOCALIZERS`); ``model_options``: further model config
    fields as ``key=value`` (YAML values, e.g. ``beta=0.04``, ``kernel_sigma=5``), for every model.
    These three are applied once, by the driver, when it builds each model
    (:func:`sm_eval.checkpoints.resolve_models`), whose config the workers then use as it is;
    ``threads`` is the torch CPU thread count in every worker and in the single process (keep it
    fixed across runs you compare); ``device`` is ``"cpu"`` or ``"cuda"``; ``dtype`` a key of
    :data:`DTYPES` (autocast). Records come in the original frame and carry what the resized frame needs."""

    batch_size: int = 8
    loader_workers: int = 2
    threads: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    image_size: int | None = None
    localizer: str | None = None
    model_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.threads < 1 or self.loader_workers < 0:
            raise ValueError(
                f"batch_size ({self.batch_size}) and threads ({self.threads}) must be at least 1, "
                f"loader_workers ({self.loader_workers}) at least 0"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; expected 'cpu' or 'cuda'")
        self.model_overrides()  # a malformed option fails here, before any work

    def model_overrides(self) -> dict[str, Any]:
        """The model config fields these settings replace: ``image_size`` and ``localizer`` when
        set, then ``model_options`` (a ``ConfigError``, a ``ValueError``, for one that is not ``key=value``)."""
        overrides: dict[str, Any] = {}
        if self.image_size is not None:
            overrides["image_size"] = self.image_size
        if self.localizer is not None:
            overrides["localizer"] = self.localizer
        for option in self.model_options:
            key, value = parse_override(option, "model option", "key=value")
            overrides[key] = value
        return overrides


def local_device(name: str) -> str:
    """The device of this process for ``--device`` ``name`` (``auto``, ``cpu`` or ``cuda``):
    ``auto`` is ``cuda`` when torch sees a CUDA device, else ``cpu``; ``RuntimeError`` when
    ``cuda`` is asked for and there is none."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device here")
    return name


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op CPU threads, then restore the previous count;
    ``None`` leaves torch's own count."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class BatchClock:
    """An ``on_batch`` callback for :func:`predict_split` that times the start apart from the
    steady state: ``first_batch_seconds`` from its creation until the first batch of records came
    back (model loading, loader start-up, the first batch itself), then the rate of the rest."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_batch_seconds: float | None = None
        self.first_batch_pairs = 0
        self.pairs = 0
        self.last = self.started

    def __call__(self, pairs: int) -> None:
        self.last = time.perf_counter()
        self.pairs += pairs
        if self.first_batch_seconds is None:
            self.first_batch_seconds, self.first_batch_pairs = self.last - self.started, pairs

    def steady_pairs_per_second(self) -> float | None:
        """Pairs per second after the first batch (``None`` when there was no later batch)."""
        if self.first_batch_seconds is None or self.pairs == self.first_batch_pairs:
            return None
        return (self.pairs - self.first_batch_pairs) / (self.last - self.started - self.first_batch_seconds)


def worker_records(
    checkpoint: bytes,
    shards: Location,
    names: Sequence[str],
    shard_of: Mapping[str, str],
    settings: EvalSettings,
) -> Iterator[KeypointRecords]:
    """Records of every pair of the shards ``names``, one :class:`KeypointRecords` per batch (in
    the order batches arrive; the driver sorts). Runs in a Ray worker or in the driver itself."""
    with torch_threads(settings.threads):
        device = torch.device(settings.device)
        started = time.perf_counter()
        model = load_model(checkpoint).eval().to(device)  # the driver's model, overrides applied
        log.info("model loaded on %s in %.1f s; reading %d shards", device, time.perf_counter() - started, len(names))
        batches = eval_batches(
            shards,
            names,
            shard_of,
            spec=model.input_spec,
            batch_size=settings.batch_size,
            loader_workers=settings.loader_workers,
            device=device,
        )
        yield from stream_records(model, batches, DTYPES[settings.dtype])


def predict_split(
    checkpoint: CheckpointFile,
    plan: SplitPlan,
    settings: EvalSettings,
    *,
    workers: int = 0,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> KeypointRecords:
    """Records of every pair of ``plan``, in index order (the canonical order).

    ``workers=0`` predicts in this process; ``workers=N`` on ``min(N, shards)`` Ray tasks (Ray must
    be initialised), each over its own whole shards (:func:`~sm_eval.plan.assign_shards`), with
    ``gpus_per_worker`` GPUs (the device becomes ``cuda`` when above 0) and ``cpus_per_worker`` CPUs
    (default: ``settings.threads``). An error in a worker is raised here as the worker raised it
    (e.g. the reader's ``ValueError`` naming a corrupt shard); a shard that yields other pairs than
    its index lists raises ``ValueError`` naming it. ``progress`` shows a bar of pairs evaluated;
    ``on_batch`` is called with each batch's pair count as it arrives."""
    desc = f"{checkpoint.name} {plan.split}"
    parts, seen = [], []
    with tqdm(total=plan.num_pairs, unit="pair", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        if workers == 0:
            stream = worker_records(checkpoint.data, plan.shards, list(plan.shard_counts), plan.shard_of, settings)
        else:
            ray_settings = replace(settings, device="cuda" if gpus_per_worker > 0 else "cpu")
            cpus = settings.threads if cpus_per_worker is None else cpus_per_worker
            stream = _run_ray(checkpoint, plan, ray_settings, workers, gpus_per_worker, cpus)
        for part in stream:
            keys = _pair_keys(part)
            bar.update(len(keys))
            if on_batch is not None:
                on_batch(len(keys))
            parts.append(part)
            seen += keys
    if not parts:
        raise ValueError(f"{plan.shards.url}: no records for split {plan.split!r}")
    records = KeypointRecords.concat(parts)
    check_coverage(plan, seen, list(plan.shard_counts))
    return records.take(canonical_order(records.pair_key, plan.position))


def _run_ray(
    checkpoint: CheckpointFile,
    plan: SplitPlan,
    settings: EvalSettings,
    workers: int,
    gpus: float,
    cpus: float,
) -> Iterator[KeypointRecords]:
    """Records as the Ray workers yield them, batch by batch, from whichever worker is ready."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("predict_split(workers > 0) needs Ray: call ray.init() first")
    _check_resources(ray.cluster_resources(), cpus, gpus)
    shares = assign_shards(plan.shard_counts, workers)
    log.info(
        "%d Ray workers (%.3g CPUs, %.3g GPUs each), pairs per worker %s",
        len(shares),
        cpus,
        gpus,
        [sum(plan.shard_counts[name] for name in share) for share in shares],
    )
    task = ray.remote(worker_records).options(num_cpus=cpus, num_gpus=gpus, name=f"sm_eval:{checkpoint.name}")
    data, shard_of = ray.put(checkpoint.data), ray.put(plan.shard_of)
    pending = [task.remote(data, plan.shards, share, shard_of, settings) for share in shares]
    try:
        while pending:
            ready, _ = ray.wait(pending, num_returns=1)
            for generator in ready:
                try:
                    ref = next(generator)
                except StopIteration:
                    pending.remove(generator)
                    continue
                yield _get(ray, ref, checkpoint.name)
    finally:
        for generator in pending:
            ray.cancel(generator, force=True)


def _get(ray: Any, ref: Any, what: str = "the model") -> KeypointRecords:
    """``ray.get(ref)``, raising a worker's error as the worker raised it (its message names the
    shard), with Ray's wrapper (holding the remote traceback) as its cause; a worker lost for good
    (killed, out of memory, its node gone, after Ray's retries) as a ``RuntimeError`` saying so."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, Exception):
            raise cause from error
        raise
    except ray.exceptions.RayError as error:
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(
            f"a Ray worker evaluating {what} was lost after Ray's retries ({type(error).__name__}: {reason}); "
            "nothing was written to --out: run the same command again"
        ) from error


def _check_resources(resources: Mapping[str, float], cpus: float, gpus: float) -> None:
    """Fail now, rather than wait forever, when one worker's request exceeds the whole cluster."""
    for name, wanted in (("CPU", cpus), ("GPU", gpus)):
        if wanted > resources.get(name, 0.0):
            raise RuntimeError(
                f"each worker asks for {wanted:g} {name}s but the Ray cluster has {resources.get(name, 0.0):g}; "
                "lower --threads/--cpus-per-worker/--gpus-per-worker or add nodes"
            )


def _pair_keys(records: KeypointRecords) -> list[str]:
    """The key of each pair in one batch's ``records``, once per pair: a pair's records are
    contiguous, so a pair read twice (from two shards) is counted twice."""
    keys = records.pair_key.astype(str)
    if not len(keys):
        return []
    return keys[np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])].tolist()
