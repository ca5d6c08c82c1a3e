"""Localizers: where a keypoint's score map peaks, in cell coordinates. Pure functions, no parameters.

Every localizer takes ``scores`` ``[B, N, h, w]`` (cosine similarities of ``B x N`` source keypoints
with every cell of an ``h x w`` target map) and returns ``[B, N, 2]`` ``(x, y)`` cell coordinates,
cell ``j`` at ``j`` (:mod:`sm_model.pixels` maps cells to pixels). They compute in float32 (float64
for float64 scores) whatever the scores' dtype, also under autocast. :data:`LOCALIZERS`:

==========  ==========================================================================================
``argmax``  nearest neighbour: the cell of the highest score (:func:`argmax_cells`; no gradient)
``dense``   soft-argmax over the whole map at temperature ``beta`` (:func:`dense_soft_argmax`)
``window``  hard argmax, then a soft-argmax in the ``k x k`` window around it (SimpleMatch's;
            :func:`window_soft_argmax`)
``kernel``  a Gaussian of width ``sigma`` cells centred at the argmax multiplies the scores, then a
            soft-argmax over the whole map (the survey's strong baseline; :func:`kernel_soft_argmax`)
==========  ==========================================================================================

:func:`localize` picks one by a :class:`Localization`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor

from sm_model.config import Localizer

LOCALIZERS: tuple[str, ...] = get_args(Localizer)


@dataclass(frozen=True)
class Localization:
    """A localizer and its settings: ``method`` one of :data:`LOCALIZERS`; ``beta`` the softmax
    temperature of the soft-argmax ones; ``window`` the ``window`` method's side in cells (``None``:
    the whole map, i.e. ``dense``); ``sigma`` the ``kernel`` method's Gaussian width in cells."""

    method: Localizer = "window"
    beta: float = 0.02
    window: int | None = None
    sigma: float = 7.0


def localize(scores: Tensor, localization: Localization) -> Tensor:
    """``scores`` ``[B, N, h, w]`` -> ``[B, N, 2]`` cells by ``localization.method``."""
    method = localization.method
    if method == "argmax":
        return argmax_cells(scores)
    if method == "dense" or (method == "window" and localization.window is None):
        return dense_soft_argmax(scores, localization.beta)
    if method == "window":
        return window_soft_argmax(scores, localization.window, localization.beta)
    if method == "kernel":
        return kernel_soft_argmax(scores, localization.sigma, localization.beta)
    raise ValueError(f"unknown localizer {method!r}; expected one of {', '.join(LOCALIZERS)}")


def argmax_cells(scores: Tensor) -> Tensor:
    """The cell of each map's highest score: ``scores`` ``[B, N, h, w]`` -> ``[B, N, 2]`` ``(x, y)``
    cells, float32 (float64 for float64 scores). Ties go to the first cell in row-major order."""
    width = scores.shape[-1]
    peak = scores.flatten(2).argmax(dim=2)  # [B, N]
    compute_dtype = torch.promote_types(scores.dtype, torch.float32)
    return torch.stack((peak % width, peak // width), dim=-1).to(compute_dtype)


def kernel_soft_argmax(scores: Tensor, sigma: float, beta: float) -> Tensor:
    """Kernel soft-argmax: ``scores`` ``[B, N, h, w]`` -> ``[B, N, 2]`` ``(x, y)`` cells.

    The scores are multiplied by ``exp(-((x - x*)^2 + (y - y*)^2) / (2 sigma^2))``, a Gaussian of
    width ``sigma`` cells centred at the argmax cell ``(x*, y*)`` (not renormalised: 1 at the peak),
    then the expectation of the cell coordinates under ``softmax(. / beta)`` over the whole map is
    returned, as the survey's code does (sigma 7, beta 0.04). The Gaussian suppresses a second
    mode far from the peak; a symmetric peak stays exactly where it is. As in that code the kernel
    multiplies the scores themselves, so a negative score far away rises towards 0. Gradient flows
    through the scores, not through the argmax."""
    if not sigma > 0:
        raise ValueError(f"the kernel soft-argmax sigma must be positive, got {sigma}")
    _check_beta(beta)
    compute_dtype = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(compute_dtype)
    height, width = scores.shape[-2:]
    peak = argmax_cells(scores)  # [B, N, 2]
    columns = torch.arange(width, dtype=compute_dtype, device=scores.device)
    rows = torch.arange(height, dtype=compute_dtype, device=scores.device)
    dx2 = (columns - peak[..., :1]) ** 2  # [B, N, w]
    dy2 = (rows - peak[..., 1:]) ** 2  # [B, N, h]
    kernel = torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2 * sigma**2))  # [B, N, h, w]
    x, y = _expected_cell(scores * kernel, beta)
    return torch.stack((x, y), dim=-1)


