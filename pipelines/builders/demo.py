"""Generate the demo dataset: random perspective views of scikit-image's photos, in the SPair-71k layout.

    python -m pipelines.builders.demo --out data/demo [--images-per-category 24] [--seed 0]

A small, freely redistributable stand-in for SPair-71k that trains on a CPU in minutes. Five
photos bundled with scikit-image (:data:`DEMO_OBJECTS`) each give one category; every demo image
is a random view of its category's photo: a homography (rotation up to +-45 degrees, scale
0.6-1.3, translation, mild perspective) plus a mild colour change, 320x240 to 400x300 pixels by
default, saved as JPEG quality 90. The keypoints of a category are fixed once on its photo (the
strongest well-separated Harris corners inside a hand-drawn object outline, ids ``0..K-1``) and
projected through each view's homography, so pairs of views have exact ground truth.

:func:`generate` writes the exact SPair-71k layout (``JPEGImages``, ``ImageAnnotation`` with 30
keypoint slots and ``null`` for unused ones, ``PairAnnotation``, ``Layout/large``), so the
dataset is read by :mod:`pipelines.sources.demo` (through
:func:`pipelines.sources.spair.read_spair_layout`), which never generates one itself. Run
``python -m pipelines.builders.demo --help`` for the options.

Coordinates
-----------
Everything is generated directly in the schema frame: in the photo and in every view, the pixel
in column ``c`` and row ``r`` is centred at ``(c, r)``. A view is rendered by inverse mapping:
the view pixel centred at ``(u, v)`` takes the bilinear sample of the photo at
``H^-1 (u, v)``, with :func:`scipy.ndimage.map_coordinates`, which puts array index ``i`` at
coordinate ``i``. So a photo point ``p`` appears in the view at ``H p``, which is the keypoint
written. Keypoints and boxes are therefore taken as stored, like SPair-71k's own, with no
conversion; unlike SPair-71k's integers they are floats rounded to 0.01 pixel, to keep the
projection exact. A box is the bounding box of the projected object outline, clipped to the
pixel centres ``[0, W - 1] x [0, H - 1]``; a keypoint projected outside those centres is
``null`` in that image.

Pair fields: ``viewpoint_variation`` 0/1/2 from the rotation difference (under 15, under 35,
35 degrees or more), ``scale_variation`` 0/1/2 from the ratio of view scales (under 1.2, under
1.5, 1.5 or more), ``truncation`` 0 none, 1 source, 2 target, 3 both (an image truncates when a
keypoint left its frame), ``occlusion`` 0, poses ``"Unspecified"``, ``mirror`` 0. The images of
a category are split between trn/val/test (disjoint images); pairs are ordered pairs of distinct
images of one category and split sharing at least 3 keypoints, sampled with the seed.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import color, data, feature

from pipelines.sources.demo import SPLITS
from pipelines.sources.spair import annotation_path, layout_path

log = logging.getLogger(__name__)

DEFAULT_IMAGES_PER_CATEGORY = 24
DEFAULT_PAIRS_PER_CATEGORY: Mapping[str, int] = {"trn": 60, "val": 15, "test": 15}
DEFAULT_SIZE = (400, 300)
HELD_OUT_FRACTION = 0.2
"""Share of a category's images in each of val and test (the rest is trn)."""
MIN_IMAGES_PER_SPLIT = 2

KEYPOINT_SLOTS = 30
KEYPOINTS_PER_OBJECT = 14
MIN_COMMON_KEYPOINTS = 3
JPEG_QUALITY = 90
COORDINATE_DECIMALS = 2

MIN_SIZE_FRACTION = 0.8
"""A view's width and height are drawn from ``[0.8, 1] x`` the requested size."""
MAX_ROTATION_DEG = 45.0
SCALE_RANGE = (0.6, 1.3)
MAX_SHIFT = 0.25
"""Largest offset of the object centre from the frame centre, as a fraction of W and H."""
MAX_TILT = 0.15
"""Largest perspective term, in units of the object's half size."""
OBJECT_FRACTION = 0.7
"""The object's long side spans this fraction of the view's short side at scale 1."""
MAX_GAIN_CHANGE = 0.15
MAX_BIAS = 12.0
VIEWPOINT_STEPS_DEG = (15.0, 35.0)
SCALE_RATIO_STEPS = (1.2, 1.5)


