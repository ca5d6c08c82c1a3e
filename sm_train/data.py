"""Training pairs from shards to network-ready batches (:mod:`sm_feed.batches`): exact per-rank
epoch plans, CPU decoding and resizing in DataLoader processes, batches in the same order for any
number of them.

    >>> plan = plan_epoch(split_shards(shards, "trn"), world_size=2, seed=0, epoch=3)
    >>> for batch in pair_batches(shards, plan.ranks[rank], spec=model.input_spec, batch_size=8, ...):
    ...     batch = batch.to(device)

Exact epochs: :func:`plan_epoch` shuffles the shard order with ``seed + epoch`` (identically on
every rank), lays the pairs of all shards end to end and cuts them into ``world_size`` runs of
exactly ``total // world_size`` pairs, so every rank sees the same number of pairs and no pair
twice; a shard on a cut is read by both neighbours, each taking its own slice. Each rank then
cuts its run into ``steps = (total // world_size) // batch_size`` batches; the pairs left over
(fewer than one global batch) are reported by the plan and skipped for that epoch only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pipelines.reader import ShardSlice, entry_order, shuffle_pairs
from pipelines.storage import Location
from sm_feed.batches import PairBatch, PairRef, assemble_batch, pair_refs, pins_memory, to_device
from sm_model.inputs import InputSpec


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


def pair_batches(
    shards: Location,
    entries: Sequence[str | ShardSlice],
    *,
    spec: InputSpec,
    batch_size: int,
    loader_workers: int = 0,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    split_nodes: bool = True,
    max_batches: int | None = None,
    skip_batches: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[PairBatch]:
    """Batches of the pairs in ``entries``, in the order :func:`pipelines.reader.pair_dataset`
    yields them in one process (its shard order, shuffling and splitting), read, checked and
    resized as the model's input ``spec`` says by ``loader_workers`` processes
    (:func:`sm_feed.batches.pair_refs`; forkserver: forking inside Ray workers can deadlock) and
    assembled here. The batches do not depend on ``loader_workers``: the same seed, epoch and
    position give the same batches, byte for byte, with any number of loader processes.

    With ``max_batches`` only full batches are yielded, at most that many (training); otherwise
    every pair is yielded and the last batch may be short (evaluation). ``skip_batches`` drops the
    first batches of the stream (resuming mid-epoch). With a CUDA ``device`` the batches come on
    it, each copied while the previous one is in use (:func:`sm_feed.batches.to_device`)."""
    if not entries:
        return
    shuffle = shuffle_buffer > 0
    ordered = entry_order(shards, entries, shuffle=shuffle, seed=seed, epoch=epoch, split_nodes=split_nodes)
    refs: Iterator[PairRef] = iter(())
    if ordered:
        refs = pair_refs(shards, ordered, spec=spec, loader_workers=loader_workers)
    if shuffle:
        refs = shuffle_pairs(refs, shuffle_buffer, seed + epoch)
    batches = _cut(refs, shards, batch_size, max_batches, skip_batches, pins_memory(device))
    yield from to_device(batches, device)


def _cut(
    refs: Iterator[PairRef],
    shards: Location,
    batch_size: int,
    max_batches: int | None,
    skip_batches: int,
    pin_memory: bool,
) -> Iterator[PairBatch]:
    pending: list[PairRef] = []
    produced = 0
    for ref in refs:
        pending.append(ref)
        if len(pending) < batch_size:
            continue
        if produced >= skip_batches:
            yield assemble_batch(pending, pin_memory)
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
        yield assemble_batch(pending, pin_memory)
