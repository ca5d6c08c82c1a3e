"""PF-PASCAL: pair CSVs (NCNet, HPF, WeakAlign variants) over flat JPEGs and per-class .mat files.

Layout (the root is the folder holding ``JPEGImages/``)::

    JPEGImages/<voc_id>.jpg              # flat, not per class
    Annotations/<class>/<voc_id>.mat     # kps (N, 2) x, y with NaN rows; bbox (1, 4) x1, y1, x2, y2
    <split CSV>                          # the first of CSV_NAMES[split] that exists

CSV columns, by header name: ``source_image,target_image,class`` always, ``flip`` (0/1) optionally,
``XA,YA,XB,YB`` optionally (each one ``;``-separated float list). Image paths in the CSV read like
``PF-dataset-PASCAL/JPEGImages/2011_001407.jpg``: only the basename is used, under ``JPEGImages/``.
``class`` is 1-based into :data:`CLASS_NAMES`.

Keypoints
---------
- With ``XA,YA,XB,YB``: the keypoints come from the CSV. They hold only the keypoints annotated in
  both images, in a compacted order, so ``kps_ids`` are the positions ``0..n-1``, *not* the class's
  semantic keypoint ids.
- Without them: the keypoints come from the two ``.mat`` files. ``kps`` has one row per semantic
  keypoint of the class, NaN where the image has no annotation; the rows annotated (no NaN) in both
  images are kept and ``kps_ids`` are their row indices, i.e. semantic ids. Dropping NaN rows is this
  format's own "not annotated" marker, not a repair: any other bad value passes through to the shard
  stage's checks.
- The bbox always comes from the ``.mat`` files.

Coordinates
-----------
Both the CSV and the ``.mat`` values come from the original MATLAB Proposal Flow code, whose pixel
``(1, 1)`` is centred at ``(1.0, 1.0)``; the schema centres pixel ``(0, 0)`` at ``(0.0, 0.0)``. So
:data:`MATLAB_ORIGIN` (1.0) is subtracted from every keypoint coordinate and from every bbox
coordinate, CSV and ``.mat`` alike; nothing else changes (the bbox stays ``x1, y1, x2, y2``).
The PCK threshold is ``img``: the max side of the target image.

Keys: image ``safe_key(stem)`` (JPEGImages is flat, so a stem names one file); pair
``safe_key(src_stem, trg_stem)``, plus a ``flip`` part when ``flip == 1``. The training CSV lists each
ordered pair with flip 0 and 1 and also repeats some rows exactly: repeats get the same key, so the
shard stage rejects them as duplicates. ``origin`` is ``<csv>:<line>`` with the header on line 1.

Per CSV row, the reader rejects (one item per non-blank row; a CSV lacking ``source_image``,
``target_image``, ``class`` or holding only some of ``XA..YB`` is a usage error, :class:`ValueError`):

- ``malformed-annotation``: the row is not UTF-8 or not parsable CSV (e.g. a field over the
  :mod:`csv` size limit), its field count differs from the header's, an image path is
  empty, ``class`` is not an integer in 1..20, ``flip`` is not 0 or 1, an inline list holds a
  non-number; or a ``.mat`` is not a readable MAT file or lacks an N x 2 ``kps`` or a 4-value ``bbox``
  of at most :data:`MAX_MAT_ELEMENTS` values (checked from the variable headers, before loading);
- ``missing-annotation``: ``Annotations/<class>/<stem>.mat`` does not exist for either image;
- ``unreadable-annotation``: that path is a directory, FIFO or other non-file, or too large;
- ``keypoint-count-mismatch``: ``XA, YA, XB, YB`` differ in length, or the two ``.mat`` files'
  ``kps`` differ in row count.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.io

from pipelines.checks import KEYPOINT_COUNT_MISMATCH, MALFORMED_ANNOTATION, MISSING_ANNOTATION
from pipelines.schema import ExtraValue, ImageRef, PairRecord, Reject, RejectError, safe_key
from pipelines.sources.files import CsvRow, csv_rows, read_annotation, read_list_file
from pipelines.storage import Location

DATASET = "pfpascal"
SPLITS: tuple[str, ...] = ("trn", "val", "test")

CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
"""The classes in CSV ``class`` order: ``class`` 1 is ``aeroplane``."""

CSV_NAMES: dict[str, tuple[str, ...]] = {
    "trn": ("trn_pairs.csv", "train_pairs.csv", "trn_pairs_pf_pascal.csv", "train_pairs_pf_pascal.csv"),
    "val": ("val_pairs.csv", "val_pairs_pf_pascal.csv"),
    "test": ("test_pairs.csv", "test_pairs_pf_pascal.csv"),
}
"""Per split, the pair-list names the releases use (HPF/NCNet first, then WeakAlign/GeoAware)."""

IMAGE_DIR = "JPEGImages"
ANNOTATION_DIR = "Annotations"
PAIR_COLUMNS = ("source_image", "target_image", "class")
FLIP_COLUMN = "flip"
KEYPOINT_COLUMNS = ("XA", "YA", "XB", "YB")
MATLAB_ORIGIN = 1.0
"""Subtracted from every coordinate: MATLAB centres its first pixel at 1.0, the schema at 0.0."""
MAX_MAT_ELEMENTS = 10_000
"""Bound on the values of ``kps`` and of ``bbox`` in one ``.mat`` (a class has at most a few dozen keypoints)."""


@dataclass(frozen=True)
class MatAnnotation:
    """One image's ``.mat`` content in MATLAB 1-based pixels: ``kps`` ``(N, 2)`` x, y with NaN
    rows where the keypoint is not annotated; ``bbox`` ``(4,)`` x1, y1, x2, y2."""

    kps: np.ndarray
    bbox: np.ndarray


@dataclass(frozen=True)
class _Row:
    """One CSV row's fields, parsed but not yet joined with the ``.mat`` files."""

    src_name: str
    trg_name: str
    class_id: int
    flip: int | None
    keypoint_lists: tuple[str, str, str, str] | None
    """The raw ``XA, YA, XB, YB`` cells, or None when the CSV has no keypoint columns."""

    @property
    def src_stem(self) -> str:
        return _stem(self.src_name)

    @property
    def trg_stem(self) -> str:
        return _stem(self.trg_name)

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_id - 1]

    @property
    def key(self) -> str:
        flip_part = ("flip",) if self.flip == 1 else ()
        return safe_key(self.src_stem, self.trg_stem, *flip_part)