@dataclass(frozen=True)
class DemoObject:
    """One category: a bundled photo and the outline ``(x, y)`` of its object, in photo pixels."""

    category: str
    photo_name: str
    load: Callable[[], np.ndarray]
    outline: tuple[tuple[int, int], ...]

    @property
    def outline_array(self) -> np.ndarray:
        """``(M, 2)`` float64 outline vertices."""
        return np.asarray(self.outline, dtype=np.float64)


DEMO_OBJECTS: tuple[DemoObject, ...] = (
    DemoObject(
        "cat", "chelsea", data.chelsea,
        ((30, 20), (80, 0), (330, 0), (395, 10), (380, 120), (360, 230), (320, 299), (60, 299), (20, 200)),
    ),
    DemoObject(
        "person", "astronaut", data.astronaut,
        ((150, 40), (200, 15), (280, 25), (305, 90), (300, 150), (340, 260), (360, 330), (290, 370), (275, 511),
         (20, 511), (25, 300), (60, 260), (120, 230), (115, 180), (160, 150)),
    ),
    DemoObject(
        "cup", "coffee", data.coffee,
        ((80, 170), (170, 70), (175, 40), (240, 18), (340, 18), (405, 50), (415, 80), (470, 170), (480, 250),
         (430, 340), (300, 390), (160, 380), (90, 310)),
    ),
    DemoObject("rocket", "rocket", data.rocket, ((305, 128), (335, 128), (338, 400), (355, 410), (290, 410), (302, 400))),
    DemoObject(
        "motorbike", "stereo_motorcycle[0]", lambda: data.stereo_motorcycle()[0],
        ((100, 200), (150, 160), (290, 160), (340, 110), (420, 105), (500, 80), (530, 95), (580, 125), (575, 170),
         (560, 250), (630, 270), (680, 330), (685, 410), (650, 450), (560, 440), (500, 360), (470, 360), (350, 400),
         (340, 435), (320, 435), (260, 400), (170, 400), (120, 340), (125, 260), (95, 230)),
    ),
)
CATEGORIES = tuple(obj.category for obj in DEMO_OBJECTS)


@dataclass(frozen=True)
class View:
    """The random parameters of one demo image: its ``size`` ``(W, H)``; the homography's
    in-plane ``rotation_deg``, ``scale`` (1 = the object's long side spans 0.7 of the short
    side), ``shift`` of the object centre (fractions of W and H) and perspective ``tilt``; the
    colour change ``gain`` (per channel) and ``bias``; the ``fill`` grey outside the photo."""

    size: tuple[int, int]
    rotation_deg: float
    scale: float
    shift: tuple[float, float]
    tilt: tuple[float, float]
    gain: tuple[float, float, float]
    bias: float
    fill: int


@dataclass
class ViewTruth:
    """The ground truth of one view. Shapes: ``keypoints`` ``(K, 2)`` float64 with NaN rows for
    keypoints outside the frame, ``bbox`` ``(4,)`` float64."""

    view: View
    keypoints: np.ndarray
    bbox: np.ndarray

    @property
    def visible(self) -> np.ndarray:
        """``(K,)`` bool: keypoints inside the frame."""
        return np.isfinite(self.keypoints).all(axis=1)


@dataclass
class DemoImage:
    """A written demo image: its stem, category and ground truth (its pixels are on disk only)."""

    stem: str
    category: str
    truth: ViewTruth

    @property
    def imname(self) -> str:
        return f"{self.stem}.jpg"


# ---------------------------------------------------------------- geometry


def object_keypoints(photo: np.ndarray, outline: np.ndarray, count: int = KEYPOINTS_PER_OBJECT) -> np.ndarray:
    """The ``count`` strongest Harris corners of ``photo`` (``(h, w, 3)``) at least 6% of the
    object's size apart, inside ``outline`` (``(M, 2)``) shrunk by 4 pixels; ``(K, 2)`` float64
    ``(x, y)``, strongest first (their ids are the row numbers)."""
    height, width = photo.shape[:2]
    outline_mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(outline_mask).polygon([tuple(p) for p in outline.tolist()], fill=1)
    inside = ndimage.binary_erosion(np.asarray(outline_mask, dtype=bool), iterations=4)
    response = np.where(inside, feature.corner_harris(color.rgb2gray(photo), sigma=1.5), 0.0)
    long_side = float((outline.max(axis=0) - outline.min(axis=0)).max())
    peaks = feature.corner_peaks(
        response, min_distance=max(6, int(0.06 * long_side)), threshold_rel=0.005, num_peaks=count, exclude_border=False
    )
    return peaks[:, ::-1].astype(np.float64)


