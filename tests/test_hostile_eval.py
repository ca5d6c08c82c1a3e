"""Hostile and broken shards against the reader and sm_eval (issue 14, items 1, 2, 7 and the
sm_eval part of 8): every case is built from the demo shards by rewriting a tar (and, where the
attack is consistent, index.parquet) and must end in a clear error naming the shard and the
member, never in a silently changed score or a file outside ``--out``."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.reader import MAX_DOCUMENT_BYTES, CorruptShardError, pair_dataset, split_shards
from pipelines.storage import Location
from sm_eval.__main__ import main
from sm_eval.evaluate import match_file
from sm_eval.plan import check_coverage, read_split_plan
from tests.test_eval import save_tiny

Members = list[tuple[str, bytes]]


def read_members(path: Path) -> Members:
    with tarfile.open(path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]


def write_members(path: Path, members: Members) -> None:
    """A plain tar as the sharder writes one (PAX headers, end-of-archive marker)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def index_rows(shards: Path) -> list[dict[str, Any]]:
    return pq.read_table(shards / "index.parquet").to_pylist()


@pytest.fixture
def shards(demo_shards: Path, tmp_path: Path) -> Path:
    """A copy of the demo shards to break."""
    return Path(shutil.copytree(demo_shards, tmp_path / "shards"))


def first_test_pair(shards: Path) -> tuple[str, str]:
    """``(shard name, pair key)`` of the test split's first pair."""
    row = next(row for row in index_rows(shards) if row["split"] == "test")
    return row["shard"], row["key"]


def edit_document(shards: Path, shard: str, key: str, change: Callable[[dict], None]) -> None:
    """Rewrite the pair document ``key`` of ``shard`` with ``change`` applied (NaN and infinity
    written as :mod:`json` writes them)."""
    members = read_members(shards / shard)
    for i, (name, data) in enumerate(members):
        if name == f"{key}.pair.json":
            doc = json.loads(data)
            change(doc)
            members[i] = (name, json.dumps(doc).encode())
    write_members(shards / shard, members)


def read_all(shards: Path, shard: str) -> list:
    return list(pair_dataset(Location(str(shards)), [shard]))


# ---- item 7: the tar itself ------------------------------------------------------------------


@pytest.mark.parametrize("into_header", [0, 100])
def test_a_shard_cut_at_a_header_is_an_error_naming_it(shards: Path, into_header: int) -> None:
    shard, key = first_test_pair(shards)
    with tarfile.open(shards / shard) as tar:
        offset = tar.getmember(f"{key}.pair.json").offset  # its header: the images before it stay whole
    (shards / shard).write_bytes((shards / shard).read_bytes()[: offset + into_header])
    with pytest.raises(CorruptShardError, match=rf"corrupt shard {shards / shard}: .*cut short"):
        read_all(shards, shard)


