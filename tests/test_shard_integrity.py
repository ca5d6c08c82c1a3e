"""Shards whose bytes changed after sharding, keypoint ids the index cannot key on, and pairs
missing from their shard: each ends in an error naming the shard and the member (or a counted
reject at sharding), never in a silently changed score. Every case starts from a copy of the demo
shards; the tests use only names the reader had before digests, so each fails (nothing is raised)
on a reader without these checks."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipelines.shard
import pipelines.sources.demo
from pipelines import checks
from pipelines.imageio import decode_rgb
from pipelines.reader import CorruptShardError, ShardSlice, index_rows, pair_dataset, read_entry, split_shards
from pipelines.schema import ImageRef, PairRecord, RejectError
from pipelines.shard import finalize, shard_dataset
from pipelines.storage import Location
from sm_eval.__main__ import main as sm_eval_main
from tests.test_eval import save_tiny
from tests.test_hostile_eval import edit_document, read_members, write_members

DIGEST_COLUMNS = ("pair_sha256", "src_image_sha256", "trg_image_sha256")


@pytest.fixture
def shards(demo_shards: Path, tmp_path: Path) -> Path:
    """A copy of the demo shards to break."""
    return Path(shutil.copytree(demo_shards, tmp_path / "shards"))


def first_test_pair(shards: Path) -> tuple[str, str]:
    """``(shard name, pair key)`` of the test split's first pair."""
    row = next(row for row in pq.read_table(shards / "index.parquet").to_pylist() if row["split"] == "test")
    return row["shard"], row["key"]


def read_all(shards: Path, shard: str) -> list:
    return list(pair_dataset(Location(str(shards)), [shard]))


