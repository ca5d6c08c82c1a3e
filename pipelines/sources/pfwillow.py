"""PF-WILLOW: the 900-pair test CSV with 10 keypoints per image inline; boxes from the keypoints.

Layout (the root is the folder holding the pair CSV)::

    test_pairs.csv | test_pairs_pf.csv       # the first that exists
    PF-dataset-WILLOW/<subclass>/<name>.png  # also named PF-dataset/ or PF-WILLOW/ by some releases
    PF-dataset-WILLOW/<subclass>/<name>.mat  # pts_coord (2, 10); the same points as the CSV, not read

CSV columns, by header name: ``imageA, imageB, XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10``. An image
path such as ``PF-dataset-WILLOW/car(G)/Cars_006a.png`` is used as given, relative to the root; where
that file does not exist the same ``<subclass>/<name>`` is looked for under each of
:data:`IMAGE_FOLDERS` (releases rename the folder), and where none exists the path stays as given so
the shard stage reports the missing image. The subclass is the path's folder (one of
:data:`SUBCLASSES`); the category is the subclass without its ``(...)`` suffix.

Coordinates
-----------
The CSV values are the ``.mat`` ``pts_coord`` values: MATLAB pixels, whose pixel ``(1, 1)`` is
centred at ``(1.0, 1.0)``. The schema centres pixel ``(0, 0)`` at ``(0.0, 0.0)``, so
:data:`MATLAB_ORIGIN` (1.0) is subtracted from every coordinate. PF-WILLOW has no object box: each
side's bbox is the box around that image's 10 keypoints, ``(min x, min y, max x, max y)`` in the same
frame, and the PCK threshold is ``bbox-kp`` (its max side, for the target). All 10 keypoints are
annotated in every image, so ``kps_ids`` are ``0..9``.

Keys: image ``safe_key(subclass, stem)`` (the same file name recurs in different subclasses); pair
``safe_key(subclass, src_stem, trg_stem)``. ``origin`` is ``<csv>:<line>`` with the header on line 1.

Per CSV row, the reader rejects (one item per non-blank row; a CSV lacking any of the 42 columns is
a usage error, :class:`ValueError`):

- ``malformed-annotation``: the row is not UTF-8 or not parsable CSV (e.g. a field over the
  :mod:`csv` size limit), its field count differs from the header's, a coordinate is not a number,
  or an image path is not ``.../<subclass>/<name>`` with one of the 10 subclasses;
- ``path-outside-root``: an image path is absolute or climbs out of the root with ``..``;
- ``inconsistent-annotation``: the two images lie in different subclasses (pairs never cross them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.checks import INCONSISTENT_ANNOTATION, MALFORMED_ANNOTATION, PATH_OUTSIDE_ROOT
from pipelines.schema import ImageRef, PairRecord, Reject, RejectError, safe_key
from pipelines.sources.files import csv_rows, read_list_file
from pipelines.storage import Location, PathOutsideRoot, confine

DATASET = "pfwillow"
SPLITS: tuple[str, ...] = ("test",)
CSV_NAMES = ("test_pairs.csv", "test_pairs_pf.csv")
IMAGE_FOLDERS = ("PF-dataset-WILLOW", "PF-dataset", "PF-WILLOW")
SUBCLASSES: tuple[str, ...] = (
    "car(G)", "car(M)", "car(S)", "duck(S)", "motorbike(G)", "motorbike(M)", "motorbike(S)",
    "winebottle(M)", "winebottle(wC)", "winebottle(woC)",
)
NUM_KEYPOINTS = 10
IMAGE_COLUMNS = ("imageA", "imageB")
MATLAB_ORIGIN = 1.0
"""Subtracted from every coordinate: MATLAB centres its first pixel at 1.0, the schema at 0.0."""


def coordinate_columns(side: str, axis: str) -> tuple[str, ...]:
    """``coordinate_columns("A", "X")`` -> ``("XA1", ..., "XA10")``."""
    return tuple(f"{axis}{side}{index}" for index in range(1, NUM_KEYPOINTS + 1))


REQUIRED_COLUMNS = IMAGE_COLUMNS + tuple(
    column for side in ("A", "B") for axis in ("X", "Y") for column in coordinate_columns(side, axis)
)


@dataclass(frozen=True)
class ListedImage:
    """An image path as the CSV lists it, split into its subclass folder and file name."""

    path: str
    subclass: str
    name: str

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]


def find_pairs_csv(root: Location) -> str:
    """The first of :data:`CSV_NAMES` under ``root``; :class:`FileNotFoundError` when none exists."""
    for name in CSV_NAMES:
        if root.exists(name):
            return name
    raise FileNotFoundError(f"{root.url}: no PF-WILLOW pair list; looked for {', '.join(CSV_NAMES)}")


def category_of(subclass: str) -> str:
    """``"winebottle(woC)"`` -> ``"winebottle"``."""
    return subclass.split("(", 1)[0]


def resolve_image_path(root: Location, listed: ListedImage) -> str:
    """``listed.path`` if it exists under ``root``, else ``<folder>/<subclass>/<name>`` for the first
    of :data:`IMAGE_FOLDERS` that exists, else ``listed.path`` unchanged."""
    candidates = [listed.path] + [f"{folder}/{listed.subclass}/{listed.name}" for folder in IMAGE_FOLDERS]
    return next((path for path in candidates if root.exists(path)), listed.path)


def keypoint_bbox(kps: np.ndarray) -> np.ndarray:
    """The box ``(4,)`` x1, y1, x2, y2 around keypoints ``(N, 2)``; NaN propagates (no NaN skipping)."""
    return np.array([kps[:, 0].min(), kps[:, 1].min(), kps[:, 0].max(), kps[:, 1].max()], dtype=np.float64)


def read_pairs(root: Location, split: str) -> Iterator[PairRecord | Reject]:
    """One :class:`PairRecord` or :class:`Reject` per row of the pair CSV, in file order.
    :class:`ValueError` for a split other than ``test`` or a CSV lacking the format's columns."""
    if split not in SPLITS:
        raise ValueError(f"PF-WILLOW has no split {split!r}; choose one of {', '.join(SPLITS)}")
    csv_name = find_pairs_csv(root)
    header, rows = csv_rows(read_list_file(root, csv_name), csv_name)
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{csv_name}: header lacks {missing}; not a PF-WILLOW pair list")
    # Each of the 100 images recurs in 18 pairs; look each path up once.
    resolve = functools.cache(functools.partial(resolve_image_path, root))
    for row in rows:
        origin = f"{csv_name}:{row.line}"
        item = origin
        try:
            if row.problem:
                raise RejectError(MALFORMED_ANNOTATION, row.problem)
            values = _row_values(header, row.fields)
            src, trg = _listed_images(values)
            item = safe_key(src.subclass, src.stem, trg.stem)
            yield _pair(item, values, src, trg, split, origin, resolve)
        except RejectError as problem:  # the CSV is at fault
            yield Reject(item=item, file=csv_name, reason=problem.reason, detail=f"{origin}: {problem.detail}")


