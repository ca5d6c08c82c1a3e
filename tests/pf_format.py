"""Fixture writers for the Proposal Flow benchmarks (PF-PASCAL, PF-WILLOW) in their real on-disk formats.

``.mat`` files are written with :func:`scipy.io.savemat` in the shapes MATLAB's files load with:
PF-PASCAL ``kps`` N x 2 (NaN rows = not annotated) and ``bbox`` 1 x 4, PF-WILLOW ``pts_coord`` 2 x 10.
All coordinates handed to these writers are the files' own MATLAB 1-based values.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from pipelines.schema import Reject

PASCAL_CSV_PREFIX = "PF-dataset-PASCAL/JPEGImages"
WILLOW_NUM_KEYPOINTS = 10


class ImageFiles:
    """Writes small solid images, encoding each (size, format) once and copying the bytes after."""

    def __init__(self) -> None:
        self._encoded: dict[tuple[tuple[int, int], str], bytes] = {}

    def write(self, path: Path, size: tuple[int, int]) -> None:
        """An image of ``size`` ``(W, H)`` at ``path``, JPEG or PNG after its suffix."""
        image_format = "PNG" if path.suffix.lower() == ".png" else "JPEG"
        if (size, image_format) not in self._encoded:
            buffer = io.BytesIO()
            Image.new("RGB", size, (90, 120, 150)).save(buffer, format=image_format)
            self._encoded[size, image_format] = buffer.getvalue()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._encoded[size, image_format])


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A CSV the way the releases write them: a header line, then one line per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def float_list(values: Sequence[float]) -> str:
    """PF-PASCAL's inline coordinate cell: ``[1.5, 2.0]`` -> ``"1.5;2.0"`` (``repr`` precision)."""
    return ";".join(repr(float(value)) for value in values)


def pascal_csv_image(stem: str) -> str:
    """An image path as the PF-PASCAL CSVs write it."""
    return f"{PASCAL_CSV_PREFIX}/{stem}.jpg"


def write_pascal_mat(path: Path, kps: np.ndarray | None, bbox: np.ndarray | None) -> None:
    """``Annotations/<class>/<stem>.mat``: ``kps`` ``(N, 2)`` x, y with NaN rows, ``bbox`` ``(4,)``
    stored 1 x 4; either left out when None (for malformed fixtures)."""
    content = {}
    if kps is not None:
        content["kps"] = np.asarray(kps, dtype=np.float64)
    if bbox is not None:
        content["bbox"] = np.asarray(bbox, dtype=np.float64).reshape(1, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, content)


def willow_header() -> list[str]:
    """``imageA, imageB, XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10``."""
    numbered = [f"{axis}{side}{i}" for side in "AB" for axis in "XY" for i in range(1, WILLOW_NUM_KEYPOINTS + 1)]
    return ["imageA", "imageB", *numbered]


def willow_row(image_a: str, image_b: str, pts_a: np.ndarray, pts_b: np.ndarray) -> list[object]:
    """One PF-WILLOW CSV row from two ``(10, 2)`` keypoint arrays (x, y)."""
    return [image_a, image_b, *pts_a[:, 0], *pts_a[:, 1], *pts_b[:, 0], *pts_b[:, 1]]


def write_willow_mat(path: Path, pts: np.ndarray) -> None:
    """``<subclass>/<name>.mat`` holding ``pts_coord`` 2 x 10 (row 0 = x, row 1 = y) from ``(10, 2)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"pts_coord": np.asarray(pts, dtype=np.float64).T})


def only_reject(items: list) -> Reject:
    """The single item a reader yielded for a one-row fixture, which must be a reject."""
    assert len(items) == 1 and isinstance(items[0], Reject), items
    return items[0]