def find_pairs_csv(root: Location, split: str) -> str:
    """The name of ``split``'s pair CSV under ``root``: the first of :data:`CSV_NAMES` that exists.
    :class:`ValueError` for an unknown split, :class:`FileNotFoundError` when none exists."""
    if split not in CSV_NAMES:
        raise ValueError(f"PF-PASCAL has no split {split!r}; choose one of {', '.join(SPLITS)}")
    for name in CSV_NAMES[split]:
        if root.exists(name):
            return name
    raise FileNotFoundError(f"{root.url}: no PF-PASCAL {split} pair list; looked for {', '.join(CSV_NAMES[split])}")


def annotation_path(class_name: str, stem: str) -> str:
    """Where the ``.mat`` of image ``stem`` annotated as ``class_name`` lies, relative to the root."""
    return f"{ANNOTATION_DIR}/{class_name}/{stem}.mat"


def read_mat_annotation(root: Location, rel_path: str) -> MatAnnotation:
    """Parse the ``.mat`` file ``rel_path``; raises :class:`RejectError` when it is missing, not a
    readable MAT file, or lacks a numeric ``kps`` (N x 2) or ``bbox`` (4 values)."""
    try:
        data = read_annotation(root, rel_path)
    except FileNotFoundError:
        raise RejectError(MISSING_ANNOTATION, f"{rel_path} does not exist", rel_path) from None
    try:
        # The variable headers first: a compressed variable can inflate far beyond the file's size.
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(io.BytesIO(data)) if name in ("kps", "bbox")}
        oversized = {name: shape for name, shape in shapes.items() if math.prod(shape) > MAX_MAT_ELEMENTS}
        mat = {} if oversized else scipy.io.loadmat(io.BytesIO(data), variable_names=list(shapes))
    # scipy signals a corrupt file with MatReadError, ValueError, IndexError, OSError, NotImplementedError ...
    except Exception as error:  # noqa: BLE001
        raise RejectError(MALFORMED_ANNOTATION, f"{rel_path} is not a readable MAT file: {error}", rel_path) from None
    if oversized:
        raise RejectError(MALFORMED_ANNOTATION, f"{rel_path}: variables {oversized} hold more than {MAX_MAT_ELEMENTS} values", rel_path)
    kps, bbox = mat.get("kps"), mat.get("bbox")
    if not _is_numeric(kps) or kps.ndim != 2 or kps.shape[1] != 2:
        raise RejectError(MALFORMED_ANNOTATION, f"{rel_path}: 'kps' is {_describe(kps)}, expected an N x 2 number array", rel_path)
    if not _is_numeric(bbox) or bbox.size != 4:
        raise RejectError(MALFORMED_ANNOTATION, f"{rel_path}: 'bbox' is {_describe(bbox)}, expected 1 x 4 numbers", rel_path)
    return MatAnnotation(kps=kps.astype(np.float64), bbox=bbox.astype(np.float64).reshape(4))


