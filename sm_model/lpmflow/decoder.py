"""LPMFlow's decoder block: self-attention on each image's tokens, then cross-attention from the
source tokens to the target tokens, whose head-summed probabilities are the block's "4D
correlation" (the released ``MultiscaleDecoder``). Every attention branch goes through
:func:`bounded_activation`. Parameter names follow the released model's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sm_model.lpmflow.layers import LAYER_NORM_EPS, Attention, Mlp
from sm_model.matching import without_autocast

_E_MINUS_4 = math.exp(-4)


def bounded_activation(x: Tensor) -> Tensor:
    """The released ``arf``, ``max(0, (e^x - e^-x) / (e^x + e^(-x-4)))``, in its stable form
    ``(1 - e^-2x) / (1 + e^(-2x-4))`` for ``x > 0`` and 0 otherwise: in ``[0, 1)`` and finite for
    every input (the literal form is inf/inf above x = 88.7 in float32). Computed in float32,
    returned in ``x``'s dtype."""
    with without_autocast(x.device.type):
        decay = torch.exp(-2 * x.float().clamp(min=0))
        return ((1 - decay) / (1 + decay * _E_MINUS_4)).to(x.dtype)


class DecoderBlock(nn.Module):
    """One progressive-decoder block (see the module). ``grids``: the token grids it takes, of the
    backbone's ``grid`` g and/or ``2g``, each with zero-initialised learned positions for both
    images (``pos_embed_src``/``_trg`` at ``g``, ``pos_embed_src_up``/``_trg_up`` at ``2g``); a
    block builds only those it uses. ``src_mlp``: the source self-attention branch adds
    ``MLP(LN(s))`` instead of the released ``LN(s)``."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: int, dropout: float, grid: int, grids: tuple[int, ...], src_mlp: bool
    ) -> None:
        super().__init__()
        self.sattn = Attention(dim, heads, dropout)
        self.cattn = Attention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, mlp_ratio, dropout)
        self.src_mlp = src_mlp
        if not set(grids) <= {grid, 2 * grid}:
            raise ValueError(f"a decoder block takes token grids {grid} and {2 * grid}, got {grids}")
        self.suffixes = {side: "" if side == grid else "_up" for side in grids}
        for side, suffix in self.suffixes.items():
            self.register_parameter(f"pos_embed_src{suffix}", nn.Parameter(torch.zeros(1, 1 + side * side, dim)))
            self.register_parameter(f"pos_embed_trg{suffix}", nn.Parameter(torch.zeros(1, 1 + side * side, dim)))

    def _positions(self, image: str, tokens: Tensor) -> Tensor:
        for side, suffix in self.suffixes.items():
            if tokens.shape[1] == 1 + side * side:
                return getattr(self, f"pos_embed_{image}{suffix}")
        raise ValueError(
            f"this decoder block takes token grids {tuple(self.suffixes)} (plus CLS), got {tokens.shape[1]} tokens"
        )

    def forward(self, src: Tensor, trg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``src`` ``[B, 1 + n_s, C]``, ``trg`` ``[B, 1 + n_t, C]`` (CLS first) -> the new
        ``(src, trg)`` and the patch-to-patch cross-attention ``[B, n_s, n_t]`` (head-summed, float32)."""
        src = src + self._positions("src", src)
        trg = trg + self._positions("trg", trg)
        src = src + bounded_activation(self.sattn(self.norm1(src)))
        src = src + (self.mlp(self.norm2(src)) if self.src_mlp else self.norm2(src))
        trg = trg + bounded_activation(self.sattn(self.norm1(trg)))
        trg = trg + self.mlp(self.norm2(trg))
        out, attention = self.cattn.cross(self.norm1(src), self.norm1(trg))
        src = src + bounded_activation(out)
        src = src + self.mlp(self.norm2(src))
        return src, trg, attention[:, 1:, 1:]