def view_homography(outline: np.ndarray, view: View) -> np.ndarray:
    """``(3, 3)`` map from photo pixels to view pixels: centre the object's box and scale its
    half long side to 1, tilt, rotate, then scale and place it in the frame."""
    low, high = outline.min(axis=0), outline.max(axis=0)
    centre, half = (low + high) / 2, float((high - low).max()) / 2
    to_unit = np.array([[1 / half, 0, -centre[0] / half], [0, 1 / half, -centre[1] / half], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, 1, 0], [view.tilt[0], view.tilt[1], 1]])
    angle = math.radians(view.rotation_deg)
    rotate = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    width, height = view.size
    radius = OBJECT_FRACTION / 2 * min(width, height) * view.scale
    place = np.array(
        [[radius, 0, (width - 1) / 2 + view.shift[0] * width], [0, radius, (height - 1) / 2 + view.shift[1] * height], [0, 0, 1]]
    )
    return place @ rotate @ tilt @ to_unit


def project_points(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``(N, 2)`` points through ``(3, 3)`` ``homography``; ``(N, 2)``."""
    homogeneous = np.column_stack([points, np.ones(len(points))]) @ homography.T
    return homogeneous[:, :2] / homogeneous[:, 2:]


def warp_image(photo: np.ndarray, homography: np.ndarray, size: tuple[int, int], fill: float) -> np.ndarray:
    """Render ``photo`` (``(h, w, C)``) through ``homography`` into a ``size = (W, H)`` frame:
    ``(H, W, C)`` float64. View pixel ``(u, v)`` is the bilinear sample of the photo at
    ``H^-1 (u, v)`` (integer coordinates are pixel centres); outside the photo it is ``fill``.
    When the view shrinks the photo, the photo is first blurred against aliasing."""
    width, height = size
    inverse = np.linalg.inv(homography)
    sigma = _antialias_sigma(inverse, ((width - 1) / 2, (height - 1) / 2))
    source = ndimage.gaussian_filter(photo.astype(np.float64), sigma=(sigma, sigma, 0)) if sigma > 0 else photo.astype(np.float64)
    grid_u, grid_v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    sample = project_points(inverse, np.column_stack([grid_u.ravel(), grid_v.ravel()]))
    rows_cols = [sample[:, 1].reshape(height, width), sample[:, 0].reshape(height, width)]
    channels = [ndimage.map_coordinates(source[..., c], rows_cols, order=1, mode="constant", cval=fill) for c in range(photo.shape[2])]
    return np.stack(channels, axis=-1)


def _antialias_sigma(inverse: np.ndarray, point: tuple[float, float]) -> float:
    """Gaussian sigma (photo pixels) for the photo pixels per view pixel of ``inverse`` at
    ``point``, as :func:`skimage.transform.rescale` chooses it: ``(factor - 1) / 2``."""
    u, v = point
    x, y, w = inverse @ np.array([u, v, 1.0])
    jacobian = (inverse[:2, :2] * w - np.outer([x, y], inverse[2, :2])) / w**2
    factor = math.sqrt(abs(np.linalg.det(jacobian)))
    return max(0.0, (factor - 1) / 2)


def recolour(image: np.ndarray, gain: Sequence[float], bias: float) -> np.ndarray:
    """``(H, W, 3)`` float -> uint8: per-channel ``gain``, then ``bias``, rounded and clipped."""
    return np.clip(np.rint(image * np.asarray(gain) + bias), 0, 255).astype(np.uint8)


def render_view(photo: np.ndarray, outline: np.ndarray, keypoints: np.ndarray, view: View) -> tuple[np.ndarray, ViewTruth]:
    """Warp ``photo`` and its ground truth (``outline`` ``(M, 2)``, ``keypoints`` ``(K, 2)``)
    into ``view``: the ``(H, W, 3)`` uint8 image and its truth. Keypoints are rounded to 0.01
    pixel; those outside ``[0, W-1] x [0, H-1]`` become NaN rows. The box is the projected
    outline's, clipped to the same range."""
    homography = view_homography(outline, view)
    image = recolour(warp_image(photo, homography, view.size, view.fill), view.gain, view.bias)
    width, height = view.size
    projected = np.round(project_points(homography, keypoints), COORDINATE_DECIMALS)
    inside = (projected >= 0).all(axis=1) & (projected[:, 0] <= width - 1) & (projected[:, 1] <= height - 1)
    projected[~inside] = np.nan
    corners = project_points(homography, outline)
    low = np.clip(corners.min(axis=0), 0, [width - 1, height - 1])
    high = np.clip(corners.max(axis=0), 0, [width - 1, height - 1])
    bbox = np.round(np.concatenate([low, high]), COORDINATE_DECIMALS)
    return image, ViewTruth(view=view, keypoints=projected, bbox=bbox)


def sample_view(rng: np.random.Generator, max_size: tuple[int, int]) -> View:
    """Draw one view's parameters; sizes lie in ``[0.8, 1] x max_size``."""
    size = tuple(int(rng.integers(math.ceil(MIN_SIZE_FRACTION * side), side + 1)) for side in max_size)
    return View(
        size=size,
        rotation_deg=float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)),
        scale=float(math.exp(rng.uniform(math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])))),
        shift=(float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)), float(rng.uniform(-MAX_SHIFT, MAX_SHIFT))),
        tilt=(float(rng.uniform(-MAX_TILT, MAX_TILT)), float(rng.uniform(-MAX_TILT, MAX_TILT))),
        gain=tuple(float(g) for g in rng.uniform(1 - MAX_GAIN_CHANGE, 1 + MAX_GAIN_CHANGE, size=3)),
        bias=float(rng.uniform(-MAX_BIAS, MAX_BIAS)),
        fill=int(rng.integers(0, 256)),
    )


