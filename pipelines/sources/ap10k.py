"""AP-10K animal pairs (GeoAware-SC benchmark): its pair layout, or the same pairs built from the raw release.

Two layouts are recognised from the root, in this order:

1. The GeoAware-SC pair layout (the root holds ``PairAnnotation/``)::

       ImageAnnotation/<family>/<species>/<12-digit image id>.json
       JPEGImages/<family>/<species>/<12-digit image id>.jpg
       PairAnnotation/<split>/<src id>-<trg id>:<category>.json

   An image annotation is ``{**COCO annotation, **COCO image, "name": species, "supercategory":
   family}`` (the image's ``id`` overwrites the annotation's, so ``id`` is the image id). A pair
   file is ``{"src_json_path", "trg_json_path"}``: paths relative to the directory GeoAware ran
   from, with a prefix such as ``data/ap-10k/`` baked in. They are re-rooted by keeping the path
   from its last ``ImageAnnotation`` component on; the image is the annotation path with
   ``ImageAnnotation`` -> ``JPEGImages`` and ``.json`` -> ``.jpg`` (as GeoAware derives it).

2. The raw AP-10K release (the root holds ``annotations/``): ``annotations/ap10k-{train,val,test}-
   split1.json`` (COCO style) and ``data/<file_name>``. The pairs are built in memory, nothing is
   written, following GeoAware's ``prepare_ap10k`` recipe as
   :func:`sample_pairs` implements it (:mod:`pipelines.builders.ap10k`'s docstring lists where it
   deliberately differs from GeoAware's script). :mod:`pipelines.builders.ap10k` (``python -m
   pipelines.builders.ap10k --raw DIR --out DIR``) writes the same pairs as layout 1, and reading
   that layout gives the same pair records as reading the raw root (only image paths and ``origin``
   differ). Images the recipe leaves out are yielded as ``Reject(kind="image")`` in every split.

Keypoints
---------
17 joints per image, a flat list of 17 ``[x, y, v]`` triplets. ``v = 0`` means "not labelled"
(stored at ``(0, 0)``), ``v = 2`` labelled and visible, ``v = 1`` labelled but occluded. A joint
is *labelled* when ``v > 0``: ``v = 1`` counts as labelled here (its position was annotated),
whereas GeoAware's ``v / 2`` weighting would count it as half a joint and halve its coordinates
(the released data has only ``v`` in {0, 2}, so the two agree on it). A pair keeps the joints
labelled in *both* images; ``kps_ids`` are their joint indices 0..16 (:data:`JOINT_NAMES`).

Coordinates
-----------
AP-10K keypoints are COCO pixel coordinates, 0-based with pixel ``(0, 0)`` at ``(0, 0)``: they are
used as they are. The COCO bbox ``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)``; the PCK
threshold is ``bbox``, the max side of the target box, i.e. GeoAware's ``max(w, h)``. The declared
size is the annotation's ``(width, height)``.

Keys: image ``safe_key(species, 12-digit id)``; pair ``safe_key(src id, trg id, category)`` with
12-digit ids, i.e. the pair file's name, which is unique within a split. ``category`` (and
``group``) is the name's suffix: the species for ``trn``/``val``/``test``, the family for
``*_cross_species``, ``all`` for ``*_cross_family``. ``extras`` hold both images' species and family.

Paths the files give (a pair file's ``src_json_path``/``trg_json_path``, a raw image's ``file_name``)
must stay inside the root, else ``path-outside-root``: the pair's reject in layout 1, the image left
out in layout 2. Species and family names must be folder names (they name layout 1's folders).
Annotation files are read and parsed with bounded work (:mod:`pipelines.sources.files`).
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from pipelines import jsonio
from pipelines.checks import (
    EXCLUDED_IMAGE,
    INCONSISTENT_ANNOTATION,
    MALFORMED_ANNOTATION,
    MISSING_ANNOTATION,
    PATH_OUTSIDE_ROOT,
)
from pipelines.schema import ImageRef, PairRecord, Reject, RejectError, safe_key
from pipelines.sources.files import MAX_RELEASE_BYTES, load_annotation_json, read_list_file
from pipelines.storage import Location, PathOutsideRoot, confine

DATASET = "ap10k"
INTRA_SPLITS: tuple[str, ...] = ("trn", "val", "test")
SPLITS: tuple[str, ...] = (
    *INTRA_SPLITS, "val_cross_species", "test_cross_species", "val_cross_family", "test_cross_family",
)
CROSS_FAMILY_CATEGORY = "all"

JOINT_NAMES: tuple[str, ...] = (
    "L_Eye", "R_Eye", "Nose", "Neck", "Root of tail", "L_Shoulder", "L_Elbow", "L_F_Paw", "R_Shoulder",
    "R_Elbow", "R_F_Paw", "L_Hip", "L_Knee", "L_B_Paw", "R_Hip", "R_Knee", "R_B_Paw",
)
VISIBILITY_VALUES = (0, 1, 2)

IMAGE_ANNOTATION_DIR = "ImageAnnotation"
IMAGE_DIR = "JPEGImages"
PAIR_DIR = "PairAnnotation"
RAW_ANNOTATION_FILES: tuple[str, ...] = tuple(
    f"annotations/ap10k-{part}-split1.json" for part in ("train", "val", "test")
)
RAW_IMAGE_DIR = "data"

_PAIR_NAME = re.compile(r"^([0-9]{1,20})-([0-9]{1,20}):(.+)\.json$")
_IMAGE_ID = re.compile(r"[0-9]{1,20}")
_IMAGE_ANNOTATION_FIELDS = ("id", "name", "supercategory", "keypoints", "bbox", "width", "height")


@dataclass(frozen=True)
class Protocol:
    """GeoAware's split sizes and sampling caps; the defaults are GeoAware's own numbers."""

    test_per_species: int = 30
    val_per_species: int = 20
    trn_pairs_per_image: int = 50
    min_keypoints: int = 3
    """Labelled joints an image needs to be kept, and joints a pair's images must share."""
    cross_species_pairs: dict[str, int] = field(default_factory=lambda: {"val": 400, "test": 900})
    cross_family_pairs: dict[str, int] = field(default_factory=lambda: {"val": 20, "test": 30})


