"""The transformer layers LPMFlow's encoder, decoder and Swin stages share: multi-head attention
(self-attention with an optional additive bias, and cross-attention returning its probabilities)
and the MLP. Parameter names follow the released model's (``qkv``, ``proj``; ``fc1``, ``fc2``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sm_model.matching import without_autocast

LAYER_NORM_EPS = 1e-6
"""The released encoder's and decoders' LayerNorm epsilon (the Swin stages keep PyTorch's 1e-5)."""
INIT_STD = 0.02
"""Std of the released truncated-normal initialisations."""


class Mlp(nn.Module):
    """``fc2(drop(GELU(fc1(x))))`` then dropout: ``[..., C]`` -> ``[..., C]``, ``ratio * C`` wide inside."""

    def __init__(self, dim: int, ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head attention, ``softmax(q k^T / sqrt(C / heads) [+ bias]) v``, whose one ``qkv``
    projection serves both as self-attention (:meth:`forward`) and cross-attention
    (:meth:`cross`); ``dropout`` on the output projection."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width {dim} must be a multiple of its {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` -> q, k, v stacked ``[3, B, heads, N, C / heads]``."""
        batch, length, dim = x.shape
        return self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)

    def _merge(self, x: Tensor) -> Tensor:
        """``[B, heads, N, C / heads]`` -> the projected output ``[B, N, C]``."""
        batch, _, length, _ = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, length, -1)))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """Self-attention: ``[B, N, C]`` -> ``[B, N, C]``, with ``bias`` ``[heads, N, N]`` added to the
        scaled logits."""
        q, k, v = self._split(x)
        mask = bias.to(q.dtype) if bias is not None else None
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def cross(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Queries from ``x`` ``[B, Nx, C]``, keys and values from ``y`` ``[B, Ny, C]`` -> the
        output ``[B, Nx, C]`` and the attention probabilities summed over heads ``[B, Nx, Ny]``
        (each row sums to the number of heads). The probabilities are float32 under autocast too:
        the flows' soft-argmax at temperature 0.02 reads their differences."""
        q, _, _ = self._split(x)
        _, k, v = self._split(y)
        with without_autocast(x.device.type):
            probabilities = (q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return self._merge(probabilities.to(v.dtype) @ v), probabilities.sum(dim=1)
