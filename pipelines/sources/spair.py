"""SPair-71k: pairs listed in ``Layout/large/<split>.txt``, one PairAnnotation JSON each.

Layout read (see ``datasets.md`` section 1)::

    Layout/large/{trn,val,test}.txt          one pair name per line, e.g.
                                             000009-2008_001546-2009_000327:aeroplane
    PairAnnotation/<split>/<name>.json       the pair: keypoints, boxes, sizes, difficulty flags
    JPEGImages/<category>/<imname>           the images (opened by the shard stage, not here)

Every non-blank Layout line is a pair, the last one included when the file lacks a trailing
newline (the HPF/CATs/DHPF/CHM loaders drop the last element of ``split("\\n")`` and so lose a
pair on such a file). A missing Layout file is a usage error (:class:`FileNotFoundError`), not a
reject; so is one that cannot be read at all (:class:`ValueError`), while a line that is not UTF-8
is that line's reject.

Coordinates
-----------
SPair-71k stores keypoints as integer pixel coordinates ``[x, y]`` and boxes as
``[x1, y1, x2, y2]`` integer pixel corners (the pixels of the first and last column and row of
the object, VOC style). No public loader shifts them and DIFT indexes feature maps with them
directly, so they are already 0-based with pixel centres on the integers, which is the schema
frame: keypoints and boxes are taken **as stored**, with no conversion. An inclusive box may end
on the last pixel, whose outer edge is ``W - 0.5``; :data:`pipelines.checks.BBOX_TOLERANCE_PX`
allows for it. ``src_imsize``/``trg_imsize`` are ``[W, H, C]``; ``[:2]`` is the declared size.

Per pair, the reader rejects (one item per Layout line):

- ``missing-annotation``: the PairAnnotation JSON does not exist;
- ``unreadable-annotation``: it is a directory, FIFO or other non-file, or too large
  (:func:`pipelines.sources.files.read_annotation`);
- ``malformed-annotation``: the JSON does not parse within the bounds of :mod:`pipelines.jsonio`
  (depth, number length, finite numbers, unique keys, UTF-8), a field is missing or of the wrong
  type, or the Layout line is not UTF-8 or not ``<id>-<src stem>-<trg stem>:<category>``;
- ``inconsistent-annotation``: ``category`` differs from the name's ``:<category>``, an image
  name's stem differs from the stem in the pair name, or ``kps_ids`` are not integers (strings of
  integers are accepted) in ``[0, 29]`` or not unique;
- ``keypoint-count-mismatch``: ``src_kps``, ``trg_kps`` and ``kps_ids`` differ in length.

A ``null`` keypoint or coordinate becomes NaN and is left for the shard stage to reject, as are
difficulty flags outside their ranges and other extras the index cannot hold
(:data:`pipelines.schema.EXTRA_FIELDS`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipelines.checks import (
    INCONSISTENT_ANNOTATION,
    KEYPOINT_COUNT_MISMATCH,
    MALFORMED_ANNOTATION,
    MISSING_ANNOTATION,
)
from pipelines.schema import ExtraValue, ImageRef, PairRecord, Reject, RejectError, is_utf8, safe_key
from pipelines.sources.files import parse_json, read_annotation, read_list_file
from pipelines.storage import Location

SPLITS = ("trn", "val", "test")
DATASET = "spair"
MAX_KEYPOINT_ID = 29
"""SPair-71k images have 30 keypoint slots, ids 0..29."""

_PAIR_NAME = re.compile(r"(?P<id>\d+)-(?P<src>[^-:/]+)-(?P<trg>[^-:/]+):(?P<category>[^:/]+)")
_INT_STRING = re.compile(r"[+-]?\d+")
_DIFFICULTY_FIELDS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")


def layout_path(split: str) -> str:
    """The Layout list of ``split``, relative to the dataset root."""
    return f"Layout/large/{split}.txt"


def annotation_path(split: str, name: str) -> str:
    """The PairAnnotation JSON of pair ``name``, relative to the dataset root."""
    return f"PairAnnotation/{split}/{name}.json"


def read_pairs(root: Location, split: str) -> Iterator[PairRecord | Reject]:
    """Every pair of ``Layout/large/<split>.txt`` under ``root``, in Layout order."""
    return read_spair_layout(root, split, DATASET)


def read_spair_layout(root: Location, split: str, dataset: str = DATASET) -> Iterator[PairRecord | Reject]:
    """Read a dataset in the SPair-71k layout, labelling its records ``dataset``.

    The Layout list is read at once, so a missing list raises :class:`FileNotFoundError` here
    rather than on the first iteration; the pairs are then parsed lazily, one item per line.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    names = layout_names(root, split)
    return (_read_pair(root, split, name, line, dataset) for line, name in names)


