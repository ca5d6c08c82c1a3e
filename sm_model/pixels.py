"""The pixel and normalisation conventions: the one place that says where a pixel is.

Every point the project stores or predicts is ``(x, y)`` with the centre of pixel ``(0, 0)`` at
``(0.0, 0.0)`` (:mod:`pipelines.schema`). Three frames use that convention:

- the *original* image ``W x H`` (datasets, shards, predictions, PCK);
- the *network input*: the original resized anisotropically to ``S x S`` (:func:`resize_image`);
- a stride-``s`` *feature map*, whose "cell coordinates" put cell ``j`` at ``j``.

How points move between the frames is the model's *pixel convention*
(``ModelConfig.pixel_convention``), one of :data:`PIXEL_CONVENTIONS`:

==============  ================================  =================================  ==================
convention      original -> input                 cell ``j`` -> input pixel          source features
==============  ================================  =================================  ==================
``"center"``    ``x' = (x + 0.5) * S / W - 0.5``  ``s*j + (s - 1)/2`` (its centre)    bilinear at the cell
                (pixel centres aligned)                                               coordinate
``"official"``  ``x' = x * S / W``                ``s*j`` (its corner)               the integer cell
                                                                                      ``floor(x' / s)``
==============  ================================  =================================  ==================

``"center"`` is the project's, the default for the models it trains: cell ``j`` covers pixels
``[s*j - 0.5, s*(j+1) - 0.5]``. ``"official"`` is what the released SimpleMatch code does (the
network learns the offset); models loaded from released checkpoints use it
(:func:`sm_model.official.official_model`). At stride ``s`` the two put the same cell ``(s - 1)/2``
input pixels apart (+1.5 at 4, +3.5 at 8, +7.5 at 16); an input pixel maps back to original
pixels ``(W/S - 1)/2`` apart (and an original point to input pixels ``(S/W - 1)/2`` apart), so a
matched cell's prediction differs by ``(s/2) * W/S - 1/2`` original pixels. Functions here take the
convention, ``"center"`` by default: :func:`rescale_points`, :func:`original_to_input_pixels`,
:func:`input_to_original_pixels`, :func:`to_resized_square`, :func:`from_resized_square`,
:func:`pixels_to_cells`, :func:`cells_to_pixels`, :func:`default_sampling`.

Images are resized by :func:`resize_image` as ``ModelConfig.image_resize`` says, one of
:data:`IMAGE_RESIZES`: ``"antialiased"`` (PIL's bilinear, which widens its filter when shrinking)
or ``"official"`` (OpenCV's ``cv2.resize`` ``INTER_LINEAR`` on uint8, which the official code uses:
bilinear between the two nearest pixels, no antialiasing, reproduced here bit for bit in numpy).
A model's input as a whole (size, resize, normalisation, convention) is :mod:`sm_model.inputs`.
"""

from __future__ import annotations

from typing import TypeVar, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sm_model.config import ImageResize, KeypointSampling, PixelConvention

PIXEL_CONVENTIONS: tuple[str, ...] = get_args(PixelConvention)
IMAGE_RESIZES: tuple[str, ...] = get_args(ImageResize)

Points = TypeVar("Points", np.ndarray, Tensor)


def check_convention(convention: str) -> None:
    """A ValueError unless ``convention`` is one of :data:`PIXEL_CONVENTIONS`."""
    if convention not in PIXEL_CONVENTIONS:
        raise ValueError(f"unknown pixel convention {convention!r}; expected one of {PIXEL_CONVENTIONS}")


def rescale_points(points: Points, scale: Points, convention: PixelConvention = "center") -> Points:
    """Points ``(..., 2)`` of an image -> the same points after the image is resized by ``scale``
    (``(..., 2)``-broadcastable ``(S_x / W, S_y / H)``): pixel centres aligned (``"center"``,
    ``(x + 0.5) * scale - 0.5``) or ``x * scale`` (``"official"``). numpy or torch alike."""
    check_convention(convention)
    if convention == "official":
        return points * scale
    return (points + 0.5) * scale - 0.5


def original_to_input_pixels(
    points: Tensor, sizes: Tensor, input_size: int, convention: PixelConvention = "center"
) -> Tensor:
    """Points ``[B, N, 2]`` in images of ``sizes`` ``[B, 2]`` ``(W, H)`` -> pixels of the
    ``input_size`` square they were resized to."""
    return rescale_points(points, input_size / _as_float(sizes, points).unsqueeze(1), convention)


def input_to_original_pixels(
    points: Tensor, sizes: Tensor, input_size: int, convention: PixelConvention = "center"
) -> Tensor:
    """Inverse of :func:`original_to_input_pixels`: ``x = (x' + 0.5) * W / S - 0.5`` (``"center"``)
    or ``x = x' * W / S`` (``"official"``)."""
    return rescale_points(points, _as_float(sizes, points).unsqueeze(1) / input_size, convention)


def to_resized_square(
    points: np.ndarray, size_wh: tuple[int, int], square: int, convention: PixelConvention = "center"
) -> np.ndarray:
    """numpy :func:`original_to_input_pixels` of one image: ``(..., 2)`` points of a ``(W, H)``
    image -> its ``square x square`` resize. Returns float64."""
    scale = np.array([square / size_wh[0], square / size_wh[1]], dtype=np.float64)
    return rescale_points(np.asarray(points, dtype=np.float64), scale, convention)


