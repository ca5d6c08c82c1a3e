"""Pairs from shards to network-ready batches: exact per-rank epoch plans, CPU decoding and
resizing in DataLoader workers, keypoint padding with a validity mask.

    >>> plan = plan_epoch(split_shards(shards, "trn"), world_size=2, seed=0, epoch=3)
    >>> for batch in pair_batches(shards, plan.ranks[rank], image_size=252, batch_size=8, ...):
    ...     batch = batch.to(device)

Exact epochs: :func:`plan_epoch` shuffles the shard order with ``seed + epoch`` (identically on
every rank), lays the pairs of all shards end to end and cuts them into ``world_size`` runs of
exactly ``total // world_size`` pairs, so every rank sees the same number of pairs and no pair
twice; a shard on a cut is read by both neighbours, each taking its own slice. Each rank then
cuts its run into ``steps = (total // world_size) // batch_size`` batches; the pairs left over
(fewer than one global batch) are reported by the plan and skipped for that epoch only.

Images are resized to the square network input on CPU (anisotropically, like the benchmarks'
protocol); keypoints and boxes stay in *original* pixels, and the model maps them
(:func:`sm_train.model.simplematch.original_to_input_pixels`), so the resize convention lives in
one place.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pipelines.reader import ShardSlice, pair_dataset
from pipelines.schema import ExtraValue, PairSample, ThresholdKind
from pipelines.storage import Location
from sm_train.model.backbones import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class EpochPlan:
    """What each rank reads in one epoch. ``ranks[r]`` lists rank ``r``'s shard slices in reading
    order; every rank holds ``pairs_per_rank`` pairs; ``steps`` batches of ``batch_size`` are
    taken from them; ``dropped`` pairs (fewer than ``world_size * batch_size``) are not seen."""

    ranks: list[list[ShardSlice]]
    pairs_per_rank: int
    steps: int
    dropped: int


def plan_epoch(
    shard_counts: dict[str, int], world_size: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> EpochPlan:
    """Split one epoch of the shards (``{name: pair count}``, e.g. from
    :func:`pipelines.reader.split_shards`) into ``world_size`` equal runs of pairs.

    The shard order is shuffled with ``seed + epoch`` when ``shuffle``; the result is the same on
    every rank, so ranks agree on the plan without communicating."""
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be at least 1")
    names = [name for name, count in shard_counts.items() if count > 0]
    if shuffle:
        random.Random(seed + epoch).shuffle(names)
    total = sum(shard_counts[name] for name in names)
    per_rank = total // world_size
    steps = per_rank // batch_size
    if steps == 0:
        raise ValueError(
            f"{total} pairs cannot fill one batch of {batch_size} on each of {world_size} workers; "
            "lower the batch size or the worker count"
        )
    ranks: list[list[ShardSlice]] = [[] for _ in range(world_size)]
    offset = 0  # position of the current shard's first pair in the epoch's pair sequence
    for name in names:
        count = shard_counts[name]
        for rank in range(world_size):
            lo, hi = max(offset, rank * per_rank), min(offset + count, (rank + 1) * per_rank)
            if lo < hi:
                ranks[rank].append(ShardSlice(name, lo - offset, hi - offset))
        offset += count
    return EpochPlan(ranks, per_rank, steps, total - world_size * steps * batch_size)


@dataclass(frozen=True)
class PairMeta:
    """What evaluation needs of a pair besides the network inputs, exactly as stored (float64).
    Shapes: ``kps_ids`` ``(N,)``, ``trg_kps`` ``(N, 2)``, ``trg_bbox`` ``(4,)``; ``trg_size`` ``(W, H)``."""

    key: str
    dataset: str
    category: str
    threshold: ThresholdKind
    kps_ids: np.ndarray
    trg_kps: np.ndarray
    trg_bbox: np.ndarray
    trg_size: tuple[int, int]
    extras: dict[str, ExtraValue]


@dataclass
class PreparedPair:
    """One pair after CPU preprocessing: ``src_image``/``trg_image`` ``[3, S, S]`` uint8; the
    rest in original pixels as float32 tensors (``kps`` ``[N, 2]``, ``bbox`` ``[4]``) and
    ``size`` ``[2]`` int64 ``(W, H)``."""

    src_image: Tensor
    trg_image: Tensor
    src_kps: Tensor
    trg_kps: Tensor
    src_bbox: Tensor
    trg_bbox: Tensor
    src_size: Tensor
    trg_size: Tensor
    meta: PairMeta


@dataclass
class PairBatch:
    """A batch of ``B`` pairs padded to the largest keypoint count ``N`` of the batch.

    ``src_image``/``trg_image`` ``[B, 3, S, S]`` uint8 (the original images resized to S x S);
    ``src_kps``/``trg_kps`` ``[B, N, 2]`` float32 in *original* pixels, NaN in padded rows;
    ``valid`` ``[B, N]`` bool; ``src_bbox``/``trg_bbox`` ``[B, 4]`` float32 original pixels;
    ``src_size``/``trg_size`` ``[B, 2]`` int64 original ``(W, H)``; ``meta`` one per pair (stays on CPU).
    """

    src_image: Tensor
    trg_image: Tensor
    src_kps: Tensor
    trg_kps: Tensor
    valid: Tensor
    src_bbox: Tensor
    trg_bbox: Tensor
    src_size: Tensor
    trg_size: Tensor
    meta: list[PairMeta]

    def __len__(self) -> int:
        return len(self.meta)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """The batch with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return PairBatch(**moved, meta=self.meta)


