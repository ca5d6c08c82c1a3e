"""Figures with PIL only: the PCK curve (PCK against alpha) and match pictures like the paper's.

Pure functions from numbers and pixels to ``PIL.Image``; :func:`png_bytes` encodes them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CORRECT = (0, 190, 0)
WRONG = (230, 30, 30)
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229),
)  # fmt: skip
"""The tab20-like colours of curve lines, reordered so the first ten are the strong ones."""


@cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG (deterministic for the same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- PCK curve ---------------------------------------------------------------------------------


def pck_curve_image(
    alphas: Sequence[float],
    series: Mapping[str, Sequence[float]],
    title: str,
    emphasised: str | None = None,
    size: tuple[int, int] = (900, 560),
) -> Image.Image:
    """PCK (fractions, shown in %) against alpha: one line per entry of ``series`` (``label ->
    (A,)`` values at ``alphas`` ``(A,)``), the ``emphasised`` one thick and black, a legend on the
    right (the picture grows taller when the legend needs it). Colours cycle after 20 lines, dashed
    the second time round."""
    font, small = _font(16), _font(13)
    legend_rows = len(series)
    width, height = size[0], max(size[1], 90 + 18 * legend_rows)
    left, right, top, bottom = 70, width - 230, 70, height - 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 14), title, fill="black", font=font)
    x_max = max(alphas)

    def to_px(alpha: float, value: float) -> tuple[float, float]:
        return left + (right - left) * alpha / x_max, bottom - (bottom - top) * value

    for tick in range(0, 101, 10):
        _, y = to_px(0, tick / 100)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{tick}", fill="black", font=small, anchor="rm")
    for tick in _alpha_ticks(x_max):
        x, _ = to_px(tick, 0)
        draw.line([(x, top), (x, bottom)], fill=(235, 235, 235))
        draw.text((x, bottom + 8), f"{tick:g}", fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, bottom + 30), "alpha", fill="black", font=font, anchor="mt")
    draw.text((left, top - 10), "PCK (%)", fill="black", font=font, anchor="lb")

    ordered = sorted(series, key=lambda label: label != emphasised)
    for index, label in enumerate(ordered):
        strong = label == emphasised
        colour = (0, 0, 0) if strong else PALETTE[index % len(PALETTE)]
        dashed = not strong and index >= len(PALETTE)
        points = [to_px(a, v) for a, v in zip(alphas, series[label])]
        _polyline(draw, points, colour, 3 if strong else 2, dashed)
        legend_y = top + 18 * index
        _polyline(draw, [(right + 15, legend_y + 7), (right + 45, legend_y + 7)], colour, 3 if strong else 2, dashed)
        draw.text((right + 52, legend_y), label, fill="black", font=small)
    return image


def _alpha_ticks(x_max: float) -> list[float]:
    step = 0.05 if x_max <= 0.5 else 0.1
    return [round(step * i, 6) for i in range(int(x_max / step + 1e-9) + 1)]


def _polyline(
    draw: ImageDraw.ImageDraw, points: Sequence[tuple[float, float]], colour, width: int, dashed: bool
) -> None:
    """A line through ``points``; dashed as 8 px on, 6 px off."""
    if not dashed:
        draw.line(list(points), fill=colour, width=width, joint="curve")
        return
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = float(np.hypot(x1 - x0, y1 - y0))
        for start in np.arange(0.0, length, 14.0):
            stop = min(start + 8.0, length)
            dash = [(x0 + f * (x1 - x0), y0 + f * (y1 - y0)) for f in (start / length, stop / length)]
            draw.line(dash, fill=colour, width=width)


# ---- matches -----------------------------------------------------------------------------------


MAX_PANEL_ASPECT = 4
"""The widest an image is drawn beside the other, as a multiple of the picture's height."""


def _side_by_side(
    src_image: np.ndarray, trg_image: np.ndarray, height: int, caption: str, footer: int = 0
) -> tuple[Image.Image, ImageDraw.ImageDraw, Callable[[np.ndarray, int], tuple[float, float]]]:
    """A white canvas with ``caption`` on top, then source and target (``(H, W, 3)`` uint8) side by
    side, both scaled to ``height`` (or to :data:`MAX_PANEL_ASPECT` times that width), and ``footer`` empty pixels below. Returns the canvas, its
    drawing context and ``place(point, side)``: the canvas position of ``point`` (original pixels,
    pixel centres at integers) of the source (``side`` 0) or the target (1)."""
    header, gap = 26, 8
    # An image wider than MAX_PANEL_ASPECT : 1 is scaled to that width instead (less tall), so the
    # canvas stays bounded whatever the image's shape (an 80,000,000 x 1 image included).
    scales = tuple(
        min(height / image.shape[0], MAX_PANEL_ASPECT * height / image.shape[1]) for image in (src_image, trg_image)
    )
    src, trg = (
        Image.fromarray(image).resize(
            (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))), Image.BILINEAR
        )
        for image, scale in zip((src_image, trg_image), scales)
    )
    canvas = Image.new("RGB", (src.width + gap + trg.width, header + height + footer), "white")
    canvas.paste(src, (0, header))
    canvas.paste(trg, (src.width + gap, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 5), caption, fill="black", font=_font(14))
    offsets = (0, src.width + gap)

    def place(point: np.ndarray, side: int) -> tuple[float, float]:
        # Pixel centres sit at integer coordinates: scale (x + 0.5), not x.
        scale = scales[side]
        return (point[0] + 0.5) * scale - 0.5 + offsets[side], (point[1] + 0.5) * scale - 0.5 + header

    return canvas, draw, place


