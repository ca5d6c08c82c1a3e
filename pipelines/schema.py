"""The pair sample: the one contract between shards and every consumer.

Coordinates
-----------
Every keypoint is ``(x, y)`` in pixels of the *original* image, 0-based, with pixel ``(0, 0)``
centred at ``(0.0, 0.0)``; the image covers ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``. Bounding boxes
are ``(x1, y1, x2, y2)`` in the same frame. How each benchmark's native convention maps onto this
frame is stated in the module docstring of its reader under ``pipelines.sources``.

On disk (see ``pipelines.shard``) a shard holds image entries first (``<image_key>.jpg|png`` with
the original encoded bytes and ``<image_key>.json`` with an :class:`ImageInfo`), then pair entries
(``<pair_key>.pair.json`` with a :func:`pair_to_json` document that names both image keys).
Everything is JSON; nothing is pickled. ``index.parquet`` records the sha256 of every pair's
document and images (:data:`DIGEST_FIELDS`, :func:`pair_digest`, :func:`image_digest`), which the
reader verifies.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Literal, get_args

import numpy as np

SCHEMA_VERSION = 1

ThresholdKind = Literal["bbox", "img", "bbox-kp"]
"""How PCK's distance threshold is derived from the *target* image:
``bbox`` max side of the target bbox (SPair-71k, AP-10K), ``img`` max side of the target image
(PF-PASCAL), ``bbox-kp`` max side of the box around the target's real keypoints (PF-WILLOW)."""
THRESHOLD_KINDS: tuple[str, ...] = get_args(ThresholdKind)

ExtraValue = int | float | str

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class ExtraField:
    """The declared type of one extra field (a column of the index): ``kind`` is ``int``,
    ``float`` or ``str``; an int lies in ``[low, high]`` (by default the int64 range), a float is
    finite, a str is UTF-8 text. ``required`` fields are present in every pair of the dataset."""

    kind: type
    low: int = INT64_MIN
    high: int = INT64_MAX
    required: bool = True


_SPAIR_EXTRAS = {
    # Difficulty levels 0 easy, 1 medium, 2 hard; truncation and occlusion 0 none, 1 source,
    # 2 target, 3 both (../shared/reference/datasets.md 1.2).
    "viewpoint_variation": ExtraField(int, 0, 2),
    "scale_variation": ExtraField(int, 0, 2),
    "truncation": ExtraField(int, 0, 3),
    "occlusion": ExtraField(int, 0, 3),
    "src_pose": ExtraField(str),
    "trg_pose": ExtraField(str),
    "mirror": ExtraField(int, 0, 1, required=False),
}

EXTRA_FIELDS: dict[str, dict[str, ExtraField]] = {
    "spair": _SPAIR_EXTRAS,
    "demo": _SPAIR_EXTRAS,
    "pfpascal": {"csv": ExtraField(str), "class_id": ExtraField(int, 1, 20), "flip": ExtraField(int, 0, 1, required=False)},
    "pfwillow": {"subclass": ExtraField(str)},
    "ap10k": {name: ExtraField(str) for name in ("src_species", "trg_species", "src_family", "trg_family")},
}
"""Per dataset, the extra fields its reader yields and their types: declared once, so every pair
of a dataset gives the index the same column types (:func:`normalise_extras`)."""


def normalise_extras(dataset: str, extras: dict[str, Any]) -> dict[str, ExtraValue]:
    """``extras`` in the types :data:`EXTRA_FIELDS` declares for ``dataset``. The one conversion
    made is lossless: an integer where text is declared becomes its decimal text (SPair-71k poses
    are names, a few documents give a number). :class:`ValueError` naming the field when a value
    cannot be represented (a bool, an int outside its range or beyond int64, a non-finite float,
    text that is not UTF-8, any other type), or when a field is not declared or a required one is
    missing (from a reader, a bug the reader tests catch; from a shard, corrupt data)."""
    declared = EXTRA_FIELDS.get(dataset)
    if declared is None:
        raise ValueError(f"dataset {dataset!r} has no extra fields declared in pipelines.schema.EXTRA_FIELDS")
    unknown = sorted(extras.keys() - declared.keys())
    missing = sorted(name for name, spec in declared.items() if spec.required and name not in extras)
    if unknown or missing:
        raise ValueError(f"{dataset} extra fields: undeclared {unknown}, required but missing {missing}")
    return {name: _normalise_extra(name, value, declared[name]) for name, value in extras.items()}


