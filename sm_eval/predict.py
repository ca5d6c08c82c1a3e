"""Model predictions on batches of pairs, as per-keypoint records (:mod:`sm_eval.pck`).

Used by ``sm_eval`` and by training validation alike, so both score exactly the same way.

Evaluation batches (:func:`eval_batches`) are cut shard by shard: a batch never spans two shards,
so which pairs share a batch (and so the padded keypoint count and every kernel's batch shape)
depends only on the shard and the batch size, never on which worker reads the shard or on how
many DataLoader processes decode it. That is what makes a prediction independent of the worker
count, to the last bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import partial

import torch

from pipelines.reader import pair_dataset
from pipelines.schema import PairSample
from pipelines.storage import Location
from sm_eval.pck import FLAG_COLUMNS, Frame, KeypointRecords, records_for_pair
from sm_model.batches import PairBatch, PreparedPair, collate_pairs, prepare_pair, stream_loader
from sm_model.pixels import normalize_images
from sm_model.simplematch import SimpleMatch


def predict_batch(model: SimpleMatch, batch: PairBatch, autocast_dtype: torch.dtype | None = None):
    """Target keypoints ``[B, N, 2]`` float32 in original target pixels (on the batch's device)
    for a batch already on the model's device; ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs
    the network under autocast."""
    src = normalize_images(batch.src_image.float() / 255)
    trg = normalize_images(batch.trg_image.float() / 255)
    with torch.autocast(src.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model.predict(src, trg, batch.src_kps, batch.valid, batch.src_size, batch.trg_size)


def batch_records(
    model: SimpleMatch,
    batch: PairBatch,
    frame: Frame = "original",
    autocast_dtype: torch.dtype | None = None,
) -> KeypointRecords:
    """Per-keypoint records of one batch (on the model's device). ``frame="resized"`` scores in
    the ``S x S`` network frame of older papers, with ``S`` the batch's image side."""
    pred = predict_batch(model, batch, autocast_dtype).cpu().numpy()
    valid = batch.valid.cpu().numpy()
    square = batch.src_image.shape[-1] if frame == "resized" else None
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
                frame=frame,
                square=square,
                flags=flags or None,
            )
        )
    return KeypointRecords.concat(parts)


def predict_records(
    model: SimpleMatch,
    batches: Iterable[PairBatch],
    device: torch.device,
    frame: Frame = "original",
    autocast_dtype: torch.dtype | None = None,
) -> KeypointRecords | None:
    """Records of every pair in ``batches`` (``None`` when there are none)."""
    parts = [batch_records(model, batch.to(device), frame, autocast_dtype) for batch in batches]
    return KeypointRecords.concat(parts) if parts else None


def shard_batches(
    samples: Iterable[PairSample], shard_of: Mapping[str, str], image_size: int, batch_size: int
) -> Iterator[PairBatch]:
    """A pipeline stage: pairs (as the reader yields them, a shard at a time) -> batches of at most
    ``batch_size`` prepared pairs (images resized to ``image_size``) that never span two shards.

    ``shard_of`` maps each pair key to its shard name (from ``index.parquet``); a pair it does not
    list means the shards and their index disagree, which raises ``ValueError``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pending: list[PreparedPair] = []
    current: str | None = None
    for sample in samples:
        shard = shard_of.get(sample.key)
        if shard is None:
            raise ValueError(
                f"pair {sample.key!r} was read from the shards but index.parquet does not list it in this split: "
                "do the shards still match their index?"
            )
        if pending and (shard != current or len(pending) == batch_size):
            yield collate_pairs(pending)
            pending = []
        current = shard
        pending.append(prepare_pair(sample, image_size))
    if pending:
        yield collate_pairs(pending)


def eval_batches(
    shards: Location,
    names: Sequence[str],
    shard_of: Mapping[str, str],
    *,
    image_size: int,
    batch_size: int,
    loader_workers: int = 0,
) -> Iterator[PairBatch]:
    """Batches of every pair of the shards ``names`` (cut by :func:`shard_batches`), decoded and
    resized by ``loader_workers`` DataLoader processes (forkserver: forking inside Ray workers can
    deadlock; a script calling this with ``loader_workers > 0`` needs an
    ``if __name__ == "__main__":`` guard). Every name is read here (no split by ``RANK``); with
    several loader processes the batches of different shards interleave, each batch unchanged."""
    if not names:
        return
    read = set(names)
    wanted = {key: shard for key, shard in shard_of.items() if shard in read}
    dataset = pair_dataset(shards, names, split_nodes=False).compose(
        partial(shard_batches, shard_of=wanted, image_size=image_size, batch_size=batch_size)
    )
    yield from stream_loader(dataset, loader_workers)
