"""Hostile and broken inputs (issue 14, items 3, 4, 5 and item 8's JSON keys and difficulty flags):
nothing outside ``--root`` is read, nothing outside ``--out`` is written, every bad input is a
counted reject naming its file and reason (input = written + rejected), and the index is built."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image

from pipelines import checks, jsonio
from pipelines.imageio import MAX_IMAGE_PIXELS, probe_image
from pipelines.schema import EXTRA_FIELDS, ImageRef, PairRecord, Reject, RejectError, normalise_extras
from pipelines.shard import INDEX_COLUMNS, index_table, shard_dataset
from pipelines.sources import ap10k, pfpascal
from pipelines.storage import Location, NotARegularFile, PathOutsideRoot, confine
from tests import ap10k_format as fmt
from tests.pf_format import ImageFiles, willow_header, willow_row, write_csv, write_pascal_mat
from tests.spair_format import pair_document, write_pair

SIZE = (64, 48)
SECRET = b"the secret bytes"


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A test that blocks (e.g. on a FIFO) fails after a minute instead of hanging the suite."""
    def hung(*_):
        raise TimeoutError("blocked for 60 s: something waited on a FIFO or similar")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A complete, tiny PNG file declaring a ``width x height`` 1-bit image (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _png_text(text: bytes):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("secret", text.decode())
    return info


def _summary_invariant(summary: dict) -> None:
    for split, counts in summary.items():
        assert counts["input_pairs"] == counts["written_pairs"] + counts["rejected_pairs"], split


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ Location


@pytest.mark.parametrize("url", ["LOCAL", "s3://bucket/prefix"])
@pytest.mark.parametrize("rel", ["../secret.txt", "a/../../secret.txt", "/etc/passwd", "..", "a/\0b"])
def test_every_location_method_refuses_paths_outside_its_root(tmp_path: Path, url: str, rel: str) -> None:
    """Local and S3 alike, before any request: S3 confinement needs no server."""
    location = Location(str(tmp_path / "root") if url == "LOCAL" else url)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    scratch = tmp_path / "scratch.bin"
    scratch.write_bytes(b"x")
    calls = [
        lambda: location.full(rel),
        lambda: location.read_bytes(rel),
        lambda: location.read_text(rel),
        lambda: location.exists(rel),
        lambda: location.list_files(rel),
        lambda: location.put_bytes(rel, b"pwned"),
        lambda: location.put_file(rel, scratch),
        lambda: location.remove(rel),
    ]
    for call in calls:
        with pytest.raises(PathOutsideRoot, match="is outside") as raised:
            call()
        assert isinstance(raised.value, ValueError) and raised.value.path == rel
    assert (tmp_path / "secret.txt").read_bytes() == SECRET and scratch.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch.bin", "secret.txt"]


def test_paths_inside_the_root_are_normalised() -> None:
    assert confine("a/./b/../c.jpg") == "a/c.jpg"
    assert confine("") == confine(".") == confine("a/..") == ""
    location = Location("s3://bucket/prefix")
    assert location.full("x/../y.json") == "s3://bucket/prefix/y.json"


def test_local_reads_open_regular_files_only(tmp_path: Path) -> None:
    root = Location(str(tmp_path))
    (tmp_path / "dir.json").mkdir()
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "big.json").write_bytes(b"0" * 100)
    (tmp_path / "real.jpg").write_bytes(b"data")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")
    with pytest.raises(IsADirectoryError):
        root.read_bytes("dir.json")
    with pytest.raises(NotARegularFile, match="FIFO"):  # and never blocks
        root.read_bytes("fifo.jpg")
    with pytest.raises(FileNotFoundError):
        root.read_bytes("dangling.jpg")
    with pytest.raises(OSError):
        root.read_bytes("loop.jpg")
    with pytest.raises(OSError, match="100 bytes, more than the 99 allowed"):
        root.read_bytes("big.json", max_bytes=99)
    assert root.read_bytes("big.json", max_bytes=100) == b"0" * 100
    assert root.read_bytes("link.jpg") == b"data"
    # Listing skips what cannot be read instead of failing on it.
    assert root.list_files("") == {"big.json": 100, "link.jpg": 4, "real.jpg": 4}


