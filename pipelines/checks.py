"""The validation checklist as pure functions: each returns the reasons a pair cannot be taken.

Readers under ``pipelines.sources`` reject what they cannot parse (a missing or malformed
annotation file, a keypoint list whose parts disagree in length). Everything a parsed pair can
still get wrong is checked here, so every dataset obeys the same rules. Nothing is clamped or
repaired: a pair with one bad keypoint is rejected whole, with the reason and the offending values.
"""

from __future__ import annotations

import dataclasses
import posixpath

import numpy as np

from pipelines.schema import PairRecord, Reject, is_utf8, normalise_extras
from pipelines.storage import PathOutsideRoot, confine

MISSING_ANNOTATION = "missing-annotation"
UNREADABLE_ANNOTATION = "unreadable-annotation"
MALFORMED_ANNOTATION = "malformed-annotation"
PATH_OUTSIDE_ROOT = "path-outside-root"
INCONSISTENT_ANNOTATION = "inconsistent-annotation"
MISSING_IMAGE = "missing-image"
UNREADABLE_IMAGE = "unreadable-image"
TRUNCATED_IMAGE = "truncated-image"
CORRUPT_IMAGE = "corrupt-image"
IMAGE_TOO_LARGE = "image-too-large"
IMAGE_SIZE_MISMATCH = "image-size-mismatch"
KEYPOINT_COUNT_MISMATCH = "keypoint-count-mismatch"
INVALID_KEYPOINT_IDS = "invalid-keypoint-ids"
NO_KEYPOINTS = "no-keypoints"
NAN_KEYPOINTS = "nan-keypoints"
KEYPOINT_OUTSIDE_IMAGE = "keypoint-outside-image"
EMPTY_BBOX = "empty-bbox"
INVERTED_BBOX = "inverted-bbox"
BBOX_OUTSIDE_IMAGE = "bbox-outside-image"
SAME_IMAGE = "same-image"
DUPLICATE_PAIR = "duplicate-pair"
EXCLUDED_IMAGE = "excluded-image"

REASONS: dict[str, str] = {
    MISSING_ANNOTATION: "an annotation file the pair needs does not exist",
    UNREADABLE_ANNOTATION: "an annotation file exists but cannot be read: a directory, FIFO or device, no permission, or too large",
    MALFORMED_ANNOTATION: "an annotation file (JSON, CSV, .mat) cannot be parsed, lacks a field, or a field has the wrong type or range",
    PATH_OUTSIDE_ROOT: "a path the annotation gives is absolute or climbs out of the dataset root with '..'",
    INCONSISTENT_ANNOTATION: "annotation fields contradict each other or the file's location",
    MISSING_IMAGE: "an image file the pair needs does not exist",
    UNREADABLE_IMAGE: "an image file is not a decodable JPEG or PNG",
    TRUNCATED_IMAGE: "an image file ends before its end-of-image marker",
    CORRUPT_IMAGE: (
        "a JPEG's compressed data is damaged: a scan holds an invalid code, too few or too many bytes for its"
        " blocks, or misplaced restart markers (checked with --full-decode; PIL decodes such data without an error)"
    ),
    IMAGE_TOO_LARGE: "an image file has more bytes or pixels than pipelines.imageio allows (a decompression bomb guard)",
    IMAGE_SIZE_MISMATCH: "the image size in the annotation differs from the image file",
    KEYPOINT_COUNT_MISMATCH: "source keypoints, target keypoints and keypoint ids differ in number",
    INVALID_KEYPOINT_IDS: "a keypoint id repeats within the pair, or is not an integer in [0, MAX_KEYPOINT_ID]",
    NO_KEYPOINTS: "the pair has no keypoint annotated in both images",
    NAN_KEYPOINTS: "a keypoint coordinate is NaN or infinite",
    KEYPOINT_OUTSIDE_IMAGE: "a keypoint lies outside its image",
    EMPTY_BBOX: "a bounding box has zero width or height",
    INVERTED_BBOX: "a bounding box has x2 < x1 or y2 < y1",
    BBOX_OUTSIDE_IMAGE: "a bounding box reaches more than one pixel outside its image",
    SAME_IMAGE: "source and target are the same image",
    DUPLICATE_PAIR: "the pair was already listed earlier in the input",
    EXCLUDED_IMAGE: "an image left out by the benchmark's own protocol (e.g. AP-10K crowd images)",
}