def layout_names(root: Location, split: str) -> list[tuple[int, str]]:
    """``(line number, pair name)`` of every non-blank line of the split's Layout list."""
    path = layout_path(split)
    try:
        data = read_list_file(root, path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{root.full(path)}: no SPair-71k Layout list for split {split!r}") from error
    # Undecodable bytes survive as surrogates, so that only their line is rejected (_read_pair).
    text = data.decode("utf-8", errors="surrogateescape")
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _read_pair(root: Location, split: str, name: str, line: int, dataset: str) -> PairRecord | Reject:
    origin = annotation_path(split, name)
    if not is_utf8(name):
        detail = f"line {line} {name!r} is not UTF-8 text"
        return Reject(item=safe_key(name), file=layout_path(split), reason=MALFORMED_ANNOTATION, detail=detail)
    match = _PAIR_NAME.fullmatch(name)
    if match is None:
        detail = f"line {line} {name!r} is not <id>-<source stem>-<target stem>:<category>"
        return Reject(item=safe_key(name), file=layout_path(split), reason=MALFORMED_ANNOTATION, detail=detail)
    try:
        return _parse_pair(read_annotation(root, origin), name, match, split, dataset, origin)
    except FileNotFoundError:
        return Reject(item=safe_key(name), file=origin, reason=MISSING_ANNOTATION, detail=f"{origin} does not exist (Layout line {line})")
    except RejectError as rejected:
        return rejected.to_reject(safe_key(name), origin)


def _parse_pair(raw: bytes, name: str, match: re.Match[str], split: str, dataset: str, origin: str) -> PairRecord:
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise RejectError(MALFORMED_ANNOTATION, f"top level is a {type(doc).__name__}, not an object")

    category = _field(doc, "category", str)
    src_imname, trg_imname = _field(doc, "src_imname", str), _field(doc, "trg_imname", str)
    src_size, trg_size = _image_size(doc, "src_imsize"), _image_size(doc, "trg_imsize")
    src_bbox, trg_bbox = _bbox(doc, "src_bndbox"), _bbox(doc, "trg_bndbox")
    src_kps, trg_kps = _keypoints(doc, "src_kps"), _keypoints(doc, "trg_kps")
    raw_ids = _field(doc, "kps_ids", list)
    extras = _extras(doc)

    if category != match["category"]:
        raise RejectError(INCONSISTENT_ANNOTATION, f"category {category!r} but the pair name says {match['category']!r}")
    for side, imname, stem in (("src", src_imname, match["src"]), ("trg", trg_imname, match["trg"])):
        if _stem(imname) != stem:
            raise RejectError(INCONSISTENT_ANNOTATION, f"{side}_imname {imname!r} but the pair name says {stem!r}")
    kps_ids = _keypoint_ids(raw_ids)
    counts = (len(src_kps), len(trg_kps), len(kps_ids))
    if len(set(counts)) != 1:
        raise RejectError(KEYPOINT_COUNT_MISMATCH, f"{counts[0]} src_kps, {counts[1]} trg_kps, {counts[2]} kps_ids")

    return PairRecord(
        key=safe_key(name),
        dataset=dataset,
        split=split,
        category=category,
        group=category,
        threshold="bbox",
        src=_image_ref(category, src_imname, src_size),
        trg=_image_ref(category, trg_imname, trg_size),
        src_kps=src_kps,
        trg_kps=trg_kps,
        kps_ids=kps_ids,
        src_bbox=src_bbox,
        trg_bbox=trg_bbox,
        origin=origin,
        extras=extras,
    )


def _image_ref(category: str, imname: str, size: tuple[int, int]) -> ImageRef:
    return ImageRef(key=safe_key(category, _stem(imname)), path=f"JPEGImages/{category}/{imname}", declared_size=size)


def _stem(imname: str) -> str:
    """``"2008_001546.jpg"`` -> ``"2008_001546"``."""
    return imname.rsplit(".", 1)[0]


def _field(doc: dict[str, Any], key: str, kind: type) -> Any:
    if key not in doc:
        raise RejectError(MALFORMED_ANNOTATION, f"field {key!r} is missing")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RejectError(MALFORMED_ANNOTATION, f"field {key!r} is {value!r}, expected {kind.__name__}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _image_size(doc: dict[str, Any], key: str) -> tuple[int, int]:
    """``[W, H, C]`` -> ``(W, H)``."""
    value = _field(doc, key, list)
    if len(value) < 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RejectError(MALFORMED_ANNOTATION, f"field {key!r} is {value!r}, expected [W, H, C] integers")
    return int(value[0]), int(value[1])


def _bbox(doc: dict[str, Any], key: str) -> np.ndarray:
    """``[x1, y1, x2, y2]`` -> ``(4,)`` float64, as stored."""
    value = _field(doc, key, list)
    if len(value) != 4 or not all(_is_number(v) for v in value):
        raise RejectError(MALFORMED_ANNOTATION, f"field {key!r} is {value!r}, expected [x1, y1, x2, y2] numbers")
    return np.asarray(value, dtype=np.float64)


def _keypoints(doc: dict[str, Any], key: str) -> np.ndarray:
    """A list of ``[x, y]`` -> ``(N, 2)`` float64; ``null`` (a point or a coordinate) -> NaN."""
    value = _field(doc, key, list)
    try:  # the common case, all numbers, at C speed; anything else is checked point by point
        points = np.array(value)
        if (
            points.dtype.kind in "if"
            and points.shape == (len(value), 2)
            and not any(type(v) is bool for point in value for v in point)
        ):
            return points.astype(np.float64)
    except ValueError:  # ragged rows
        pass
    rows = []
    for index, point in enumerate(value):
        if point is None:
            point = [None, None]
        if not isinstance(point, list) or len(point) != 2 or not all(v is None or _is_number(v) for v in point):
            raise RejectError(MALFORMED_ANNOTATION, f"{key}[{index}] is {point!r}, expected [x, y] numbers")
        rows.append([math.nan if v is None else float(v) for v in point])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def _keypoint_ids(raw_ids: list[Any]) -> np.ndarray:
    """``kps_ids`` (ints or strings of ints) -> ``(N,)`` int64, each in ``[0, 29]``, unique."""
    ids = []
    for index, value in enumerate(raw_ids):
        if isinstance(value, str) and _INT_STRING.fullmatch(value.strip()):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_KEYPOINT_ID:
            raise RejectError(INCONSISTENT_ANNOTATION, f"kps_ids[{index}] is {raw_ids[index]!r}, expected an integer in [0, {MAX_KEYPOINT_ID}]")
        ids.append(value)
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise RejectError(INCONSISTENT_ANNOTATION, f"kps_ids {raw_ids!r} repeat {repeated}")
    return np.asarray(ids, dtype=np.int64)


def _extras(doc: dict[str, Any]) -> dict[str, ExtraValue]:
    """The difficulty flags (ints), the poses as stored, and ``mirror`` when present."""
    extras: dict[str, ExtraValue] = {key: _field(doc, key, int) for key in _DIFFICULTY_FIELDS}
    for key in ("src_pose", "trg_pose"):
        value = _field(doc, key, object)
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise RejectError(MALFORMED_ANNOTATION, f"field {key!r} is {value!r}, expected a pose name or number")
        extras[key] = value
    if "mirror" in doc:
        extras["mirror"] = _field(doc, "mirror", int)
    return extras