# ------------------------------------------------------------------------------ bounded JSON


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"pair_id": ' + b"9" * 5000 + b"}", "a number of 5000 characters"),
        (b'{"src_kps": [[1e400, 2]]}', "1e400 is beyond the range of a 64-bit float"),
        (b'{"bbox": [-1e999, 0, 1, 1]}', "beyond the range"),
        (b'{"x": NaN}', "NaN is not a JSON number"),
        (b'{"x": [Infinity]}', "Infinity is not a JSON number"),
        (b'{"deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested 100001 levels deep"),
        (b"[" * 100_000, "nested 100000 levels deep"),
        (b'{"category": "cat", "category": "dog"}', "names the key(s) ['category'] more than once"),
        (b'{"a": {"k": 1, "k": 2}}', "['k'] more than once"),
        (b'{"pose": "L\xffft"}', "not UTF-8: byte 0xff at offset 11"),
        (b'{"a": 1', "not valid JSON"),
    ],
)
def test_bounded_json_refuses_with_a_reason(text: bytes, message: str) -> None:
    with pytest.raises(jsonio.JSONError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        jsonio.loads(text)


def test_bounded_json_accepts_real_documents() -> None:
    doc = pair_document(src_kps=[[100.5, 1e-3], [2, 3], [4, 5]], mirror=0)
    text = ("\ufeff" + json.dumps(doc, indent=4)).encode()  # a byte-order mark is fine
    assert jsonio.loads(text) == doc
    assert jsonio.loads(b'{"s": "[[[{{{\\"]]]"}') == {"s": '[[[{{{"]]]'}  # brackets in strings do not nest
    with pytest.raises(jsonio.JSONError, match="more than the 10 allowed"):
        jsonio.loads(b"[1, 2, 3, 4, 5]", max_bytes=10)


# ------------------------------------------------------------------------------ SPair-71k


def _stem(index: int) -> str:
    return f"2010_{index:06d}"


def _doc(pair_id: int, src: int = 0, trg: int = 1, **overrides) -> dict:
    fields = {
        "pair_id": pair_id,
        "src_imname": f"{_stem(src)}.jpg",
        "trg_imname": f"{_stem(trg)}.jpg",
        "src_imsize": [*SIZE, 3],
        "trg_imsize": [*SIZE, 3],
        "src_bndbox": [2, 3, 60, 44],
        "trg_bndbox": [5, 1, 63, 47],
        "src_kps": [[10, 10], [30, 20], [50, 40]],
        "trg_kps": [[12, 8], [33, 22], [60, 40]],
        "kps_ids": [0, 4, 9],
        "category": "cat",
    }
    return pair_document(**{**fields, **overrides})


def _name(pair_id: int, src: int = 0, trg: int = 1) -> str:
    return f"{pair_id:06d}-{_stem(src)}-{_stem(trg)}:cat"


def hostile_spair(root: Path, sandbox: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """A SPair-71k root (split ``trn``) with one broken input per case of issue 14 items 3-5 and 8.
    Returns ``{pair name or Layout line: (expected reason, expected file)}`` and the valid names."""
    images = root / "JPEGImages" / "cat"
    images.mkdir(parents=True)
    for index in range(4):
        (images / f"{_stem(index)}.jpg").write_bytes(_jpeg(index))
    # Item 4: unused dangling and looping symlinks anywhere in an image folder change nothing.
    (images / "unused-dangling.jpg").symlink_to(root / "nowhere.jpg")
    (images / "unused-loop.jpg").symlink_to(images / "unused-loop.jpg")
    os.mkfifo(images / "unused-fifo.jpg")
    # Images a pair uses that are no regular file, missing behind a link, or a decompression bomb.
    os.mkfifo(images / f"{_stem(90)}.jpg")
    (images / f"{_stem(91)}.jpg").mkdir()
    (images / f"{_stem(92)}.jpg").symlink_to(root / "nowhere.jpg")
    (images / f"{_stem(93)}.jpg").write_bytes(_png_header(15_000, 15_000))  # 225 megapixels
    (images / f"{_stem(94)}.jpg").write_bytes(_png_header(10_000, 10_000))  # over our bound, under PIL's error
    (sandbox / "secret").mkdir(exist_ok=True)
    (sandbox / "secret" / "x.jpg").write_bytes(SECRET)

    valid = [_name(1, 0, 1), _name(2, 1, 0), _name(3, 2, 3)]
    for pair_id, name in enumerate(valid, start=1):
        src, trg = (0, 1) if pair_id == 1 else (1, 0) if pair_id == 2 else (2, 3)
        write_pair(root, "trn", name, _doc(pair_id, src, trg))
    # Item 5: a numeric pose beside string poses is normalised (index column of strings), not a crash.
    numeric_pose = _name(4, 3, 2)
    write_pair(root, "trn", numeric_pose, _doc(4, 3, 2, src_pose=2))
    valid.append(numeric_pose)
    # A pair without the optional mirror flag: its index cell is null.
    no_mirror = _doc(5, 0, 2)
    del no_mirror["mirror"]
    write_pair(root, "trn", _name(5, 0, 2), no_mirror)
    valid.append(_name(5, 0, 2))

    cases: dict[str, tuple[str, str]] = {}

    def bad(pair_id: int, reason: str, content: bytes | str | None, file: str | None = None, src: int = 0, trg: int = 3) -> Path:
        name = _name(pair_id, src, trg)
        path = root / "PairAnnotation" / "trn" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is not None:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        cases[name] = (reason, file or f"PairAnnotation/trn/{name}.json")
        return path

    text = json.dumps(_doc(0, 0, 3))
    malformed = checks.MALFORMED_ANNOTATION
    bad(100, malformed, text.replace('"pair_id": 0', '"pair_id": ' + "7" * 5000))  # > 4300 digits
    bad(101, malformed, text.replace("[[10, 10]", "[[1e400, 10]"))  # keypoint overflows a float
    bad(102, malformed, text.replace("[2, 3, 60, 44]", "[2, 3, 1e400, 44]"))  # bbox overflows
    bad(103, malformed, text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")  # RecursionError before
    bad(104, malformed, text[:-1] + ', "category": "cat"}')  # duplicate key (item 8)
    bad(105, malformed, text.encode().replace(b'"Left"', b'"L\xffft"'))  # not UTF-8
    bad(106, malformed, text.replace("[[10, 10]", "[[NaN, 10]"))
    bad(107, checks.UNREADABLE_ANNOTATION, None).mkdir()  # the annotation path is a directory
    os.mkfifo(bad(108, checks.UNREADABLE_ANNOTATION, None))  # a FIFO: must not hang
    looping = bad(109, checks.UNREADABLE_ANNOTATION, None)
    looping.symlink_to(looping)
    # Item 5 and 8: extras the index cannot hold, negative or out-of-range difficulty flags.
    bad(110, malformed, json.dumps(_doc(0, 0, 3, truncation=2**70)))
    bad(111, malformed, json.dumps(_doc(0, 0, 3, mirror=2**70)))
    bad(112, malformed, json.dumps(_doc(0, 0, 3, viewpoint_variation=-1)))
    bad(113, malformed, json.dumps(_doc(0, 0, 3, occlusion=-3)))
    bad(114, malformed, json.dumps(_doc(0, 0, 3, scale_variation=3)))
    bad(115, malformed, text.replace('"Left"', '"\\ud800"'))  # a lone surrogate: no UTF-8 text
    # Images a pair uses (file: the image).
    for pair_id, index, reason in (
        (120, 90, checks.UNREADABLE_IMAGE),
        (121, 91, checks.UNREADABLE_IMAGE),
        (122, 92, checks.MISSING_IMAGE),
        (123, 93, checks.IMAGE_TOO_LARGE),
        (124, 94, checks.IMAGE_TOO_LARGE),
    ):
        bad(pair_id, reason, json.dumps(_doc(pair_id, 0, index)), f"JPEGImages/cat/{_stem(index)}.jpg", trg=index)
    # Item 3: an image path derived from the document that climbs out of the root.
    escape = "000130-.-.:.."
    write_pair(root, "trn", escape, _doc(130, category="..", src_imname="..", trg_imname=".."))
    cases[escape] = (checks.PATH_OUTSIDE_ROOT, f"PairAnnotation/trn/{escape}.json")
    lines = valid + list(cases)
    # Item 4: a Layout line that is not UTF-8 is that line's reject; the others still count.
    layout = ("\n".join(lines) + "\n").encode() + b"000140-2010_\xff-2010_000001:cat\n"
    (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
    (root / "Layout" / "large" / "trn.txt").write_bytes(layout)
    cases["000140-2010_\udcff-2010_000001:cat"] = (malformed, "Layout/large/trn.txt")
    return cases, valid


def _find(rejects: list[dict], name: str) -> dict:
    from pipelines.schema import safe_key

    return next(r for r in rejects if r["item"] == safe_key(name))


def test_hostile_spair_root_gives_counted_rejects_and_an_index(tmp_path: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    cases, valid = hostile_spair(root, tmp_path)
    summary = shard_dataset("spair", Location(str(root)), Location(str(out)), ["trn"])
    _summary_invariant(summary)
    assert summary["trn"]["input_pairs"] == len(valid) + len(cases)
    assert summary["trn"]["written_pairs"] == len(valid)
    rejects = _rejects(out)
    assert len(rejects) == len(cases)
    for name, (reason, file) in cases.items():
        reject = _find(rejects, name)
        assert (reject["reason"], reject["file"]) == (reason, file), (name, reject)
        assert reject["detail"]
    assert set(summary["trn"]["rejects_by_reason"]) <= set(checks.REASONS)

    index = {row["key"]: row for row in pq.read_table(out / "index.parquet").to_pylist()}
    assert len(index) == len(valid)
    assert index["000004-2010_000003-2010_000002_cat"]["src_pose"] == "2"
    assert {row["src_pose"] for row in index.values()} == {"Left", "2"}
    assert index["000005-2010_000000-2010_000002_cat"]["mirror"] is None
    assert index["000001-2010_000000-2010_000001_cat"]["mirror"] == 0
    # The messages say what was wrong.
    assert "1e400" in _find(rejects, _name(101, 0, 3))["detail"]
    assert "nested" in _find(rejects, _name(103, 0, 3))["detail"]
    assert "'category'" in _find(rejects, _name(104, 0, 3))["detail"]
    assert "not a regular file" in _find(rejects, _name(120, 0, 90))["detail"]
    assert "'viewpoint_variation' is -1" in _find(rejects, _name(112, 0, 3))["detail"]
    assert "climb" in _find(rejects, "000130-.-.:..")["detail"]


def test_rerun_after_a_fix_builds_the_index(tmp_path: Path) -> None:
    """Item 5: the index step used to fail on every re-run; now a re-run is a no-op and succeeds."""
    root, out = tmp_path / "root", tmp_path / "out"
    hostile_spair(root, tmp_path)
    first = shard_dataset("spair", Location(str(root)), Location(str(out)), ["trn"])
    index = (out / "index.parquet").read_bytes()
    assert shard_dataset("spair", Location(str(root)), Location(str(out)), ["trn"]) == first
    assert (out / "index.parquet").read_bytes() == index


# ------------------------------------------------------------------------------ PF-WILLOW


def hostile_willow(root: Path, sandbox: Path) -> dict[int, str]:
    """PF-WILLOW with valid rows and rows naming files outside the root, not UTF-8, or oversized;
    returns ``{CSV line: expected reason}`` of the bad rows."""
    images = ImageFiles()
    for name in ("Cars_001a", "Cars_002a", "Cars_003a"):
        images.write(root / "PF-dataset-WILLOW" / "car(G)" / f"{name}.png", (300, 200))
    secret = sandbox / "secret" / "winebottle(M)" / "secret.png"
    secret.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (300, 200), (1, 2, 3)).save(secret, format="PNG", pnginfo=_png_text(SECRET))
    pts = np.array([[float(10 + 3 * i), float(50 - 2 * i)] for i in range(10)])
    car = "PF-dataset-WILLOW/car(G)"
    rows = [
        willow_row(f"{car}/Cars_001a.png", f"{car}/Cars_002a.png", pts, pts),  # line 2
        willow_row("../../secret/winebottle(M)/secret.png", f"{car}/Cars_001a.png", pts, pts),  # 3
        willow_row(f"{car}/Cars_002a.png", str(secret), pts, pts),  # 4: absolute
        willow_row("../../secret/winebottle(M)/secret.png", "winebottle(M)/a.png", pts, pts),  # 5
        willow_row(f"{car}/Cars_002a.png", f"{car}/Cars_003a.png", pts, pts),  # 6
        willow_row(f"{car}/Cars_003a.png", f"{car}/Cars_001a.png", pts, pts),  # 7
    ]
    write_csv(root / "test_pairs.csv", willow_header(), rows)
    with (root / "test_pairs.csv").open("ab") as csv_file:
        csv_file.write(b"PF-dataset-WILLOW/car(G)/Cars_\xff01a.png," + b",".join([b"1"] * 41) + b"\n")  # 8
        csv_file.write(b"PF-dataset-WILLOW/car(G)/Cars_001a.png," + b"1" * 200_000 + b"," + b",".join([b"1"] * 40) + b"\n")  # 9
        csv_file.write(b"PF-dataset-WILLOW/car(G)/Cars_001a.png,PF-dataset-WILLOW/car(G)/Cars_003a.png," + b",".join([b"5"] * 39) + b",1e400\n")  # 10
    return {
        3: checks.PATH_OUTSIDE_ROOT,
        4: checks.PATH_OUTSIDE_ROOT,
        5: checks.PATH_OUTSIDE_ROOT,
        8: checks.MALFORMED_ANNOTATION,
        9: checks.MALFORMED_ANNOTATION,
        10: checks.NAN_KEYPOINTS,
    }


def test_willow_paths_outside_the_root_and_broken_rows_are_rejects(tmp_path: Path) -> None:
    root, out = tmp_path / "data" / "willow", tmp_path / "out"
    expected = hostile_willow(root, tmp_path)
    summary = shard_dataset("pfwillow", Location(str(root)), Location(str(out)))
    _summary_invariant(summary)
    assert summary["test"]["input_pairs"] == 9 and summary["test"]["written_pairs"] == 3
    rejects = _rejects(out)
    by_line = {int(r["detail"].split(":")[1]) if r["file"] == "test_pairs.csv" else int(r["file"].split(":")[1]): r for r in rejects}
    assert {line: r["reason"] for line, r in by_line.items()} == expected
    assert by_line[4]["detail"].startswith("test_pairs.csv:4: image path") and "absolute" in by_line[4]["detail"]
    assert "not UTF-8" in by_line[8]["detail"] and "field larger than field limit" in by_line[9]["detail"]
    for shard in out.glob("*.tar"):
        assert SECRET not in shard.read_bytes()


# ------------------------------------------------------------------------------ AP-10K and PF-PASCAL


def test_ap10k_file_name_outside_the_root_is_left_out_and_never_read(tmp_path: Path) -> None:
    root, out = tmp_path / "ap10k", tmp_path / "out"
    parts = fmt.single_animal_release({"cat": range(10, 16)})
    images, _ = parts["train"]
    images[0]["file_name"] = "../../secret/x.jpg"
    (tmp_path / "secret").mkdir()
    fmt.write_raw_release(root, parts)  # the fixture writer itself puts that image outside the root
    assert (tmp_path / "secret" / "x.jpg").exists()
    left_out = [r for r in ap10k.read_pairs(Location(str(root)), "trn") if isinstance(r, Reject)]
    assert [(r.kind, r.reason, r.item) for r in left_out] == [("image", checks.PATH_OUTSIDE_ROOT, f"{images[0]['id']:012d}")]
    summary = shard_dataset("ap10k", Location(str(root)), Location(str(out)), ["trn"])
    _summary_invariant(summary)
    assert summary["trn"]["images_left_out_by_reason"] == {checks.PATH_OUTSIDE_ROOT: 1}


def test_ap10k_pair_layout_paths_outside_the_root_are_rejects(tmp_path: Path) -> None:
    good = fmt.write_image_annotation(tmp_path, "Felidae", "cat", "000000000011", fmt.image_annotation_document(11, "cat"))
    deep = fmt.write_image_annotation(tmp_path, "Felidae", "cat", "000000000012", '{"id": ' + "[" * 50_000 + "]" * 50_000 + "}")
    fmt.write_pair_file(tmp_path, "test", "000000000011-000000000013:cat", fmt.geoaware_pair_document(good, "ImageAnnotation/../../../secret/x.json"))
    fmt.write_pair_file(tmp_path, "test", "000000000011-000000000012:cat", fmt.geoaware_pair_document(good, deep))
    dup = fmt.write_pair_file(tmp_path, "test", "000000000012-000000000011:cat", '{"src_json_path": "a", "src_json_path": "b"}')
    items = list(ap10k.read_pairs(Location(str(tmp_path)), "test"))
    got = {r.item: (r.reason, r.file) for r in items}
    assert got == {
        "000000000011_000000000012_cat": (checks.MALFORMED_ANNOTATION, deep),
        "000000000011_000000000013_cat": (checks.PATH_OUTSIDE_ROOT, "PairAnnotation/test/000000000011-000000000013:cat.json"),
        "000000000012_000000000011_cat": (checks.MALFORMED_ANNOTATION, dup),
    }


def test_ap10k_species_must_be_a_folder_name(tmp_path: Path) -> None:
    doc = fmt.image_annotation_document(11, "cat", name="../../x")
    with pytest.raises(RejectError, match="not a name"):
        ap10k.parse_image_annotation(doc, "JPEGImages/x.jpg", "ImageAnnotation/x.json")


def test_ap10k_release_file_too_deep_is_a_clear_error(tmp_path: Path) -> None:
    fmt.write_raw_release(tmp_path, fmt.single_animal_release({"cat": range(3)}))
    (tmp_path / "annotations" / "ap10k-val-split1.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match="ap10k-val-split1.json: nested 100000 levels deep"):
        list(ap10k.read_pairs(Location(str(tmp_path)), "trn"))


def test_pascal_rows_and_mat_files_that_cannot_be_read_are_rejects(tmp_path: Path) -> None:
    for stem in ("2008_000001", "2008_000002"):
        write_pascal_mat(tmp_path / "Annotations" / "bird" / f"{stem}.mat", np.array([[10.0, 20.0], [30.0, 40.0]]), np.array([5, 6, 100, 90]))
    bomb = tmp_path / "Annotations" / "bird" / "2008_000003.mat"
    scipy.io.savemat(bomb, {"kps": np.zeros((500_000, 2)), "bbox": np.zeros((1, 4))}, do_compression=True)
    assert bomb.stat().st_size < 100_000  # small on disk, 8 MB once loaded
    (tmp_path / "Annotations" / "bird" / "2008_000004.mat").mkdir()
    header = "source_image,target_image,class,flip\n"
    rows = [
        "JPEGImages/2008_000001.jpg,JPEGImages/2008_000002.jpg,3,0",
        "JPEGImages/2008_000001.jpg,JPEGImages/2008_000003.jpg,3,0",
        "JPEGImages/2008_000001.jpg,JPEGImages/2008_000004.jpg,3,0",
        "JPEGImages/2008_\udcff.jpg,JPEGImages/2008_000002.jpg,3,0",
        "JPEGImages/2008_000001.jpg,JPEGImages/2008_000002.jpg," + "3" * 200_000 + ",0",
        "JPEGImages/2008_000002.jpg,JPEGImages/2008_000001.jpg," + "9" * 5000 + ",0",
    ]
    (tmp_path / "trn_pairs.csv").write_bytes((header + "\n".join(rows) + "\n").encode("utf-8", "surrogateescape"))
    items = list(pfpascal.read_pairs(Location(str(tmp_path)), "trn"))
    assert isinstance(items[0], PairRecord)
    got = [(r.reason, r.file) for r in items[1:]]
    assert got == [
        (checks.MALFORMED_ANNOTATION, "Annotations/bird/2008_000003.mat"),
        (checks.UNREADABLE_ANNOTATION, "Annotations/bird/2008_000004.mat"),
        (checks.MALFORMED_ANNOTATION, "trn_pairs.csv"),
        (checks.MALFORMED_ANNOTATION, "trn_pairs.csv"),
        (checks.MALFORMED_ANNOTATION, "trn_pairs.csv"),
    ]
    assert "more than 10000 values" in items[1].detail
    assert items[3].detail.startswith("trn_pairs.csv:5: field 1 is not UTF-8")
    assert items[4].detail.startswith("trn_pairs.csv:6: cannot be parsed as CSV")


# ------------------------------------------------------------------------------ checks and schema


def _record(**overrides) -> PairRecord:
    extras = {"viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0, "src_pose": "Left", "trg_pose": "Left"}
    box = np.array([0.0, 0, 5, 5])
    fields = {
        "key": "k", "dataset": "spair", "split": "trn", "category": "cat", "group": "cat", "threshold": "bbox",
        "src": ImageRef("a", "JPEGImages/cat/a.jpg"), "trg": ImageRef("b", "JPEGImages/cat/b.jpg"),
        "src_kps": np.zeros((1, 2)), "trg_kps": np.zeros((1, 2)), "kps_ids": np.zeros(1, np.int64),
        "src_bbox": box, "trg_bbox": box, "origin": "o.json", "extras": extras,
    }  # fmt: skip
    return PairRecord(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("overrides", "reason", "detail"),
    [
        ({"src": ImageRef("a", "../../secret/a.jpg")}, checks.PATH_OUTSIDE_ROOT, "source image path"),
        ({"trg": ImageRef("b", "/etc/passwd")}, checks.PATH_OUTSIDE_ROOT, "absolute"),
        ({"trg": ImageRef("b", "JPEGImages/cat/./a.jpg")}, checks.SAME_IMAGE, "both sides"),
        ({"category": "c\udcffat"}, checks.MALFORMED_ANNOTATION, "not UTF-8"),
        ({"dataset": "unknown"}, checks.MALFORMED_ANNOTATION, "no extra fields declared"),
    ],
)
def test_check_pair_rejects_paths_and_fields_of_any_reader(overrides: dict, reason: str, detail: str) -> None:
    assert checks.check_pair(_record()) == []
    problems = checks.check_pair(_record(**overrides))
    assert problems and problems[0].reason == reason and detail in problems[0].detail


def test_extras_are_normalised_to_their_declared_types() -> None:
    extras = _record().extras
    assert normalise_extras("spair", {**extras, "src_pose": 2, "mirror": np.int64(1)}) == {**extras, "src_pose": "2", "mirror": 1}
    for bad in ({"truncation": 2**70}, {"truncation": True}, {"occlusion": 1.0}, {"src_pose": 1.5}, {"src_pose": None}, {"bogus": 1}):
        with pytest.raises(ValueError):
            normalise_extras("spair", {**extras, **bad})
    with pytest.raises(ValueError, match="required but missing \\['trg_pose'\\]"):
        normalise_extras("spair", {k: v for k, v in extras.items() if k != "trg_pose"})
    record = checks.normalised(_record(src=ImageRef("a", "JPEGImages/./cat/a.jpg"), extras={**extras, "src_pose": 7}))
    assert record.src.path == "JPEGImages/cat/a.jpg" and record.extras["src_pose"] == "7"


def test_declared_extras_fit_the_index() -> None:
    """No extra shadows an index column, and a name means one type in every dataset."""
    kinds: dict[str, type] = {}
    for fields in EXTRA_FIELDS.values():
        assert not fields.keys() & INDEX_COLUMNS.keys()
        for name, spec in fields.items():
            assert kinds.setdefault(name, spec.kind) is spec.kind, name
            assert spec.kind in (int, float, str)
    row = {name: ("spair" if name == "dataset" else 1 if kind is int else "x") for name, kind in INDEX_COLUMNS.items()}
    # An optional column missing from the first row is kept (type inference used to drop it).
    table = index_table([row, {**row, "mirror": 1}])
    assert table.column("mirror").to_pylist() == [None, 1]
    with pytest.raises(RuntimeError, match="earlier version"):
        index_table([{**row, "src_pose": 2}])


def test_images_over_the_bounds_are_refused_before_decoding() -> None:
    with pytest.raises(RejectError) as raised:
        probe_image(_png_header(15_000, 15_000))
    assert raised.value.reason == checks.IMAGE_TOO_LARGE
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    with pytest.raises(RejectError, match=f"{side} x {side} pixels") as raised:
        probe_image(_png_header(side, side), full_decode=True)
    assert raised.value.reason == checks.IMAGE_TOO_LARGE
    assert probe_image(_png_header(64, 48)).size == (64, 48)


# ------------------------------------------------------------------------------ the sandbox


def _snapshot(top: Path, skip: set[str]) -> dict[str, tuple]:
    """Every entry under ``top`` (links not followed) with its type, size, mtime and content digest."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
            found[os.path.relpath(path, top)] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, digest)
    return found


def test_sharding_hostile_roots_writes_nothing_outside_out(tmp_path: Path) -> None:
    """A sandbox holding the roots, a 'secret' sibling and the outputs: after sharding every
    hostile root, nothing outside the output folders has changed, and no output holds a secret."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    hostile_spair(sandbox / "spair", sandbox)
    hostile_willow(sandbox / "data" / "willow", sandbox)
    parts = fmt.single_animal_release({"cat": range(10, 16)})
    parts["train"][0][0]["file_name"] = "../../secret/ap10k.jpg"
    fmt.write_raw_release(sandbox / "ap10k", parts)
    (sandbox / "secret" / "ap10k.jpg").write_bytes(SECRET)
    outs = {name: sandbox / "out" / name for name in ("spair", "pfwillow", "ap10k")}
    before = _snapshot(sandbox, {str(sandbox / "out")})

    shard_dataset("spair", Location(str(sandbox / "spair")), Location(str(outs["spair"])), ["trn"])
    shard_dataset("pfwillow", Location(str(sandbox / "data" / "willow")), Location(str(outs["pfwillow"])))
    shard_dataset("ap10k", Location(str(sandbox / "ap10k")), Location(str(outs["ap10k"])), ["trn"])

    assert _snapshot(sandbox, {str(sandbox / "out")}) == before
    for out in outs.values():
        assert (out / "index.parquet").exists()
        _summary_invariant(json.loads((out / "summary.json").read_text()))
        for path in out.rglob("*"):
            assert not path.is_symlink() and (path.is_dir() or SECRET not in path.read_bytes()), path