GEOAWARE_PROTOCOL = Protocol()


@dataclass(frozen=True)
class AnimalImage:
    """One single-animal image: ``keypoints`` ``(17, 3)`` float64 rows ``[x, y, v]``, ``bbox``
    ``(4,)`` float64 ``x1, y1, x2, y2``, ``size`` ``(W, H)``; paths relative to the root."""

    image_id: int
    species: str
    family: str
    keypoints: np.ndarray
    bbox: np.ndarray
    size: tuple[int, int]
    image_path: str
    annotation_file: str

    @functools.cached_property
    def labelled(self) -> np.ndarray:
        """``(17,)`` bool: the joints with ``v > 0``."""
        return self.keypoints[:, 2] > 0

    @functools.cached_property
    def key(self) -> str:
        return safe_key(self.species, image_stem(self.image_id))


@dataclass(frozen=True)
class PairSpec:
    """A pair as the recipe (:func:`sample_pairs`) lists it:
    ``PairAnnotation/<split>/<name>.json``."""

    src: AnimalImage
    trg: AnimalImage
    category: str

    @property
    def name(self) -> str:
        return f"{image_stem(self.src.image_id)}-{image_stem(self.trg.image_id)}:{self.category}"


@dataclass
class RawRelease:
    """The raw release after GeoAware's image filter: the images kept (in image-id order), the
    ``Reject(kind="image")`` for those left out, and each kept image's GeoAware annotation document."""

    images: list[AnimalImage]
    rejects: list[Reject]
    documents: dict[int, dict[str, Any]]


def image_stem(image_id: int) -> str:
    """The 12-digit file stem AP-10K and GeoAware give image ``image_id``."""
    return f"{image_id:012d}"