def window_soft_argmax(scores: Tensor, window: int, beta: float) -> Tensor:
    """Hard argmax, then a soft-argmax inside the k x k window around it (the official localization).

    ``scores``: ``[B, N, h, w]``; returns ``[B, N, 2]`` as ``(x, y)`` cell coordinates.

    The window's top-left is ``clamp(argmax - floor(k / 2), 0, side - k)`` per axis: near a border the
    window is shifted inward, never padded, so the argmax is off-centre there (and, for an even k, at
    offset k / 2 elsewhere). A k larger than a side of the map shrinks to that side. Inside the
    window, ``softmax(scores / beta)`` weighs the window's cell coordinates.

    Only the scores inside each keypoint's window receive gradient; the argmax index itself has
    none. Only a ``[B, N, k*k]`` window is gathered (never ``[B, N, h*w, k*k]``), which is where the
    memory saving over :func:`dense_soft_argmax` comes from.

    dtype: the softmax and the expectation run in float32 (or float64 for float64 scores) and the
    coordinates are returned in that dtype, not in bfloat16/float16: bfloat16 resolves only 0.5 cell
    at 64-128 cells, i.e. 2 pixels at stride 4.
    """
    if window < 1:
        raise ValueError(f"window must be a positive number of cells, got {window}")
    _check_beta(beta)
    batch, keypoints, height, width = scores.shape
    window_height, window_width = min(window, height), min(window, width)
    flat_scores = scores.flatten(2)  # [B, N, h*w]
    peak = flat_scores.argmax(dim=2)  # [B, N]; argmax has no gradient, as intended
    top = _window_start(peak // width, window_height, height)
    left = _window_start(peak % width, window_width, width)
    row_offsets = torch.arange(window_height, device=scores.device)
    column_offsets = torch.arange(window_width, device=scores.device)
    window_index = (
        (top[..., None, None] + row_offsets[:, None]) * width + left[..., None, None] + column_offsets
    )  # [B, N, kh, kw]
    window_scores = flat_scores.gather(2, window_index.flatten(2)).view(batch, keypoints, window_height, window_width)
    x, y = _expected_cell(window_scores, beta)
    return torch.stack((x + left, y + top), dim=-1)


def _window_start(peak: Tensor, window: int, side: int) -> Tensor:
    """First cell of a ``window``-cell span around ``peak`` (any shape), shifted inward to fit ``side``."""
    return (peak - window // 2).clamp(0, side - window)


def dense_soft_argmax(scores: Tensor, beta: float) -> Tensor:
    """Soft-argmax over the whole map: ``scores`` ``[B, N, h, w]`` -> ``[B, N, 2]`` ``(x, y)`` cells.

    The expectation of the cell coordinates under ``softmax(scores / beta)`` over all ``h*w`` cells;
    dtype as :func:`window_soft_argmax`.
    """
    _check_beta(beta)
    x, y = _expected_cell(scores, beta)
    return torch.stack((x, y), dim=-1)


def _expected_cell(scores: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Expected ``(x, y)`` ``[B, N]`` each, relative to the map's first cell, under
    ``softmax(scores / beta)`` over the last two dims of ``scores`` ``[B, N, h, w]``."""
    compute_dtype = torch.promote_types(scores.dtype, torch.float32)
    height, width = scores.shape[-2:]
    # At beta = 0.02 the logits span +-50: float32 keeps the softmax and the sums accurate.
    weights = torch.softmax(scores.to(compute_dtype).flatten(2) / beta, dim=2).unflatten(2, (height, width))
    # Multiply-and-sum rather than a matmul, which autocast would run (and return) in bfloat16.
    x = (weights.sum(dim=2) * torch.arange(width, dtype=compute_dtype, device=scores.device)).sum(-1)
    y = (weights.sum(dim=3) * torch.arange(height, dtype=compute_dtype, device=scores.device)).sum(-1)
    return x, y


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"the soft-argmax temperature beta must be positive, got {beta}")
