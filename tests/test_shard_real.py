"""End to end on the real PF-WILLOW files in ../shared/data: shard, index, read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import scipy.io

from pipelines.reader import pair_dataset, split_shards
from pipelines.shard import shard_dataset
from pipelines.storage import Location


def test_pfwillow_all_900_pairs_shard_and_round_trip(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "pf-willow"
    out = Location(str(tmp_path / "shards"))
    summary = shard_dataset("pfwillow", Location(str(root)), out, workers=2)

    assert summary["test"]["input_pairs"] == 900
    assert summary["test"]["written_pairs"] == 900
    assert summary["test"]["rejected_pairs"] == 0
    assert (tmp_path / "shards" / "rejects.jsonl").read_text() == ""
    # 100 images, each used by 18 pairs: stored once, they take ~1/18 of self-contained pairs.
    assert summary["test"]["stored_over_selfcontained"] < 0.07
    index = pq.read_table(tmp_path / "shards" / "index.parquet").to_pylist()
    assert len(index) == len({row["key"] for row in index}) == 900
    assert {row["threshold"] for row in index} == {"bbox-kp"}

    shards = split_shards(out, "test")
    assert sum(shards.values()) == 900 and len(shards) > 1
    samples = list(pair_dataset(out, shards))
    assert [s.key for s in samples] == [row["key"] for row in index]
    for sample in samples:
        subclass = sample.extras["subclass"]
        for image_key, kps, image in (
            (sample.src_image_key, sample.src_kps, sample.src_image),
            (sample.trg_image_key, sample.trg_kps, sample.trg_image),
        ):
            stem = image_key[len(subclass) + 1 :]
            pts = scipy.io.loadmat(root / "PF-dataset-WILLOW" / subclass / f"{stem}.mat")["pts_coord"]
            np.testing.assert_array_equal(kps, pts.T - 1.0)  # MATLAB 1-based -> 0-based, exactly
            assert image.dtype == np.uint8 and image.shape[2] == 3
        np.testing.assert_array_equal(sample.kps_ids, np.arange(10))
    record = json.loads((tmp_path / "shards" / "_manifests" / "test.json").read_text())
    assert record["input_pairs"] == 900
