"""Keypoint losses: Euclidean distance in input pixels, averaged over valid keypoints (official)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
