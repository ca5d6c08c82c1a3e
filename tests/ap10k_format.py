"""Writers of AP-10K fixtures in the real on-disk formats: the raw COCO-style release and
GeoAware-SC's pair layout."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

JOINTS = 17
SPLIT1_PARTS = ("train", "val", "test")

# (id, species, family): a made-up subset of AP-10K's 54 categories, in three families.
CATEGORIES = (
    (1, "antelope", "Bovidae"),
    (2, "cow", "Bovidae"),
    (3, "cat", "Felidae"),
    (4, "lion", "Felidae"),
    (5, "tiger", "Felidae"),
    (6, "panda", "Ursidae"),
)
CATEGORY_IDS = {species: cat_id for cat_id, species, _ in CATEGORIES}
FAMILIES = {species: family for _, species, family in CATEGORIES}

ReleasePart = tuple[list[dict], list[dict]]
"""``(COCO images, COCO annotations)`` of one split1 file."""


@functools.cache
def tiny_jpeg() -> bytes:
    """An 8x6 JPEG, encoded once and written wherever an image file is needed."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (90, 140, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def joint_xy(image_id: int, joint: int) -> tuple[int, int]:
    """The fixture's position of ``joint`` in image ``image_id`` (distinct per image and joint)."""
    return 10 + 3 * joint + image_id % 7, 20 + 2 * joint + image_id % 5


def keypoints(image_id: int, labelled: Iterable[int], occluded: Iterable[int] = ()) -> list[int]:
    """The flat 51-number COCO list: ``v = 2`` for ``labelled``, ``v = 1`` for ``occluded``,
    ``(0, 0, 0)`` elsewhere."""
    visibility = {j: 2 for j in labelled} | {j: 1 for j in occluded}
    flat = []
    for joint in range(JOINTS):
        x, y = joint_xy(image_id, joint) if joint in visibility else (0, 0)
        flat.extend([x, y, visibility.get(joint, 0)])
    return flat


def coco_image(image_id: int, width: int = 64, height: int = 48) -> dict:
    return {
        "license": 1,
        "id": image_id,
        "file_name": f"{image_id:012d}.jpg",
        "width": width,
        "height": height,
        "background": 1,
    }


def coco_annotation(
    ann_id: int,
    image_id: int,
    species: str,
    labelled: Iterable[int] = range(JOINTS),
    occluded: Iterable[int] = (),
    bbox=(4, 6, 40, 30),
    iscrowd: int = 0,
) -> dict:
    labelled, occluded = list(labelled), list(occluded)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATEGORY_IDS[species],
        "bbox": list(bbox),
        "area": bbox[2] * bbox[3],
        "iscrowd": iscrowd,
        "num_keypoints": len(labelled) + len(occluded),
        "keypoints": keypoints(image_id, labelled, occluded),
    }


def coco_document(images: Sequence[dict], annotations: Sequence[dict]) -> dict:
    """A COCO file as AP-10K ships it (info, licenses, images, annotations, categories)."""
    joint_names = [f"joint_{j}" for j in range(JOINTS)]
    categories = [
        {"id": cat_id, "name": species, "supercategory": family, "keypoints": joint_names, "skeleton": [[1, 2]]}
        for cat_id, species, family in CATEGORIES
    ]
    return {
        "info": {"description": "AP-10k", "version": "1.0", "year": 2021},
        "licenses": [{"id": 1, "name": "The MIT License", "url": ""}],
        "images": list(images),
        "annotations": list(annotations),
        "categories": categories,
    }


def write_raw_release(root: Path, parts: dict[str, ReleasePart], with_images: bool = True) -> Path:
    """``annotations/ap10k-<part>-split1.json`` for each of train/val/test (``parts[part]`` =
    ``(images, annotations)``, empty when absent) and, if ``with_images``, ``data/<file_name>``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for part in SPLIT1_PARTS:
        images, annotations = parts.get(part, ((), ()))
        document = coco_document(images, annotations)
        (root / "annotations" / f"ap10k-{part}-split1.json").write_text(json.dumps(document, indent=4))
        if with_images:
            (root / "data").mkdir(exist_ok=True)
            for image in images:
                (root / "data" / image["file_name"]).write_bytes(tiny_jpeg())
    return root


def single_animal_release(species_images: dict[str, Sequence[int]], labelled=range(JOINTS)) -> dict[str, ReleasePart]:
    """One fully labelled animal per image, ``species -> image ids``; the images are dealt across
    the three split1 files in turn (so file order is not image-id order)."""
    parts: dict[str, ReleasePart] = {part: ([], []) for part in SPLIT1_PARTS}
    counter = 0
    for species, image_ids in species_images.items():
        for image_id in image_ids:
            images, annotations = parts[SPLIT1_PARTS[counter % 3]]
            images.append(coco_image(image_id))
            annotations.append(coco_annotation(1000 + image_id, image_id, species, labelled))
            counter += 1
    return parts


def image_annotation_document(
    image_id: int, species: str, labelled: Iterable[int] = range(JOINTS), **overrides
) -> dict:
    """A GeoAware ``ImageAnnotation`` document: ``{**annotation, **image, name, supercategory}``."""
    annotation = coco_annotation(9000 + image_id, image_id, species, labelled)
    return {**annotation, **coco_image(image_id), "name": species, "supercategory": FAMILIES[species], **overrides}


def write_image_annotation(root: Path, family: str, species: str, file_stem: str, document: dict | str) -> str:
    """Write ``ImageAnnotation/<family>/<species>/<file_stem>.json`` (a string is written as is)
    and its JPEG; returns the path relative to ``root``."""
    rel = f"ImageAnnotation/{family}/{species}/{file_stem}.json"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(document if isinstance(document, str) else json.dumps(document, indent=4))
    jpeg = root / "JPEGImages" / family / species / f"{file_stem}.jpg"
    jpeg.parent.mkdir(parents=True, exist_ok=True)
    jpeg.write_bytes(tiny_jpeg())
    return rel


def write_pair_file(root: Path, split: str, name: str, document: dict | str) -> str:
    """Write ``PairAnnotation/<split>/<name>.json``; returns its path relative to ``root``."""
    rel = f"PairAnnotation/{split}/{name}.json"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(document if isinstance(document, str) else json.dumps(document, indent=4))
    return rel


def geoaware_pair_document(src_annotation: str, trg_annotation: str, prefix: str = "data/ap-10k/") -> dict:
    """A pair file as GeoAware writes it: cwd-relative paths with ``prefix`` baked in."""
    return {"src_json_path": prefix + src_annotation, "trg_json_path": prefix + trg_annotation}