MAX_KEYPOINT_ID = 2**16 - 1
"""The largest keypoint id a pair may carry. Ids name semantic points (SPair-71k has at most 30 per
category, AP-10K 17); evaluation records one row per ``(pair, id)``, so an id must be unique within
its pair, and a bound keeps per-id tables small."""

BBOX_TOLERANCE_PX = 1.0
"""How far a box corner may reach past the pixel-centre frame: VOC-style inclusive boxes of
SPair-71k and PF-PASCAL legitimately end on the last pixel's outer edge."""


def check_pair(pair: PairRecord) -> list[Reject]:
    """Checks that need no image: image paths inside the dataset root, text and extra fields the
    index can hold, counts, NaN, bboxes, self-pairs."""
    reasons = _check_paths(pair) + _check_fields(pair)
    counts = (len(pair.src_kps), len(pair.trg_kps), len(pair.kps_ids))
    if len(set(counts)) != 1:
        reasons.append(_reject(pair, KEYPOINT_COUNT_MISMATCH, f"{counts[0]} source, {counts[1]} target keypoints, {counts[2]} ids"))
    elif counts[0] == 0:
        reasons.append(_reject(pair, NO_KEYPOINTS, "0 keypoints"))
    reasons.extend(_check_keypoint_ids(pair))
    for side, kps in (("source", pair.src_kps), ("target", pair.trg_kps)):
        bad_rows = np.flatnonzero(~np.isfinite(kps).all(axis=1)) if len(kps) else []
        if len(bad_rows):
            reasons.append(_reject(pair, NAN_KEYPOINTS, f"{side} keypoint rows {list(map(int, bad_rows))} are not finite"))
    for side, bbox in (("source", pair.src_bbox), ("target", pair.trg_bbox)):
        reasons.extend(_check_bbox_shape(pair, side, bbox))
    if posixpath.normpath(pair.src.path) == posixpath.normpath(pair.trg.path):
        reasons.append(_reject(pair, SAME_IMAGE, f"both sides are {pair.src.path}"))
    return reasons


def normalised(pair: PairRecord) -> PairRecord:
    """``pair`` as the shard stage stores it, for a pair :func:`check_pair` found nothing wrong
    with: image paths normalised (``a/./b.jpg`` -> ``a/b.jpg``, as a root's listing names them) and
    extras in their declared types, so every index column has one type."""
    return dataclasses.replace(
        pair,
        src=dataclasses.replace(pair.src, path=confine(pair.src.path)),
        trg=dataclasses.replace(pair.trg, path=confine(pair.trg.path)),
        extras=normalise_extras(pair.dataset, pair.extras),
    )


def _check_paths(pair: PairRecord) -> list[Reject]:
    """Image paths must stay inside the dataset root (the same lexical rule
    :class:`pipelines.storage.Location` enforces), whatever the reader derived them from."""
    for side, ref in (("source", pair.src), ("target", pair.trg)):
        try:
            confine(ref.path, "the dataset root")
        except PathOutsideRoot as error:
            return [_reject(pair, PATH_OUTSIDE_ROOT, f"{side} image path {error}")]
    return []


def _check_fields(pair: PairRecord) -> list[Reject]:
    """The fields that become index columns: UTF-8 text, and extras of the types
    :data:`pipelines.schema.EXTRA_FIELDS` declares for the dataset (see
    :func:`pipelines.schema.normalise_extras`, which the shard stage then applies)."""
    for name in ("category", "group", "origin"):
        if not is_utf8(getattr(pair, name)):
            return [_reject(pair, MALFORMED_ANNOTATION, f"{name} {getattr(pair, name)!r} is not UTF-8 text")]
    try:
        normalise_extras(pair.dataset, pair.extras)
    except ValueError as error:
        return [_reject(pair, MALFORMED_ANNOTATION, str(error))]
    return []


