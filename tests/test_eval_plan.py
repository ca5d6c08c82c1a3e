"""Evaluation planning (sm_eval.plan) and checkpoint naming (sm_eval.checkpoints): pure functions
on hand-written indexes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.reader import ShardSlice
from pipelines.storage import Location
from sm_eval.checkpoints import checkpoint_file, model_names
from sm_eval.plan import (
    assign_shards,
    canonical_order,
    check_coverage,
    plan_from_index,
    sample_pairs,
)

SHARDS = Location("/data/shards")


def index(*rows: tuple[str, str, str, str]) -> dict[str, list[str]]:
    """Index columns from ``(key, split, shard, category)`` rows (dataset demo, threshold bbox)."""
    return {
        "key": [r[0] for r in rows],
        "split": [r[1] for r in rows],
        "shard": [r[2] for r in rows],
        "category": [r[3] for r in rows],
        "dataset": ["demo"] * len(rows),
        "threshold": ["bbox"] * len(rows),
    }


COLUMNS = index(
    ("t3", "test", "test-0.tar", "cat"),
    ("t1", "test", "test-0.tar", "dog"),
    ("v1", "val", "val-0.tar", "cat"),
    ("t2", "test", "test-2.tar", "cat"),
    ("t0", "test", "test-2.tar", "cat"),
    ("t9", "test", "test-2.tar", "dog"),
)


def test_plan_keeps_index_order_and_drops_shards_without_pairs() -> None:
    plan = plan_from_index(SHARDS, "test", COLUMNS, ["test-0.tar", "test-1.tar", "test-2.tar"])
    assert plan.pair_keys == ("t3", "t1", "t2", "t0", "t9")
    assert plan.shard_counts == {"test-0.tar": 2, "test-2.tar": 3}  # test-1 lost all its pairs to rejects
    assert plan.categories == ("cat", "dog", "cat", "cat", "dog")
    assert plan.datasets == ("demo",) and plan.threshold_kinds == ("bbox",)
    assert plan.position == {"t3": 0, "t1": 1, "t2": 2, "t0": 3, "t9": 4}
    assert plan.position_in_shard == {"t3": 0, "t1": 1, "t2": 0, "t0": 1, "t9": 2}
    assert plan.slices_of(["t9", "t3", "t2"]) == [ShardSlice("test-0.tar", 0, 1), ShardSlice("test-2.tar", 0, 3)]


def test_plan_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="/data/shards: split 'trn' has no pairs"):
        plan_from_index(SHARDS, "trn", COLUMNS, ["trn-0.tar"])
    twice = index(("a", "test", "test-0.tar", "c"), ("a", "test", "test-1.tar", "c"))
    with pytest.raises(ValueError, match=r"listed more than once in split 'test': \['a'\]"):
        plan_from_index(SHARDS, "test", twice, ["test-0.tar", "test-1.tar"])
    with pytest.raises(ValueError, match=r"shards \['test-2.tar'\], which the split does not list"):
        plan_from_index(SHARDS, "test", COLUMNS, ["test-0.tar"])
    with pytest.raises(ValueError, match=r"lacks the columns \['threshold'\]"):
        plan_from_index(SHARDS, "test", {k: v for k, v in COLUMNS.items() if k != "threshold"}, ["test-0.tar"])


def test_assign_shards_balances_pair_counts_with_whole_shards() -> None:
    counts = {"s0": 10, "s1": 70, "s2": 30, "s3": 40, "s4": 20, "s5": 30}
    # Largest first to the least-loaded worker: s1->0 (70), s3->1 (40), s2->1 (70), s5->0 (100),
    # s4->1 (90), s0->1 (100). Each list comes back in index order.
    assert assign_shards(counts, 2) == [["s1", "s5"], ["s0", "s2", "s3", "s4"]]
    three = assign_shards(counts, 3)
    assert sorted(name for share in three for name in share) == sorted(counts)
    assert [sum(counts[n] for n in share) for share in three] == [70, 70, 60]
    assert assign_shards(counts, 3) == three  # deterministic
    assert assign_shards({"a": 5, "b": 5}, 4) == [["a"], ["b"]]  # no idle workers
    assert assign_shards(counts, 1) == [list(counts)]
    with pytest.raises(ValueError, match="at least 1"):
        assign_shards(counts, 0)


def test_canonical_order_sorts_pairs_by_index_and_keeps_keypoint_order() -> None:
    keys = np.array(["b", "b", "a", "c", "a", "b"], dtype=object)  # records as two workers returned them
    order = canonical_order(keys, {"a": 0, "b": 1, "c": 2})
    assert order.tolist() == [2, 4, 0, 1, 5, 3]
    with pytest.raises(ValueError, match="'z'"):
        canonical_order(np.array(["a", "z"], dtype=object), {"a": 0})


def test_check_coverage_names_the_shard_that_fell_short() -> None:
    plan = plan_from_index(SHARDS, "test", COLUMNS, ["test-0.tar", "test-2.tar"])
    check_coverage(plan, ["t3", "t1", "t2", "t0", "t9"], ["test-0.tar", "test-2.tar"])
    with pytest.raises(ValueError, match=r"shard /data/shards/test-2.tar yielded 0 of the 3 pairs"):
        check_coverage(plan, ["t3", "t1"], ["test-0.tar", "test-2.tar"])
    with pytest.raises(ValueError, match=r"not in split 'test' of index.parquet were read: \['v1'\]"):
        check_coverage(plan, ["t3", "t1", "t2", "t0", "t9", "v1"], ["test-0.tar", "test-2.tar"])


def test_sample_pairs_takes_turns_over_categories_and_spreads_within_each() -> None:
    keys = [f"c{i}" for i in range(9)] + ["d0", "d1", "d2"] + ["e0"]
    categories = ["cat"] * 9 + ["dog"] * 3 + ["emu"]
    # 5 picks over 3 categories: up to 2 each, evenly spaced -> cat c0, c8; dog d0, d2; emu e0.
    assert sample_pairs(keys, categories, 5) == ["c0", "d0", "e0", "c8", "d2"]
    assert sample_pairs(keys, categories, 7) == ["c0", "d0", "e0", "c4", "d1", "c8", "d2"]
    assert sample_pairs(keys, categories, 0) == [] and sample_pairs([], [], 3) == []
    assert len(sample_pairs(keys, categories, 100)) == len(keys)


def test_model_names_are_short_distinct_and_file_safe() -> None:
    assert model_names(["/runs/a/ckpt.pt"]) == ["ckpt"]
    assert model_names(["runs/exp1/checkpoint_000010", "runs/exp2/checkpoint_000010/model.pt"]) == [
        "exp1-checkpoint_000010",
        "exp2-checkpoint_000010",
    ]
    assert model_names(["s3://bucket/spair/best.pth", "/local/pf pascal/best.pth"]) == ["spair-best", "pf_pascal-best"]
    assert model_names(["m.pt", "m.pt"]) == ["m", "m#2"]


def test_checkpoint_file_accepts_a_file_or_a_directory_with_model_pt(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoint_000001").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint_000001" / "model.pt").write_bytes(b"x")
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    directory, name = checkpoint_file(str(tmp_path / "run" / "checkpoint_000001"))
    assert (directory.url, name) == (str(tmp_path / "run" / "checkpoint_000001"), "model.pt")
    directory, name = checkpoint_file(str(tmp_path / "ckpt.pt"))
    assert (directory.url, name) == (str(tmp_path), "ckpt.pt")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'run'}: expected"):
        checkpoint_file(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint_file(str(tmp_path / "absent.pt"))
