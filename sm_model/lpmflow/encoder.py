"""LPMFlow's layout-aware joint encoder (the released "single tower"): both images' backbone tokens
in one sequence, with learned positions, a segment embedding per image and a relative-position
bias that tells a patch where another patch lies, in its own image or in the other one.

Sequence layout, ``n = g * g`` patches per image on a ``g x g`` grid::

    [ src CLS | src patch 0 .. n-1 | trg CLS | trg patch 0 .. n-1 ]      2 + 2n tokens

Parameter names follow the released model's, so released weights map one to one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sm_model.lpmflow.layers import INIT_STD, LAYER_NORM_EPS, Attention, Mlp


def relative_position_index(grid: int) -> Tensor:
    """``[2n, 2n]`` long: the bias-table entry of every pair of patch tokens of the joint sequence
    without its CLS tokens (source patches, then target patches), ``n = grid * grid``.

    An entry stands for ``(dr, dc, s_a, s_b)``: the row and column offsets of patch ``a`` from patch
    ``b`` and the images (0 source, 1 target) they belong to. Entries are numbered in the
    lexicographic order of those tuples, as the released code's ``torch.unique`` numbers them, so
    there are ``4 (2g - 1)^2`` entries (3844 at g = 16)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rows, cols = rows.flatten().repeat(2), cols.flatten().repeat(2)
    image = torch.arange(2).repeat_interleave(grid * grid)
    span = 2 * grid - 1
    dr = rows[:, None] - rows[None, :] + grid - 1
    dc = cols[:, None] - cols[None, :] + grid - 1
    return ((dr * span + dc) * 4) + image[:, None] * 2 + image[None, :]


class RelativeAttention(Attention):
    """Multi-head self-attention over the joint sequence with a learned bias per head on every
    patch-patch logit (:func:`relative_position_index`); rows and columns of the CLS tokens get
    none. ``forward``: ``[B, 2 + 2n, C]`` -> ``[B, 2 + 2n, C]``."""

    def __init__(self, dim: int, heads: int, grid: int, dropout: float) -> None:
        super().__init__(dim, heads, dropout)
        self.relative_position_bias_table = nn.Parameter(torch.empty(heads, 4 * (2 * grid - 1) ** 2))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=INIT_STD)
        # Into a table with one extra zero entry: the index of every pair that involves a CLS token.
        patches = grid * grid
        index = torch.full((2 + 2 * patches, 2 + 2 * patches), 4 * (2 * grid - 1) ** 2)
        patch_rows = torch.cat([torch.arange(1, 1 + patches), torch.arange(2 + patches, 2 + 2 * patches)])
        index[patch_rows[:, None], patch_rows[None, :]] = relative_position_index(grid)
        self.register_buffer("bias_index", index, persistent=False)

    def bias(self) -> Tensor:
        """``[heads, 2 + 2n, 2 + 2n]``: the additive bias of every logit."""
        table = self.relative_position_bias_table
        return torch.cat([table, table.new_zeros(self.heads, 1)], dim=1)[:, self.bias_index]

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x, self.bias())


class EncoderBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, grid: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = RelativeAttention(dim, heads, grid, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class JointEncoder(nn.Module):
    """``forward(src, trg)``: backbone tokens ``[B, 1 + n, C]`` of each image (CLS first) ->
    the encoded ``(src, trg)``, each ``[B, 1 + n, C]`` after the final LayerNorm.

    Every parameter is learned from scratch: patch and CLS positions per image (the two images'
    copies start equal, as the released code's aliased views do), a segment embedding per image,
    ``depth`` :class:`EncoderBlock` s with their relative-position bias tables."""

    def __init__(self, dim: int, grid: int, depth: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.grid = grid
        positions = nn.init.trunc_normal_(torch.zeros(1, 1 + grid * grid, dim), std=INIT_STD)
        # Standard strides (not the slice's): DDP's gradient buckets expect them.
        cls, patches = (
            part.clone(memory_format=torch.contiguous_format) for part in positions.split([1, grid * grid], 1)
        )
        self.cls_pos_embed_src = nn.Parameter(cls)
        self.cls_pos_embed_trg = nn.Parameter(cls.clone())
        self.pos_embed_src = nn.Parameter(patches)
        self.pos_embed_trg = nn.Parameter(patches.clone())
        self.src_segment_pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, dim), std=INIT_STD))
        self.trg_segment_pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, dim), std=INIT_STD))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_ratio, grid, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)

    def forward(self, src: Tensor, trg: Tensor) -> tuple[Tensor, Tensor]:
        length = 1 + self.grid * self.grid
        if src.shape[1] != length or trg.shape != src.shape:
            raise ValueError(
                f"the encoder takes [B, {length}, C] tokens of each image (CLS first), got {tuple(src.shape)} and {tuple(trg.shape)}"
            )
        x = torch.cat(
            [
                src[:, :1] + self.cls_pos_embed_src,
                src[:, 1:] + self.pos_embed_src + self.src_segment_pos_embed,
                trg[:, :1] + self.cls_pos_embed_trg,
                trg[:, 1:] + self.pos_embed_trg + self.trg_segment_pos_embed,
            ],
            dim=1,
        )
        x = self.norm(self.blocks(self.pos_drop(x)))
        return x[:, :length], x[:, length:]
