"""Sparse matching and window localization: pure functions on tensors, no parameters.

Keypoints are ``(x, y)`` pixels of the network input (S x S) and cells are cell coordinates, both
as :mod:`sm_model.pixels` defines them for a pixel convention (``"center"`` unless told).
:func:`match_keypoints` is one scale of the model's matching end to end, in float32.

Shapes: ``B`` pairs, ``N`` keypoints per pair (any number, padded ones included: callers mask them
with their validity mask), ``C`` channels, ``h x w`` the target feature map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sm_model.config import KeypointSampling, PixelConvention
from sm_model.pixels import cells_to_pixels, default_sampling, pixels_to_cells


def sample_keypoint_features(
    feature_map: Tensor,
    keypoints: Tensor,
    stride: float,
    mode: KeypointSampling | None = None,
    convention: PixelConvention = "center",
) -> Tensor:
    """The feature vector of ``feature_map`` at each keypoint.

    ``feature_map``: ``[B, C, h, w]``; ``keypoints``: ``[B, N, 2]`` input pixels; returns ``[B, N, C]``.
    ``mode`` ``None`` is the ``convention``'s own (:func:`sm_model.pixels.default_sampling`).

    ``"bilinear"`` interpolates between the four nearest cells at the keypoint's cell coordinate in
    ``convention`` (a keypoint on a cell's pixel gets exactly that cell's vector). Beyond the
    outermost cells the missing neighbours count as zeros: within the half-cell margin of the map
    that only scales the vector, so its direction, and hence the cosine similarity, equals that of
    the nearest in-map interpolation.

    ``"nearest"`` is the official behaviour: cell ``floor(x / stride)``, ``floor(y / stride)``. It
    ignores the half-pixel centre offset: for integer pixel coordinates it is still the cell holding
    the pixel, but a sub-pixel ``x`` in ``[stride*i - 0.5, stride*i)`` lies in cell ``i`` and is read
    from cell ``i - 1``. It is the same in both conventions. Indices are clamped to the map so that
    border and padded keypoints read a real cell.

    Non-finite keypoints (a padding choice of the caller) are read as pixel ``(0, 0)``, so that every
    row is finite.
    """
    batch = feature_map.shape[0]
    if keypoints.ndim != 3 or keypoints.shape[0] != batch or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints must be [B={batch}, N, 2], got {tuple(keypoints.shape)}")
    keypoints = keypoints.to(torch.promote_types(keypoints.dtype, torch.float32))
    keypoints = torch.nan_to_num(keypoints, nan=0.0, posinf=0.0, neginf=0.0)
    mode = default_sampling(convention, mode)
    if mode == "bilinear":
        return _sample_bilinear(feature_map, pixels_to_cells(keypoints, stride, convention))
    if mode == "nearest":
        return _sample_nearest(feature_map, keypoints, stride)
    raise ValueError(f"unknown keypoint sampling mode {mode!r}: expected 'bilinear' or 'nearest'")


def match_keypoints(
    src_map: Tensor,
    trg_map: Tensor,
    src_kps: Tensor,
    stride: float,
    window: int | None,
    beta: float,
    sampling: KeypointSampling | None = None,
    convention: PixelConvention = "center",
) -> Tensor:
    """Sparse matching and localization on one scale: where each source keypoint lies in the target.

    ``src_map``, ``trg_map``: ``[B, C, h, w]``; ``src_kps``: ``[B, N, 2]`` input pixels. Returns
    ``[B, N, 2]`` input pixels: the source features at the keypoints
    (:func:`sample_keypoint_features` with ``sampling`` and ``convention``), their
    :func:`cosine_similarity` with the whole target map, :func:`localize` with ``window`` and
    ``beta``, and cells back to pixels in ``convention``.

    All of it runs in float32 (float64 for float64 maps) with autocast disabled, whatever the maps'
    dtype: at beta 0.02 a bfloat16 score error of 2e-3 is 0.1 in the softmax logit, and moved the
    window soft-argmax by 0.1 cell on average. The backbone and decoder may still run in bfloat16;
    only their output maps are cast (gradients flow back through the cast)."""
    compute_dtype = torch.promote_types(src_map.dtype, torch.float32)
    with torch.autocast(src_map.device.type, enabled=False):
        src_map, trg_map = src_map.to(compute_dtype), trg_map.to(compute_dtype)
        keypoint_features = sample_keypoint_features(src_map, src_kps, stride, sampling, convention)
        scores = cosine_similarity(keypoint_features, trg_map)  # [B, N, h, w]
        return cells_to_pixels(localize(scores, window, beta), stride, convention)


def _sample_bilinear(feature_map: Tensor, cells: Tensor) -> Tensor:
    """``feature_map`` ``[B, C, h, w]`` at cell coordinates ``cells`` ``[B, N, 2]`` -> ``[B, N, C]``."""
    height, width = feature_map.shape[-2:]
    # align_corners=False puts normalised -1 / +1 on the outer edges of the map, i.e. cell -0.5 and
    # w - 0.5, so cell j's centre is at (2j + 1) / w - 1; unlike align_corners=True it also works for w = 1.
    grid = (2 * cells + 1) / cells.new_tensor([width, height]) - 1
    # Sample in at least float32: a bfloat16 grid would resolve only ~0.06 cell on a 63-cell map.
    compute_dtype = torch.promote_types(feature_map.dtype, torch.float32)
    sampled = F.grid_sample(
        feature_map.to(compute_dtype),
        grid.to(compute_dtype).unsqueeze(2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [B, C, N, 1]
    return sampled.squeeze(3).transpose(1, 2).to(feature_map.dtype)


def _sample_nearest(feature_map: Tensor, keypoints: Tensor, stride: float) -> Tensor:
    """``feature_map`` ``[B, C, h, w]`` at the official integer cells of ``keypoints`` ``[B, N, 2]``
    (input pixels) -> ``[B, N, C]``."""
    batch, channels, height, width = feature_map.shape
    # Clamp in floating point, before the cast, so that huge padding values cannot overflow.
    column = torch.floor(keypoints[..., 0] / stride).clamp(0, width - 1).long()
    row = torch.floor(keypoints[..., 1] / stride).clamp(0, height - 1).long()
    flat_index = (row * width + column).unsqueeze(1).expand(batch, channels, -1)  # [B, C, N]
    return feature_map.flatten(2).gather(2, flat_index).transpose(1, 2)


def cosine_similarity(src_features: Tensor, trg_map: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of every source keypoint feature with every target position.

    ``src_features``: ``[B, N, C]``; ``trg_map``: ``[B, C, h, w]``; returns ``[B, N, h, w]`` in the
    inputs' dtype. Both sides are L2-normalised with ``eps`` (official 1e-8) guarding zero vectors,
    which therefore score 0 everywhere.
    """
    batch, channels, height, width = trg_map.shape
    if src_features.ndim != 3 or src_features.shape[0] != batch or src_features.shape[2] != channels:
        raise ValueError(f"src_features must be [B={batch}, N, C={channels}], got {tuple(src_features.shape)}")
    src = F.normalize(src_features, dim=2, eps=eps)
    trg = F.normalize(trg_map.flatten(2), dim=1, eps=eps)  # [B, C, h*w]
    return torch.bmm(src, trg).view(batch, src_features.shape[1], height, width)


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


def localize(scores: Tensor, window: int | None, beta: float) -> Tensor:
    """``scores`` ``[B, N, h, w]`` -> ``[B, N, 2]`` cells: :func:`window_soft_argmax` with a
    ``window``, :func:`dense_soft_argmax` when ``window`` is ``None``."""
    if window is None:
        return dense_soft_argmax(scores, beta)
    return window_soft_argmax(scores, window, beta)


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
