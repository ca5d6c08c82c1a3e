"""Keypoint losses: SimpleMatch's Euclidean distance in input pixels, averaged over valid keypoints
(official), and the survey baseline's Gaussian-smoothed cross-entropy on score maps."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def keypoint_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean Euclidean (not squared) distance between ``pred`` and ``target`` over valid keypoints.

    ``pred``, ``target``: ``[B, N, 2]`` input pixels; ``valid``: ``[B, N]`` bool. Every valid keypoint
    of the batch weighs the same (a per-keypoint mean, as the official code: pairs with more
    keypoints weigh more). Invalid keypoints may hold any value, NaN included, and get zero
    gradient. With no valid keypoint the loss is a 0 that is still connected to ``pred``'s graph.
    Returns a float32 (or wider) scalar.
    """
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred and target must both be [B, N, 2], got {tuple(pred.shape)} and {tuple(target.shape)}")
    if valid.shape != pred.shape[:-1] or valid.dtype != torch.bool:
        expected = tuple(pred.shape[:-1])
        raise ValueError(f"valid must be a bool [B, N] = {expected}, got {valid.dtype} {tuple(valid.shape)}")
    compute_dtype = torch.promote_types(pred.dtype, torch.float32)
    offset = pred.to(compute_dtype) - target.to(compute_dtype)
    # Zero the invalid offsets before the norm (not the distances after it), so that garbage there
    # cannot turn the backward pass into NaN; the norm's gradient at a zero offset is 0.
    offset = torch.where(valid.unsqueeze(-1), offset, torch.zeros_like(offset))
    distance = torch.linalg.vector_norm(offset, dim=-1)
    return distance.sum() / valid.sum().clamp(min=1)


def multiscale_loss(preds: Sequence[Tensor], target: Tensor, valid: Tensor, weights: Sequence[float]) -> Tensor:
    """Weighted sum of :func:`keypoint_loss` over scales.

    ``preds``: one ``[B, N, 2]`` prediction in input pixels per scale, coarse to fine (1/16, 1/8, 1/4
    when multi-scale; a single 1/4 prediction otherwise); ``target``: ``[B, N, 2]`` input pixels;
    ``valid``: ``[B, N]`` bool; ``weights``: one weight per element of ``preds``, in the same order.
    """
    if len(preds) == 0:
        raise ValueError("multiscale_loss needs at least one prediction")
    if len(weights) != len(preds):
        raise ValueError(f"got {len(weights)} scale weights for {len(preds)} predictions: give one weight per scale")
    return sum(
        (weight * keypoint_loss(pred, target, valid) for pred, weight in zip(preds, weights, strict=True)),
        start=torch.zeros((), dtype=torch.float32, device=target.device),
    )


def gaussian_cross_entropy(
    scores: Tensor, target_cells: Tensor, valid: Tensor, temperature: float, window: int = 7, eps: float = 1e-30
) -> Tensor:
    """The survey's Gaussian-smoothed cross-entropy of score maps against ground-truth cells.

    ``scores``: ``[B, N, h, w]`` cosine similarities of each source keypoint with the target map;
    ``target_cells``: ``[B, N, 2]`` the ground-truth target points in cell coordinates (any real
    value); ``valid``: ``[B, N]`` bool. Per keypoint: ``p = softmax(scores / temperature)`` over the
    ``h*w`` cells; ``p`` is read by bilinear interpolation (border values beyond the map) at the
    ``window x window`` integer offsets ``(dx, dy)`` (``-r..r``, ``r = window // 2``) around the
    target; the loss is ``-sum(g(dx, dy) * log p)`` over the offsets that fall strictly inside the
    map (``0 < x < w - 1``, ``0 < y < h - 1``), with the unnormalised Gaussian
    ``g = exp(-(dx^2 + dy^2) / (2 s^2)) / (2 pi s^2)``, ``s = r / 2`` (``g = 1`` for a 1-cell window).
    Returns the mean over the pairs that have a valid keypoint of each pair's mean over its valid
    keypoints, a float32 (or wider) scalar, 0 (connected to ``scores``) when none is valid.

    As the survey's code, except: ``log`` is of ``max(p, eps)`` (that code can take ``log(0)``), and
    invalid keypoints are masked rather than cut off at a count."""
    batch, keypoints, height, width = scores.shape
    if target_cells.shape != (batch, keypoints, 2) or valid.shape != (batch, keypoints) or valid.dtype != torch.bool:
        raise ValueError(
            f"scores [B, N, h, w] = {tuple(scores.shape)} needs target_cells [B, N, 2] and a bool valid [B, N], got "
            f"{tuple(target_cells.shape)} and {valid.dtype} {tuple(valid.shape)}"
        )
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the Gaussian target window must be an odd number of cells, got {window}")
    compute_dtype = torch.promote_types(scores.dtype, torch.float32)
    device = scores.device
    probabilities = torch.softmax(scores.to(compute_dtype).flatten(2) / temperature, dim=2)
    radius = window // 2
    steps = torch.arange(-radius, radius + 1, dtype=compute_dtype, device=device)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    offsets = torch.stack((dx, dy), dim=-1).view(-1, 2)  # [k*k, 2] as (x, y)
    if radius:
        sigma = radius / 2
        weights = torch.exp(-(offsets**2).sum(-1) / (2 * sigma**2)) / (2 * math.pi * sigma**2)  # [k*k]
    else:
        weights = torch.ones(1, dtype=compute_dtype, device=device)
    # Invalid targets may hold anything, NaN included: read them at cell (0, 0) and mask them below.
    target = torch.where(valid.unsqueeze(-1), target_cells.to(compute_dtype), torch.zeros((), dtype=compute_dtype, device=device))
    points = target.unsqueeze(2) + offsets  # [B, N, k*k, 2]
    inside = (points[..., 0] > 0) & (points[..., 0] < width - 1) & (points[..., 1] > 0) & (points[..., 1] < height - 1)
    # align_corners=True: cell 0 at -1 and cell w - 1 at +1 (a 1-cell side maps to 0).
    span = points.new_tensor([max(width - 1, 1), max(height - 1, 1)])
    grid = 2 * points / span - 1
    sampled = F.grid_sample(
        probabilities.view(batch * keypoints, 1, height, width),
        grid.view(batch * keypoints, 1, -1, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    ).view(batch, keypoints, -1)  # [B, N, k*k]
    per_keypoint = -(weights * torch.log(sampled.clamp_min(eps)) * inside).sum(-1)  # [B, N]
    per_keypoint = torch.where(valid, per_keypoint, torch.zeros_like(per_keypoint))
    counts = valid.sum(dim=1)  # [B]
    per_pair = per_keypoint.sum(dim=1) / counts.clamp(min=1)
    return per_pair.sum() / (counts > 0).sum().clamp(min=1)
