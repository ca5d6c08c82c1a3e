"""Damaged JPEG data (hostile-input sweep, defect 11): PIL decodes a JPEG whose compressed data
lost or zeroed bytes mid-stream without an error (libjpeg's "Corrupt JPEG data" is only a
warning, and PIL drops it), so ``--full-decode`` walks every scan's Huffman codes itself and
rejects such a file as ``corrupt-image``, while every valid encoding still passes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.imageio import jpeg_data_problem, probe_image
from pipelines.schema import RejectError
from pipelines.shard import shard_dataset
from pipelines.storage import Location
from tests.test_shard import IMAGES_PER_CATEGORY, SIZE, VALID_PAIRS, build_spair


def _photo(size: tuple[int, int] = (500, 375)) -> np.ndarray:
    """A smooth picture with edges and texture, like a photo (not noise), ``size`` = (W, H)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 128 + 100 * np.sin(x / 23.0) * np.cos(y / 31.0)
    green = 255 * (x / max(width - 1, 1)) * ((x + y) % 97 > 40)
    blue = 128 + 120 * np.sign(np.sin((x - y) / 17.0))
    noise = np.random.default_rng(0).normal(0, 12, (height, width, 3))
    return np.clip(np.stack([red, green, blue], axis=-1) + noise, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _zeroed(data: bytes, start: int, count: int = 2000) -> bytes:
    damaged = bytearray(data)
    damaged[start : start + count] = bytes(count)
    return bytes(damaged)


ENCODINGS = {
    "baseline q90": {"quality": 90},
    "baseline q75 4:2:0": {"quality": 75, "subsampling": 2},
    "4:2:2": {"quality": 85, "subsampling": 1},
    "4:4:4 q95": {"quality": 95, "subsampling": 0},
    "optimized tables": {"quality": 80, "optimize": True},
    "quality 1": {"quality": 1},
    "quality 100": {"quality": 100},
    "progressive": {"quality": 90, "progressive": True},
    "progressive optimized 4:4:4": {"quality": 70, "progressive": True, "optimize": True, "subsampling": 0},
    "restart every 3 blocks": {"quality": 90, "restart_marker_blocks": 3},
    "restart every row": {"quality": 85, "restart_marker_rows": 1},
    "progressive with restarts": {"quality": 80, "progressive": True, "restart_marker_blocks": 7},
}


@pytest.mark.parametrize("size", [(500, 375), (33, 17), (1, 1), (64, 48)])
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_valid_jpegs_of_every_encoding_pass(name: str, size: tuple[int, int]) -> None:
    for pixels in (_photo(size), _photo(size)[..., 0]):  # colour and greyscale
        data = _encode(pixels, **ENCODINGS[name])
        assert jpeg_data_problem(data) is None, (name, size, pixels.ndim)
        assert probe_image(data, full_decode=True).size == size


def test_demo_dataset_jpegs_pass(demo_root: Path) -> None:
    paths = sorted(demo_root.rglob("*.jpg"))
    assert len(paths) > 10
    for path in paths:
        assert jpeg_data_problem(path.read_bytes()) is None, path


def test_real_jpegs_pass(shared_data: Path) -> None:
    """The real AP-10K images in ``../shared/data``."""
    paths = sorted(shared_data.rglob("*.jpg"))
    assert paths
    for path in paths:
        data = path.read_bytes()
        assert jpeg_data_problem(data) is None, path
        probe_image(data, full_decode=True)


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_two_thousand_zeroed_bytes_are_corrupt(name: str) -> None:
    """2,000 bytes zeroed at 16 places of a 500 x 375 JPEG's compressed data, each a
    ``corrupt-image``, except
    where the damaged stream is itself valid: Huffman codes resynchronise, so now and then the
    decoder walks out of the damage in step and meets every block and the end exactly (libjpeg
    sees nothing either). That happens more often within one short restart interval, or in a
    progressive refinement scan of a few bits per block."""
    data = _encode(_photo(), **ENCODINGS[name])
    caught = 0
    for start in np.linspace(data.index(b"\xff\xda") + 20, len(data) - 2002, 16).astype(int):
        damaged = _zeroed(data, start)
        Image.open(io.BytesIO(damaged)).load()  # PIL itself sees nothing wrong
        try:
            probe_image(damaged, full_decode=True)
        except RejectError as error:
            assert error.reason == "corrupt-image"
            assert str(error).startswith("corrupt JPEG data: ")
            caught += 1
    assert caught >= (12 if "progressive" in name or "restart" in name else 15), caught


def test_each_kind_of_damage_is_named() -> None:
    data = _encode(_photo(), quality=90)
    middle = len(data) // 2
    # Bytes lost mid-stream, then the end marker still in place.
    assert jpeg_data_problem(data[:middle] + data[middle + 300 :]) is not None
    # Bytes after the last block, before the end-of-image marker.
    assert (
        jpeg_data_problem(data[:-2] + b"\x12\x34\x56" + data[-2:]) == "3 bytes of extraneous data after the last block"
    )
    # A file cut short, its end marker appended: the last blocks have no data.
    assert jpeg_data_problem(data[:middle] + b"\xff\xd9").startswith("premature end of data segment: the blocks need")
    # Restart markers out of sequence.
    restarts = _encode(_photo(), quality=90, restart_marker_rows=1)
    rst = [i for i in range(len(restarts) - 1) if restarts[i] == 0xFF and 0xD0 <= restarts[i + 1] <= 0xD7]
    swapped = bytearray(restarts)
    swapped[rst[2] + 1] = 0xD5
    assert jpeg_data_problem(bytes(swapped)).startswith("restart marker 5 where restart marker 2 belongs")
    # A restart marker lost.
    lost = restarts[: rst[4]] + restarts[rst[4] + 2 :]
    assert jpeg_data_problem(lost) is not None


def test_sharding_rejects_a_jpeg_with_zeroed_bytes_with_full_decode(tmp_path: Path) -> None:
    """The sweep's case: an SPair image with 2,000 bytes zeroed mid-stream is a counted
    ``corrupt-image`` reject of every pair using it under ``--full-decode``, naming the file."""
    root = tmp_path / "spair"
    build_spair(root)
    damaged_path = root / "JPEGImages" / "cat" / "2010_000000.jpg"
    data = _encode(_photo(SIZE), quality=100, subsampling=0)
    assert len(data) > 6000
    damaged_path.write_bytes(_zeroed(data, len(data) // 3))

    out = tmp_path / "out"
    summary = shard_dataset("spair", Location(str(root)), Location(str(out)), ["trn"], full_decode=True)["trn"]
    uses_image = 2 * (IMAGES_PER_CATEGORY - 1)
    assert summary["rejects_by_reason"] == {"corrupt-image": uses_image}
    assert summary["written_pairs"] == VALID_PAIRS - uses_image
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["file"] for r in rejects} == {"JPEGImages/cat/2010_000000.jpg"}
    assert all(r["detail"].startswith(f"{damaged_path}: corrupt JPEG data: ") for r in rejects)
