"""Model predictions on batches of pairs, as per-keypoint records (:mod:`sm_eval.pck`).

Used by ``sm_eval`` and by training validation alike, so both score exactly the same way.

Evaluation batches (:func:`eval_batches`) are cut shard by shard: a batch never spans two shards,
so which pairs share a batch (and so the padded keypoint count and every kernel's batch shape)
depends only on the shard and the batch size, never on which worker reads the shard or on how
many DataLoader processes decode it (:mod:`sm_feed.batches` assembles the same bytes for any
number). That is what makes a prediction independent of the worker count, to the last bit.

:func:`stream_records` keeps a GPU busy: the next batch's prediction is queued before the records
of the previous one are built on the host, and the batches arrive on the device already
(:func:`eval_batches` with ``device``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from pipelines.reader import entry_urls
from pipelines.storage import Location
from sm_eval.pck import FLAG_COLUMNS, KeypointRecords, records_for_pair
from sm_feed.batches import PairBatch, PairRef, assemble_batch, pair_refs, pins_memory, to_device
from sm_model.inputs import InputSpec
from sm_model.matcher import MatchModel


def predict_batch(model: MatchModel, batch: PairBatch, autocast_dtype: torch.dtype | None = None):
    """Target keypoints ``[B, N, 2]`` float32 in original target pixels (on the batch's device)
    for a batch already on the model's device; ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs
    the network under autocast."""
    spec = model.input_spec
    src, trg = spec.to_network(batch.src_image), spec.to_network(batch.trg_image)
    with torch.autocast(src.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model.predict(src, trg, batch.src_kps, batch.valid, batch.src_size, batch.trg_size)


def batch_records(
    model: MatchModel,
    batch: PairBatch,
    autocast_dtype: torch.dtype | None = None,
) -> KeypointRecords:
    """Per-keypoint records of one batch (on the model's device), in the original frame; they carry
    the model's input side ``S``, so they score in the resized ``S x S`` frame too
    (:func:`sm_eval.pck.records_in_frame`)."""
    return _records(*_launch(model, batch, autocast_dtype))


def stream_records(
    model: MatchModel, batches: Iterable[PairBatch], autocast_dtype: torch.dtype | None = None
) -> Iterator[KeypointRecords]:
    """:func:`batch_records` of each of ``batches`` (on the model's device), the same records, with
    the prediction of each batch queued on the device before the records of the one before are
    built, so that the device does not wait for the host in between."""
    previous = None
    for batch in batches:
        launched = _launch(model, batch, autocast_dtype)
        if previous is not None:
            yield _records(*previous)
        previous = launched
    if previous is not None:
        yield _records(*previous)


def _launch(model: MatchModel, batch: PairBatch, autocast_dtype: torch.dtype | None):
    """The prediction of ``batch`` queued, with its copy to the host (and of ``valid``) behind it."""
    pred, square = predict_batch(model, batch, autocast_dtype), model.input_spec.size
    if pred.device.type != "cuda":
        return batch, square, pred, batch.valid.cpu(), None
    host = pred.to("cpu", non_blocking=True), batch.valid.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(pred.device))
    return batch, square, *host, copied


def _records(
    batch: PairBatch, square: int, pred: torch.Tensor, valid: torch.Tensor, copied: torch.cuda.Event | None
) -> KeypointRecords:
    if copied is not None:
        copied.synchronize()
    return _batch_records(batch, square, pred.numpy(), valid.numpy())


def _batch_records(batch: PairBatch, square: int, pred: np.ndarray, valid: np.ndarray) -> KeypointRecords:
    parts = []
    for row, meta in enumerate(batch.meta):
        count = len(meta.kps_ids)
        flags = {name: meta.extras[name] for name in FLAG_COLUMNS if name in meta.extras}
        parts.append(
            records_for_pair(
                meta.key,
                meta.category,
                pred[row, :count],
                meta.trg_kps,
                valid[row, :count],
                meta.kps_ids,
                meta.threshold,
                meta.trg_bbox,
                meta.trg_size,
                square=square,
                flags=flags or None,
            )
        )
    return KeypointRecords.concat(parts)


def predict_records(
    model: MatchModel,
    batches: Iterable[PairBatch],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> KeypointRecords | None:
    """Records of every pair in ``batches`` (``None`` when there are none)."""
    parts = list(stream_records(model, (batch.to(device) for batch in batches), autocast_dtype))
    return KeypointRecords.concat(parts) if parts else None


def eval_batches(
    shards: Location,
    names: Sequence[str],
    shard_of: Mapping[str, str],
    *,
    spec: InputSpec,
    batch_size: int,
    loader_workers: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[PairBatch]:
    """Batches of at most ``batch_size`` pairs of the shards ``names``, shard after shard in that
    order, a batch never spanning two shards; images resized as the model's input ``spec`` says. Read, checked and resized by ``loader_workers`` DataLoader processes
    (:func:`sm_feed.batches.pair_refs`; forkserver: forking inside Ray workers can deadlock; a
    script calling this with ``loader_workers > 0`` needs an ``if __name__ == "__main__":``
    guard), the same batches for any number of them. Every name is read here (no split by
    ``RANK``). ``shard_of`` maps each pair key to its shard name (from ``index.parquet``); a pair it
    does not list means the shards and their index disagree, which raises ``ValueError``. With a
    CUDA ``device`` the batches come on it (:func:`sm_feed.batches.to_device`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not names:
        return
    entry_urls(shards, list(names))  # no shard twice
    read = set(names)
    wanted = {key: shard for key, shard in shard_of.items() if shard in read}
    refs = pair_refs(shards, names, spec=spec, loader_workers=loader_workers)
    yield from to_device(_shard_batches(refs, wanted, batch_size, pins_memory(device)), device)


def _shard_batches(
    refs: Iterable[PairRef], shard_of: Mapping[str, str], batch_size: int, pin_memory: bool
) -> Iterator[PairBatch]:
    """Batches of at most ``batch_size`` pairs that never span two entries (here: shards)."""
    pending: list[PairRef] = []
    for ref in refs:
        if ref.key not in shard_of:
            raise ValueError(
                f"pair {ref.key!r} was read from the shards but index.parquet does not list it in this split: "
                "do the shards still match their index?"
            )
        if pending and (ref.piece != pending[0].piece or len(pending) == batch_size):
            yield assemble_batch(pending, pin_memory)
            pending = []
        pending.append(ref)
    if pending:
        yield assemble_batch(pending, pin_memory)
