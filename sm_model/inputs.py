"""A model's input: the one place where an image becomes network input.

Every model has an :class:`InputSpec` (``model.input_spec``, from its config by
:meth:`InputSpec.of`): the square side ``S``, the normalisation, how images are resized and the
pixel convention that moves points between the original image and the input
(:mod:`sm_model.pixels`). An image goes through two steps, which the data feed runs apart (the
resize in loader processes, the rest on the device, with augmentation in between for training):

1. :meth:`InputSpec.resize`: uint8 ``(H, W, 3)`` -> uint8 ``[3, S, S]``;
2. :meth:`InputSpec.normalize` of ``[B, 3, S, S]`` floats in ``[0, 1]`` (:meth:`InputSpec.to_network`
   from uint8).

:meth:`InputSpec.prepare` does both for one image; :meth:`InputSpec.batch` for several.

    >>> spec = model.input_spec
    >>> src = spec.prepare(image)                   # float [3, S, S]
    >>> kps = spec.to_input_pixels(points, sizes)   # original pixels -> input pixels
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sm_model.config import ImageResize, ModelConfig, PixelConvention
from sm_model.pixels import input_to_original_pixels, original_to_input_pixels, resize_image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: images resized to ``size`` x ``size`` by ``resize_method``
    (:func:`sm_model.pixels.resize_image`), scaled to ``[0, 1]`` and normalised by ``mean`` and
    ``std`` per channel; points moved between frames in ``pixel_convention``. Plain values only, so
    it pickles to loader processes and Ray workers."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_method: ImageResize = "antialiased"
    pixel_convention: PixelConvention = "center"

    @classmethod
    def of(cls, config: ModelConfig) -> InputSpec:
        """The input of a model built from ``config`` (every backbone here takes ImageNet
        normalisation): images at ``config.image_size``, or at the side its kind's options give by
        ``input_side(config)`` for a kind that resizes inside the network (LPMFlow: 512 -> 256)."""
        input_side = getattr(config.options, "input_side", None)
        size = input_side(config) if input_side is not None else config.image_size
        return cls(size=size, resize_method=config.image_resize, pixel_convention=config.pixel_convention)

    def resize(self, image: np.ndarray) -> Tensor:
        """``(H, W, 3)`` uint8 -> ``[3, S, S]`` uint8."""
        return resize_image(image, self.size, self.resize_method)

    def normalize(self, images: Tensor) -> Tensor:
        """``[B, 3, S, S]`` floats in ``[0, 1]`` -> the network's input (per-channel ``mean``, ``std``)."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def to_network(self, images: Tensor) -> Tensor:
        """``[B, 3, S, S]`` uint8 (resized by :meth:`resize`) -> the network's float input."""
        return self.normalize(images.float() / 255)

    def prepare(self, image: np.ndarray) -> Tensor:
        """One ``(H, W, 3)`` uint8 image -> float ``[3, S, S]``, ready for the network."""
        return self.to_network(self.resize(image).unsqueeze(0))[0]

    def batch(self, images: Sequence[np.ndarray]) -> Tensor:
        """Several ``(H, W, 3)`` uint8 images -> float ``[B, 3, S, S]``."""
        return self.to_network(torch.stack([self.resize(image) for image in images]))

    def to_input_pixels(self, points: Tensor, sizes: Tensor) -> Tensor:
        """Points ``[B, N, 2]`` in original images of ``sizes`` ``[B, 2]`` ``(W, H)`` -> input pixels."""
        return original_to_input_pixels(points, sizes, self.size, self.pixel_convention)

    def to_original_pixels(self, points: Tensor, sizes: Tensor) -> Tensor:
        """Input pixels ``[B, N, 2]`` -> pixels of original images of ``sizes`` ``[B, 2]``."""
        return input_to_original_pixels(points, sizes, self.size, self.pixel_convention)
