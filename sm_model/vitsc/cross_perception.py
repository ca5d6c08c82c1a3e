"""The cross-perception module (the paper's Sec. 4.1, Eq. 7): interleaved attention between the
source and target token maps. One layer is two pre-norm blocks, each cross-attention, then
self-attention, then an FFN: the first updates the source with the target, the second the target
with the *updated* source::

    X1 = X  + CrossAttn(LN(X) + P,  LN'(Y) + P, LN'(Y))      Y1 = Y  + CrossAttn(LN(Y) + P,  LN'(X3) + P, LN'(X3))
    X2 = X1 + SelfAttn(LN(X1) + P, LN(X1) + P, LN(X1))       Y2 = Y1 + SelfAttn(LN(Y1) + P, LN(Y1) + P, LN(Y1))
    X3 = X2 + FFN(LN(X2))                                     Y3 = Y2 + FFN(LN(Y2))

``P`` is a fixed 2D sine encoding added to queries and keys only (:func:`sine_positions`). Every
attention's output projection and every FFN's second linear start at zero, so the module is the
identity at initialisation (the paper's aim: preserve the backbone's representation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sine_positions(height: int, width: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The 2D sine-cosine position encoding of an ``height x width`` grid (row-major), ``[h*w, dim]``
    float32: the first ``dim / 2`` channels encode the row, the last ``dim / 2`` the column, each as
    DETR's interleaved sin/cos at frequencies ``10000^(-2i / (dim / 2))`` of the cell centre's
    position normalised to ``[0, 2 pi]`` (``(j + 0.5) / side * 2 pi``): a cell means the same
    fraction of the image at every input size, so 448 evaluation needs nothing."""
    if dim % 4:
        raise ValueError(f"the sine position encoding needs dim a multiple of 4, got {dim}")
    quarter = dim // 4
    frequencies = 10000.0 ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)

    def encode(side: int) -> Tensor:  # [side, dim / 2]
        position = (torch.arange(side, dtype=torch.float32, device=device) + 0.5) / side * 2 * math.pi
        angles = position[:, None] * frequencies  # [side, dim / 4]
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)

    rows, columns = encode(height), encode(width)
    return torch.cat(
        (rows[:, None].expand(height, width, -1), columns[None].expand(height, width, -1)), dim=-1
    ).reshape(height * width, dim)


class Attention(nn.Module):
    """Standard multi-head attention ``softmax(Q K^T / sqrt(d / H)) V`` with input projections
    ``q``, ``k``, ``v`` and the output projection ``out`` (all with bias); dropout 0."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """``query`` ``[B, n, d]``, ``key`` and ``value`` ``[B, m, d]`` -> ``[B, n, d]``."""
        batch, length, dim = query.shape

        def heads(x: Tensor) -> Tensor:  # [B, L, d] -> [B, H, L, d / H]
            return x.unflatten(-1, (self.heads, dim // self.heads)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(self.q(query)), heads(self.k(key)), heads(self.v(value)))
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))


class CrossPerceptionBlock(nn.Module):
    """Cross-attention of ``x`` to ``context``, self-attention of ``x``, then an FFN (hidden 4d,
    GELU); pre-norm residual, a LayerNorm per sub-layer input and one for the context."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_query, self.norm_context, self.norm_self, self.norm_ffn = (nn.LayerNorm(dim) for _ in range(4))
        self.cross = Attention(dim, heads)
        self.self_attention = Attention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, context: Tensor, positions: Tensor) -> Tensor:
        """``x`` ``[B, n, d]`` updated with ``context`` ``[B, n, d]``; ``positions`` ``[n, d]``."""
        context = self.norm_context(context)
        x = x + self.cross(self.norm_query(x) + positions, context + positions, context)
        normed = self.norm_self(x)
        x = x + self.self_attention(normed + positions, normed + positions, normed)
        return x + self.ffn(self.norm_ffn(x))


class CrossPerceptionLayer(nn.Module):
    """One interleaved layer: ``source`` updated with the target, then ``target`` with the updated source."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.source = CrossPerceptionBlock(dim, heads)
        self.target = CrossPerceptionBlock(dim, heads)

    def forward(self, x: Tensor, y: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        x = self.source(x, y, positions)
        return x, self.target(y, x, positions)


class CrossPerception(nn.Module):
    """``layers`` :class:`CrossPerceptionLayer` in sequence (separate weights), initialised as the
    identity: linear weights truncated-normal (std 0.02), biases 0, and every attention's ``out``
    and every FFN's second linear zero."""

    def __init__(self, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(CrossPerceptionLayer(dim, heads) for _ in range(layers))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, CrossPerceptionBlock):
                for last in (module.cross.out, module.self_attention.out, module.ffn[-1]):
                    nn.init.zeros_(last.weight)
                    nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, y: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Source and target tokens ``[B, h*w, d]`` (row-major over ``height x width``) -> both enhanced."""
        positions = sine_positions(height, width, self.dim, x.device).to(x.dtype)
        for layer in self.layers:
            x, y = layer(x, y, positions)
        return x, y
