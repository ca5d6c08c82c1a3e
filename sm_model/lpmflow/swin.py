"""LPMFlow's Swin pieces (spec sections 3.5 and 3.9; the released ``models/base/swin.py`` and
``ChannelAttention``, ``SRBranch_feat``, ``SRBranch`` of ``models/LPMFlow.py``): window attention
without shift and with Swin's relative-position bias, channel attention, and the two modules built
from them::

    SwinBlock_w(x)  = x' + MLP(LN2(x')),   x' = x + WMSA_w(LN1(x))         (MLP: fc1, GELU, fc2)
    CA(x)           = x + x * sigmoid(M(avgpool x) + M(maxpool x))        (M: Conv1x1, ReLU, Conv1x1)
    SwinStage(x)    = CA(x + LN_f(SwinBlock_w(x)))                         map [B, C, H, W] -> same
    FeatureSuperResolution: tokens [B, 1+g^2, C] -> patches bilinear x2 -> 2 stages -> [B, 1+4g^2, C]
    FlowRefinement: y_1 = stage_1(x), y_2 = stage_2(y_1), ...; Conv3x3-ReLU-Conv3x3(sum y_i) -> [B, 2, H, W]

Windows: the released block uses the whole map as one window when its side is not larger than the
window (``min(resolution) <= window``) and sizes its bias table for that *effective* window. Every
constructor here takes the effective window (:func:`effective_window`, the caller applies it) so
that the released tables load; a map whose side is not a multiple of it raises.

State-dict keys of a :class:`SwinStage` against the released ``nn.Sequential(TransformerWarper2d(
SwinTransformer2d(depths=[1])), ChannelAttention)``: ``block.*`` is ``0.transformer.layers.0.
blocks.0.*``, ``norm.*`` is ``0.transformer.norm.*``, ``channel_attention.*`` is ``1.*``. The
relative-position index is recomputed, not stored (the released persistent buffer is dropped).
Initialisation as released: the block's linears and the bias table truncated normal (std 0.02),
zero biases; convolutions PyTorch's default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sm_model.lpmflow.layers import INIT_STD, Attention, Mlp


def effective_window(window: int, side: int) -> int:
    """The window a released Swin block uses on a ``side x side`` map: the map itself when it is not larger."""
    return min(window, side)


def relative_position_index(window: int) -> Tensor:
    """Swin's ``[w*w, w*w]`` index into the ``(2w-1)^2``-row bias table: tokens ``i``, ``j`` of a
    window (row-major, at row ``r`` and column ``c``) read row ``(r_i - r_j + w - 1) * (2w - 1) +
    c_i - c_j + w - 1``."""
    rows, columns = (
        grid.flatten() for grid in torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    )
    return (rows[:, None] - rows + window - 1) * (2 * window - 1) + columns[:, None] - columns + window - 1


class ChannelAttention(nn.Module):
    """``x + x * sigmoid(fc(avgpool x) + fc(maxpool x))`` with global pools and ``fc`` =
    Conv1x1(C -> C / reduction) -> ReLU -> Conv1x1(C / reduction -> C), no biases; map ``[B, C, H, W]`` -> same."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"channel attention needs at least {reduction} channels, got {channels}")
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc(x.mean((2, 3), keepdim=True)) + self.fc(x.amax((2, 3), keepdim=True))
        return x + x * gate.sigmoid()


class WindowAttention(Attention):
    """Multi-head self-attention inside one ``window x window`` window, ``softmax(q k^T / sqrt(d /
    heads) + bias) v``, with a per-head bias from ``relative_position_bias_table`` ``[(2w-1)^2,
    heads]`` at :func:`relative_position_index`; projections ``qkv`` and ``proj`` (with bias)."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__(dim, heads)
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=INIT_STD)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def bias(self) -> Tensor:
        """The relative-position bias ``[heads, w*w, w*w]``."""
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)

    def forward(self, windows: Tensor) -> Tensor:
        """``windows`` ``[B * nW, w*w, C]``, each a window's tokens row-major -> same shape."""
        return super().forward(windows, self.bias())


class SwinBlock(nn.Module):
    """One Swin block without shift (released ``SwinTransformerBlock``, shift 0, no dropout) on
    non-overlapping ``window x window`` windows; ``window`` is the effective one (module docstring)."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        for linear in (self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.trunc_normal_(linear.weight, std=INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: a channels-last map ``[B, H, W, C]`` (``H``, ``W`` multiples of the window) -> same shape."""
        batch, height, width, dim = x.shape
        w = self.window
        if height % w or width % w:
            raise ValueError(
                f"a {height}x{width} map does not tile into {w}x{w} windows (build the block with effective_window)"
            )
        tiles = (batch, height // w, w, width // w, w, dim)  # window (i, j) holds rows i*w.., columns j*w..
        windows = self.norm1(x).reshape(tiles).transpose(2, 3).reshape(-1, w * w, dim)
        attended = self.attn(windows).view(batch, height // w, width // w, w, w, dim).transpose(2, 3)
        x = x + attended.reshape(x.shape)
        return x + self.mlp(self.norm2(x))


class SwinStage(nn.Module):
    """``channel_attention(x + norm(block(x)))`` on a map ``[B, C, H, W]`` -> same shape (the
    released ``TransformerWarper2d`` residual around a one-block ``SwinTransformer2d`` and its final
    LayerNorm, then channel attention)."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.block = SwinBlock(dim, heads, window, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.channel_attention = ChannelAttention(dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.permute(0, 2, 3, 1)
        tokens = tokens + self.norm(self.block(tokens))
        return self.channel_attention(tokens.permute(0, 3, 1, 2))


class FeatureSuperResolution(nn.Module):
    """The FSR block (released ``SRBranch_feat``): tokens ``[B, 1+g^2, C]`` (CLS first, a square
    grid row-major) -> ``[B, 1+4g^2, C]``: the patches bilinearly (``align_corners=False``) to
    ``2g x 2g``, then ``depth`` :class:`SwinStage` s; the CLS token passes unchanged."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.stages = nn.ModuleList(SwinStage(dim, heads, window, mlp_ratio) for _ in range(depth))

    def forward(self, tokens: Tensor) -> Tensor:
        batch, length, dim = tokens.shape
        grid = math.isqrt(length - 1)
        if grid * grid != length - 1:
            raise ValueError(f"{length - 1} patch tokens are not a square grid")
        x = tokens[:, 1:].transpose(1, 2).reshape(batch, dim, grid, grid)
        x = F.interpolate(x, size=(2 * grid, 2 * grid), mode="bilinear", align_corners=False)
        for stage in self.stages:
            x = stage(x)
        return torch.cat([tokens[:, :1], x.flatten(2).transpose(1, 2)], dim=1)


class FlowRefinement(nn.Module):
    """The refinement (released ``SRBranch``): one :class:`SwinStage` per window (coarse to fine)
    in sequence, then ``head`` = Conv3x3(channels -> hidden) -> ReLU -> Conv3x3(hidden -> 2) on the
    sum of the stage outputs; map ``[B, channels, H, W]`` -> residual flow ``[B, 2, H, W]``."""

    def __init__(
        self, channels: int, heads: int, windows: tuple[int, ...], hidden: int = 32, mlp_ratio: int = 4
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(SwinStage(channels, heads, window, mlp_ratio) for window in windows)
        self.head = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 2, 3, padding=1)
        )

    def zero_head(self) -> None:
        """Zero the last convolution, so that the residual flow is exactly 0."""
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return self.head(sum(outputs))