def pair_key(src_id: int, trg_id: int, category: str) -> str:
    return safe_key(image_stem(src_id), image_stem(trg_id), category)


# ---------------------------------------------------------------------------------------------
# Entry point


def read_pairs(root: Location, split: str) -> Iterator[PairRecord | Reject]:
    """Every pair of ``split``: from the pair layout when ``root`` holds ``PairAnnotation/``, else
    built from the raw release. Raises :class:`FileNotFoundError` when ``root`` holds neither, or
    the split's folder is missing from a pair layout."""
    if split not in SPLITS:
        raise ValueError(f"unknown AP-10K split {split!r}; choose one of {', '.join(SPLITS)}")
    if root.exists(PAIR_DIR):
        return read_layout_pairs(root, split)
    if any(root.exists(name) for name in RAW_ANNOTATION_FILES):
        return read_raw_pairs(root, split)
    raise FileNotFoundError(
        f"{root.full('')}: neither {PAIR_DIR}/ (GeoAware-SC pair layout) "
        f"nor {RAW_ANNOTATION_FILES[0]} (raw AP-10K release)"
    )


def make_pair_record(split: str, pair: PairSpec, origin: str) -> PairRecord:
    """The record of ``pair``: the joints labelled in both images, bboxes already ``x1, y1, x2, y2``."""
    src, trg = pair.src, pair.trg
    kps_ids = np.flatnonzero(src.labelled & trg.labelled).astype(np.int64)
    return PairRecord(
        key=pair_key(src.image_id, trg.image_id, pair.category),
        dataset=DATASET,
        split=split,
        category=pair.category,
        group=pair.category,
        threshold="bbox",
        src=ImageRef(src.key, src.image_path, src.size),
        trg=ImageRef(trg.key, trg.image_path, trg.size),
        src_kps=src.keypoints[kps_ids, :2].copy(),
        trg_kps=trg.keypoints[kps_ids, :2].copy(),
        kps_ids=kps_ids,
        src_bbox=src.bbox.copy(),
        trg_bbox=trg.bbox.copy(),
        origin=origin,
        extras={
            "src_species": src.species,
            "trg_species": trg.species,
            "src_family": src.family,
            "trg_family": trg.family,
        },
    )