# ---------------------------------------------------------------- annotation documents


def _coordinates(values: np.ndarray) -> list[float]:
    return [round(float(v), COORDINATE_DECIMALS) for v in values]


def image_annotation(image: DemoImage, obj: DemoObject) -> dict[str, Any]:
    """The ``ImageAnnotation/<category>/<stem>.json`` document: SPair-71k's keys, 30 keypoint
    slots, ``null`` where the keypoint is unused or outside the frame. ``azimuth_id`` is the
    in-plane rotation in 45-degree bins (0..7), the nearest thing a 2-D view has."""
    truth = image.truth
    slots: dict[str, list[float] | None] = {str(i): None for i in range(KEYPOINT_SLOTS)}
    for index, point in enumerate(truth.keypoints):
        if np.isfinite(point).all():
            slots[str(index)] = _coordinates(point)
    width, height = truth.view.size
    return {
        "filename": image.imname,
        "src_database": "scikit-image",
        # The generator's module when the demo data was first released; kept so generated files stay byte-identical.
        "src_annotation": "pipelines.sources.demo",
        "src_image": f"skimage.data.{obj.photo_name}",
        "image_width": width,
        "image_height": height,
        "image_depth": 3,
        "category": image.category,
        "pose": "Unspecified",
        "truncated": int(not truth.visible.all()),
        "occluded": 0,
        "difficult": 0,
        "bndbox": _coordinates(truth.bbox),
        "kps": slots,
        "azimuth_id": int(round(truth.view.rotation_deg / 45)) % 8,
    }


def pair_name(pair_id: int, src: DemoImage, trg: DemoImage) -> str:
    """``000001-cat_0003-cat_0011:cat``, the SPair-71k pattern."""
    return f"{pair_id:06d}-{src.stem}-{trg.stem}:{src.category}"