def test_a_gzip_compressed_shard_is_refused_without_decompressing(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard, _ = first_test_pair(shards)
    # A small gzip bomb: the shard's members plus 64 MiB of zeros, about 100 KB compressed.
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [*read_members(shards / shard), ("zeros.bin", bytes(64 * 2**20))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (shards / shard).write_bytes(gzip.compress(plain.getvalue(), compresslevel=9))
    assert (shards / shard).stat().st_size < 2**20

    def no_inflating(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the reader started decompressing")

    monkeypatch.setattr(zlib, "decompressobj", no_inflating)
    with pytest.raises(CorruptShardError, match=rf"corrupt shard {shards / shard}: gzip-compressed"):
        read_all(shards, shard)


def test_a_huge_image_is_refused_naming_the_shard_and_member(shards: Path) -> None:
    shard, key = first_test_pair(shards)
    members = read_members(shards / shard)
    doc = json.loads(dict(members)[f"{key}.pair.json"])
    image_key, side = doc["trg"]["image"], 15_000  # 225 megapixels: a 1-bit PNG of a few hundred KB
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    rewritten = []
    for name, data in members:
        if name == f"{image_key}.jpg":
            name, data = f"{image_key}.png", buffer.getvalue()
        elif name == f"{image_key}.json":
            info = json.loads(data)
            data = json.dumps({**info, "size": [side, side], "format": "png"}).encode()
        elif name.endswith(".pair.json"):
            pair = json.loads(data)
            for part in ("src", "trg"):
                if pair[part]["image"] == image_key:
                    pair[part]["size"] = [side, side]  # consistent everywhere: only the pixel count is wrong
            data = json.dumps(pair).encode()
        rewritten.append((name, data))
    write_members(shards / shard, rewritten)
    with pytest.raises(CorruptShardError, match=rf"{shards / shard}: member {image_key}.png: image-too-large"):
        read_all(shards, shard)


# ---- item 2: one validation on both sides of a shard -------------------------------------------


@pytest.mark.parametrize("adjacent", [True, False])
def test_a_pair_twice_in_a_shard_is_refused(shards: Path, adjacent: bool) -> None:
    shard, key = first_test_pair(shards)
    members = read_members(shards / shard)
    entry = next(m for m in members if m[0] == f"{key}.pair.json")
    at = members.index(entry) + 1 if adjacent else len(members)
    write_members(shards / shard, [*members[:at], entry, *members[at:]])
    with pytest.raises(CorruptShardError, match=rf"{shards / shard}: member {key}.pair.json: .*(twice|second)"):
        read_all(shards, shard)


def test_a_document_beyond_the_size_bound_is_refused_unread(shards: Path) -> None:
    shard, key = first_test_pair(shards)
    many = 100_000  # the index says 14

    def inflate(doc: dict) -> None:
        doc["kps_ids"] = list(range(many))
        for part in ("src", "trg"):
            doc[part]["kps"] = [[1.0, 1.0]] * many

    edit_document(shards, shard, key, inflate)
    with pytest.raises(
        CorruptShardError, match=rf"member {key}.pair.json: \d+ bytes; a document may have {MAX_DOCUMENT_BYTES}"
    ):
        read_all(shards, shard)


def test_a_keypoint_count_other_than_the_index_says_is_refused(shards: Path) -> None:
    shard, key = first_test_pair(shards)

    def one_more(doc: dict) -> None:  # a valid pair in itself, one keypoint more than its index row
        doc["kps_ids"].append(max(doc["kps_ids"]) + 1)
        for part in ("src", "trg"):
            doc[part]["kps"].append(doc[part]["kps"][0])

    edit_document(shards, shard, key, one_more)
    with pytest.raises(CorruptShardError, match=r"num_keypoints 15, index.parquet says 14"):
        read_all(shards, shard)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda doc: doc["trg"]["kps"][0].__setitem__(0, float("nan")), "NaN is not a JSON number"),
        (
            lambda doc: doc["trg"].__setitem__("bbox", [0, 0, float("inf"), float("inf")]),
            "Infinity is not a JSON number",
        ),
        (lambda doc: doc["trg"].__setitem__("bbox", [0, 0, 1e6, 1e6]), "bbox-outside-image"),
        (lambda doc: doc["trg"]["kps"][0].__setitem__(0, -40.0), "keypoint-outside-image"),
        (lambda doc: doc["src"].__setitem__("image", doc["trg"]["image"]), "src_image"),  # the index disagrees
        (lambda doc: doc.__setitem__("category", "dog"), "category 'dog', index.parquet says"),
        (lambda doc: doc["trg"].__setitem__("kps", [[1, 2, 3]] * len(doc["kps_ids"])), r"trg.kps has shape"),
        (lambda doc: doc.__setitem__("threshold", "anything"), "threshold"),
    ],
)
def test_a_pair_the_sharder_would_reject_is_refused(shards: Path, change: Callable[[dict], None], message: str) -> None:
    shard, key = first_test_pair(shards)
    edit_document(shards, shard, key, change)
    with pytest.raises(
        CorruptShardError, match=rf"corrupt shard {shards / shard}: member {key}.pair.json: .*{message}"
    ):
        read_all(shards, shard)


def test_coverage_counts_pairs_rather_than_comparing_sets(demo_shards: Path) -> None:
    plan = read_split_plan(Location(str(demo_shards)), "test")
    check_coverage(plan, list(plan.pair_keys), list(plan.shard_counts))
    twice = [*plan.pair_keys, plan.pair_keys[3]]
    with pytest.raises(ValueError, match=rf"read more than once: \['{plan.pair_keys[3]}'\]"):
        check_coverage(plan, twice, list(plan.shard_counts))


def test_an_index_naming_a_shard_the_split_does_not_list_is_an_error(shards: Path) -> None:
    rows = index_rows(shards)
    rows[0]["shard"] = "../../elsewhere.tar"
    pq.write_table(pa.Table.from_pylist(rows), shards / "index.parquet")
    with pytest.raises(ValueError, match=r"in shard '../../elsewhere.tar', which _manifests/\w+.json does not list"):
        split_shards(Location(str(shards)), rows[0]["split"])


