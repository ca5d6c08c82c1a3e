"""The pixel and normalisation conventions: the one place that says where a pixel is.

Every point the project stores or predicts is ``(x, y)`` with the centre of pixel ``(0, 0)`` at
``(0.0, 0.0)`` (:mod:`pipelines.schema`). Three frames use that convention:

- the *original* image ``W x H`` (datasets, shards, predictions, PCK);
- the *network input*: the original resized anisotropically to ``S x S`` (:func:`resize_image`);
  points move between the two with pixel centres aligned, ``x' = (x + 0.5) * S / W - 0.5``
  (:func:`rescale_points`, :func:`original_to_input_pixels`, :func:`input_to_original_pixels`);
- a stride-``s`` *feature map*: cell ``i`` covers pixels ``[s*i - 0.5, s*(i+1) - 0.5]`` and its centre
  is at pixel ``s*i + (s - 1)/2``; "cell coordinates" put the centre of cell ``j`` at ``j``
  (:func:`pixels_to_cells`, :func:`cells_to_pixels`). The official code maps cell ``i`` to pixel
  ``s*i`` (the cell's corner) and leaves the network to learn the offset; we use the centre.

Images reach the backbones ImageNet-normalised (:func:`normalize_images`).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Points = TypeVar("Points", np.ndarray, Tensor)


def rescale_points(points: Points, scale: Points) -> Points:
    """Points ``(..., 2)`` of an image -> the same points after the image is resized by ``scale``
    (``(..., 2)``-broadcastable ``(S_x / W, S_y / H)``), pixel centres aligned. numpy or torch alike."""
    return (points + 0.5) * scale - 0.5


def original_to_input_pixels(points: Tensor, sizes: Tensor, input_size: int) -> Tensor:
    """Points ``[B, N, 2]`` in images of ``sizes`` ``[B, 2]`` ``(W, H)`` -> pixels of the
    ``input_size`` square they were resized to."""
    return rescale_points(points, input_size / _as_float(sizes, points).unsqueeze(1))


def input_to_original_pixels(points: Tensor, sizes: Tensor, input_size: int) -> Tensor:
    """Inverse of :func:`original_to_input_pixels`: ``x = (x' + 0.5) * W / S - 0.5``."""
    return rescale_points(points, _as_float(sizes, points).unsqueeze(1) / input_size)


def to_resized_square(points: np.ndarray, size_wh: tuple[int, int], square: int) -> np.ndarray:
    """numpy :func:`original_to_input_pixels` of one image: ``(..., 2)`` points of a ``(W, H)``
    image -> its ``square x square`` resize. Returns float64."""
    scale = np.array([square / size_wh[0], square / size_wh[1]], dtype=np.float64)
    return rescale_points(np.asarray(points, dtype=np.float64), scale)


def from_resized_square(points: np.ndarray, size_wh: tuple[int, int], square: int) -> np.ndarray:
    """Inverse of :func:`to_resized_square`. Returns float64."""
    scale = np.array([size_wh[0] / square, size_wh[1] / square], dtype=np.float64)
    return rescale_points(np.asarray(points, dtype=np.float64), scale)


def pixels_to_cells(points: Tensor, stride: float) -> Tensor:
    """Input pixels ``[..., 2]`` -> cell coordinates ``[..., 2]`` of a stride-``stride`` map."""
    return (points - (stride - 1) / 2) / stride


def cells_to_pixels(cells: Tensor, stride: float) -> Tensor:
    """Cell coordinates ``[..., 2]`` of a stride-``stride`` map -> input pixels ``[..., 2]``."""
    return cells * stride + (stride - 1) / 2


def resize_image(image: np.ndarray, size: int) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``[3, size, size]`` uint8, bilinear (anisotropic, like the benchmarks)."""
    resized = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()


def normalize_images(images: Tensor) -> Tensor:
    """``[B, 3, S, S]`` float in ``[0, 1]`` -> ImageNet-normalised, the input every backbone
    (and the official code) expects."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _as_float(sizes: Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(sizes, device=like.device).to(torch.promote_types(like.dtype, torch.float32))
