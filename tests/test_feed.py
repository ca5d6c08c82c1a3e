"""The data path from shards to batches (sm_feed.batches): batches assembled from chunks that
loader processes ship are the batches of the per-pair path (prepare_pair + collate_pairs in this
process), byte for byte, for any number of loader processes, for training (same seed, epoch and
position), validation and evaluation; each image is resized once per piece and equals its per-pair
resize; pieces cover exactly the entries; sm_eval reports its start-up apart from its steady rate."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import sm_feed.batches
import sm_model.inputs
import sm_model.pixels
from pipelines import reader
from pipelines.reader import CorruptShardError, ShardSlice, index_rows, pair_dataset, split_shards
from pipelines.storage import Location
from sm_eval.evaluate import EvalRequest, evaluate
from sm_eval.plan import read_split_plan
from sm_eval.predict import eval_batches
from sm_eval.runner import EvalSettings
from sm_feed.batches import (
    PairBatch,
    assemble_batch,
    pair_refs,
    pins_memory,
    plan_pieces,
    to_device,
)
from sm_model.checkpoint import save_checkpoint
from sm_model.config import ModelConfig
from sm_model.inputs import InputSpec
from sm_model.simplematch import SimpleMatchOptions
from sm_model.simplematch.model import SimpleMatch
from sm_train.data import pair_batches, plan_epoch
from tests.per_pair import collate_pairs, prepare_pair

SIZE = 28


def assert_same_batches(new: list[PairBatch], old: list[PairBatch]) -> None:
    """Equal byte for byte: every tensor's dtype, shape and bytes (NaN padding included), every
    meta field (arrays by dtype and value)."""
    assert len(new) == len(old) > 0
    for a, b in zip(new, old):
        for field in fields(PairBatch):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if isinstance(x, torch.Tensor):
                assert (x.dtype, x.shape) == (y.dtype, y.shape), field.name
                assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), field.name
        assert len(a.meta) == len(b.meta)
        for m, n in zip(a.meta, b.meta):
            for field in fields(m):
                x, y = getattr(m, field.name), getattr(n, field.name)
                if isinstance(x, np.ndarray):
                    assert x.dtype == y.dtype and np.array_equal(x, y), field.name
                else:
                    assert x == y, field.name


def per_pair_batches(samples: Iterable, batch_size: int, image_resize: str = "antialiased") -> Iterator[PairBatch]:
    """The reference: each pair resized on its own and collated in this process."""
    pending: list = []
    for sample in samples:
        pending.append(prepare_pair(sample, SIZE, image_resize))
        if len(pending) == batch_size:
            yield collate_pairs(pending)
            pending = []
    if pending:
        yield collate_pairs(pending)


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_training_batches_are_the_per_pair_batches_for_any_loader_count(demo_shards: Path, loader_workers: int) -> None:
    shards = Location(str(demo_shards))
    plan = plan_epoch(split_shards(shards, "trn"), 2, 5, seed=3, epoch=1)
    common = {"shuffle_buffer": 16, "seed": 3, "epoch": 1, "split_nodes": False}
    skip = 2  # resuming at step 2 of rank 1
    old = list(itertools.islice(per_pair_batches(pair_dataset(shards, plan.ranks[1], **common), 5), skip, plan.steps))
    new = list(
        pair_batches(
            shards, plan.ranks[1], spec=InputSpec(SIZE), batch_size=5, loader_workers=loader_workers,
            max_batches=plan.steps, skip_batches=skip, **common,
        )
    )  # fmt: skip
    assert_same_batches(new, old)


def test_validation_batches_follow_the_rank_split(demo_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = Location(str(demo_shards))
    names = list(split_shards(shards, "val"))
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        old = list(per_pair_batches(pair_dataset(shards, names), 4, "official"))
        new = list(
            pair_batches(shards, names, spec=InputSpec(SIZE, resize_method="official"), batch_size=4, loader_workers=2)
        )
        assert_same_batches(new, old)


def test_eval_batches_are_the_per_pair_batches_cut_at_shards(demo_shards: Path) -> None:
    plan = read_split_plan(Location(str(demo_shards)), "test")
    names = list(plan.shard_counts)
    old = [batch for name in names for batch in per_pair_batches(pair_dataset(plan.shards, [name]), 5)]
    assert any(len(batch) < 5 for batch in old[:-1])  # a shard ended a batch early
    for loader_workers in (0, 2):
        new = list(
            eval_batches(
                plan.shards, names, plan.shard_of, spec=InputSpec(SIZE), batch_size=5, loader_workers=loader_workers
            )
        )
        assert_same_batches(new, old)


def test_each_image_is_resized_once_per_piece(demo_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resized = []

    def counting_resize(image: np.ndarray, size: int, method: str = "antialiased") -> torch.Tensor:
        resized.append(image.shape)
        return sm_model.pixels.resize_image(image, size, method)

    monkeypatch.setattr(sm_model.inputs, "resize_image", counting_resize)
    shards = Location(str(demo_shards))
    names = list(split_shards(shards, "trn"))
    refs = list(pair_refs(shards, names, spec=InputSpec(SIZE)))
    table = pq.read_table(demo_shards / "index.parquet").to_pandas().query("split == 'trn'")
    distinct = sum(len(set(group.src_image) | set(group.trg_image)) for _, group in table.groupby("shard"))
    assert len(resized) == distinct < 2 * len(refs)
    # ... and a resized-once image is the image each of its pairs would have resized on its own.
    batch = assemble_batch(refs[:40])
    old = collate_pairs([prepare_pair(s, SIZE) for s in itertools.islice(pair_dataset(shards, names), 40)])
    assert_same_batches([batch], [old])


def test_pieces_cover_the_entries_and_balance_the_processes(demo_shards: Path) -> None:
    shards = Location(str(demo_shards))
    counts = split_shards(shards, "trn")
    entries = plan_epoch(counts, 1, 4, seed=0, epoch=0).ranks[0]
    index = index_rows(shards, {name: shards.full(name) for name in counts})

    def pairs(pieces: list) -> list[tuple[str, int]]:
        return [(p.name, i) for p in pieces for i in range(p.start, p.stop)]

    assert plan_pieces(shards, entries, index, 0, SIZE) == entries  # small shards: nothing to cut
    for workers in (2, 3, 5):
        pieces = plan_pieces(shards, entries, index, workers, SIZE)
        assert pairs(pieces) == pairs(entries) and len(pieces) % workers == 0
    # A bound of two images per piece: every piece uses at most two distinct images.
    one_image = 3 * SIZE * SIZE
    pieces = plan_pieces(shards, entries, index, 0, SIZE, piece_bytes=2 * one_image)
    assert pairs(pieces) == pairs(entries) and len(pieces) > len(entries)
    for piece in pieces:
        rows = list(index[shards.full(piece.name)].values())[piece.start : piece.stop]
        assert len({r["src_image"] for r in rows} | {r["trg_image"] for r in rows}) <= 2
    # Whole shards (names) are read to their end, never cut.
    names = list(counts)
    assert plan_pieces(shards, names, index, 4, SIZE, piece_bytes=one_image) == names


def test_small_pieces_and_many_processes_give_the_same_batches(
    demo_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = Location(str(demo_shards))
    plan = plan_epoch(split_shards(shards, "trn"), 1, 8, seed=0, epoch=0)
    common = {
        "spec": InputSpec(SIZE),
        "batch_size": 8,
        "shuffle_buffer": 32,
        "split_nodes": False,
        "max_batches": plan.steps,
    }
    old = list(pair_batches(shards, plan.ranks[0], **common))
    monkeypatch.setattr(sm_feed.batches, "PIECE_BYTES", 3 * 3 * SIZE * SIZE)  # pieces of three images
    monkeypatch.setattr(sm_feed.batches, "CHUNK_PAIRS", 3)
    index = index_rows(Location(str(demo_shards)), {s.name: shards.full(s.name) for s in plan.ranks[0]})
    assert len(plan_pieces(shards, plan.ranks[0], index, 3, SIZE)) > 2 * len(plan.ranks[0])
    new = list(pair_batches(shards, plan.ranks[0], loader_workers=3, **common))
    assert_same_batches(new, old)


def test_a_slice_checks_the_pairs_it_takes_and_that_the_index_lists_every_pair(
    demo_shards: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(demo_shards, tmp_path / "shards"))
    shards = Location(str(copy))
    name, count = next((n, c) for n, c in split_shards(shards, "trn").items() if c >= 4)
    with tarfile.open(copy / name) as tar:
        members = [(member.name, tar.extractfile(member).read()) for member in tar]
    last_doc = [m for m, _ in members if m.endswith(".pair.json")][-1]
    with tarfile.open(copy / name, "w") as tar:
        for member, data in members:
            data = b"{not json" if member == last_doc else data
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = index_rows(shards, {name: shards.full(name)})
    assert len(list(reader.read_entry(shards, ShardSlice(name, 0, count - 1), index))) == count - 1
    with pytest.raises(CorruptShardError, match=f"member {last_doc}: not valid JSON"):
        list(reader.read_entry(shards, name, index))
    unlisted = {url: dict(itertools.islice(rows.items(), 1, None)) for url, rows in index.items()}
    with pytest.raises(CorruptShardError, match="index.parquet does not list this pair"):
        list(reader.read_entry(shards, ShardSlice(name, 1, 2), unlisted))


def test_to_device_on_the_cpu_passes_batches_through(demo_shards: Path) -> None:
    shards = Location(str(demo_shards))
    batches = list(pair_batches(shards, list(split_shards(shards, "val")), spec=InputSpec(SIZE), batch_size=4))
    assert not pins_memory("cpu") and not pins_memory(None)
    assert_same_batches(list(to_device(iter(batches), "cpu")), batches)
    assert all(a is b for a, b in zip(to_device(iter(batches), None), batches))


def test_report_times_the_first_batch_apart_from_the_steady_rate(demo_shards: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(
        SimpleMatch(ModelConfig(backbone="dinov2_vits14", image_size=SIZE, window_size=5, options=SimpleMatchOptions(decoder_channels=16))),
        checkpoint,
    )
    settings = EvalSettings(batch_size=4, loader_workers=1, threads=2)
    out = tmp_path / "out"
    evaluate(
        EvalRequest(
            checkpoints=(str(checkpoint),), shards=str(demo_shards), out=str(out), settings=settings,
            device="cpu", matches=0, progress=False,
        )
    )  # fmt: skip
    (model,) = json.loads((out / "report.json").read_text())["models"]
    assert 0 < model["first_batch_seconds"] <= model["seconds"]
    assert model["steady_pairs_per_second"] > 0
    pairs = read_split_plan(Location(str(demo_shards)), "test").num_pairs
    steady_seconds = model["seconds"] - model["first_batch_seconds"]
    assert model["steady_pairs_per_second"] * steady_seconds <= pairs