def resize_image(image: np.ndarray, size: int) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``[3, size, size]`` uint8, bilinear (anisotropic, like the benchmarks)."""
    resized = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()


def prepare_pair(sample: PairSample, image_size: int) -> PreparedPair:
    """CPU preprocessing of one pair (runs in DataLoader workers)."""
    meta = PairMeta(
        key=sample.key,
        dataset=sample.dataset,
        category=sample.category,
        threshold=sample.threshold,
        kps_ids=sample.kps_ids,
        trg_kps=sample.trg_kps,
        trg_bbox=sample.trg_bbox,
        trg_size=sample.trg_size,
        extras=sample.extras,
    )
    return PreparedPair(
        src_image=resize_image(sample.src_image, image_size),
        trg_image=resize_image(sample.trg_image, image_size),
        src_kps=torch.from_numpy(sample.src_kps).float(),
        trg_kps=torch.from_numpy(sample.trg_kps).float(),
        src_bbox=torch.from_numpy(sample.src_bbox).float(),
        trg_bbox=torch.from_numpy(sample.trg_bbox).float(),
        src_size=torch.tensor(sample.src_size, dtype=torch.int64),
        trg_size=torch.tensor(sample.trg_size, dtype=torch.int64),
        meta=meta,
    )


def collate_pairs(pairs: Sequence[PreparedPair]) -> PairBatch:
    """Stack prepared pairs, padding keypoints with NaN to the batch's largest count."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    most = max(len(pair.src_kps) for pair in pairs)
    src_kps = torch.full((len(pairs), most, 2), float("nan"))
    trg_kps = torch.full((len(pairs), most, 2), float("nan"))
    valid = torch.zeros(len(pairs), most, dtype=torch.bool)
    for row, pair in enumerate(pairs):
        count = len(pair.src_kps)
        src_kps[row, :count], trg_kps[row, :count], valid[row, :count] = pair.src_kps, pair.trg_kps, True
    return PairBatch(
        src_image=torch.stack([pair.src_image for pair in pairs]),
        trg_image=torch.stack([pair.trg_image for pair in pairs]),
        src_kps=src_kps,
        trg_kps=trg_kps,
        valid=valid,
        src_bbox=torch.stack([pair.src_bbox for pair in pairs]),
        trg_bbox=torch.stack([pair.trg_bbox for pair in pairs]),
        src_size=torch.stack([pair.src_size for pair in pairs]),
        trg_size=torch.stack([pair.trg_size for pair in pairs]),
        meta=[pair.meta for pair in pairs],
    )


def pair_batches(
    shards: Location,
    entries: Sequence[str | ShardSlice],
    *,
    image_size: int,
    batch_size: int,
    loader_workers: int = 0,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    split_nodes: bool = True,
    max_batches: int | None = None,
    skip_batches: int = 0,
) -> Iterator[PairBatch]:
    """Batches of the pairs in ``entries`` (see :func:`pipelines.reader.pair_dataset` for the
    order, shuffling and splitting), decoded and resized by ``loader_workers`` processes
    (started with forkserver: forking inside Ray workers can deadlock) and batched in this process.

    With ``max_batches`` only full batches are yielded, at most that many (training); otherwise
    every pair is yielded and the last batch may be short (evaluation). ``skip_batches`` drops the
    first batches of the stream (resuming mid-epoch; the order is deterministic for a fixed
    ``loader_workers``)."""
    if not entries:
        return
    dataset = pair_dataset(
        shards, entries, shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch, split_nodes=split_nodes
    ).compose(partial(_prepare_all, image_size=image_size))
    pending: list[PreparedPair] = []
    produced = 0
    for pair in stream_loader(dataset, loader_workers):
        pending.append(pair)
        if len(pending) < batch_size:
            continue
        if produced >= skip_batches:
            yield collate_pairs(pending)
        pending, produced = [], produced + 1
        if max_batches is not None and produced >= max_batches:
            return
    if max_batches is not None:
        # A short stream would leave this rank with fewer steps than the others (a DDP hang).
        raise RuntimeError(
            f"{shards.url}: the shards yielded {produced} batches of {batch_size}, the plan needs "
            f"{max_batches}; do the shards still match their index.parquet?"
        )
    if pending and produced >= skip_batches:
        yield collate_pairs(pending)


def loader_context() -> multiprocessing.context.BaseContext:
    """The start method for DataLoader processes: forkserver (forking inside Ray workers can
    deadlock), with this module preloaded in the server, so loader processes fork from a server
    that has already imported torch and the reader instead of importing them each (seconds per
    process). Has no effect once this process's forkserver is running."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    return context


def stream_loader(dataset: torch.utils.data.IterableDataset, loader_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader that passes ``dataset``'s items through unbatched, produced by
    ``loader_workers`` processes started by :func:`loader_context` (none: in this process). A
    loader process with no shard (more processes than shards) simply yields nothing."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=loader_workers,
        multiprocessing_context=loader_context() if loader_workers else None,
        persistent_workers=False,
    )


def _prepare_all(samples: Iterator[PairSample], image_size: int) -> Iterator[PreparedPair]:
    for sample in samples:
        yield prepare_pair(sample, image_size)



def normalize_images(images: Tensor) -> Tensor:
    """``[B, 3, S, S]`` float in ``[0, 1]`` -> ImageNet-normalised, the input every backbone
    (and the official code) expects."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std