def _check_keypoint_ids(pair: PairRecord) -> list[Reject]:
    """Keypoint ids are integers in ``[0, MAX_KEYPOINT_ID]``, none twice: evaluation keys its
    records by ``(pair, id)``, so a repeated id would score a point twice."""
    ids = np.asarray(pair.kps_ids)
    if ids.size == 0:
        return []
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        return [_reject(pair, INVALID_KEYPOINT_IDS, f"kps_ids {ids.tolist()!r} are not a list of integers")]
    outside = [int(i) for i in ids if not 0 <= int(i) <= MAX_KEYPOINT_ID]
    if outside:
        return [_reject(pair, INVALID_KEYPOINT_IDS, f"kps_ids {outside[:5]} outside [0, {MAX_KEYPOINT_ID}]")]
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        return [_reject(pair, INVALID_KEYPOINT_IDS, f"kps_ids repeat {values[counts > 1].tolist()[:5]}")]
    return []


def _check_bbox_shape(pair: PairRecord, side: str, bbox: np.ndarray) -> list[Reject]:
    if bbox.shape != (4,) or not np.isfinite(bbox).all():
        return [_reject(pair, MALFORMED_ANNOTATION, f"{side} bbox {bbox.tolist()} is not 4 finite numbers")]
    x1, y1, x2, y2 = bbox
    if x2 < x1 or y2 < y1:
        return [_reject(pair, INVERTED_BBOX, f"{side} bbox {bbox.tolist()}")]
    if x2 == x1 or y2 == y1:
        return [_reject(pair, EMPTY_BBOX, f"{side} bbox {bbox.tolist()}")]
    return []


def check_against_images(pair: PairRecord, src_size: tuple[int, int], trg_size: tuple[int, int]) -> list[Reject]:
    """Checks against the real image sizes ``(W, H)``: declared sizes, keypoints inside
    ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``, bboxes inside that frame widened by
    :data:`BBOX_TOLERANCE_PX`."""
    reasons = []
    for side, ref, size, kps, bbox in (
        ("source", pair.src, src_size, pair.src_kps, pair.src_bbox),
        ("target", pair.trg, trg_size, pair.trg_kps, pair.trg_bbox),
    ):
        if ref.declared_size is not None and tuple(ref.declared_size) != tuple(size):
            reasons.append(
                _reject(pair, IMAGE_SIZE_MISMATCH, f"{side} annotation says {list(ref.declared_size)}, {ref.path} is {list(size)} (W, H)", ref.path)
            )
            continue
        width, height = size
        if len(kps) and np.isfinite(kps).all():
            outside = np.flatnonzero(
                (kps[:, 0] < -0.5) | (kps[:, 0] > width - 0.5) | (kps[:, 1] < -0.5) | (kps[:, 1] > height - 0.5)
            )
            if len(outside):
                rows = {int(i): kps[i].tolist() for i in outside}
                reasons.append(_reject(pair, KEYPOINT_OUTSIDE_IMAGE, f"{side} keypoints {rows} outside a {width}x{height} image"))
        if bbox.shape == (4,) and np.isfinite(bbox).all():
            low, tol = -0.5 - BBOX_TOLERANCE_PX, BBOX_TOLERANCE_PX
            if bbox[0] < low or bbox[1] < low or bbox[2] > width - 0.5 + tol or bbox[3] > height - 0.5 + tol:
                reasons.append(_reject(pair, BBOX_OUTSIDE_IMAGE, f"{side} bbox {bbox.tolist()} outside a {width}x{height} image"))
    return reasons


def _reject(pair: PairRecord, reason: str, detail: str, file: str | None = None) -> Reject:
    return Reject(item=pair.key, file=file or pair.origin, reason=reason, detail=detail)