def read_pairs(root: Location, split: str) -> Iterator[PairRecord | Reject]:
    """One :class:`PairRecord` or :class:`Reject` per row of ``split``'s pair CSV, in file order.
    :class:`ValueError` when the CSV lacks the columns of the format."""
    csv_name = find_pairs_csv(root, split)
    header, rows = _read_csv(root, csv_name)
    _check_header(header, csv_name)
    annotations = _AnnotationCache(root)
    for csv_row in rows:
        origin = f"{csv_name}:{csv_row.line}"
        item = origin
        try:
            row = _parse_row(header, csv_row, csv_name, origin)
            item = row.key
            yield _pair(row, split, csv_name, origin, annotations)
        except RejectError as problem:
            yield problem.to_reject(item)


class _AnnotationCache:
    """The ``.mat`` files parsed during one :func:`read_pairs` call (images recur in many pairs);
    failures are remembered too, so a missing file is looked up once."""

    def __init__(self, root: Location) -> None:
        self._root = root
        self._parsed: dict[str, MatAnnotation | RejectError] = {}

    def get(self, rel_path: str) -> MatAnnotation:
        if rel_path not in self._parsed:
            try:
                self._parsed[rel_path] = read_mat_annotation(self._root, rel_path)
            except RejectError as problem:
                self._parsed[rel_path] = problem
        parsed = self._parsed[rel_path]
        if isinstance(parsed, RejectError):
            raise RejectError(parsed.reason, parsed.detail, parsed.file)
        return parsed


def _read_csv(root: Location, csv_name: str) -> tuple[list[str], Iterator[CsvRow]]:
    """The header and each non-blank row after it (:func:`pipelines.sources.files.csv_rows`)."""
    return csv_rows(read_list_file(root, csv_name), csv_name)


