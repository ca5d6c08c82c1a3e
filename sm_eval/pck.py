"""The PCK protocol: thresholds, hits, per-keypoint records and their aggregation.

This module is the only place the protocol is defined. Training validation and ``sm_eval`` both use it.
Everything here is plain numpy; the resize convention is :mod:`sm_model.pixels`'s.

Protocol
--------
* Coordinates follow :mod:`pipelines.schema`: ``(x, y)`` pixels of the original image, 0-based,
  pixel centres on integers.
* A keypoint is correct at ``alpha`` when ``||pred - gt||_2 <= alpha * base``. ``rule="<"`` gives
  the strict variant that GeoAware and sd-dino use.
* ``base`` comes from the *target* image (:func:`threshold_base`):
  * ``bbox`` is the max side of the bbox, with no ``+1``.
  * ``img`` is the max side of the image.
  * ``bbox-kp`` is the max side of the box around the *valid* keypoints only. The official
    PF-WILLOW code also took min/max over ``-1`` padding, which inflated the threshold.
* Frames (:data:`FRAMES`): ``original`` measures distances and thresholds in the original image.
  ``resized`` is the frame of the SimpleMatch paper (its official code) and of the survey:
  predictions, ground truth and the threshold base all move into the anisotropically resized
  ``S x S`` network input (:func:`sm_model.pixels.to_resized_square`). There, a bbox base is
  measured on the resized box, the ``bbox-kp`` base on the resized keypoints, and the ``img`` base
  is ``S``. Records are made in the original frame and carry what the resized frame needs (``S``,
  the target size, the resized base), so one set of records scores both
  (:func:`records_in_frame`). The resize is affine per axis, so a shift in where the convention
  puts pixel centres moves prediction and ground truth alike and never changes a distance.
* Averages (:func:`summarize`):
  * *per image* is the mean over pairs of each pair's fraction of correct keypoints.
  * *per keypoint* is total correct / total keypoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np

from pipelines.schema import THRESHOLD_KINDS
from sm_model.pixels import to_resized_square

Rule = Literal["<=", "<"]
Frame = Literal["original", "resized"]
FRAMES: tuple[str, ...] = ("original", "resized")
RULES: tuple[str, ...] = ("<=", "<")
FLAG_COLUMNS: tuple[str, ...] = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
RESIZE_COLUMNS: tuple[str, ...] = ("input_size", "trg_width", "trg_height", "threshold_base_resized")


def frame_square(frame: str) -> int | None:
    """The side ``S`` of a record frame name (``"resized-<S>"``), ``None`` for ``"original"``."""
    if frame == "original":
        return None
    prefix, _, side = frame.partition("-")
    if prefix != "resized" or not side.isdigit():
        raise ValueError(f"unknown record frame {frame!r}; expected 'original' or 'resized-<S>'")
    return int(side)


def _max_side(lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.max(hi - lo))


def threshold_base(
    kind: str,
    trg_bbox: np.ndarray,
    trg_size: tuple[int, int],
    trg_kps: np.ndarray,
    valid: np.ndarray,
) -> float:
    """The threshold base (the threshold at ``alpha = 1``) of one pair, in the frame of its inputs.

    Shapes: ``trg_bbox`` ``(4,)`` as ``(x1, y1, x2, y2)``; ``trg_size`` ``(W, H)``; ``trg_kps``
    ``(N, 2)``; ``valid`` ``(N,)`` bool. Only ``bbox-kp`` reads the keypoints, and only the valid rows.
    """
    if kind == "bbox":
        box = np.asarray(trg_bbox, dtype=np.float64).reshape(2, 2)
        return _max_side(box[0], box[1])
    if kind == "img":
        return float(max(trg_size))
    if kind == "bbox-kp":
        kps = np.asarray(trg_kps, dtype=np.float64).reshape(-1, 2)[np.asarray(valid, dtype=bool)]
        if len(kps) == 0:
            raise ValueError("bbox-kp threshold needs at least one valid target keypoint")
        return _max_side(kps.min(axis=0), kps.max(axis=0))
    raise ValueError(f"unknown threshold kind {kind!r}; expected one of {THRESHOLD_KINDS}")


def keypoint_hits(
    pred: np.ndarray,
    gt: np.ndarray,
    base: float | np.ndarray,
    alphas: Sequence[float],
    rule: str = "<=",
) -> np.ndarray:
    """Which keypoints fall within ``alpha * base`` of their ground truth, for each alpha.

    Shapes: ``pred``/``gt`` ``(N, 2)``; ``base`` is a scalar or ``(N,)`` (one base per keypoint).
    Returns ``(len(alphas), N)`` bool.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    diff = np.asarray(pred, dtype=np.float64).reshape(-1, 2) - np.asarray(gt, dtype=np.float64).reshape(-1, 2)
    dist = np.hypot(diff[:, 0], diff[:, 1])
    thresholds = np.asarray(alphas, dtype=np.float64)[:, None] * np.asarray(base, dtype=np.float64)
    return dist <= thresholds if rule == "<=" else dist < thresholds


