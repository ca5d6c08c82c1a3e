"""From LPMFlow's attention maps to flows, and from its flow to target points, as the released
code computes them.

A flow here is ``[B, 2, F, F]`` on the source grid, ``(x, y)`` displacements in cells of that
grid: source cell ``(i, j)`` moves to ``(j + flow_x, i + flow_y)``. The model's four flows come
from its cross-attention maps at the ``2g`` "up" grid (:func:`attention_flow`) and are then
repeated onto the ``8g`` flow grid (:func:`to_flow_grid`); keypoints read the final flow at their
integer pixel of the input frame (:func:`transfer_keypoints`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sm_model.matching import without_autocast


def square_side(count: int) -> int:
    """The side of a square grid of ``count`` cells; a ValueError unless ``count`` is a square."""
    side = round(count**0.5)
    if side * side != count:
        raise ValueError(f"{count} tokens do not form a square grid")
    return side


def attention_volume(attention: Tensor, side: int) -> Tensor:
    """A patch-to-patch attention map ``[B, n_s, n_t]`` (source rows) -> ``[B, side^2, side, side]``:
    target positions flattened, source positions as a ``side x side`` map, each side at ``g`` first
    brought to ``side`` by bilinear upsampling with aligned corners, the target side first (the
    released order, which matters: upsampling does not commute with the reshapes)."""
    batch, n_src, n_trg = attention.shape
    g_src, g_trg = square_side(n_src), square_side(n_trg)
    if g_trg != side:
        target = attention.reshape(batch, n_src, g_trg, g_trg)
        attention = F.interpolate(target, size=side, mode="bilinear", align_corners=True).reshape(batch, n_src, -1)
    volume = attention.reshape(batch, g_src, g_src, side * side).permute(0, 3, 1, 2)
    if g_src != side:
        volume = F.interpolate(volume, size=side, mode="bilinear", align_corners=True)
    return volume


def soft_argmax_flow(volume: Tensor, grid_x: Tensor, grid_y: Tensor, beta: float) -> Tensor:
    """``volume`` ``[B, h*w, h, w]`` (target positions flattened, source map) -> flow ``[B, 2, h, w]``
    in cells: for each source cell the expectation, under ``softmax(volume / beta)`` over the
    target positions, of the coordinate vectors ``grid_x`` ``[w]`` and ``grid_y`` ``[h]`` (normalised
    to ``[-1, 1]``; released as trained parameters), unnormalised to cells, minus the cell itself.
    With the grids at ``linspace(-1, 1)`` this is the expected target cell minus the source cell.
    Float32, autocast off."""
    batch, _, height, width = volume.shape
    with without_autocast(volume.device.type):
        weights = (volume.float() / beta).softmax(dim=1).view(batch, height, width, height, width)
        expected_x = torch.einsum("bvuij,u->bij", weights, grid_x.float())
        expected_y = torch.einsum("bvuij,v->bij", weights, grid_y.float())
        rows = torch.arange(height, device=volume.device, dtype=torch.float32).view(height, 1)
        cols = torch.arange(width, device=volume.device, dtype=torch.float32).view(1, width)
        flow_x = (expected_x + 1) * (width - 1) / 2 - cols
        flow_y = (expected_y + 1) * (height - 1) / 2 - rows
        return torch.stack([flow_x, flow_y], dim=1)


def attention_flow(attention: Tensor, side: int, grid_x: Tensor, grid_y: Tensor, beta: float) -> Tensor:
    """A decoder block's attention ``[B, n_s, n_t]`` -> its flow ``[B, 2, side, side]`` on the up grid
    (:func:`attention_volume`, then :func:`soft_argmax_flow`)."""
    return soft_argmax_flow(attention_volume(attention, side), grid_x, grid_y, beta)


def to_flow_grid(flow: Tensor, side: int) -> Tensor:
    """A flow ``[B, 2, h, h]`` in its cells -> ``[B, 2, side, side]`` in cells of the finer grid:
    each value repeated (nearest) and scaled by ``side / h``."""
    return F.interpolate(flow, size=side, mode="nearest") * (side / flow.shape[-1])


def transfer_keypoints(flow: Tensor, points: Tensor, input_side: int) -> Tensor:
    """Target points ``[B, N, 2]`` of source ``points`` ``[B, N, 2]`` in pixels of the
    ``input_side`` square, as the released evaluation transfers them: each point truncated to its
    integer pixel (toward zero, then clamped to the image), moved by the flow ``[B, 2, F, F]``
    (flow cells) upsampled bilinearly to ``input_side`` without aligned corners and scaled to
    pixels, read at that pixel. The upsampled flow is read at the points only, never built.
    Float32, autocast off."""
    batch, _, side, _ = flow.shape
    with without_autocast(flow.device.type):
        pixels = points.float().trunc().clamp(0, input_side - 1)
        # Where output pixel p samples the flow grid in F.interpolate(..., align_corners=False).
        source = ((pixels + 0.5) * (side / input_side) - 0.5).clamp(min=0)
        low = source.floor().clamp(max=side - 1)
        fraction = source - low
        low = low.long()
        high = (low + 1).clamp(max=side - 1)
        flat = flow.float().flatten(2)  # [B, 2, F*F]

        def at(x: Tensor, y: Tensor) -> Tensor:
            index = (y * side + x).unsqueeze(1).expand(batch, 2, -1)
            return flat.gather(2, index).transpose(1, 2)  # [B, N, 2]

        fx, fy = fraction[..., :1], fraction[..., 1:]
        top = at(low[..., 0], low[..., 1]) * (1 - fx) + at(high[..., 0], low[..., 1]) * fx
        bottom = at(low[..., 0], high[..., 1]) * (1 - fx) + at(high[..., 0], high[..., 1]) * fx
        displacement = (top * (1 - fy) + bottom * fy) * (input_side / side)
        return pixels + displacement