def _row_values(header: list[str], fields: list[str]) -> dict[str, str]:
    if len(fields) != len(header):
        raise RejectError(MALFORMED_ANNOTATION, f"{len(fields)} fields, the header has {len(header)}")
    return dict(zip(header, fields))


def _listed_images(values: dict[str, str]) -> tuple[ListedImage, ListedImage]:
    src, trg = _listed_image(values["imageA"]), _listed_image(values["imageB"])
    if src.subclass != trg.subclass:
        raise RejectError(INCONSISTENT_ANNOTATION, f"pairs lie within one subclass, but {src.path} and {trg.path} do not")
    return src, trg


def _pair(
    key: str,
    values: dict[str, str],
    src: ListedImage,
    trg: ListedImage,
    split: str,
    origin: str,
    resolve: Callable[[ListedImage], str],
) -> PairRecord:
    src_kps, trg_kps = _keypoints(values, "A"), _keypoints(values, "B")
    return PairRecord(
        key=key,
        dataset=DATASET,
        split=split,
        category=category_of(src.subclass),
        group=src.subclass,
        threshold="bbox-kp",
        src=ImageRef(safe_key(src.subclass, src.stem), resolve(src)),
        trg=ImageRef(safe_key(trg.subclass, trg.stem), resolve(trg)),
        src_kps=src_kps,
        trg_kps=trg_kps,
        kps_ids=np.arange(NUM_KEYPOINTS, dtype=np.int64),
        src_bbox=keypoint_bbox(src_kps),
        trg_bbox=keypoint_bbox(trg_kps),
        origin=origin,
        extras={"subclass": src.subclass},
    )


def _listed_image(path: str) -> ListedImage:
    parts = path.strip().replace("\\", "/").split("/")
    if len(parts) < 2 or parts[-1] in ("", ".", ".."):
        raise RejectError(MALFORMED_ANNOTATION, f"image path {path!r} is not [<folder>/]<subclass>/<name>")
    if parts[-2] not in SUBCLASSES:
        raise RejectError(MALFORMED_ANNOTATION, f"{path!r}: {parts[-2]!r} is not a PF-WILLOW subclass ({', '.join(SUBCLASSES)})")
    try:
        listed = confine("/".join(parts), "the dataset root")
    except PathOutsideRoot as error:
        raise RejectError(PATH_OUTSIDE_ROOT, f"image path {error}") from None
    return ListedImage(listed, subclass=parts[-2], name=parts[-1])


def _keypoints(values: dict[str, str], side: str) -> np.ndarray:
    """Image ``side``'s keypoints ``(10, 2)`` in the schema frame."""
    columns = coordinate_columns(side, "X") + coordinate_columns(side, "Y")
    try:
        coords = np.array([float(values[column]) for column in columns], dtype=np.float64)
    except ValueError:
        bad = {column: values[column] for column in columns if not _is_float(values[column])}
        raise RejectError(MALFORMED_ANNOTATION, f"not numbers: {bad}") from None
    xs, ys = coords.reshape(2, NUM_KEYPOINTS)
    return np.stack([xs, ys], axis=1) - MATLAB_ORIGIN


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
