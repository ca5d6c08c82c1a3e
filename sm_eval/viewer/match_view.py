"""The Match tab without the browser: a pair encoded once, clicked points matched against it, and
the picture the tab shows: source (left) and target (right) side by side, each point in its colour
on both, and the heat map of the last point's similarity over the target.

Both images are shown at one height (that of the taller one, at most :data:`DISPLAY_HEIGHT`
pixels, so a small pair is shown pixel for pixel), :data:`GAP` pixels apart, in one picture: one
image to send per click. A click gives a pixel of that picture; on the source it maps back to
original source pixels with pixel centres aligned (:func:`display_to_original`), so the point
matched is ``(x, y)`` in original pixels as :mod:`sm_eval.match` takes it. Each click costs one
``match`` call against the cached encoding (:func:`sm_eval.match.match_encoded_with_maps`) and one
redraw.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from sm_eval import figures
from sm_eval.match import (
    EncodedPair,
    MatchResult,
    check_points,
    encode_pair,
    match_encoded_with_maps,
)
from sm_model.matcher import MatchModel

DISPLAY_HEIGHT = 560
"""The tallest the two images are shown (both at the same height)."""
MAX_PANEL_ASPECT = 3
"""The widest an image is shown, as a multiple of the height (a panorama is shown less tall)."""
GAP = 8
"""Pixels between the two images."""
MAX_POINTS = 256
"""Points kept on screen at once; more must be cleared first."""
POINT_COLOURS = figures.PALETTE[:10]
"""Each point's colour, in turn (the strong half of the curve palette)."""
COLOUR_NAMES = ("blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive", "cyan")
"""How the points table names :data:`POINT_COLOURS`."""
HEAT_OPACITY = 0.55
"""How much the heat map covers the target image."""
FEW_POINTS = 16
"""Up to this many points (a click is one) are matched on one CPU thread: a single point's ``match``
is too small to share, and on a busy machine the threads only wait for each other (at 448 on 2
loaded cores: 9 ms on one thread, 39 ms on two)."""

_MODEL_LOCK = threading.Lock()


@contextlib.contextmanager
def _model_use(threads: int | None) -> Iterator[None]:
    """One model call at a time in this process (sessions share the model), on ``threads`` CPU
    threads when given (restored afterwards)."""
    with _MODEL_LOCK:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


@dataclass
class MatchedPoint:
    """One matched point: ``source`` and ``target`` ``(x, y)`` in original pixels, its ``score``,
    its ``colour`` and its number on screen (1-based)."""

    number: int
    source: tuple[float, float]
    target: tuple[float, float]
    score: float
    colour: tuple[int, int, int]


@dataclass
class PairSession:
    """One browser session's pair: the images, their displayed copies (both at the same height), the
    encoding (made once when the pair is loaded) and the points matched so far, with the last
    point's score map."""

    src_image: np.ndarray
    trg_image: np.ndarray
    src_display: np.ndarray
    trg_display: np.ndarray
    pair: EncodedPair
    src_name: str = "source"
    trg_name: str = "target"
    points: list[MatchedPoint] = field(default_factory=list)
    last_map: np.ndarray | None = None
    encode_seconds: float = 0.0

    @property
    def source_size(self) -> tuple[int, int]:
        return self.pair.source_size

    @property
    def target_size(self) -> tuple[int, int]:
        return self.pair.target_size

    @property
    def src_display_size(self) -> tuple[int, int]:
        return self.src_display.shape[1], self.src_display.shape[0]

    @property
    def trg_display_size(self) -> tuple[int, int]:
        return self.trg_display.shape[1], self.trg_display.shape[0]

    @functools.cached_property
    def src_picture(self) -> Image.Image:
        return Image.fromarray(self.src_display)

    @functools.cached_property
    def trg_picture(self) -> Image.Image:
        return Image.fromarray(self.trg_display)

    @property
    def target_offset(self) -> int:
        """Where the target starts in the picture (x)."""
        return self.src_display.shape[1] + GAP


