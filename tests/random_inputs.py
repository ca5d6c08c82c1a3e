"""Seeded random network inputs the model tests share."""

from __future__ import annotations

import torch


def random_images(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and target ``[batch, 3, size, size]``, standard normal from ``seed``."""
    src, trg = torch.randn(2, batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return src, trg


def random_keypoints(batch: int, count: int, size: int, seed: int = 1) -> torch.Tensor:
    """``[batch, count, 2]`` input pixels, uniform over a ``size`` square, from ``seed``."""
    return torch.rand(batch, count, 2, generator=torch.Generator().manual_seed(seed)) * (size - 1)