def from_resized_square(
    points: np.ndarray, size_wh: tuple[int, int], square: int, convention: PixelConvention = "center"
) -> np.ndarray:
    """Inverse of :func:`to_resized_square`. Returns float64."""
    scale = np.array([size_wh[0] / square, size_wh[1] / square], dtype=np.float64)
    return rescale_points(np.asarray(points, dtype=np.float64), scale, convention)


def pixels_to_cells(points: Tensor, stride: float, convention: PixelConvention = "center") -> Tensor:
    """Input pixels ``[..., 2]`` -> cell coordinates ``[..., 2]`` of a stride-``stride`` map:
    ``(x - (s - 1)/2) / s`` (``"center"``) or ``x / s`` (``"official"``)."""
    check_convention(convention)
    if convention == "official":
        return points / stride
    return (points - (stride - 1) / 2) / stride


def cells_to_pixels(cells: Tensor, stride: float, convention: PixelConvention = "center") -> Tensor:
    """Cell coordinates ``[..., 2]`` of a stride-``stride`` map -> input pixels ``[..., 2]``:
    ``s*j + (s - 1)/2`` (``"center"``) or ``s*j`` (``"official"``)."""
    check_convention(convention)
    if convention == "official":
        return cells * stride
    return cells * stride + (stride - 1) / 2


def default_sampling(convention: PixelConvention, sampling: KeypointSampling | None = None) -> KeypointSampling:
    """How source keypoint features are read: ``sampling`` when given (``ModelConfig.keypoint_sampling``),
    else the convention's own: ``"bilinear"`` at the cell coordinate (``"center"``) or ``"nearest"``,
    the integer cell ``floor(x / s)`` (``"official"``)."""
    check_convention(convention)
    if sampling is not None:
        return sampling
    return "nearest" if convention == "official" else "bilinear"


def resize_image(image: np.ndarray, size: int, method: ImageResize = "antialiased") -> Tensor:
    """``(H, W, C)`` uint8 -> ``[C, size, size]`` uint8, bilinear, anisotropic (like the
    benchmarks). ``method`` (``ModelConfig.image_resize``): ``"antialiased"``, PIL's bilinear
    (a wider triangle filter when shrinking), or ``"official"``, OpenCV's ``INTER_LINEAR`` as the
    official code resizes (:func:`resize_like_opencv`)."""
    if method == "official":
        resized = resize_like_opencv(image, size)
    elif method == "antialiased":
        resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    else:
        raise ValueError(f"unknown image resize {method!r}; expected one of {IMAGE_RESIZES}")
    return torch.from_numpy(resized.copy()).permute(2, 0, 1).contiguous()


_COEF_BITS = 11
"""OpenCV's fixed-point precision of interpolation weights for 8-bit images (``INTER_RESIZE_COEF_BITS``)."""


def resize_like_opencv(image: np.ndarray, size: int) -> np.ndarray:
    """``cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)`` for an ``(H, W, C)``
    uint8 ``image``, in numpy, bit for bit (checked against OpenCV 5.0 on 200 random sizes).

    Output pixel ``d`` samples the source at ``(d + 0.5) * W / S - 0.5`` (half-pixel centres), from
    its two nearest pixels only: no antialiasing however much the image shrinks. OpenCV computes
    in fixed point, which this repeats: weights rounded to 1/2048 from float32 positions; columns
    clamped to the image (a position left of the first centre reads the first pixel); rows read at
    ``floor`` and ``floor + 1`` clipped to the image with unclamped weights; the vertical pass as its
    SIMD code does, ``((a >> 4) * wa >> 16) + ((b >> 4) * wb >> 16)`` then ``(v + 2) >> 2``. That
    truncates, so a value that is exactly ``k + 0.5`` in real arithmetic may come out as ``k``."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, C) uint8 array, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    first_col, second_col, col_weights = _opencv_taps(width, size, clamp=True)
    first_row, second_row, row_weights = _opencv_taps(height, size, clamp=False)
    pixels = image.astype(np.int64)
    rows = pixels[:, first_col] * col_weights[0][:, None] + pixels[:, second_col] * col_weights[1][:, None]
    top = ((rows[first_row] >> 4) * row_weights[0][:, None, None]) >> 16
    bottom = ((rows[second_row] >> 4) * row_weights[1][:, None, None]) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def _opencv_taps(source: int, size: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The two source indices and the fixed-point weights (``2**11`` = 1) of each of ``size``
    outputs along an axis of ``source`` pixels, as ``cv2.resize`` ``INTER_LINEAR`` computes them."""
    scale = 1.0 / (size / source)
    position = ((np.arange(size) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position)
    fraction = position - first
    first = first.astype(np.int64)
    if clamp:
        outside = (first < 0) | (first >= source - 1)
        fraction[outside] = 0
        first = np.clip(first, 0, source - 1)
    one = np.float32(1 << _COEF_BITS)
    weights = (np.rint((1 - fraction) * one).astype(np.int64), np.rint(fraction * one).astype(np.int64))
    return np.clip(first, 0, source - 1), np.clip(first + 1, 0, source - 1), weights


def _as_float(sizes: Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(sizes, device=like.device).to(torch.promote_types(like.dtype, torch.float32))