def flip_image_bytes(tar_path: Path) -> tuple[str, str]:
    """XOR 64 bytes in the middle of a JPEG of ``tar_path``, in place (same length, tar headers
    untouched): the first that still decodes afterwards (to other pixels), which only its digest
    can tell, or else the first. Returns its member name and the start of the reader's message
    about it after the member name: ``sha256`` for one that decodes."""
    with tarfile.open(tar_path) as tar:
        images = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".jpg")]
    data = bytearray(tar_path.read_bytes())
    chosen = None
    for name, offset, size in images:
        candidate = data[offset : offset + size]
        candidate[size // 2 : size // 2 + 64] = bytes(byte ^ 0x5A for byte in candidate[size // 2 : size // 2 + 64])
        try:
            changed = decode_rgb(bytes(candidate))
        except (OSError, ValueError, RejectError):  # the decoder itself refuses it
            continue
        assert not np.array_equal(changed, decode_rgb(bytes(data[offset : offset + size])))
        chosen = (name, offset, size, "sha256 ")
        break
    name, offset, size, message = chosen or (*images[0], "")  # only a decoder stricter than today's
    start = offset + size // 2
    data[start : start + 64] = bytes(byte ^ 0x5A for byte in data[start : start + 64])
    tar_path.write_bytes(bytes(data))
    return name, message


# ---- A: what was sharded is what is read ---------------------------------------------------------


def test_flipped_jpeg_bytes_are_refused_naming_the_shard_and_member(shards: Path) -> None:
    shard, _ = first_test_pair(shards)
    member, message = flip_image_bytes(shards / shard)
    with pytest.raises(CorruptShardError, match=rf"corrupt shard {shards / shard}: member {member}: {message}"):
        read_all(shards, shard)
    # The path the feed (sm_feed.batches) and sm_eval's batches take refuses it as well.
    location = Location(str(shards))
    index = index_rows(location, {shard: location.full(shard)})
    with pytest.raises(CorruptShardError, match=rf"corrupt shard {shards / shard}: member {member}: {message}"):
        list(read_entry(location, shard, index))


def test_sm_eval_on_shards_with_flipped_jpeg_bytes_writes_no_report(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shard, _ = first_test_pair(shards)
    member, message = flip_image_bytes(shards / shard)
    out = tmp_path / "out"
    code = sm_eval_main([
        "--checkpoint", str(save_tiny(tmp_path / "tiny.pt", seed=0)), "--shards", str(shards), "--out", str(out),
        "--split", "test", "--matches", "0", "--loader-workers", "0", "--threads", "2", "--batch-size", "8",
        "--device", "cpu", "--no-progress",
    ])  # fmt: skip
    assert code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sm_eval: error:")]
    assert len(errors) == 1 and f"corrupt shard {shards / shard}: member {member}: {message}" in errors[0], errors
    assert not (out / "report.json").exists() and not (out / "predictions.parquet").exists()


def moved_keypoint(doc: dict) -> None:
    """Move the target's first ground-truth keypoint 30 px along x, staying inside the image."""
    x = doc["trg"]["kps"][0][0]
    doc["trg"]["kps"][0][0] = x + 30 if x + 30 < doc["trg"]["size"][0] - 0.5 else x - 30


def test_a_moved_ground_truth_keypoint_is_refused(shards: Path) -> None:
    shard, key = first_test_pair(shards)
    edit_document(shards, shard, key, moved_keypoint)
    with pytest.raises(
        CorruptShardError,
        match=rf"corrupt shard {shards / shard}: member {key}.pair.json: sha256 .* differs from what pipelines.shard wrote",
    ):
        read_all(shards, shard)


def test_an_edited_image_info_member_is_refused(shards: Path) -> None:
    shard, key = first_test_pair(shards)
    members = read_members(shards / shard)
    image = json.loads(dict(members)[f"{key}.pair.json"])["src"]["image"]
    edited = [
        (name, json.dumps({**json.loads(data), "path": "JPEGImages/elsewhere.jpg"}).encode())
        if name == f"{image}.json"
        else (name, data)
        for name, data in members
    ]
    write_members(shards / shard, edited)
    with pytest.raises(CorruptShardError, match=rf"corrupt shard {shards / shard}: member {image}.jpg: sha256 "):
        read_all(shards, shard)


def without_digests(shards: Path) -> None:
    """Make ``shards`` look as an earlier pipelines.shard wrote them: no digests in the index."""
    table = pq.read_table(shards / "index.parquet")
    pq.write_table(
        table.drop_columns([name for name in DIGEST_COLUMNS if name in table.column_names]), shards / "index.parquet"
    )


def test_shards_without_digests_are_refused_unless_read_unverified(shards: Path) -> None:
    without_digests(shards)
    location = Location(str(shards))
    names = list(split_shards(location, "test"))
    with pytest.raises(
        CorruptShardError, match=r"records no pair_sha256.*run the pipelines.shard command that wrote them again"
    ):
        pair_dataset(location, names)  # before anything is read
    index = index_rows(location, {name: location.full(name) for name in names})
    with pytest.raises(CorruptShardError, match="records no pair_sha256"):
        list(read_entry(location, names[0], index))
    unverified = list(pair_dataset(location, names, verify=False))
    assert len(unverified) == sum(split_shards(location, "test").values())


def test_a_rerun_rewrites_shards_written_without_digests(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    # An output of the earlier format: fingerprints of format 1, manifests and index without digests.
    with monkeypatch.context() as patch:
        patch.setattr(pipelines.shard, "SHARD_FORMAT_VERSION", 1)
        shard_dataset("demo", Location(str(demo_root)), Location(str(out)), ["val"], max_shard_bytes=60_000)
    for path in (out / "_manifests" / "val").glob("*.json"):
        manifest = json.loads(path.read_text())
        manifest["rows"] = [{k: v for k, v in row.items() if k not in DIGEST_COLUMNS} for row in manifest["rows"]]
        path.write_text(json.dumps(manifest))
    finalize(Location(str(out)))
    location = Location(str(out))
    with pytest.raises(CorruptShardError, match="records no pair_sha256"):
        pair_dataset(location, list(split_shards(location, "val")))

    shard_dataset("demo", Location(str(demo_root)), Location(str(out)), ["val"], max_shard_bytes=60_000)
    samples = list(pair_dataset(location, list(split_shards(location, "val"))))
    assert len(samples) == sum(split_shards(location, "val").values()) > 0


# ---- B: keypoint ids ----------------------------------------------------------------------------

BAD_IDS = {
    "repeated": lambda ids: [ids[0], *ids[:-1]],
    "negative": lambda ids: [-1, *ids[1:]],
    "huge": lambda ids: [10**18, *ids[1:]],
}


def record(kps_ids: list[int]) -> PairRecord:
    count = len(kps_ids)
    extras = {
        "viewpoint_variation": 0,
        "scale_variation": 0,
        "truncation": 0,
        "occlusion": 0,
        "src_pose": "Left",
        "trg_pose": "Left",
    }
    box = np.array([0.0, 0, 5, 5])
    return PairRecord(
        key="k", dataset="spair", split="trn", category="cat", group="cat", threshold="bbox",
        src=ImageRef("a", "JPEGImages/cat/a.jpg"), trg=ImageRef("b", "JPEGImages/cat/b.jpg"),
        src_kps=np.zeros((count, 2)), trg_kps=np.zeros((count, 2)), kps_ids=np.asarray(kps_ids, np.int64),
        src_bbox=box, trg_bbox=box, origin="o.json", extras=extras,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("ids", "detail"), [([3, 3], "repeat [3]"), ([-1, 2], "[-1] outside"), ([10**18, 1], f"[{10**18}] outside")]
)
def test_check_pair_refuses_keypoint_ids_that_repeat_or_are_out_of_range(ids: list[int], detail: str) -> None:
    assert checks.check_pair(record([0, 5, 29])) == []
    problems = checks.check_pair(record(ids))
    assert problems and problems[0].reason == "invalid-keypoint-ids" and detail in problems[0].detail, problems


def test_the_sharder_counts_pairs_with_bad_keypoint_ids_as_rejects(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = pipelines.sources.demo.read_pairs
    spoiled: dict[str, str] = {}

    def with_bad_ids(root: Location, split: str) -> Iterator:
        for item in original(root, split):
            if isinstance(item, PairRecord) and len(spoiled) < len(BAD_IDS) and len(item.kps_ids) > 1:
                kind = list(BAD_IDS)[len(spoiled)]
                item.kps_ids = np.asarray(BAD_IDS[kind](item.kps_ids.tolist()), np.int64)
                spoiled[item.key] = kind
            yield item

    monkeypatch.setattr(pipelines.sources.demo, "read_pairs", with_bad_ids)
    out = tmp_path / "out"
    summary = shard_dataset("demo", Location(str(demo_root)), Location(str(out)), ["val"])["val"]
    assert summary["rejects_by_reason"] == {"invalid-keypoint-ids": len(BAD_IDS)}
    assert summary["input_pairs"] == summary["written_pairs"] + len(BAD_IDS)
    rejects = {row["item"]: row for row in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == set(spoiled)
    assert all(row["reason"] == "invalid-keypoint-ids" and "kps_ids" in row["detail"] for row in rejects.values())
    assert not set(spoiled) & set(pq.read_table(out / "index.parquet").column("key").to_pylist())


@pytest.mark.parametrize("kind", list(BAD_IDS))
def test_the_reader_refuses_a_pair_with_bad_keypoint_ids(shards: Path, kind: str) -> None:
    shard, key = first_test_pair(shards)
    edit_document(shards, shard, key, lambda doc: doc.__setitem__("kps_ids", BAD_IDS[kind](doc["kps_ids"])))
    with pytest.raises(
        CorruptShardError,
        match=rf"corrupt shard {shards / shard}: member {key}.pair.json: invalid-keypoint-ids: kps_ids",
    ):
        read_all(shards, shard)


# ---- C: every pair the index lists is in its shard ----------------------------------------------


def drop_members(tar_path: Path, drop: Callable[[str], bool]) -> list[str]:
    members = read_members(tar_path)
    write_members(tar_path, [(name, data) for name, data in members if not drop(name)])
    return [name for name, _ in members if drop(name)]


def test_a_pair_missing_from_its_shard_is_an_error_naming_it(shards: Path) -> None:
    location = Location(str(shards))
    shard, count = next((name, n) for name, n in split_shards(location, "test").items() if n >= 3)
    docs = [name for name, _ in read_members(shards / shard) if name.endswith(".pair.json")]
    (removed,) = drop_members(shards / shard, lambda name: name == docs[1])
    message = rf"corrupt shard {shards / shard} yielded {count - 1} of the {count} pairs index.parquet lists in it: member {removed} is missing"
    with pytest.raises(CorruptShardError, match=message):
        read_all(shards, shard)
    index = index_rows(location, {shard: location.full(shard)})
    with pytest.raises(CorruptShardError, match=message):  # a run of pairs before the missing one too
        list(read_entry(location, ShardSlice(shard, 0, 1), index))


def test_a_shard_without_members_is_an_error_naming_its_pairs(shards: Path) -> None:
    location = Location(str(shards))
    shard, count = next((name, n) for name, n in split_shards(location, "test").items() if n >= 2)
    first = next(name for name, _ in read_members(shards / shard) if name.endswith(".pair.json"))
    with tarfile.open(shards / shard, "w"):
        pass  # a valid tar without a member
    with pytest.raises(
        CorruptShardError,
        match=rf"corrupt shard {shards / shard} yielded 0 of the {count} pairs .*member {first} is missing \(and {count - 1} more\)",
    ):
        read_all(shards, shard)