def display_pair(src_image: np.ndarray, trg_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two images as shown: both scaled (antialiased when shrinking) to one height, that of the
    taller one but at most :data:`DISPLAY_HEIGHT` (an image wider than :data:`MAX_PANEL_ASPECT`
    times that is shown less tall); an image already at its size is shown as it is."""
    height = min(DISPLAY_HEIGHT, max(src_image.shape[0], trg_image.shape[0]))
    shown = []
    for image in (src_image, trg_image):
        rows, cols = image.shape[:2]
        scale = min(height / rows, MAX_PANEL_ASPECT * height / cols)
        size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        if size == (cols, rows):
            shown.append(image)
        else:
            shown.append(np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=2.0)))
    return shown[0], shown[1]


def display_to_original(point: tuple[float, float], display_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A point of a displayed copy ``display_size`` ``(w, h)`` -> original pixels of a ``size``
    ``(W, H)`` image, pixel centres aligned: ``x = (x_d + 0.5) * W / w - 0.5``."""
    scale = np.array(size, dtype=np.float64) / np.array(display_size, dtype=np.float64)
    return (np.asarray(point, dtype=np.float64) + 0.5) * scale - 0.5


def original_to_display(point: np.ndarray, size: tuple[int, int], display_size: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`display_to_original`."""
    scale = np.array(display_size, dtype=np.float64) / np.array(size, dtype=np.float64)
    return (np.asarray(point, dtype=np.float64) + 0.5) * scale - 0.5


def load_pair(
    model: MatchModel,
    src_image: np.ndarray,
    trg_image: np.ndarray,
    *,
    src_name: str = "source",
    trg_name: str = "target",
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> PairSession:
    """A new session for the pair: both images encoded once (:func:`sm_eval.match.encode_pair`)."""
    with _model_use(None):
        started = time.perf_counter()
        pair = encode_pair(model, src_image, trg_image, device=device, autocast_dtype=autocast_dtype)
        seconds = time.perf_counter() - started
    src_display, trg_display = display_pair(src_image, trg_image)
    return PairSession(src_image, trg_image, src_display, trg_display, pair, src_name, trg_name,
                       encode_seconds=seconds)  # fmt: skip


def click_point(session: PairSession, picture_xy: tuple[float, float]) -> np.ndarray | None:
    """The original source point of a click at pixel ``picture_xy`` of the picture, or ``None``
    when the click is not on the source image."""
    x, y = picture_xy
    width, height = session.src_display_size
    if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
        return None
    return display_to_original((x, y), session.src_display_size, session.source_size)


def add_points(model: MatchModel, session: PairSession, points: np.ndarray) -> MatchResult:
    """Match ``points`` (``(N, 2)`` original source pixels) against the session's encoding, keep them
    on screen in their colours and keep the last point's score map. ``ValueError`` for a point outside
    the source image, or when more than :data:`MAX_POINTS` would be on screen."""
    points = check_points(np.asarray(points, dtype=np.float64).reshape(-1, 2), session.source_size, "source image")
    if len(session.points) + len(points) > MAX_POINTS:
        raise ValueError(f"at most {MAX_POINTS} points at once: clear the points first")
    with _model_use(1 if len(points) <= FEW_POINTS and session.pair.device.type == "cpu" else None):
        result, maps = match_encoded_with_maps(model, session.pair, points)
    for source, target, score in zip(result.source_points, result.target_points, result.scores):
        number = len(session.points) + 1
        colour = POINT_COLOURS[(number - 1) % len(POINT_COLOURS)]
        session.points.append(
            MatchedPoint(number, (float(source[0]), float(source[1])), (float(target[0]), float(target[1])),
                         float(score), colour)
        )  # fmt: skip
    session.last_map = maps[-1]
    return result


def clear_points(session: PairSession) -> None:
    session.points.clear()
    session.last_map = None


# ---- the picture -------------------------------------------------------------------------------


@cache
def _heat_lut() -> np.ndarray:
    """``(256, 3)`` uint8: the turbo colour map, low (dark blue) to high (dark red)."""
    import matplotlib

    return np.round(matplotlib.colormaps["turbo"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def heat_overlay(
    image: np.ndarray | Image.Image, score_map: np.ndarray, opacity: float = HEAT_OPACITY
) -> tuple[Image.Image, tuple[float, float]]:
    """``image`` (the displayed target) under the score map ``(h, w)`` stretched over it (bilinear,
    cell centres at the centres of the image regions they cover, as the model's input is the whole
    target resized), coloured low to high from the map's minimum to its maximum; returns the picture
    and that ``(minimum, maximum)``."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    low, high = float(np.min(score_map)), float(np.max(score_map))
    scaled = (np.asarray(score_map, dtype=np.float32) - low) * np.float32(255.0 / max(high - low, 1e-12))
    stretched = Image.fromarray(np.ascontiguousarray(scaled, dtype=np.float32)).resize(picture.size, Image.BILINEAR)
    heat = stretched.convert("L")  # clamps to 0..255
    heat.putpalette(_heat_lut().tobytes())
    return Image.blend(picture, heat.convert("RGB"), opacity), (low, high)


def warm_up() -> None:
    """Load what the first picture would otherwise wait for (the colour map, the font, the labels)."""
    _heat_lut()
    for number, colour in enumerate(POINT_COLOURS, start=1):
        _label(number, colour)


@cache
def _label(number: int, colour: tuple[int, int, int]) -> Image.Image:
    """A point's number in its colour, outlined in black, as an RGBA picture (drawn once)."""
    text = str(number)
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, stroke_width=2)
    label = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(label).text((-left, -top), text, fill=colour, stroke_width=2, stroke_fill=(0, 0, 0))
    return label


def _marker(picture: Image.Image, draw: ImageDraw.ImageDraw, xy: np.ndarray, colour, number: int, radius: float,
            target: bool) -> None:  # fmt: skip
    x, y = float(xy[0]), float(xy[1])
    box = [x - radius, y - radius, x + radius, y + radius]
    if target:  # a ring with a cross: the match
        draw.ellipse(box, outline=(0, 0, 0), width=4)
        draw.ellipse(box, outline=colour, width=2)
        draw.line([x - radius, y, x + radius, y], fill=colour, width=1)
        draw.line([x, y - radius, x, y + radius], fill=colour, width=1)
    else:  # a filled dot: the clicked point
        draw.ellipse(box, fill=colour, outline=(0, 0, 0), width=1)
    label = _label(number, colour)
    picture.paste(label, (round(x + radius + 1), round(y - radius - label.height + 2)), label)


def session_image(session: PairSession, heat_map: bool = True) -> tuple[Image.Image, tuple[float, float] | None]:
    """Source and target side by side, every point in its colour (a dot on the source, a ring on the
    target) and, with ``heat_map``, the last point's score map over the target; returns the picture
    and the heat map's ``(minimum, maximum)`` (``None`` without one)."""
    src, trg = session.src_picture, session.trg_picture
    heat_range = None
    if heat_map and session.last_map is not None:
        trg, heat_range = heat_overlay(trg, session.last_map)
    offset = session.target_offset
    picture = Image.new("RGB", (offset + trg.width, max(src.height, trg.height)), (255, 255, 255))
    picture.paste(src, (0, 0))
    picture.paste(trg, (offset, 0))
    draw = ImageDraw.Draw(picture)
    radius = max(4.0, 0.012 * picture.height)
    for point in session.points:
        source = original_to_display(point.source, session.source_size, session.src_display_size)
        target = original_to_display(point.target, session.target_size, session.trg_display_size) + (offset, 0)
        _marker(picture, draw, source, point.colour, point.number, radius, target=False)
        _marker(picture, draw, target, point.colour, point.number, radius, target=True)
    return picture, heat_range


def session_picture(session: PairSession, heat_map: bool = True) -> tuple[np.ndarray, tuple[float, float] | None]:
    """:func:`session_image` as an ``(H, W, 3)`` uint8 array."""
    picture, heat_range = session_image(session, heat_map)
    return np.asarray(picture), heat_range


def points_table(session: PairSession | None) -> list[list]:
    """The rows of the points table: number, colour, source x, y, target x, y, score."""
    if session is None:
        return []
    return [
        [p.number, COLOUR_NAMES[POINT_COLOURS.index(p.colour)], round(p.source[0], 2), round(p.source[1], 2),
         round(p.target[0], 2), round(p.target[1], 2), round(p.score, 4)]
        for p in session.points
    ]  # fmt: skip


def describe_point(point: MatchedPoint) -> str:
    """How the tab states one match (the browser test reads it): ``point N: source (x, y) -> target
    (x, y), score s``, coordinates in original pixels to 2 decimals."""
    return (
        f"point {point.number}: source ({point.source[0]:.2f}, {point.source[1]:.2f}) -> "
        f"target ({point.target[0]:.2f}, {point.target[1]:.2f}), score {point.score:.4f}"
    )
