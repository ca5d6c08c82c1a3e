"""What one evaluation reads: a split's pairs in index order, their shards, and each worker's share.

The index order of ``index.parquet`` is the canonical order of every output: records from any
number of workers are put back into it (:func:`canonical_order`), so the predictions file does not
depend on who computed what. Workers get whole shards (:func:`assign_shards`), balanced by pair
count. Everything here is pure except :func:`read_split_plan`, which reads the index.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipelines.reader import ShardSlice, read_index, split_shards
from pipelines.storage import Location

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("key", "split", "shard", "dataset", "category", "threshold")


@dataclass(frozen=True)
class SplitPlan:
    """The pairs of one split of a shard set, in index order.

    ``pair_keys``, ``pair_shards``, ``categories`` are parallel tuples (one entry per pair);
    ``shard_counts`` maps each shard that holds pairs of the split to its pair count, in index
    order; ``datasets`` and ``threshold_kinds`` are the distinct values found, sorted."""

    shards: Location
    split: str
    pair_keys: tuple[str, ...]
    pair_shards: tuple[str, ...]
    categories: tuple[str, ...]
    shard_counts: dict[str, int]
    datasets: tuple[str, ...]
    threshold_kinds: tuple[str, ...]

    @property
    def num_pairs(self) -> int:
        return len(self.pair_keys)

    @cached_property
    def position(self) -> dict[str, int]:
        """Pair key -> its position in index order."""
        return {key: index for index, key in enumerate(self.pair_keys)}

    @cached_property
    def shard_of(self) -> dict[str, str]:
        """Pair key -> shard name."""
        return dict(zip(self.pair_keys, self.pair_shards))

    @cached_property
    def position_in_shard(self) -> dict[str, int]:
        """Pair key -> its position among its shard's pairs (a shard stores them in index order)."""
        seen: Counter[str] = Counter()
        positions = {}
        for key, shard in zip(self.pair_keys, self.pair_shards):
            positions[key] = seen[shard]
            seen[shard] += 1
        return positions

    def slices_of(self, keys: Sequence[str]) -> list[ShardSlice]:
        """The shortest :class:`~pipelines.reader.ShardSlice` of each shard that covers the pairs
        ``keys`` of that shard, in index order of the shards."""
        spans: dict[str, tuple[int, int]] = {}
        for key in keys:
            shard, at = self.shard_of[key], self.position_in_shard[key]
            lo, hi = spans.get(shard, (at, at + 1))
            spans[shard] = (min(lo, at), max(hi, at + 1))
        return [ShardSlice(name, *spans[name]) for name in self.shard_counts if name in spans]


def plan_from_index(
    shards: Location, split: str, columns: Mapping[str, Sequence[str]], split_shard_names: Sequence[str]
) -> SplitPlan:
    """The plan of ``split`` from the index's ``columns`` (``{name: values}`` of
    :data:`INDEX_COLUMNS`, one value per pair of every split) and the split's shard list (its
    ``_manifests/<split>.json``). Raises ``ValueError`` for a split without pairs, a pair key listed
    twice, or a pair in a shard the split does not list."""
    missing = [name for name in INDEX_COLUMNS if name not in columns]
    if missing:
        raise ValueError(f"{shards.full('index.parquet')} lacks the columns {missing}")
    rows = [i for i, value in enumerate(columns["split"]) if value == split]
    if not rows:
        raise ValueError(
            f"{shards.url}: split {split!r} has no pairs in index.parquet "
            f"(its shards {list(split_shard_names)} hold none; were all its pairs rejected?)"
        )
    keys = tuple(str(columns["key"][i]) for i in rows)
    pair_shards = tuple(str(columns["shard"][i]) for i in rows)
    duplicated = sorted(key for key, count in Counter(keys).items() if count > 1)
    if duplicated:
        raise ValueError(
            f"{shards.full('index.parquet')}: pair keys listed more than once in split {split!r}: {duplicated[:10]}"
        )
    unlisted = sorted(set(pair_shards) - set(split_shard_names))
    if unlisted:
        raise ValueError(
            f"{shards.url}: index.parquet puts pairs of split {split!r} in shards {unlisted}, "
            "which the split does not list"
        )
    counts = Counter(pair_shards)
    empty = [name for name in split_shard_names if counts[name] == 0]
    if empty:
        log.info("%s: shards %s hold no pairs of split %r (all rejected); not read", shards.url, empty, split)
    return SplitPlan(
        shards=shards,
        split=split,
        pair_keys=keys,
        pair_shards=pair_shards,
        categories=tuple(str(columns["category"][i]) for i in rows),
        shard_counts={name: counts[name] for name in split_shard_names if counts[name] > 0},
        datasets=tuple(sorted({str(columns["dataset"][i]) for i in rows})),
        threshold_kinds=tuple(sorted({str(columns["threshold"][i]) for i in rows})),
    )