def pair_annotation(pair_id: int, src: DemoImage, trg: DemoImage) -> dict[str, Any]:
    """The ``PairAnnotation/<split>/<name>.json`` document, with every SPair-71k pair field;
    keypoints are those visible in both images, in id order."""
    common = np.flatnonzero(src.truth.visible & trg.truth.visible)
    src_view, trg_view = src.truth.view, trg.truth.view
    return {
        "pair_id": pair_id,
        "src_imname": src.imname,
        "trg_imname": trg.imname,
        "src_imsize": [*src_view.size, 3],
        "trg_imsize": [*trg_view.size, 3],
        "src_bndbox": _coordinates(src.truth.bbox),
        "trg_bndbox": _coordinates(trg.truth.bbox),
        "src_pose": "Unspecified",
        "trg_pose": "Unspecified",
        "src_kps": [_coordinates(src.truth.keypoints[i]) for i in common],
        "trg_kps": [_coordinates(trg.truth.keypoints[i]) for i in common],
        "kps_ids": [int(i) for i in common],
        "category": src.category,
        "viewpoint_variation": _level(abs(src_view.rotation_deg - trg_view.rotation_deg), VIEWPOINT_STEPS_DEG),
        "scale_variation": _level(max(src_view.scale, trg_view.scale) / min(src_view.scale, trg_view.scale), SCALE_RATIO_STEPS),
        "truncation": int(not src.truth.visible.all()) + 2 * int(not trg.truth.visible.all()),
        "occlusion": 0,
        "mirror": 0,
    }


def _level(value: float, steps: tuple[float, float]) -> int:
    """0, 1 or 2: how many of ``steps`` ``value`` reaches."""
    return sum(value >= step for step in steps)


# ---------------------------------------------------------------- generation


def split_sizes(images_per_category: int) -> dict[str, int]:
    """How many of a category's images go to each split: 20% each to val and test."""
    held_out = max(MIN_IMAGES_PER_SPLIT, round(HELD_OUT_FRACTION * images_per_category))
    return {"trn": images_per_category - 2 * held_out, "val": held_out, "test": held_out}