def _normalise_extra(name: str, value: Any, spec: ExtraField) -> ExtraValue:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | str | np.integer | np.floating):
        raise ValueError(f"extra field {name!r} is {value!r}, expected {spec.kind.__name__}")  # noqa: TRY004 (data, as below)
    if isinstance(value, np.integer | np.floating):
        value = value.item()
    if spec.kind is str:
        if isinstance(value, int):
            value = str(value)
        if not isinstance(value, str) or not is_utf8(value):
            raise ValueError(f"extra field {name!r} is {value!r}, expected UTF-8 text")
        return value
    if spec.kind is float:
        if isinstance(value, str) or not np.isfinite(float(value)):
            raise ValueError(f"extra field {name!r} is {value!r}, expected a finite number")
        return float(value)
    if not isinstance(value, int) or not spec.low <= value <= spec.high:
        raise ValueError(f"extra field {name!r} is {value!r}, expected an integer in [{spec.low}, {spec.high}]")
    return value


def is_utf8(text: str) -> bool:
    """False for text holding surrogates (undecodable bytes kept by ``surrogateescape``, or a
    lone ``\\ud800`` escape in JSON), which no UTF-8 file, Parquet column or tar header can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_()+-]")


def safe_key(*parts: str) -> str:
    """Join ``parts`` into a WebDataset key: no dots (WebDataset splits a name at its first dot),
    no slashes or colons. ``safe_key("car(G)", "Cars_006a")`` -> ``"car(G)_Cars_006a"``."""
    return "_".join(_KEY_UNSAFE.sub("_", part) for part in parts)


@dataclass(frozen=True)
class ImageRef:
    """An image as a reader found it: its shard key, its path relative to the dataset root, and
    the size ``(W, H)`` its annotation declares, if any (checked against the decoded header)."""

    key: str
    path: str
    declared_size: tuple[int, int] | None = None

    @property
    def ext(self) -> str:
        """Lower-case file extension without the dot: ``jpg`` or ``png``."""
        suffix = self.path.rsplit(".", 1)[-1].lower()
        return "jpg" if suffix == "jpeg" else suffix


@dataclass
class PairRecord:
    """One annotated pair as a reader parsed it, before any image is opened.

    Shapes: ``src_kps``/``trg_kps`` ``(N, 2)`` float64, ``kps_ids`` ``(N,)`` int64,
    ``src_bbox``/``trg_bbox`` ``(4,)`` float64. Row ``i`` of both keypoint arrays is the same
    semantic point, whose dataset-specific id is ``kps_ids[i]``.
    """

    key: str
    dataset: str
    split: str
    category: str
    group: str
    threshold: ThresholdKind
    src: ImageRef
    trg: ImageRef
    src_kps: np.ndarray
    trg_kps: np.ndarray
    kps_ids: np.ndarray
    src_bbox: np.ndarray
    trg_bbox: np.ndarray
    origin: str
    extras: dict[str, ExtraValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Reject:
    """An input that could not be taken: which item, the file at fault, and why.

    ``reason`` is one of :data:`pipelines.checks.REASONS`; ``detail`` says what exactly was
    wrong in words a person can act on. ``kind`` is ``pair`` for an input pair, ``image`` for an
    image a benchmark protocol excludes before pairs are formed (AP-10K built from its raw release).
    """

    item: str
    file: str
    reason: str
    detail: str
    kind: str = "pair"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "item": self.item, "file": self.file, "reason": self.reason, "detail": self.detail}


class RejectError(Exception):
    """Raised where an input turns out unusable; the catcher makes it a :class:`Reject`.

    ``reason`` is one of :data:`pipelines.checks.REASONS`; ``detail`` is the message (``str()``
    of the error); ``file`` is the file at fault when the raiser knows it better than the catcher,
    else ``None``.
    """

    def __init__(self, reason: str, detail: str, file: str | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.file = reason, detail, file

    def to_reject(self, item: str, file: str | None = None, kind: str = "pair") -> Reject:
        """The :class:`Reject` of ``item``; ``file`` defaults to the error's own."""
        return Reject(item, file or self.file or "", self.reason, self.detail, kind)


@dataclass(frozen=True)
class ImageInfo:
    """The ``<image_key>.json`` entry stored beside each image in a shard."""

    key: str
    width: int
    height: int
    format: str
    path: str

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "size": [self.width, self.height], "format": self.format, "path": self.path}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ImageInfo:
        width, height = doc["size"]
        return cls(doc["key"], int(width), int(height), doc["format"], doc["path"])


