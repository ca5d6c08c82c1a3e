"""Sparse matching: source keypoint features against the whole target map. Pure functions on
tensors, no parameters; the localizers that turn scores into cells are :mod:`sm_model.localizers`.

Keypoints are ``(x, y)`` pixels of the network input (S x S) and cells are cell coordinates, both
as :mod:`sm_model.pixels` defines them for a pixel convention (``"center"`` unless told).
:func:`match_keypoints` is one scale of the model's matching end to end, in float32.

Shapes: ``B`` pairs, ``N`` keypoints per pair (any number, padded ones included: callers mask them
with their validity mask), ``C`` channels, ``h x w`` the target feature map.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sm_model.config import KeypointSampling, PixelConvention
from sm_model.localizers import Localization, localize
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


class Matches(NamedTuple):
    """One scale's matching: ``points`` ``[B, N, 2]`` where each source keypoint lies in the
    target, in input pixels; ``scores`` ``[B, N, h, w]`` the cosine similarities they were
    localized from (for losses on the score map, and for match scores), both float32 (float64 for
    float64 maps); ``stride`` the map's stride in input pixels."""

    points: Tensor
    scores: Tensor
    stride: float


def match_keypoints(
    src_map: Tensor,
    trg_map: Tensor,
    src_kps: Tensor,
    stride: float,
    localization: Localization,
    sampling: KeypointSampling | None = None,
    convention: PixelConvention = "center",
) -> Matches:
    """Sparse matching and localization on one scale: where each source keypoint lies in the target.

    ``src_map``, ``trg_map``: ``[B, C, h, w]``; ``src_kps``: ``[B, N, 2]`` input pixels. Returns
    :class:`Matches`: the source features at the keypoints (:func:`sample_keypoint_features` with
    ``sampling`` and ``convention``), their :func:`cosine_similarity` with the whole target map,
    and :func:`sm_model.localizers.localize` by ``localization``, cells back to pixels in
    ``convention``.

    All of it runs in float32 (float64 for float64 maps) with autocast disabled, whatever the maps'
    dtype: at beta 0.02 a bfloat16 score error of 2e-3 is 0.1 in the softmax logit, and moved the
    window soft-argmax by 0.1 cell on average. The backbone and decoder may still run in bfloat16;
    only their output maps are cast (gradients flow back through the cast)."""
    compute_dtype = torch.promote_types(src_map.dtype, torch.float32)
    with without_autocast(src_map.device.type):
        src_map, trg_map = src_map.to(compute_dtype), trg_map.to(compute_dtype)
        keypoint_features = sample_keypoint_features(src_map, src_kps, stride, sampling, convention)
        scores = cosine_similarity(keypoint_features, trg_map)  # [B, N, h, w]
        return Matches(cells_to_pixels(localize(scores, localization), stride, convention), scores, stride)


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A block with autocast off on ``device_type``, in every autocast state: a device type with no
    autocast at all (the meta device, where FLOPs are counted) cannot even be asked to disable it."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


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
