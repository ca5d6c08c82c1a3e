"""Exact epoch plans and the batches they produce: equal pairs per rank, no pair twice, bounded
remainder, and shard slices that read exactly the planned pairs."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.reader import ShardSlice, pair_dataset, split_shards
from pipelines.storage import Location
from sm_model.inputs import InputSpec
from sm_train.data import pair_batches, plan_epoch
from tests.per_pair import collate_pairs, prepare_pair


def _flatten(counts: dict[str, int], slices: list[ShardSlice]) -> list[tuple[str, int]]:
    return [(s.name, i) for s in slices for i in range(s.start, s.stop)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_plan_is_exact_and_disjoint(world_size: int, batch_size: int) -> None:
    counts = {f"s{i}": c for i, c in enumerate([13, 0, 40, 7, 22, 9, 31])}
    plan = plan_epoch(counts, world_size, batch_size, seed=1, epoch=0)
    taken = [_flatten(counts, rank) for rank in plan.ranks]
    assert all(len(rank) == plan.pairs_per_rank == sum(counts.values()) // world_size for rank in taken)
    everything = list(itertools.chain(*taken))
    assert len(set(everything)) == len(everything)
    assert plan.steps == plan.pairs_per_rank // batch_size
    assert plan.dropped == sum(counts.values()) - world_size * plan.steps * batch_size
    assert 0 <= plan.dropped < world_size * batch_size
    assert all(s.name != "s1" for rank in plan.ranks for s in rank)  # empty shards are skipped


def test_plan_is_shared_by_ranks_and_shuffled_per_epoch() -> None:
    counts = {f"s{i}": 10 + i for i in range(12)}
    first = plan_epoch(counts, 2, 4, seed=5, epoch=0)
    assert plan_epoch(counts, 2, 4, seed=5, epoch=0) == first
    assert plan_epoch(counts, 2, 4, seed=5, epoch=1).ranks != first.ranks
    ordered = plan_epoch(counts, 1, 4, seed=5, epoch=0, shuffle=False)
    assert [s.name for s in ordered.ranks[0]] == list(counts)


def test_plan_rejects_too_few_pairs() -> None:
    with pytest.raises(ValueError, match="cannot fill one batch of 8 on each of 2 workers"):
        plan_epoch({"a": 10}, 2, 8, seed=0, epoch=0)


def test_slices_read_exactly_the_planned_pairs(demo_shards: Path) -> None:
    shards = Location(str(demo_shards))
    counts = split_shards(shards, "trn")
    in_order = {name: [s.key for s in pair_dataset(shards, [name])] for name in counts}
    plan = plan_epoch(counts, 3, 5, seed=0, epoch=2)
    for rank in plan.ranks:
        keys = [s.key for s in pair_dataset(shards, rank, split_nodes=False)]
        assert keys == [in_order[s.name][i] for s in rank for i in range(s.start, s.stop)]
    with pytest.raises(ValueError, match="cannot take pairs"):
        name = next(iter(counts))
        list(pair_dataset(shards, [ShardSlice(name, 0, counts[name] + 1)]))


def test_batches_of_a_rank_are_full_and_bounded(demo_shards: Path) -> None:
    shards = Location(str(demo_shards))
    plan = plan_epoch(split_shards(shards, "trn"), 2, 6, seed=0, epoch=0)
    batches = list(
        pair_batches(shards, plan.ranks[1], spec=InputSpec(28), batch_size=6, split_nodes=False, max_batches=plan.steps)
    )
    assert len(batches) == plan.steps and all(len(b) == 6 for b in batches)
    resumed = list(
        pair_batches(
            shards, plan.ranks[1], spec=InputSpec(28), batch_size=6, split_nodes=False, max_batches=plan.steps, skip_batches=3
        )
    )
    assert [m.key for b in resumed for m in b.meta] == [m.key for b in batches[3:] for m in b.meta]
    with pytest.raises(RuntimeError, match="the plan needs"):
        list(pair_batches(shards, plan.ranks[1], spec=InputSpec(28), batch_size=6, split_nodes=False, max_batches=plan.steps + 1))


def test_collate_pads_keypoints_and_keeps_originals(demo_shards: Path) -> None:
    shards = Location(str(demo_shards))
    samples = list(itertools.islice(pair_dataset(shards, split_shards(shards, "val")), 3))
    prepared = [prepare_pair(s, 32) for s in samples]
    batch = collate_pairs(prepared)
    most = max(len(s.src_kps) for s in samples)
    assert batch.src_image.shape == (3, 3, 32, 32) and batch.src_image.dtype == torch.uint8
    assert batch.src_kps.shape == (3, most, 2)
    for row, sample in enumerate(samples):
        count = len(sample.src_kps)
        assert batch.valid[row].tolist() == [True] * count + [False] * (most - count)
        assert torch.isnan(batch.src_kps[row, count:]).all()
        np.testing.assert_allclose(batch.trg_kps[row, :count].numpy(), sample.trg_kps, rtol=1e-6)
        assert batch.meta[row].trg_kps is sample.trg_kps  # exact float64 values for scoring
        assert tuple(batch.trg_size[row].tolist()) == sample.trg_size


def test_input_spec_normalizes_with_imagenet_statistics() -> None:
    gray = torch.full((1, 3, 2, 2), 0.5)
    out = InputSpec(2).normalize(gray)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 0, 0], expected)