@dataclass
class PairSample:
    """A complete pair as the shard reader yields it.

    Shapes: ``src_image``/``trg_image`` ``(H, W, 3)`` uint8 RGB, ``src_kps``/``trg_kps``
    ``(N, 2)`` float64 (exactly the stored values), ``kps_ids`` ``(N,)`` int64,
    ``src_bbox``/``trg_bbox`` ``(4,)`` float64,
    ``src_size``/``trg_size`` ``(W, H)`` of the original images.
    """

    key: str
    dataset: str
    split: str
    category: str
    threshold: ThresholdKind
    src_image_key: str
    trg_image_key: str
    src_image: np.ndarray
    trg_image: np.ndarray
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    src_kps: np.ndarray
    trg_kps: np.ndarray
    kps_ids: np.ndarray
    src_bbox: np.ndarray
    trg_bbox: np.ndarray
    extras: dict[str, ExtraValue]


def pair_to_json(pair: PairRecord, src_size: tuple[int, int], trg_size: tuple[int, int]) -> dict[str, Any]:
    """The ``<pair_key>.pair.json`` document for ``pair``. Floats are written with ``repr``
    precision by :mod:`json`, so keypoints round-trip bit for bit."""
    return {
        "schema_version": SCHEMA_VERSION,
        "key": pair.key,
        "dataset": pair.dataset,
        "split": pair.split,
        "category": pair.category,
        "threshold": pair.threshold,
        "kps_ids": np.asarray(pair.kps_ids, dtype=np.int64).tolist(),
        "src": _side_to_json(pair.src.key, src_size, pair.src_kps, pair.src_bbox),
        "trg": _side_to_json(pair.trg.key, trg_size, pair.trg_kps, pair.trg_bbox),
        "extras": dict(pair.extras),
        "origin": pair.origin,
    }


DIGEST_FIELDS = ("pair_sha256", "src_image_sha256", "trg_image_sha256")
"""The ``index.parquet`` columns that record, per pair, the sha256 of what the sharder wrote:
its document (:func:`pair_digest`) and its two images (:func:`image_digest`). The reader
verifies every member it uses against them (:mod:`pipelines.reader`)."""


def pair_digest(data: bytes, key: str) -> str:
    """The sha256 (hex) of a pair document's bytes ``data`` less its key: the value of its
    ``"key": `` field, as :func:`json.dumps` writes ``key`` there, is left out. The key is the
    document's name: its member name, its ``key`` field and its ``index.parquet`` row must agree,
    which the reader checks apart; every other byte is covered."""
    field = b'"key": ' + encode_basestring_ascii(key).encode()  # json.dumps(key), without its overhead
    return hashlib.sha256(data.replace(field, b'"key": ', 1)).hexdigest()


def image_digest(data: bytes, info: bytes) -> str:
    """The sha256 (hex) of an image's two members: its encoded bytes ``data`` (their length
    first, so no byte can move between the two unnoticed) and its ``<image_key>.json`` bytes."""
    digest = hashlib.sha256(len(data).to_bytes(8, "big"))
    digest.update(data)
    digest.update(info)
    return digest.hexdigest()


def _side_to_json(image_key: str, size: tuple[int, int], kps: np.ndarray, bbox: np.ndarray) -> dict[str, Any]:
    return {
        "image": image_key,
        "size": [int(size[0]), int(size[1])],
        "kps": np.asarray(kps, dtype=np.float64).reshape(-1, 2).tolist(),
        "bbox": np.asarray(bbox, dtype=np.float64).tolist(),
    }


def sample_from_json(doc: dict[str, Any], src_image: np.ndarray, trg_image: np.ndarray) -> PairSample:
    """Build a :class:`PairSample` from a pair document and its two decoded images."""
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"pair {doc.get('key')!r}: schema_version {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    src, trg = doc["src"], doc["trg"]
    return PairSample(
        key=doc["key"],
        dataset=doc["dataset"],
        split=doc["split"],
        category=doc["category"],
        threshold=doc["threshold"],
        src_image_key=src["image"],
        trg_image_key=trg["image"],
        src_image=src_image,
        trg_image=trg_image,
        src_size=(int(src["size"][0]), int(src["size"][1])),
        trg_size=(int(trg["size"][0]), int(trg["size"][1])),
        src_kps=np.asarray(src["kps"], dtype=np.float64).reshape(-1, 2),
        trg_kps=np.asarray(trg["kps"], dtype=np.float64).reshape(-1, 2),
        kps_ids=np.asarray(doc["kps_ids"], dtype=np.int64),
        src_bbox=np.asarray(src["bbox"], dtype=np.float64),
        trg_bbox=np.asarray(trg["bbox"], dtype=np.float64),
        extras=dict(doc["extras"]),
    )