def read_split_plan(shards: Location, split: str) -> SplitPlan:
    """:func:`plan_from_index` on the shard set's ``index.parquet`` and split manifest (a missing
    index or unfinished split raises ``FileNotFoundError`` naming the file)."""
    names = list(split_shards(shards, split))
    table = read_index(shards).select(list(INDEX_COLUMNS))
    return plan_from_index(shards, split, table.to_pydict(), names)


def assign_shards(shard_counts: Mapping[str, int], workers: int) -> list[list[str]]:
    """Whole shards for each of at most ``workers`` workers, balanced by pair count.

    Largest shard first, each to the least-loaded worker (ties: the lower worker); each worker's
    shards are then listed in the input (index) order. Workers left without a shard are dropped,
    so the result has ``min(workers, number of shards)`` lists. Deterministic."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    order = {name: index for index, name in enumerate(shard_counts)}
    loads = [(0, worker) for worker in range(workers)]
    shares: list[list[str]] = [[] for _ in range(workers)]
    for name in sorted(shard_counts, key=lambda n: (-shard_counts[n], order[n])):
        load, worker = heapq.heappop(loads)
        shares[worker].append(name)
        heapq.heappush(loads, (load + shard_counts[name], worker))
    return [sorted(share, key=order.__getitem__) for share in shares if share]


def canonical_order(pair_keys: np.ndarray, position: Mapping[str, int]) -> np.ndarray:
    """The permutation ``(M,)`` that sorts records by their pair's index position, keeping each
    pair's records in the order they came (the pair's own keypoint order). ``pair_keys`` ``(M,)``."""
    try:
        ranks = np.fromiter((position[key] for key in pair_keys), dtype=np.int64, count=len(pair_keys))
    except KeyError as error:
        raise ValueError(f"records hold pair {error.args[0]!r}, which the split's index does not list") from None
    return np.argsort(ranks, kind="stable")


def check_coverage(plan: SplitPlan, seen_keys: Sequence[str] | np.ndarray, shards_read: Sequence[str]) -> None:
    """Raise ``ValueError`` naming each shard of ``shards_read`` whose pairs (by the index) are
    not exactly those seen (a shard cut short or holding other pairs than its index says).
    ``seen_keys`` holds a pair's key once per time it was read: counts are compared, not sets, so
    a pair read twice (and so scored twice) is an error too."""
    seen = Counter(seen_keys)
    expected: dict[str, list[str]] = defaultdict(list)
    for key, shard in zip(plan.pair_keys, plan.pair_shards):
        expected[shard].append(key)
    problems = []
    for shard in shards_read:
        missing = [key for key in expected[shard] if not seen[key]]
        if missing:
            problems.append(
                f"shard {plan.shards.full(shard)} yielded {len(expected[shard]) - len(missing)} of the "
                f"{len(expected[shard])} pairs index.parquet lists (missing e.g. {missing[:3]})"
            )
    repeated = sorted(key for key, count in seen.items() if count > 1)
    if repeated:
        problems.append(
            f"pairs were read more than once: {repeated[:3]} (read {[seen[key] for key in repeated[:3]]} times, "
            f"in shards {sorted({plan.shard_of.get(key, '?') for key in repeated[:3]})} by index.parquet)"
        )
    unexpected = sorted(set(seen) - set(plan.pair_keys))
    if unexpected:
        problems.append(f"pairs not in split {plan.split!r} of index.parquet were read: {unexpected[:3]}")
    if problems:
        raise ValueError("; ".join(problems) + ": is the shard truncated or empty, or rewritten since the index?")


def sample_pairs(pair_keys: Sequence[str], categories: Sequence[str], count: int) -> list[str]:
    """Up to ``count`` pair keys spread over categories and over each category's pairs.

    Categories take turns in sorted order; within a category, the picks are evenly spaced over its
    pairs in the given order (first and last included). Deterministic; ``pair_keys`` and
    ``categories`` are parallel."""
    if count <= 0 or not pair_keys:
        return []
    by_category: dict[str, list[str]] = defaultdict(list)
    for key, category in zip(pair_keys, categories):
        by_category[category].append(key)
    per_category = -(-count // len(by_category))
    picks = {}
    for category, keys in by_category.items():
        take = min(per_category, len(keys))
        picks[category] = [keys[i] for i in sorted(set(np.linspace(0, len(keys) - 1, take).round().astype(int)))]
    chosen = []
    for turn in range(per_category):
        for category in sorted(picks):
            if turn < len(picks[category]):
                chosen.append(picks[category][turn])
    return chosen[:count]
