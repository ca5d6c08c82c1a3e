"""The shard stage: validation and rejects, image-once shards, index, worker independence, S3."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import checks
from pipelines.reader import pair_dataset, split_shards
from pipelines.shard import main, shard_dataset
from pipelines.storage import Location, s3_client, split_s3_url
from tests.spair_format import pair_document, write_layout, write_pair

CATEGORIES = ("cat", "dog")
IMAGES_PER_CATEGORY = 6
SIZE = (64, 48)


def _jpeg(seed: int, size: tuple[int, int] = SIZE) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _stem(category: str, index: int) -> str:
    return f"2010_{CATEGORIES.index(category)}{index:05d}"


def _valid_doc(category: str, src: int, trg: int, pair_id: int) -> dict:
    return pair_document(
        pair_id=pair_id,
        src_imname=f"{_stem(category, src)}.jpg",
        trg_imname=f"{_stem(category, trg)}.jpg",
        src_imsize=[*SIZE, 3],
        trg_imsize=[*SIZE, 3],
        src_bndbox=[2, 3, 60, 44],
        trg_bndbox=[5, 1, 63, 47],
        src_kps=[[10, 10], [30, 20], [50, 40]],
        trg_kps=[[12, 8], [33, 22], [63, 47]],
        kps_ids=[0, 4, 9],
        category=category,
    )


def _pair_name(doc: dict) -> str:
    return f"{doc['pair_id']:06d}-{doc['src_imname'][:-4]}-{doc['trg_imname'][:-4]}:{doc['category']}"


def build_spair(root: Path, bad: dict[str, dict] | None = None) -> list[str]:
    """A small SPair-71k layout (split ``trn``): every ordered pair of distinct images within each
    category, plus the pairs of ``bad`` (name -> document). Returns the Layout lines."""
    for category in CATEGORIES:
        for index in range(IMAGES_PER_CATEGORY):
            path = root / "JPEGImages" / category / f"{_stem(category, index)}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(CATEGORIES.index(category) * 100 + index))
    lines = []
    for category in CATEGORIES:
        for src in range(IMAGES_PER_CATEGORY):
            for trg in range(IMAGES_PER_CATEGORY):
                if src != trg:
                    doc = _valid_doc(category, src, trg, len(lines))
                    lines.append(_pair_name(doc))
                    write_pair(root, "trn", lines[-1], doc)
    for name, doc in (bad or {}).items():
        lines.append(name)
        if doc is not None:
            write_pair(root, "trn", name, doc)
    write_layout(root, "trn", "\n".join(lines) + "\n")
    return lines


VALID_PAIRS = len(CATEGORIES) * IMAGES_PER_CATEGORY * (IMAGES_PER_CATEGORY - 1)


def _bad_pairs(root: Path) -> dict[str, tuple[dict | None, str, str]]:
    """One broken pair per reason: name -> (document or None, expected reason, expected file)."""
    cases: dict[str, tuple[dict | None, str, str]] = {}

    def case(pair_id: int, reason: str, file: str | None = None, src: int = 0, trg: int = 1, **overrides) -> None:
        doc = _valid_doc("cat", src, trg, pair_id)
        doc.update(overrides)
        name = _pair_name({**doc, "category": "cat"})
        cases[name] = (doc, reason, file or f"PairAnnotation/trn/{name}.json")

    cat_dir = root / "JPEGImages" / "cat"
    cat_dir.mkdir(parents=True)
    (cat_dir / "2010_099001.jpg").write_bytes(b"this is not a JPEG")
    (cat_dir / "2010_099002.jpg").write_bytes(_jpeg(7)[:-400])
    case(900, checks.MISSING_IMAGE, "JPEGImages/cat/2010_099000.jpg", trg_imname="2010_099000.jpg")
    case(901, checks.UNREADABLE_IMAGE, "JPEGImages/cat/2010_099001.jpg", trg_imname="2010_099001.jpg")
    case(902, checks.TRUNCATED_IMAGE, "JPEGImages/cat/2010_099002.jpg", trg_imname="2010_099002.jpg")
    case(903, checks.IMAGE_SIZE_MISMATCH, f"JPEGImages/cat/{_stem('cat', 1)}.jpg", trg_imsize=[640, 480, 3])
    case(904, checks.KEYPOINT_OUTSIDE_IMAGE, trg_kps=[[12, 8], [33, 22], [64, 47]])
    case(905, checks.NAN_KEYPOINTS, src_kps=[[10, 10], [None, 20], [50, 40]])
    case(906, checks.EMPTY_BBOX, src_bndbox=[2, 3, 2, 44])
    case(907, checks.INVERTED_BBOX, trg_bndbox=[40, 1, 5, 47])
    case(908, checks.BBOX_OUTSIDE_IMAGE, trg_bndbox=[5, 1, 70, 47])
    case(909, checks.SAME_IMAGE, trg=0)
    case(910, checks.KEYPOINT_COUNT_MISMATCH, trg_kps=[[12, 8], [33, 22]])
    case(911, checks.NO_KEYPOINTS, src_kps=[], trg_kps=[], kps_ids=[])
    case(912, checks.INCONSISTENT_ANNOTATION, category="dog")
    missing = "000913-2010_000000-2010_000001:cat"
    cases[missing] = (None, checks.MISSING_ANNOTATION, f"PairAnnotation/trn/{missing}.json")
    return cases


def test_every_reason_is_reported_counted_and_kept(tmp_path: Path) -> None:
    root = tmp_path / "spair"
    cases = _bad_pairs(root)
    lines = build_spair(root, {name: doc for name, (doc, _, _) in cases.items()})
    malformed = "000914-2010_000000-2010_000002:cat"
    write_pair(root, "trn", malformed, '{"pair_id": 914, ')
    duplicate = lines[0]
    write_layout(root, "trn", "\n".join([*lines, malformed, duplicate]) + "\n")

    out = tmp_path / "out"
    summary = shard_dataset("spair", Location(str(root)), Location(str(out)), ["trn"])["trn"]

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_item = {r["item"]: r for r in rejects if r["reason"] != checks.DUPLICATE_PAIR}
    for name, (_, reason, file) in cases.items():
        reject = by_item[name.replace(":", "_")] if name.replace(":", "_") in by_item else by_item[name]
        assert (reject["reason"], reject["file"]) == (reason, file), name
        assert reject["detail"] and reject["split"] == "trn"
    assert by_item.get(malformed, by_item.get(malformed.replace(":", "_")))["reason"] == checks.MALFORMED_ANNOTATION
    duplicates = [r for r in rejects if r["reason"] == checks.DUPLICATE_PAIR]
    assert len(duplicates) == 1 and duplicates[0]["file"].endswith(f"{duplicate}.json")

    assert summary["input_pairs"] == len(lines) + 2
    assert summary["written_pairs"] == VALID_PAIRS
    assert summary["rejected_pairs"] == len(cases) + 2 == len(rejects)
    assert summary["input_pairs"] == summary["written_pairs"] + summary["rejected_pairs"]
    assert set(summary["rejects_by_reason"]) == {r for _, r, _ in cases.values()} | {
        checks.MALFORMED_ANNOTATION,
        checks.DUPLICATE_PAIR,
    }
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == VALID_PAIRS
    assert set(index[0]) >= {"key", "split", "shard", "src_image", "trg_image", "category", "num_keypoints", "truncation"}


def test_shards_store_each_image_once_and_are_self_contained(tmp_path: Path) -> None:
    root = tmp_path / "spair"
    build_spair(root)
    out = tmp_path / "out"
    summary = shard_dataset("spair", Location(str(root)), Location(str(out)), ["trn"])["trn"]

    assert summary["shards"] == len(CATEGORIES)  # one group per category, each under the bound
    for shard in sorted(out.glob("trn-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        images = [n for n in names if n.endswith(".jpg")]
        pairs = [n for n in names if n.endswith(".pair.json")]
        assert len(images) == len(set(images)) == IMAGES_PER_CATEGORY
        assert names.index(pairs[0]) > max(names.index(i) for i in images)  # images first
        with tarfile.open(shard) as tar:
            image_keys = {n[: -len(".jpg")] for n in images}
            for name in pairs:
                doc = json.load(tar.extractfile(name))
                assert {doc["src"]["image"], doc["trg"]["image"]} <= image_keys
    # The stored JPEG bytes are the original file bytes, never re-encoded.
    with tarfile.open(out / "trn-000000.tar") as tar:
        member = next(n for n in tar.getnames() if n.endswith(".jpg"))
        info = json.load(tar.extractfile(member[:-4] + ".json"))
        assert tar.extractfile(member).read() == (root / info["path"]).read_bytes()
    # 6 images per category used by 30 pairs: the image bytes alone shrink 10x; the pair
    # documents (stored in both layouts) keep the ratio a little above 0.1 for such tiny images.
    assert summary["stored_over_selfcontained"] < 0.2
    assert summary["payload_bytes_selfcontained"] > 5 * summary["payload_bytes_stored"]


def test_output_is_identical_for_any_worker_count(tmp_path: Path) -> None:
    root = tmp_path / "spair"
    build_spair(root)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        shard_dataset("spair", Location(str(root)), Location(str(out)), ["trn"], max_shard_bytes=8000, workers=workers)
        outputs[workers] = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert len([name for name in outputs[1] if name.endswith(".tar")]) > len(CATEGORIES)
    assert outputs[1] == outputs[2]


def test_small_shard_bound_splits_groups_without_losing_pairs(tmp_path: Path) -> None:
    root = tmp_path / "spair"
    build_spair(root)
    out = Location(str(tmp_path / "out"))
    summary = shard_dataset("spair", Location(str(root)), out, ["trn"], max_shard_bytes=8000)["trn"]
    shards = split_shards(out, "trn")
    assert len(shards) == summary["shards"] > len(CATEGORIES)
    keys = [sample.key for sample in pair_dataset(out, shards)]
    assert len(keys) == len(set(keys)) == VALID_PAIRS
    # Images shared across shards are stored again, but each shard still holds each image once.
    assert summary["images_stored"] > len(CATEGORIES) * IMAGES_PER_CATEGORY


def test_s3_round_trip(tmp_path: Path, s3_bucket: str, s3_endpoint: str) -> None:
    """Local -> S3 shards -> reader, and S3 input -> S3 shards: both equal the local result."""
    root = tmp_path / "spair"
    build_spair(root)
    local_out = Location(str(tmp_path / "local"))
    shard_dataset("spair", Location(str(root)), local_out, ["trn"], max_shard_bytes=8000)

    s3_out = Location(f"{s3_bucket}/shards", s3_endpoint)
    shard_dataset("spair", Location(str(root)), s3_out, ["trn"], max_shard_bytes=8000, workers=2)
    local_files = Location(str(tmp_path / "local")).list_files("")
    assert s3_out.list_files("") == local_files
    for name in local_files:
        assert s3_out.read_bytes(name) == local_out.read_bytes(name), name

    local_samples = list(pair_dataset(local_out, split_shards(local_out, "trn")))
    s3_samples = list(pair_dataset(s3_out, split_shards(s3_out, "trn")))
    assert [s.key for s in s3_samples] == [s.key for s in local_samples]
    np.testing.assert_array_equal(s3_samples[-1].trg_image, local_samples[-1].trg_image)

    bucket, _ = split_s3_url(s3_bucket)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3_client(s3_endpoint).upload_file(str(path), bucket, f"raw/{path.relative_to(root).as_posix()}")
    from_s3 = Location(f"{s3_bucket}/from-s3", s3_endpoint)
    shard_dataset("spair", Location(f"{s3_bucket}/raw", s3_endpoint), from_s3, ["trn"], max_shard_bytes=8000)
    assert from_s3.read_bytes("index.parquet") == local_out.read_bytes("index.parquet")
    assert from_s3.read_bytes("trn-000000.tar") == local_out.read_bytes("trn-000000.tar")


def test_unknown_split_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spair has no split 'train'"):
        shard_dataset("spair", Location(str(tmp_path)), Location(str(tmp_path / "out")), ["train"])


def test_cli_summary_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "spair"
    build_spair(root)
    out = tmp_path / "out"
    assert main(["spair", "--root", str(root), "--out", str(out), "--split", "trn", "--max-shard-bytes", "8kB"]) == 0
    printed = capsys.readouterr().out
    assert f"trn: {VALID_PAIRS} input pairs = {VALID_PAIRS} written + 0 rejected" in printed
    assert json.loads((out / "summary.json").read_text())["trn"]["shards"] > len(CATEGORIES)

    assert main(["spair", "--root", str(tmp_path / "nowhere"), "--out", str(out), "--split", "val"]) == 2
    assert "nowhere/Layout/large/val.txt: no SPair-71k Layout list" in caplog.text
    with pytest.raises(SystemExit):
        main(["spair", "--root", str(root), "--out", str(out), "--max-shard-bytes", "lots"])
