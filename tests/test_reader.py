"""The shard reader: complete pairs, order, shuffling, node/worker splitting, decode-once, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import reader
from pipelines.imageio import decode_rgb
from pipelines.reader import pair_dataset, split_shards
from pipelines.schema import PairSample
from pipelines.storage import Location


def test_pairs_come_complete_in_index_order(demo_shards: Path, demo_root: Path) -> None:
    shards = Location(str(demo_shards))
    names = split_shards(shards, "trn")
    samples = list(pair_dataset(shards, names))
    index = [row for row in pq.read_table(demo_shards / "index.parquet").to_pylist() if row["split"] == "trn"]
    assert [s.key for s in samples] == [row["key"] for row in index]
    assert sum(names.values()) == len(samples)
    sample = samples[0]
    assert sample.dataset == "demo" and sample.threshold == "bbox" and sample.split == "trn"
    assert sample.src_kps.shape == sample.trg_kps.shape == (len(sample.kps_ids), 2)
    assert sample.src_image.shape == (sample.src_size[1], sample.src_size[0], 3)
    row = index[0]
    source = demo_root / "JPEGImages" / sample.category / f"{sample.src_image_key.split('_', 1)[1]}.jpg"
    np.testing.assert_array_equal(sample.src_image, decode_rgb(source.read_bytes()))
    assert row["src_image"] == sample.src_image_key and row["num_keypoints"] == len(sample.kps_ids)


def test_each_image_is_decoded_once_per_shard(demo_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []

    def counting_decode(data: bytes) -> np.ndarray:
        decoded.append(data)
        return decode_rgb(data)

    monkeypatch.setattr(reader, "decode_rgb", counting_decode)
    shards = Location(str(demo_shards))
    names = split_shards(shards, "trn")
    samples = list(pair_dataset(shards, names))
    distinct_per_shard = pq.read_table(demo_shards / "index.parquet").to_pandas().query("split == 'trn'")
    expected = sum(
        len(set(group.src_image) | set(group.trg_image)) for _, group in distinct_per_shard.groupby("shard")
    )
    assert len(decoded) == expected < 2 * len(samples)


def test_shuffling_is_seeded_and_loses_nothing(demo_shards: Path) -> None:
    shards = Location(str(demo_shards))
    names = split_shards(shards, "trn")
    ordered = [s.key for s in pair_dataset(shards, names)]
    first = [s.key for s in pair_dataset(shards, names, shuffle_buffer=16, seed=3)]
    again = [s.key for s in pair_dataset(shards, names, shuffle_buffer=16, seed=3)]
    other_epoch = [s.key for s in pair_dataset(shards, names, shuffle_buffer=16, seed=3, epoch=1)]
    assert first == again != ordered
    assert other_epoch != first
    assert sorted(first) == sorted(other_epoch) == sorted(ordered)


def _key(sample: PairSample) -> str:
    return sample.key


def test_ranks_and_loader_workers_read_disjoint_shards(demo_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = Location(str(demo_shards))
    names = split_shards(shards, "trn")
    everything = sorted(s.key for s in pair_dataset(shards, names))
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = torch.utils.data.DataLoader(
            pair_dataset(shards, names, shuffle_buffer=8, seed=0),
            batch_size=None,
            num_workers=2,
            multiprocessing_context="spawn",
            collate_fn=_key,
        )
        seen.append(list(loader))
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == everything


def test_corrupt_and_missing_shards_are_named(demo_shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(demo_shards, copy)
    shards = Location(str(copy))
    names = list(split_shards(shards, "val"))
    (copy / names[0]).write_bytes((copy / names[0]).read_bytes()[:700])
    with pytest.raises(ValueError, match=f"corrupt shard .*{names[0]}"):
        list(pair_dataset(shards, names))
    (copy / names[0]).unlink()
    with pytest.raises(FileNotFoundError, match=names[0]):
        list(pair_dataset(shards, names))
    with pytest.raises(FileNotFoundError, match="no finished split 'nope'"):
        split_shards(shards, "nope")
    with pytest.raises(ValueError, match="no shards"):
        pair_dataset(shards, [])