def test_match_files_keep_ordinary_keys_and_confine_hostile_ones() -> None:
    assert match_file(3, "000331-cat_0013-cat_0014_cat") == "matches/03-000331-cat_0013-cat_0014_cat.png"
    assert match_file(0, "car(G)_Cars_006a", "exp1-ckpt") == "matches/exp1-ckpt-00-car(G)_Cars_006a.png"
    assert match_file(7, HOSTILE_KEY) == "matches/07-____________escaped_pwned.png"
    long = match_file(1, "/" * 5000)
    assert long.startswith("matches/01-") and len(long) < 150 and long.count("/") == 1


def test_valid_shards_still_read_unchanged(demo_shards: Path) -> None:
    shards = Location(str(demo_shards))
    plan = read_split_plan(shards, "test")
    samples = list(pair_dataset(shards, list(plan.shard_counts)))
    assert [s.key for s in samples] == list(plan.pair_keys)
    rows = {row["key"]: row for row in index_rows(demo_shards)}
    assert all(len(s.kps_ids) == rows[s.key]["num_keypoints"] for s in samples)
    assert all(np.isfinite(s.trg_kps).all() for s in samples)


# ---- item 1 and sm_eval's CLI: nothing outside --out -------------------------------------------


HOSTILE_KEY = "../../../../escaped/pwned"


def make_key_hostile(shards: Path) -> str:
    """Give the test split's first pair the key :data:`HOSTILE_KEY`, consistently in its tar
    member name, its document and index.parquet; returns the old key."""
    shard, key = first_test_pair(shards)
    members = []
    for name, data in read_members(shards / shard):
        if name == f"{key}.pair.json":
            name, data = f"{HOSTILE_KEY}.pair.json", json.dumps({**json.loads(data), "key": HOSTILE_KEY}).encode()
        members.append((name, data))
    write_members(shards / shard, members)
    rows = [{**row, "key": HOSTILE_KEY} if row["key"] == key else row for row in index_rows(shards)]
    pq.write_table(pa.Table.from_pylist(rows), shards / "index.parquet")
    return key


def listing(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_hostile_pair_key_writes_nothing_outside_out(demo_shards: Path, tmp_path: Path) -> None:
    shards = Path(shutil.copytree(demo_shards, tmp_path / "shards"))
    make_key_hostile(shards)
    checkpoint = save_tiny(tmp_path / "tiny.pt", seed=0)
    out = tmp_path / "work" / "out"  # matches/NN-<key>.png would have been tmp_path/work/escaped/pwned.png
    before = listing(tmp_path)
    code = main([
        "--checkpoint", str(checkpoint), "--shards", str(shards), "--out", str(out), "--matches", "100",
        "--alphas", "0.05,0.1,0.15", "--loader-workers", "0", "--threads", "2", "--batch-size", "8",
        "--device", "cpu", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    after = listing(tmp_path)
    assert {path: size for path, size in after.items() if path in before} == before
    created = sorted(set(after) - set(before))
    assert created and all(path.startswith("work/out/") for path in created), created
    assert not (tmp_path / "work" / "escaped").exists()

    report = json.loads((out / "report.json").read_text())
    drawn = report["files"]["matches"]
    assert len(drawn) == report["data"]["pairs"]
    assert all(path.startswith("matches/") and path.count("/") == 1 and ".." not in path for path in drawn)
    assert any(path.endswith("-____________escaped_pwned.png") for path in drawn)
    assert sorted(f"work/out/{path}" for path in drawn) == sorted(
        p for p in created if p.startswith("work/out/matches/")
    )
    # The pair is scored under its own key, in the data, not in any path.
    assert HOSTILE_KEY in pq.read_table(out / "predictions.parquet").column("pair_key").to_pylist()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--workers", "-3"], "argument --workers: expected 0 or more, got -3"),
        (["--alphas", "inf"], "alphas must be distinct positive numbers of at most 1, got [inf]"),
        (["--alphas", "0.1,nan"], "alphas must be distinct positive numbers of at most 1"),
        (["--out", "{file}"], "is a file, not a directory"),
        (["--out", "{file}/sub"], "is a file, not a directory"),
    ],
)
def test_cli_misuse_is_a_one_line_usage_error_before_any_work(
    demo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture, option: list[str], message: str
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    option = [part.replace("{file}", str(a_file)) for part in option]
    argv = [
        "--checkpoint",
        str(tmp_path / "none.pt"),
        "--shards",
        str(demo_shards),
        "--out",
        str(tmp_path / "o"),
        *option,
    ]
    before = listing(tmp_path)
    with pytest.raises(SystemExit) as usage:
        main(argv)
    assert usage.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines
    assert listing(tmp_path) == before and not (tmp_path / "o").exists()  # no work started, nothing written