def parse_image_annotation(doc: Any, image_path: str, annotation_file: str) -> AnimalImage:
    """An :class:`AnimalImage` from a GeoAware image document (``{**annotation, **image, name,
    supercategory}``); :class:`RejectError` (malformed) when a field is missing or wrong."""
    if not isinstance(doc, dict):
        raise RejectError(MALFORMED_ANNOTATION, f"expected a JSON object, found {type(doc).__name__}")
    missing = [name for name in _IMAGE_ANNOTATION_FIELDS if name not in doc]
    if missing:
        raise RejectError(MALFORMED_ANNOTATION, f"missing field(s) {', '.join(missing)}")
    for name in ("id", "width", "height"):
        if not _is_int(doc[name]):
            raise RejectError(MALFORMED_ANNOTATION, f"{name} is {doc[name]!r}, not an integer")
    for name in ("name", "supercategory"):
        if not isinstance(doc[name], str) or not _is_folder_name(doc[name]):
            raise RejectError(MALFORMED_ANNOTATION, f"{name} is {doc[name]!r}, not a name")
    return AnimalImage(
        image_id=doc["id"],
        species=doc["name"],
        family=doc["supercategory"],
        keypoints=_parse_keypoints(doc["keypoints"]),
        bbox=_parse_bbox(doc["bbox"]),
        size=(doc["width"], doc["height"]),
        image_path=image_path,
        annotation_file=annotation_file,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_keypoints(values: Any) -> np.ndarray:
    """``(17, 3)`` float64 rows ``[x, y, v]`` from the flat COCO list of 51 numbers."""
    expected = 3 * len(JOINT_NAMES)
    if not isinstance(values, list) or len(values) != expected or not all(_is_number(v) for v in values):
        count = len(values) if isinstance(values, list) else type(values).__name__
        detail = f"keypoints must be {expected} numbers (17 x [x, y, v]), found {count}"
        raise RejectError(MALFORMED_ANNOTATION, detail)
    keypoints = np.asarray(values, dtype=np.float64).reshape(len(JOINT_NAMES), 3)
    bad_joints = [int(j) for j in np.flatnonzero(~np.isin(keypoints[:, 2], VISIBILITY_VALUES))]
    if bad_joints:
        found = keypoints[bad_joints, 2].tolist()
        raise RejectError(MALFORMED_ANNOTATION, f"visibility of joints {bad_joints} is {found}, not one of 0, 1, 2")
    return keypoints


def _parse_bbox(values: Any) -> np.ndarray:
    """COCO ``[x, y, w, h]`` -> ``(4,)`` float64 ``x1, y1, x2, y2``. Bad boxes (zero or negative
    sides, outside the image) pass through to the shard stage's checks."""
    if not isinstance(values, list) or len(values) != 4 or not all(_is_number(v) for v in values):
        raise RejectError(MALFORMED_ANNOTATION, f"bbox must be 4 numbers [x, y, w, h], found {values!r}")
    x, y, width, height = (float(v) for v in values)
    return np.array([x, y, x + width, y + height], dtype=np.float64)


def _load_json(root: Location, rel: str) -> Any:
    """The parsed JSON document at ``rel``; :class:`RejectError` when missing, unreadable or
    unparsable (:func:`pipelines.sources.files.load_annotation_json`)."""
    try:
        return load_annotation_json(root, rel)
    except FileNotFoundError:
        raise RejectError(MISSING_ANNOTATION, f"{root.full(rel)} does not exist") from None


# ---------------------------------------------------------------------------------------------
# Layout 1: GeoAware-SC's PairAnnotation / ImageAnnotation / JPEGImages


def read_layout_pairs(root: Location, split: str) -> Iterator[PairRecord | Reject]:
    """One item per ``PairAnnotation/<split>/*.json``, in file-name order; image annotations
    are parsed once each."""
    split_dir = f"{PAIR_DIR}/{split}"
    if not root.exists(split_dir):
        raise FileNotFoundError(f"{root.full(split_dir)}: no such split folder")
    pair_files = [rel for rel in root.list_files(split_dir) if rel.endswith(".json") and rel.count("/") == 2]
    images: dict[str, AnimalImage | RejectError] = {}
    return (_read_layout_pair(root, split, rel, images) for rel in pair_files)


def _read_layout_pair(
    root: Location, split: str, rel: str, images: dict[str, AnimalImage | RejectError]
) -> PairRecord | Reject:
    name = PurePosixPath(rel).name
    match = _PAIR_NAME.match(name)
    if match is None:
        detail = "pair file name is not <src id>-<trg id>:<category>.json"
        return Reject(safe_key(name.removesuffix(".json")), rel, MALFORMED_ANNOTATION, detail)
    named_ids, category = (int(match[1]), int(match[2])), match[3]
    key = pair_key(*named_ids, category)
    try:
        doc = _load_json(root, rel)
        sides = []
        for side in ("src", "trg"):
            annotation_path = reroot_annotation_path(doc, f"{side}_json_path")
            if annotation_path not in images:
                images[annotation_path] = _load_layout_image(root, annotation_path)
            image = images[annotation_path]
            if isinstance(image, RejectError):
                return image.to_reject(key, annotation_path)
            sides.append(image)
        pair = PairSpec(sides[0], sides[1], category)
        _check_pair_against_name(pair, named_ids, split)
    except RejectError as error:
        return error.to_reject(key, rel)
    return make_pair_record(split, pair, rel)


def reroot_annotation_path(doc: Any, field_name: str) -> str:
    """``data/ap-10k/ImageAnnotation/F/S/x.json`` -> ``ImageAnnotation/F/S/x.json``."""
    if not isinstance(doc, dict) or not isinstance(doc.get(field_name), str):
        raise RejectError(MALFORMED_ANNOTATION, f"no {field_name} string in the pair file")
    parts = doc[field_name].split("/")
    if IMAGE_ANNOTATION_DIR not in parts:
        detail = f"{field_name} {doc[field_name]!r} has no {IMAGE_ANNOTATION_DIR}/ component"
        raise RejectError(MALFORMED_ANNOTATION, detail)
    start = len(parts) - 1 - parts[::-1].index(IMAGE_ANNOTATION_DIR)
    rerooted = parts[start:]
    _inside_root("/".join(rerooted), f"{field_name} {doc[field_name]!r}")
    if len(rerooted) != 4 or not rerooted[3].endswith(".json") or not all(map(_is_folder_name, rerooted)):
        detail = f"{field_name} {doc[field_name]!r} is not .../{IMAGE_ANNOTATION_DIR}/<family>/<species>/<id>.json"
        raise RejectError(MALFORMED_ANNOTATION, detail)
    return "/".join(rerooted)


def _inside_root(path: str, what: str) -> str:
    """``path`` when it stays inside the dataset root, else :class:`RejectError`
    (``path-outside-root``) naming ``what``: the dataset gave it, so it must not be trusted."""
    try:
        confine(path, "the dataset root")
    except PathOutsideRoot as error:
        raise RejectError(PATH_OUTSIDE_ROOT, f"{what}: {error}") from None
    return path


def _is_folder_name(name: str) -> bool:
    """Whether ``name`` can be one path component (species and families name folders)."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _load_layout_image(root: Location, annotation_path: str) -> AnimalImage | RejectError:
    """The image annotation at ``annotation_path`` (``ImageAnnotation/F/S/<id>.json``), checked
    against its location; the error instead when it cannot be used."""
    _, family, species, file_name = annotation_path.split("/")
    stem = file_name.removesuffix(".json")
    image_path = f"{IMAGE_DIR}/{family}/{species}/{stem}.jpg"
    try:
        image = parse_image_annotation(_load_json(root, annotation_path), image_path, annotation_path)
        if (image.family, image.species) != (family, species):
            raise RejectError(
                INCONSISTENT_ANNOTATION,
                f"supercategory/name {image.family!r}/{image.species!r} differ from the folder {family}/{species}",
            )
        if not _IMAGE_ID.fullmatch(stem) or int(stem) != image.image_id:
            detail = f"id {image.image_id} differs from the file name {file_name}"
            raise RejectError(INCONSISTENT_ANNOTATION, detail)
    except RejectError as error:
        return error
    return image


def _check_pair_against_name(pair: PairSpec, named_ids: tuple[int, int], split: str) -> None:
    """The pair file's name must name the two images it points to, and its category must be what
    the split pairs by: both images' species, both images' family, or ``all``."""
    actual_ids = (pair.src.image_id, pair.trg.image_id)
    if actual_ids != named_ids:
        detail = f"the name says images {list(named_ids)}, the file points to {list(actual_ids)}"
        raise RejectError(INCONSISTENT_ANNOTATION, detail)
    if split.endswith("_cross_family"):
        expected = (CROSS_FAMILY_CATEGORY, CROSS_FAMILY_CATEGORY)
    elif split.endswith("_cross_species"):
        expected = (pair.src.family, pair.trg.family)
    else:
        expected = (pair.src.species, pair.trg.species)
    if expected != (pair.category, pair.category):
        detail = f"category {pair.category!r} does not match {split} pairing of {expected[0]!r} and {expected[1]!r}"
        raise RejectError(INCONSISTENT_ANNOTATION, detail)


# ---------------------------------------------------------------------------------------------
# Layout 2: the raw COCO-style release, with GeoAware's pairs rebuilt in memory


def read_raw_pairs(
    root: Location, split: str, seed: int = 42, protocol: Protocol = GEOAWARE_PROTOCOL
) -> Iterator[PairRecord | Reject]:
    """The excluded-image rejects, then the pairs :func:`sample_pairs`
    builds for ``split`` in memory (``origin``: the release file(s) listing the two images)."""
    release = load_raw_release(root, protocol.min_keypoints)
    pairs = sample_pairs(release.images, split, seed, protocol)
    return itertools.chain(release.rejects, (make_pair_record(split, pair, _raw_origin(pair)) for pair in pairs))


def _raw_origin(pair: PairSpec) -> str:
    return ", ".join(sorted({pair.src.annotation_file, pair.trg.annotation_file}))


def load_raw_release(root: Location, min_keypoints: int = GEOAWARE_PROTOCOL.min_keypoints) -> RawRelease:
    """Merge the three split1 files and apply GeoAware's image filter, one animal per image:
    crowd images (any ``iscrowd == 1``), images with several animals (ambiguous correspondence;
    GeoAware's crowd list plays this role) or none, and images with fewer than
    ``min_keypoints`` labelled joints (``v > 0``) are left out, as are images whose annotation cannot be used."""
    categories: dict[int, dict[str, Any]] = {}
    image_docs: dict[int, tuple[dict[str, Any], str]] = {}
    annotations: dict[int, list[dict[str, Any]]] = defaultdict(list)
    annotation_files: dict[int, str] = {}
    for rel in RAW_ANNOTATION_FILES:
        coco = _load_coco_file(root, rel)
        categories.update({cat["id"]: cat for cat in coco["categories"]})
        for image in coco["images"]:
            image_docs.setdefault(image["id"], (image, rel))
        for annotation in coco["annotations"]:
            annotations[annotation["image_id"]].append(annotation)
            annotation_files.setdefault(annotation["image_id"], rel)
    kept, rejects, documents = [], [], {}
    for image_id in sorted(image_docs.keys() | annotations.keys()):
        try:
            document, image = _single_animal(image_id, image_docs, annotations[image_id], categories, min_keypoints)
        except RejectError as error:
            file = image_docs[image_id][1] if image_id in image_docs else annotation_files[image_id]
            rejects.append(error.to_reject(image_stem(image_id), file, kind="image"))
            continue
        kept.append(image)
        documents[image_id] = document
    return RawRelease(kept, rejects, documents)


def _load_coco_file(root: Location, rel: str) -> dict[str, list[dict[str, Any]]]:
    """One COCO file, checked as far as merging needs: ``images[].id``, ``annotations[].image_id``
    and ``categories[].id`` integers. A broken release file stops the run (nothing can be paired)."""
    if not root.exists(rel):
        raise FileNotFoundError(f"{root.full(rel)}: AP-10K annotation file missing")
    try:
        coco = jsonio.loads(read_list_file(root, rel), max_bytes=MAX_RELEASE_BYTES)
    except jsonio.JSONError as error:
        raise ValueError(f"{root.full(rel)}: {error}") from None
    for section, id_field in (("images", "id"), ("annotations", "image_id"), ("categories", "id")):
        entries = coco.get(section) if isinstance(coco, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and _is_int(e.get(id_field)) for e in entries):
            raise ValueError(f"{root.full(rel)}: {section!r} must be a list of objects with an integer {id_field!r}")
    return coco


def _single_animal(
    image_id: int,
    image_docs: dict[int, tuple[dict[str, Any], str]],
    image_annotations: list[dict[str, Any]],
    categories: dict[int, dict[str, Any]],
    min_keypoints: int,
) -> tuple[dict[str, Any], AnimalImage]:
    """GeoAware's document and the parsed image for a usable single-animal image, else
    :class:`RejectError` saying why it is left out."""
    if image_id not in image_docs:
        detail = f"annotated in {len(image_annotations)} annotation(s) but not listed in 'images'"
        raise RejectError(INCONSISTENT_ANNOTATION, detail)
    image, file = image_docs[image_id]
    crowd = [a.get("id") for a in image_annotations if a.get("iscrowd") == 1]
    if crowd:
        raise RejectError(EXCLUDED_IMAGE, f"crowd image: annotation(s) {crowd} have iscrowd = 1")
    if len(image_annotations) != 1:
        ids = [a.get("id") for a in image_annotations]
        detail = f"{len(ids)} animals annotated {ids}; a pair needs exactly one animal per image"
        raise RejectError(EXCLUDED_IMAGE, detail)
    annotation = image_annotations[0]
    category_id = annotation.get("category_id")
    category = categories.get(category_id) if _is_int(category_id) else None
    if category is None:
        detail = f"category_id {annotation.get('category_id')!r} is not in 'categories'"
        raise RejectError(INCONSISTENT_ANNOTATION, detail)
    if not isinstance(image.get("file_name"), str):
        raise RejectError(MALFORMED_ANNOTATION, f"file_name is {image.get('file_name')!r}")
    image_path = _inside_root(f"{RAW_IMAGE_DIR}/{image['file_name']}", f"file_name {image['file_name']!r}")
    document = {**annotation, **image, "name": category.get("name"), "supercategory": category.get("supercategory")}
    parsed = parse_image_annotation(document, image_path, file)
    labelled = int(parsed.labelled.sum())
    if labelled < min_keypoints:
        raise RejectError(EXCLUDED_IMAGE, f"{labelled} labelled keypoints (v > 0), fewer than {min_keypoints}")
    return document, parsed


# ---------------------------------------------------------------------------------------------
# GeoAware's pairing recipe: images split per species, then paired per split

SpeciesLists = dict[tuple[str, str], list[AnimalImage]]
"""``{(family, species): images}``, the images sorted by id."""


def split_species(images: Sequence[AnimalImage], protocol: Protocol = GEOAWARE_PROTOCOL) -> dict[str, SpeciesLists]:
    """``{"trn" | "val" | "test": {(family, species): images}}``: per species, by image id, the
    last ``test_per_species`` images are test, the ``val_per_species`` before them val, the rest trn.
    (GeoAware splits in ``os.walk`` order, which depends on the filesystem; sorting fixes that.)"""
    by_species: dict[tuple[str, str], list[AnimalImage]] = defaultdict(list)
    for image in sorted(images, key=lambda im: im.image_id):
        by_species[(image.family, image.species)].append(image)
    splits: dict[str, SpeciesLists] = {name: {} for name in INTRA_SPLITS}
    for species in sorted(by_species):
        members = by_species[species]
        n_test = min(protocol.test_per_species, len(members))
        n_val = min(protocol.val_per_species, len(members) - n_test)
        n_trn = len(members) - n_test - n_val
        splits["trn"][species] = members[:n_trn]
        splits["val"][species] = members[n_trn : n_trn + n_val]
        splits["test"][species] = members[n_trn + n_val :]
    return splits


def sample_pairs(
    images: Sequence[AnimalImage], split: str, seed: int = 42, protocol: Protocol = GEOAWARE_PROTOCOL
) -> list[PairSpec]:
    """GeoAware's pairs of ``split``, sorted by pair file name. A pair is valid when at least
    ``min_keypoints`` joints are labelled in both images. Each split draws from its own
    ``random.Random(seed)`` (so one split can be built alone), species and families in name order:

    - ``val``/``test``: every valid unordered pair of a species, the earlier image id as source.
    - ``trn``: per species, ``trn_pairs_per_image`` x (its images) valid *ordered* pairs sampled
      without repeats, or all of them if fewer exist.
    - ``*_cross_species``: per family with several species, the products of its species' image
      lists (species in name order, source from the earlier species) are pooled and
      ``min(cross_species_pairs, valid)`` are sampled.
    - ``*_cross_family``: per unordered family pair (source from the earlier family),
      ``min(cross_family_pairs, valid)`` of the product of the two families' images.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown AP-10K split {split!r}; choose one of {', '.join(SPLITS)}")
    base = split.split("_")[0]
    lists = split_species(images, protocol)[base]
    rng = random.Random(seed)
    if split.endswith("_cross_family"):
        pairs = _cross_family_pairs(lists, rng, protocol.cross_family_pairs[base], protocol.min_keypoints)
    elif split.endswith("_cross_species"):
        pairs = _cross_species_pairs(lists, rng, protocol.cross_species_pairs[base], protocol.min_keypoints)
    else:
        per_image = protocol.trn_pairs_per_image if split == "trn" else None
        pairs = _intra_species_pairs(lists, rng, per_image, protocol.min_keypoints)
    return sorted(pairs, key=lambda pair: f"{pair.name}.json")


def _intra_species_pairs(
    lists: SpeciesLists, rng: random.Random, pairs_per_image: int | None, min_mutual: int
) -> list[PairSpec]:
    """All valid unordered pairs per species (``pairs_per_image`` None), or a sample of
    ``pairs_per_image`` x n valid ordered pairs."""
    pairs = []
    for (_, species), members in lists.items():
        valid = _valid_index_pairs(members, members, min_mutual)
        if pairs_per_image is None:
            chosen = valid[valid[:, 0] < valid[:, 1]]
        else:
            ordered = valid[valid[:, 0] != valid[:, 1]]
            chosen = _sample_rows(rng, ordered, pairs_per_image * len(members))
        pairs.extend(PairSpec(members[i], members[j], species) for i, j in chosen)
    return pairs


def _cross_species_pairs(lists: SpeciesLists, rng: random.Random, cap: int, min_mutual: int) -> list[PairSpec]:
    by_family: dict[str, list[list[AnimalImage]]] = defaultdict(list)
    for (family, _), members in lists.items():
        by_family[family].append(members)
    pairs = []
    for family in sorted(by_family):
        species_lists = by_family[family]
        members = [image for species_members in species_lists for image in species_members]
        offsets = np.cumsum([0] + [len(species_members) for species_members in species_lists])
        pooled = [np.zeros((0, 2), dtype=np.int64)] + [
            _valid_index_pairs(species_lists[a], species_lists[b], min_mutual) + [offsets[a], offsets[b]]
            for a, b in itertools.combinations(range(len(species_lists)), 2)
        ]
        chosen = _sample_rows(rng, np.concatenate(pooled), cap)
        pairs.extend(PairSpec(members[i], members[j], family) for i, j in chosen)
    return pairs


def _cross_family_pairs(lists: SpeciesLists, rng: random.Random, cap: int, min_mutual: int) -> list[PairSpec]:
    by_family: dict[str, list[AnimalImage]] = defaultdict(list)
    for (family, _), members in lists.items():
        by_family[family].extend(members)
    pairs = []
    for left, right in itertools.combinations(sorted(by_family), 2):
        valid = _sample_rows(rng, _valid_index_pairs(by_family[left], by_family[right], min_mutual), cap)
        pairs.extend(PairSpec(by_family[left][i], by_family[right][j], CROSS_FAMILY_CATEGORY) for i, j in valid)
    return pairs


def _valid_index_pairs(left: Sequence[AnimalImage], right: Sequence[AnimalImage], min_mutual: int) -> np.ndarray:
    """``(K, 2)`` int64 index pairs ``(i, j)`` into ``left`` x ``right``, in product order, whose
    images share at least ``min_mutual`` labelled joints."""
    if not left or not right:
        return np.zeros((0, 2), dtype=np.int64)
    left_labelled = np.stack([image.labelled for image in left]).astype(np.int64)
    right_labelled = np.stack([image.labelled for image in right]).astype(np.int64)
    return np.argwhere(left_labelled @ right_labelled.T >= min_mutual)


def _sample_rows(rng: random.Random, rows: np.ndarray, count: int) -> np.ndarray:
    """``min(count, len(rows))`` rows drawn without repeats."""
    return rows[rng.sample(range(len(rows)), min(count, len(rows)))]


# ---------------------------------------------------------------------------------------------
# Writing the pair layout