def _check_header(header: list[str], csv_name: str) -> None:
    missing = [name for name in PAIR_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{csv_name}: header {header} lacks {missing}; not a PF-PASCAL pair list")
    present = [name for name in KEYPOINT_COLUMNS if name in header]
    if present and len(present) != len(KEYPOINT_COLUMNS):
        raise ValueError(f"{csv_name}: header has keypoint columns {present} but not all of {list(KEYPOINT_COLUMNS)}")


def _parse_row(header: list[str], csv_row: CsvRow, csv_name: str, origin: str) -> _Row:
    if csv_row.problem:
        raise RejectError(MALFORMED_ANNOTATION, f"{origin}: {csv_row.problem}", csv_name)
    fields = csv_row.fields
    if len(fields) != len(header):
        raise RejectError(MALFORMED_ANNOTATION, f"{origin} has {len(fields)} fields, the header {len(header)}", csv_name)
    values = dict(zip(header, fields))
    src_name, trg_name = _basename(values["source_image"]), _basename(values["target_image"])
    if not src_name or not trg_name:
        raise RejectError(MALFORMED_ANNOTATION, f"{origin}: empty image path", csv_name)
    class_id = _parse_int(values["class"])
    if class_id is None or not 1 <= class_id <= len(CLASS_NAMES):
        raise RejectError(MALFORMED_ANNOTATION, f"{origin}: class {values['class']!r} is not an integer in 1..{len(CLASS_NAMES)}", csv_name)
    flip = None
    if FLIP_COLUMN in values:
        flip = _parse_int(values[FLIP_COLUMN])
        if flip not in (0, 1):
            raise RejectError(MALFORMED_ANNOTATION, f"{origin}: flip {values[FLIP_COLUMN]!r} is not 0 or 1", csv_name)
    keypoint_lists = tuple(values[name] for name in KEYPOINT_COLUMNS) if KEYPOINT_COLUMNS[0] in values else None
    return _Row(src_name, trg_name, class_id, flip, keypoint_lists)


def _pair(row: _Row, split: str, csv_name: str, origin: str, annotations: _AnnotationCache) -> PairRecord:
    src_mat_path = annotation_path(row.class_name, row.src_stem)
    trg_mat_path = annotation_path(row.class_name, row.trg_stem)
    src_mat, trg_mat = annotations.get(src_mat_path), annotations.get(trg_mat_path)
    if row.keypoint_lists is not None:
        src_kps, trg_kps, kps_ids = _inline_keypoints(row.keypoint_lists, csv_name, origin)
    else:
        src_kps, trg_kps, kps_ids = _both_annotated(src_mat, trg_mat, src_mat_path, trg_mat_path)
    extras: dict[str, ExtraValue] = {"csv": csv_name, "class_id": row.class_id}
    if row.flip is not None:
        extras["flip"] = row.flip
    return PairRecord(
        key=row.key,
        dataset=DATASET,
        split=split,
        category=row.class_name,
        group=row.class_name,
        threshold="img",
        src=ImageRef(safe_key(row.src_stem), f"{IMAGE_DIR}/{row.src_name}"),
        trg=ImageRef(safe_key(row.trg_stem), f"{IMAGE_DIR}/{row.trg_name}"),
        src_kps=src_kps - MATLAB_ORIGIN,
        trg_kps=trg_kps - MATLAB_ORIGIN,
        kps_ids=kps_ids,
        src_bbox=src_mat.bbox - MATLAB_ORIGIN,
        trg_bbox=trg_mat.bbox - MATLAB_ORIGIN,
        origin=origin,
        extras=extras,
    )


def _inline_keypoints(cells: tuple[str, str, str, str], csv_name: str, origin: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keypoints ``(n, 2)`` of both sides from the ``XA, YA, XB, YB`` cells (still 1-based), and
    the positional ids ``0..n-1``."""
    xa, ya, xb, yb = (_float_list(text, name, csv_name, origin) for text, name in zip(cells, KEYPOINT_COLUMNS))
    lengths = {name: len(coords) for name, coords in zip(KEYPOINT_COLUMNS, (xa, ya, xb, yb))}
    if len(set(lengths.values())) != 1:
        raise RejectError(KEYPOINT_COUNT_MISMATCH, f"{origin}: coordinate list lengths differ: {lengths}", csv_name)
    src_kps = np.column_stack([xa, ya]).astype(np.float64).reshape(-1, 2)
    trg_kps = np.column_stack([xb, yb]).astype(np.float64).reshape(-1, 2)
    return src_kps, trg_kps, np.arange(len(xa), dtype=np.int64)


def _both_annotated(
    src: MatAnnotation, trg: MatAnnotation, src_path: str, trg_path: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``.mat`` keypoint rows annotated in both images (still 1-based) and their row indices."""
    if len(src.kps) != len(trg.kps):
        raise RejectError(
            KEYPOINT_COUNT_MISMATCH, f"{src_path} has {len(src.kps)} keypoint rows, {trg_path} {len(trg.kps)}; the same class must have the same", trg_path
        )
    annotated = ~np.isnan(src.kps).any(axis=1) & ~np.isnan(trg.kps).any(axis=1)
    kps_ids = np.flatnonzero(annotated).astype(np.int64)
    return src.kps[kps_ids], trg.kps[kps_ids], kps_ids


def _float_list(text: str, column: str, csv_name: str, origin: str) -> list[float]:
    """``"1.5;2;3"`` -> ``[1.5, 2.0, 3.0]``; an empty cell is an empty list."""
    if not text.strip():
        return []
    try:
        return [float(part) for part in text.split(";")]
    except ValueError:
        raise RejectError(MALFORMED_ANNOTATION, f"{origin}: {column} {text!r} is not a ';'-separated list of numbers", csv_name) from None


def _parse_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _basename(path: str) -> str:
    return path.strip().replace("\\", "/").rsplit("/", 1)[-1]


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_numeric(value: object) -> bool:
    return isinstance(value, np.ndarray) and (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating))


def _describe(value: object) -> str:
    if value is None:
        return "missing"
    if isinstance(value, np.ndarray):
        return f"a {' x '.join(map(str, value.shape))} {value.dtype} array"
    return type(value).__name__