def matches_image(
    src_image: np.ndarray,
    trg_image: np.ndarray,
    src_kps: np.ndarray,
    pred_kps: np.ndarray,
    gt_kps: np.ndarray,
    correct: np.ndarray,
    caption: str,
    height: int = 320,
) -> Image.Image:
    """Source and target side by side, both scaled to ``height``, a line from each source keypoint
    to its predicted target position, green where ``correct`` and red where not; the ground truth
    is a white ring. ``src_image``/``trg_image`` ``(H, W, 3)`` uint8; ``src_kps``, ``pred_kps``,
    ``gt_kps`` ``(K, 2)`` original pixels of their images; ``correct`` ``(K,)`` bool."""
    canvas, draw, place = _side_by_side(src_image, trg_image, height, caption)
    for s, p, g, ok in zip(src_kps, pred_kps, gt_kps, correct):
        colour = CORRECT if ok else WRONG
        a, b, t = place(s, 0), place(p, 1), place(g, 1)
        draw.ellipse([t[0] - 5, t[1] - 5, t[0] + 5, t[1] + 5], outline="white", width=2)
        draw.line([a, b], fill=colour, width=2)
        for x, y in (a, b):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    return canvas


# ---- scored matches (python -m sm_eval.match) --------------------------------------------------

SCORE_COLOURS = ((0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80)))
"""The colour scale of match scores, red through yellow to green (ColorBrewer's RdYlGn ends and
middle): ``(score, RGB)`` anchors, linear between them."""
SCORE_RANGE = (0.0, 1.0)
"""Scores drawn at the two ends of :data:`SCORE_COLOURS`; a cosine similarity below 0 is drawn as 0."""


def score_colour(score: float, score_range: tuple[float, float] = SCORE_RANGE) -> tuple[int, int, int]:
    """The RGB colour of ``score`` on :data:`SCORE_COLOURS` stretched over ``score_range``
    (clamped at its ends; a non-finite score is grey)."""
    if not np.isfinite(score):
        return (128, 128, 128)
    low, high = score_range
    t = min(1.0, max(0.0, (score - low) / (high - low)))
    for (t0, c0), (t1, c1) in zip(SCORE_COLOURS, SCORE_COLOURS[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            return tuple(round(a + f * (b - a)) for a, b in zip(c0, c1))  # type: ignore[return-value]
    return SCORE_COLOURS[-1][1]


def scored_matches_image(
    src_image: np.ndarray,
    trg_image: np.ndarray,
    src_points: np.ndarray,
    trg_points: np.ndarray,
    scores: np.ndarray,
    caption: str,
    height: int | None = None,
    score_range: tuple[float, float] = SCORE_RANGE,
) -> Image.Image:
    """Source (left) and target (right) side by side, both scaled to ``height`` (default: the
    taller image's height, kept within 240..720 pixels), a line from each source point to its
    match coloured by its score (:func:`score_colour`; the best-scoring lines on top), and a
    colour bar of the score scale under the images. ``src_image``/``trg_image`` ``(H, W, 3)``
    uint8; ``src_points``, ``trg_points`` ``(N, 2)`` original pixels of their images (pixel
    centres at integers); ``scores`` ``(N,)``. Lines and dots get thinner when there are many."""
    if not score_range[1] > score_range[0]:
        raise ValueError(f"score_range must be (low, high) with low < high, got {score_range}")
    if height is None:
        height = int(min(720, max(240, src_image.shape[0], trg_image.shape[0])))
    footer = 38
    canvas, draw, place = _side_by_side(src_image, trg_image, height, caption, footer)
    scores = np.asarray(scores, dtype=np.float64)
    many = len(scores) > 200
    line_width, radius = (1, 1.5) if many else (2, 3)
    order = np.argsort(np.nan_to_num(scores, nan=-np.inf), kind="stable")  # best matches drawn last, on top
    for index in order:
        colour = score_colour(float(scores[index]), score_range)
        a, b = place(src_points[index], 0), place(trg_points[index], 1)
        draw.line([a, b], fill=colour, width=line_width)
        for x, y in (a, b):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    _score_bar(draw, canvas.width, canvas.height - footer + 8, score_range)
    return canvas


def _score_bar(draw: ImageDraw.ImageDraw, width: int, top: int, score_range: tuple[float, float]) -> None:
    """The colour bar of :func:`scored_matches_image`: ``score`` then a gradient from
    ``score_range[0]`` to ``score_range[1]`` with ticks at both ends and the middle."""
    small = _font(12)
    left = 52
    right = max(left + 60, min(width - 24, left + 300))
    draw.text((4, top + 5), "score", fill="black", font=small, anchor="lm")
    low, high = score_range
    for x in range(left, right + 1):
        draw.line(
            [(x, top), (x, top + 10)], fill=score_colour(low + (high - low) * (x - left) / (right - left), score_range)
        )
    draw.rectangle([left, top, right, top + 10], outline=(90, 90, 90))
    for fraction in (0.0, 0.5, 1.0):
        x = left + fraction * (right - left)
        draw.line([(x, top + 10), (x, top + 13)], fill="black")
        draw.text((x, top + 14), f"{low + fraction * (high - low):g}", fill="black", font=small, anchor="mt")