@dataclass
class KeypointRecords:
    """Per-keypoint records, the unit all aggregation works on. Every column is an ``(M,)`` numpy array.

    Coordinates and ``threshold_base`` are stored in the record's ``frame``: ``"original"``, or
    ``"resized-<S>"`` for the ``S x S`` frame. A flag column is ``None`` when the dataset has no
    such flag. The resize columns (``None`` when the records were made without ``S``) let
    :func:`records_in_frame` move original records into the resized frame: ``input_size`` is the
    side ``S`` of the network input, ``trg_width``/``trg_height`` the original target size and
    ``threshold_base_resized`` the threshold base measured in the ``S x S`` frame. :meth:`to_dict`
    gives a dict of arrays that ``pyarrow.table`` accepts directly.
    """

    pair_key: np.ndarray
    kp_id: np.ndarray
    category: np.ndarray
    pred_x: np.ndarray
    pred_y: np.ndarray
    gt_x: np.ndarray
    gt_y: np.ndarray
    threshold_base: np.ndarray
    frame: np.ndarray
    viewpoint_variation: np.ndarray | None = None
    scale_variation: np.ndarray | None = None
    truncation: np.ndarray | None = None
    occlusion: np.ndarray | None = None
    input_size: np.ndarray | None = None
    trg_width: np.ndarray | None = None
    trg_height: np.ndarray | None = None
    threshold_base_resized: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pair_key)

    def flags(self) -> dict[str, np.ndarray]:
        """The flag columns that are present, by name."""
        return {name: getattr(self, name) for name in FLAG_COLUMNS if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, np.ndarray]:
        """The columns that are present, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, columns: Mapping[str, Any]) -> KeypointRecords:
        """Rebuild records from :meth:`to_dict` output or from ``pyarrow.Table.to_pydict()``."""
        return cls(**{name: np.asarray(values) for name, values in columns.items()})

    def take(self, index: np.ndarray) -> KeypointRecords:
        """The records at ``index``, an ``(K,)`` int array or an ``(M,)`` bool mask."""
        return KeypointRecords(**{name: values[index] for name, values in self.to_dict().items()})

    @classmethod
    def concat(cls, parts: Sequence[KeypointRecords]) -> KeypointRecords:
        """All records of ``parts``. Every part must carry the same set of flag columns."""
        if not parts:
            raise ValueError("concat needs at least one KeypointRecords")
        names = set(parts[0].to_dict())
        if any(set(part.to_dict()) != names for part in parts):
            raise ValueError("cannot concatenate records with different flag columns or resize columns")
        return cls(**{name: np.concatenate([part.to_dict()[name] for part in parts]) for name in names})


def records_for_pair(
    pair_key: str,
    category: str,
    pred: np.ndarray,
    trg_kps: np.ndarray,
    valid: np.ndarray,
    kps_ids: np.ndarray,
    kind: str,
    trg_bbox: np.ndarray,
    trg_size: tuple[int, int],
    frame: Frame = "original",
    square: int | None = None,
    flags: Mapping[str, int] | None = None,
) -> KeypointRecords:
    """Records for the valid keypoints of one pair. Padding rows never become records.

    Inputs are in the original target image. ``pred``/``trg_kps`` ``(N, 2)``; ``valid`` ``(N,)``
    bool; ``kps_ids`` ``(N,)``; ``trg_bbox`` ``(4,)`` as ``(x1, y1, x2, y2)``; ``trg_size``
    ``(W, H)``. ``square``, the side ``S`` of the network input, fills the resize columns, so the
    records score in both frames (:func:`records_in_frame`). With ``frame="resized"`` (which needs
    ``square``) the records come back already moved into the ``S x S`` frame. ``flags`` holds
    per-pair difficulty values, keyed by names in :data:`FLAG_COLUMNS`. Returns ``K`` records,
    where ``K = valid.sum()``.
    """
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; expected one of {FRAMES}")
    if frame == "resized" and square is None:
        raise ValueError("frame='resized' needs square=S")
    unknown = set(flags or {}) - set(FLAG_COLUMNS)
    if unknown:
        raise ValueError(f"unknown flag columns {sorted(unknown)}; expected some of {FLAG_COLUMNS}")
    valid = np.asarray(valid, dtype=bool)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    gt = np.asarray(trg_kps, dtype=np.float64).reshape(-1, 2)
    bbox = np.asarray(trg_bbox, dtype=np.float64)
    count = int(valid.sum())
    columns = {name: np.full(count, int(value), dtype=np.int64) for name, value in (flags or {}).items()}
    if square is not None:
        resized_bbox = to_resized_square(bbox.reshape(2, 2), trg_size, square).reshape(4)
        resized_gt = to_resized_square(gt, trg_size, square)
        columns |= {
            "input_size": np.full(count, square, dtype=np.int64),
            "trg_width": np.full(count, trg_size[0], dtype=np.int64),
            "trg_height": np.full(count, trg_size[1], dtype=np.int64),
            "threshold_base_resized": np.full(
                count, threshold_base(kind, resized_bbox, (square, square), resized_gt, valid)
            ),
        }
    base = threshold_base(kind, bbox, trg_size, gt, valid)
    pred, gt = pred[valid], gt[valid]
    records = KeypointRecords(
        pair_key=np.full(count, pair_key, dtype=object),
        kp_id=np.asarray(kps_ids, dtype=np.int64)[valid],
        category=np.full(count, category, dtype=object),
        pred_x=pred[:, 0],
        pred_y=pred[:, 1],
        gt_x=gt[:, 0],
        gt_y=gt[:, 1],
        threshold_base=np.full(count, base),
        frame=np.full(count, "original", dtype=object),
        **columns,
    )
    return records_in_frame(records, frame)


def records_in_frame(records: KeypointRecords, frame: str) -> KeypointRecords:
    """``records`` scored in ``frame`` (one of :data:`FRAMES`).

    ``"original"`` returns original-frame records as they are. ``"resized"`` moves original-frame
    records into each record's ``S x S`` frame (``input_size``): predictions and ground truth
    through :func:`~sm_model.pixels.to_resized_square`, the base from ``threshold_base_resized``,
    the frame renamed ``"resized-<S>"``; records already in a resized frame come back as they are.
    Raises ``ValueError`` for resized records asked for in the original frame, and for original
    records without the resize columns asked for in the resized frame.
    """
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; expected one of {FRAMES}")
    names = {str(name) for name in records.frame}
    if names <= {"original"}:
        if frame == "original":
            return records
    elif "original" in names:
        raise ValueError(f"records mix frames {sorted(names)}")
    elif frame == "resized":
        return records
    else:
        raise ValueError(f"records in frame {sorted(names)} cannot be moved back to the original frame")
    missing = [name for name in RESIZE_COLUMNS if getattr(records, name) is None]
    if missing:
        raise ValueError(f"records without {missing} cannot be moved into the resized frame: make them with square=S")
    pred = np.stack([records.pred_x, records.pred_y], axis=1).astype(np.float64)
    gt = np.stack([records.gt_x, records.gt_y], axis=1).astype(np.float64)
    frame_names = np.empty(len(records), dtype=object)
    sizes = np.stack([records.trg_width, records.trg_height, records.input_size], axis=1).astype(np.int64)
    unique, inverse = np.unique(sizes, axis=0, return_inverse=True)
    for group, (width, height, square) in enumerate(unique.tolist()):
        rows = inverse.reshape(-1) == group
        pred[rows] = to_resized_square(pred[rows], (width, height), square)
        gt[rows] = to_resized_square(gt[rows], (width, height), square)
        frame_names[rows] = f"resized-{square}"
    return replace(
        records,
        pred_x=pred[:, 0],
        pred_y=pred[:, 1],
        gt_x=gt[:, 0],
        gt_y=gt[:, 1],
        threshold_base=np.asarray(records.threshold_base_resized, dtype=np.float64),
        frame=frame_names,
    )


def _scores(hits: np.ndarray, pair_index: np.ndarray) -> dict[str, Any]:
    """Both averages over one group of records. ``hits`` is ``(A, K)`` bool and ``pair_index``
    is ``(K,)`` int, where a lower index means an earlier pair key in sorted order. Counts are
    integers, and per-pair fractions are averaged in sorted pair order, so the result does not
    depend on the order of the records."""
    pairs, inverse = np.unique(pair_index, return_inverse=True)
    per_pair_total = np.bincount(inverse, minlength=len(pairs))
    per_image, per_keypoint = [], []
    for row in hits:
        per_pair_correct = np.bincount(inverse[row], minlength=len(pairs))
        per_image.append(float(np.mean(per_pair_correct / per_pair_total)))
        per_keypoint.append(int(row.sum()) / hits.shape[1])
    return {"per_image": per_image, "per_keypoint": per_keypoint, "n_pairs": len(pairs), "n_keypoints": hits.shape[1]}


def _grouped(values: np.ndarray, hits: np.ndarray, pair_index: np.ndarray) -> dict[Any, dict[str, Any]]:
    groups = np.unique(values)
    return {_plain(group): _scores(hits[:, values == group], pair_index[values == group]) for group in groups}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def summarize(records: KeypointRecords, alphas: Sequence[float], rule: str = "<=") -> dict[str, Any]:
    """PCK over ``records``, overall, per category, and per value of each flag column present.

    Each group holds ``per_image`` and ``per_keypoint`` lists of fractions in ``[0, 1]``, in the
    same order as ``alphas``, along with ``n_pairs`` and ``n_keypoints``. ``protocol`` states the
    rule, the averaging and the frame. Mixing frames is an error.
    """
    if len(records) == 0:
        raise ValueError("summarize needs at least one record")
    frames = sorted({str(f) for f in records.frame})
    if len(frames) > 1:
        raise ValueError(f"records mix frames {frames}")
    pred = np.stack([records.pred_x, records.pred_y], axis=1).astype(np.float64)
    gt = np.stack([records.gt_x, records.gt_y], axis=1).astype(np.float64)
    hits = keypoint_hits(pred, gt, records.threshold_base.astype(np.float64), alphas, rule)
    _, pair_index = np.unique(records.pair_key.astype(str), return_inverse=True)
    return {
        "protocol": {
            "rule": f"||pred - gt||_2 {rule} alpha * threshold_base",
            "frame": frames[0],
            "per_image": "mean over pairs of the pair's fraction of correct keypoints",
            "per_keypoint": "total correct keypoints / total keypoints",
        },
        "alphas": [float(a) for a in alphas],
        "overall": _scores(hits, pair_index),
        "per_category": _grouped(records.category.astype(str), hits, pair_index),
        "per_flag": {name: _grouped(values, hits, pair_index) for name, values in records.flags().items()},
    }
