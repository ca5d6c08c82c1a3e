"""ViTSC's correlations, pure functions on tensors: the dense cosine correlation, the coarse flow
(Gaussian kernel around each row's argmax, soft-argmax at a learned temperature; the paper's
Eq. 1-3) and the RAFT-style lookup of a local correlation window around each coarse match.

Points follow :mod:`sm_model.pixels` (``center``): cell ``j`` of a stride-``s`` map is centred at
input pixel ``s*j + (s - 1)/2``. Callers run these in float32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sm_model.localizers import dense_soft_argmax, kernel_soft_argmax
from sm_model.pixels import cells_to_pixels


def cosine_correlation(src_map: Tensor, trg_map: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of every source cell with every target cell: ``src_map`` ``[B, C, h, w]``,
    ``trg_map`` ``[B, C, H, W]`` -> ``[B, h*w, H, W]`` (source cells row-major)."""
    batch, _, height, width = trg_map.shape
    src = F.normalize(src_map.flatten(2), dim=1, eps=eps)  # [B, C, h*w]
    trg = F.normalize(trg_map.flatten(2), dim=1, eps=eps)  # [B, C, H*W]
    return torch.bmm(src.transpose(1, 2), trg).view(batch, -1, height, width)


def cell_centres(height: int, width: int, stride: float, device: torch.device | None = None) -> Tensor:
    """The input-pixel centres ``(x, y)`` of the cells of an ``height x width`` stride-``stride`` map, ``[h*w, 2]`` row-major."""
    rows, columns = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return cells_to_pixels(torch.stack((columns, rows), dim=-1).reshape(-1, 2), stride)


def coarse_flow(correlation: Tensor, temperature: Tensor | float, sigma: float | None, stride: float) -> tuple[Tensor, Tensor]:
    """The dense coarse flow of a square correlation ``[B, h*w, h, w]`` (source cells x target map):
    each source row's expected target position under ``softmax(C * K / T)`` (``K`` a Gaussian of
    ``sigma`` cells around the row's argmax, 1 at the peak; no kernel when ``sigma`` is ``None``),
    minus the source cell's own centre. Returns ``(flow [B, 2, h, w], matches [B, h*w, 2])``, both
    in input pixels (``matches``: the expected target positions). The gradient reaches the
    correlation and ``temperature`` (a 0-dim tensor), not the argmax."""
    batch, cells, height, width = correlation.shape
    if cells != height * width:
        raise ValueError(f"coarse_flow needs a square correlation [B, h*w, h, w], got {tuple(correlation.shape)}")
    if sigma is None:
        expected = dense_soft_argmax(correlation, temperature)
    else:
        expected = kernel_soft_argmax(correlation, sigma, temperature)
    matches = cells_to_pixels(expected, stride)  # [B, h*w, 2]
    flow = matches - cell_centres(height, width, stride, correlation.device)
    return flow.transpose(1, 2).reshape(batch, 2, height, width), matches


def local_lookup(correlation: Tensor, positions: Tensor, radius: int, grid: tuple[int, int]) -> Tensor:
    """RAFT's lookup, one level: for each source cell ``i``, ``correlation[:, i]`` (a ``[H, W]``
    map) read bilinearly at ``positions[:, i] + (dx, dy)`` for integer ``dx, dy`` in ``-r..r``,
    zeros outside the map. ``correlation``: ``[B, n, H, W]``; ``positions``: ``[B, n, 2]`` ``(x, y)``
    cell coordinates of that map; ``grid``: the ``(h, w)`` of the ``n = h*w`` source cells.
    Returns ``[B, (2r+1)^2, h, w]``, channel ``(dy + r)(2r + 1) + (dx + r)``."""
    batch, cells, height, width = correlation.shape
    offsets = torch.arange(-radius, radius + 1, dtype=positions.dtype, device=positions.device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    window = torch.stack((dx, dy), dim=-1).reshape(-1, 2)  # [K, 2], k = (dy + r)(2r + 1) + (dx + r)
    points = positions[:, :, None] + window  # [B, n, K, 2]
    # align_corners=False: cell j's centre is at (2j + 1) / W - 1 (as sm_model.matching samples).
    normalised = (2 * points + 1) / points.new_tensor([width, height]) - 1
    sampled = F.grid_sample(
        correlation.reshape(batch * cells, 1, height, width),
        normalised.reshape(batch * cells, -1, 1, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [B*n, 1, K, 1]
    return sampled.view(batch, cells, -1).transpose(1, 2).reshape(batch, -1, *grid)


def read_flow(flow: Tensor, points: Tensor) -> Tensor:
    """``flow`` ``[B, 2, H, W]`` (input pixels) read bilinearly at ``points`` ``[B, N, 2]`` input
    pixels -> ``[B, N, 2]``; a point beyond the outermost pixel centres reads the border's flow."""
    height, width = flow.shape[-2:]
    normalised = (2 * points + 1) / points.new_tensor([width, height]) - 1
    sampled = F.grid_sample(flow, normalised.unsqueeze(2), mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.squeeze(3).transpose(1, 2)  # [B, N, 2]