def generate(
    out_dir: Path,
    images_per_category: int = DEFAULT_IMAGES_PER_CATEGORY,
    pairs_per_category: int | Mapping[str, int] = DEFAULT_PAIRS_PER_CATEGORY,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write a demo dataset into ``out_dir`` (which must be empty or absent) and return it.

    ``pairs_per_category`` is per split (a mapping ``split -> count``, where a split left out
    gets none, or one count for every split), capped by the ordered pairs available (a warning
    says so); with 20% of the images in each of val and test, ``n`` held-out images give
    ``n (n - 1)`` ordered pairs at most; ``size`` is the largest ``(W, H)`` of a
    view; ``categories`` picks a subset of :data:`CATEGORIES` (each category's images do not
    depend on the others). The same arguments give byte-identical files. The Layout lists are
    written last, so an interrupted run leaves no dataset that looks complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; generate the demo dataset into a new directory")
    sizes = split_sizes(images_per_category)
    if sizes["trn"] < MIN_IMAGES_PER_SPLIT:
        raise ValueError(f"images_per_category={images_per_category}: need at least {3 * MIN_IMAGES_PER_SPLIT} images per category")
    pair_counts = _pair_counts(pairs_per_category)
    objects = _select_objects(categories)

    images_by_split: dict[str, list[list[DemoImage]]] = {split: [] for split in SPLITS}
    for obj in objects:
        images = _write_category_images(out_dir, obj, images_per_category, seed, size)
        start = 0
        for split in SPLITS:
            images_by_split[split].append(images[start : start + sizes[split]])
            start += sizes[split]

    pair_id = 0
    layouts: dict[str, list[str]] = {split: [] for split in SPLITS}
    for split_index, split in enumerate(SPLITS):
        for obj, images in zip(objects, images_by_split[split]):
            rng = np.random.default_rng([seed, 1, CATEGORIES.index(obj.category), split_index])
            for src, trg in _sample_pairs(images, pair_counts[split], rng, f"{split}/{obj.category}"):
                pair_id += 1
                name = pair_name(pair_id, src, trg)
                _write_json(out_dir / annotation_path(split, name), pair_annotation(pair_id, src, trg))
                layouts[split].append(name)
    for split in SPLITS:
        _write_text(out_dir / layout_path(split), "".join(f"{name}\n" for name in layouts[split]))
    log.info("demo dataset in %s: %s pairs", out_dir, ", ".join(f"{s} {len(layouts[s])}" for s in SPLITS))
    return out_dir


def _pair_counts(pairs_per_category: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(pairs_per_category, int):
        return {split: pairs_per_category for split in SPLITS}
    unknown = set(pairs_per_category) - set(SPLITS)
    if unknown:
        raise ValueError(f"pairs_per_category names unknown splits {sorted(unknown)}; splits are {', '.join(SPLITS)}")
    return {split: int(pairs_per_category.get(split, 0)) for split in SPLITS}


def _select_objects(categories: Sequence[str] | None) -> list[DemoObject]:
    if categories is None:
        return list(DEMO_OBJECTS)
    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown demo categories {sorted(unknown)}; choose from {', '.join(CATEGORIES)}")
    return [obj for obj in DEMO_OBJECTS if obj.category in categories]


@functools.cache
def photo_and_keypoints(obj: DemoObject) -> tuple[np.ndarray, np.ndarray]:
    """``obj``'s photo ``(h, w, 3)`` uint8 and its keypoints ``(K, 2)``, computed once."""
    photo = obj.load()
    return photo, object_keypoints(photo, obj.outline_array)


def _write_category_images(out_dir: Path, obj: DemoObject, count: int, seed: int, size: tuple[int, int]) -> list[DemoImage]:
    """Render, encode and annotate ``count`` views of ``obj``'s photo; each view draws from its
    own random stream, so it does not depend on how many views are made."""
    photo, keypoints = photo_and_keypoints(obj)
    category_index = CATEGORIES.index(obj.category)
    images = []
    for index in range(count):
        view = sample_view(np.random.default_rng([seed, 0, category_index, index]), size)
        pixels, truth = render_view(photo, obj.outline_array, keypoints, view)
        image = DemoImage(f"{obj.category}_{index:04d}", obj.category, truth)
        _write_bytes(out_dir / f"JPEGImages/{obj.category}/{image.imname}", _encode_jpeg(pixels))
        _write_json(out_dir / f"ImageAnnotation/{obj.category}/{image.stem}.json", image_annotation(image, obj))
        images.append(image)
    return images


def _sample_pairs(images: list[DemoImage], count: int, rng: np.random.Generator, where: str) -> list[tuple[DemoImage, DemoImage]]:
    """Up to ``count`` ordered pairs of distinct images sharing at least 3 visible keypoints,
    drawn without replacement, in (source, target) order."""
    candidates = [
        (a, b)
        for a in range(len(images))
        for b in range(len(images))
        if a != b and (images[a].truth.visible & images[b].truth.visible).sum() >= MIN_COMMON_KEYPOINTS
    ]
    if count > len(candidates):
        log.warning("%s: %d pairs asked, only %d available", where, count, len(candidates))
    chosen = sorted(rng.choice(len(candidates), size=min(count, len(candidates)), replace=False).tolist())
    return [(images[candidates[i][0]], images[candidates[i][1]]) for i in chosen]


def _encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    _write_text(path, json.dumps(doc) + "\n")


# ---------------------------------------------------------------- CLI


def _parse_pairs_argument(text: str) -> int | dict[str, int]:
    """``"40"`` (every split) or ``"trn=300,val=50,test=50"``."""
    if "=" not in text:
        return int(text)
    counts = {}
    for part in text.split(","):
        split, _, count = part.partition("=")
        counts[split.strip()] = int(count)
    return counts


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.builders.demo",
        description="Generate the demo dataset (random views of scikit-image photos) in the SPair-71k layout.",
    )
    parser.add_argument("--out", type=Path, required=True, help="new or empty directory to write into")
    parser.add_argument("--images-per-category", type=int, default=DEFAULT_IMAGES_PER_CATEGORY, help="views per category (default %(default)s)")
    parser.add_argument(
        "--pairs-per-category",
        type=_parse_pairs_argument,
        default=dict(DEFAULT_PAIRS_PER_CATEGORY),
        help="pairs per category and split: N for every split, or trn=N,val=M,test=K (default trn=60,val=15,test=15)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--size", type=_parse_size, default=DEFAULT_SIZE, help="largest view size WxH (default 400x300)")
    parser.add_argument("--categories", type=lambda text: text.split(","), default=None, help=f"subset of {','.join(CATEGORIES)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        generate(args.out, args.images_per_category, args.pairs_per_category, args.seed, args.size, args.categories)
    except FileExistsError as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
