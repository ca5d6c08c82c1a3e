"""Upsampling decoders: backbone feature maps -> matching feature maps at 1/4 input resolution.

Both decoders take the backbone's maps (finest first, as :class:`sm_model.backbones.Backbone`
returns them) and the network input's side ``S``, and return the maps the matcher compares, coarse
to fine, each as a :class:`ScaleFeatures` ``(features [B, C, h, w], stride)``. Only the 1/4 map is
returned unless the decoder is multi-scale.

``stride`` is ``S / h`` (a float): the cells of every returned map tile the input exactly, which is
what :func:`sm_model.pixels.pixels_to_cells` assumes. It is 4 at 252/256/448, 7 for the
first upsampled DINOv2 map and 14/16 for ViT tokens.

Every map passes through a per-scale projection head, a ``Linear(C, C)`` over channels (the
official "proj"), before matching. It is applied to the whole map (as a 1x1 convolution with the
Linear's parameters, so checkpoints keep the official ``[C, C]`` shape): being affine, it commutes
with integer indexing and, up to the zero padding at the outer half cell, with bilinear sampling.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from sm_model.config import ModelConfig


class ScaleFeatures(NamedTuple):
    """One decoder output: ``features`` ``[B, C, h, w]`` and its ``stride`` in input pixels per cell."""

    features: Tensor
    stride: float


class ConvBlock(nn.Module):
    """Two residual 3x3 units, ``x = x + ReLU(BN(Conv3x3(x)))`` twice (convs with bias), no final
    activation: the official ``ResBlock``. Keeps ``[B, C, h, w]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first = _conv_bn_relu(channels)
        self.second = _conv_bn_relu(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.first(x)
        return x + self.second(x)


def _conv_bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


def _project(head: nn.Linear, x: Tensor) -> Tensor:
    """``head`` (a ``Linear(C, C)``) over the channels of ``x`` ``[B, C, h, w]``, kept in NCHW."""
    return F.conv2d(x, head.weight[:, :, None, None], head.bias)


def _stride(image_size: int, feature_map: Tensor) -> float:
    return image_size / feature_map.shape[-2]


class ScaleHeads(nn.Module):
    """Per-scale linear projections of the decoder maps (the released model's ``proj``): ``fine``
    (1/4) always, ``coarse`` and ``mid`` only when multi-scale."""

    def __init__(self, channels: int, multiscale: bool) -> None:
        super().__init__()
        self.fine = nn.Linear(channels, channels)
        self.multiscale = multiscale
        if multiscale:
            self.coarse = nn.Linear(channels, channels)
            self.mid = nn.Linear(channels, channels)

    def forward(self, coarse: Tensor, mid: Tensor, fine: Tensor, image_size: int) -> list[ScaleFeatures]:
        """Maps ``[B, C, h, w]`` -> projected maps with their strides, coarse to fine (only the
        fine one unless multi-scale)."""
        maps = [(self.coarse, coarse), (self.mid, mid), (self.fine, fine)] if self.multiscale else [(self.fine, fine)]
        return [ScaleFeatures(_project(head, x), _stride(image_size, x)) for head, x in maps]


class ViTDecoder(nn.Module):
    """The ViT decoder of the released SimpleMatch model.

    ``tokens [B, Cb, S/p, S/p]`` -> Dropout -> (1x1 conv to ``C`` when ``Cb != C``) ->
    ``ConvTranspose2d(k2, s2)(x) + bilinear_x2(x)`` -> :class:`ConvBlock` -> bilinear resize to
    exactly ``(S // 4, S // 4)`` -> :class:`ConvBlock` -> fine head.

    The paper describes a second transposed-conv + bilinear module; the released code defines that
    transposed conv (``trans_conv2``) but never uses it, and resizes bilinearly instead (x1.75 for
    patch 14, x2 for patch 16). We follow the released code, so there is no second transposed conv.

    Multi-scale (not in the released ViT model, which is supervised at 1/4 only) adds a head on the
    token map (stride p) and one on the first upsampled map (stride p/2), each its own ``Linear``.

    With DINOv2 ViT-B/14 and ``C = 768`` (no 1x1 conv), single-scale: 24,193,536 parameters.
    """

    def __init__(self, in_channels: int, channels: int, dropout: float, multiscale: bool) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.align = nn.Identity() if in_channels == channels else nn.Conv2d(in_channels, channels, kernel_size=1)
        self.up_conv = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.refine_mid = ConvBlock(channels)
        self.refine_fine = ConvBlock(channels)
        self.heads = ScaleHeads(channels, multiscale)

    def forward(self, features: list[Tensor], image_size: int) -> list[ScaleFeatures]:
        """``features``: ``[tokens [B, Cb, S/p, S/p]]``; ``image_size``: ``S``. Returns the 1/4 map
        ``[B, C, S//4, S//4]``, preceded when multi-scale by the token map and the ~1/8 map."""
        (tokens,) = features
        coarse = self.align(self.dropout(tokens))
        mid = self.up_conv(coarse) + F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
        mid = self.refine_mid(mid)
        fine = F.interpolate(mid, size=(image_size // 4, image_size // 4), mode="bilinear", align_corners=False)
        fine = self.refine_fine(fine)
        return self.heads(coarse, mid, fine, image_size)


class ResNetDecoder(nn.Module):
    """The ResNet decoder of the released model: skip connections from the encoder stages.

    ``layer1..4`` (strides 4, 8, 16, 32) are brought to ``C`` channels by 1x1 "align" convs
    (Identity where a stage already has ``C``), then

    - ``s16 = align3(layer3) + ConvT(align4(layer4))`` -> :class:`ConvBlock` -> coarse head;
    - ``s8  = align2(layer2) + ConvT(s16)`` -> :class:`ConvBlock` -> mid head;
    - ``s4  = align1(layer1) + bilinear(s8 -> size of layer1, align_corners=True)`` ->
      :class:`ConvBlock` -> fine head.

    At sizes that are not multiples of 32 a transposed conv's output can be one cell larger than
    its skip map; it is then resized bilinearly to the skip's size (the released code only ran at
    256, where sizes agree). The released ResNet model has no dropout, and neither has this decoder:
    ``decoder_dropout`` applies to ViT tokens only. Single-scale drops the coarse and mid heads.

    With ``C = 512``, multi-scale: 18,756,608 parameters (aligns 1,705,472; two transposed convs
    2,098,176; three ConvBlocks 14,164,992; three heads 787,968).
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int, multiscale: bool) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"the ResNet decoder needs 4 backbone levels, got channels {in_channels}")
        self.align = nn.ModuleList(
            nn.Identity() if level == channels else nn.Conv2d(level, channels, kernel_size=1) for level in in_channels
        )
        self.up_conv_coarse = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.up_conv_mid = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.refine_coarse = ConvBlock(channels)
        self.refine_mid = ConvBlock(channels)
        self.refine_fine = ConvBlock(channels)
        self.heads = ScaleHeads(channels, multiscale)

    def forward(self, features: list[Tensor], image_size: int) -> list[ScaleFeatures]:
        """``features``: the four stages ``[B, Ci, ~S/s, ~S/s]`` for s = 4, 8, 16, 32; ``image_size``:
        ``S``. Returns the 1/4 map, preceded when multi-scale by the 1/16 and 1/8 maps."""
        layer1, layer2, layer3, layer4 = (align(level) for align, level in zip(self.align, features, strict=True))
        coarse = self.refine_coarse(layer3 + _resized_like(self.up_conv_coarse(layer4), layer3))
        mid = self.refine_mid(layer2 + _resized_like(self.up_conv_mid(coarse), layer2))
        upsampled = F.interpolate(mid, size=layer1.shape[-2:], mode="bilinear", align_corners=True)
        fine = self.refine_fine(layer1 + upsampled)
        return self.heads(coarse, mid, fine, image_size)


def _resized_like(x: Tensor, reference: Tensor) -> Tensor:
    """``x`` bilinearly resized to ``reference``'s spatial size, untouched when they already agree."""
    if x.shape[-2:] == reference.shape[-2:]:
        return x
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


def build_decoder(cfg: ModelConfig, backbone_channels: tuple[int, ...]) -> ViTDecoder | ResNetDecoder:
    """The decoder for a backbone with ``backbone_channels`` (finest first): one level is a ViT,
    four levels a ResNet."""
    options = cfg.options
    if len(backbone_channels) == 1:
        return ViTDecoder(backbone_channels[0], options.decoder_channels, options.decoder_dropout, options.multiscale)
    return ResNetDecoder(backbone_channels, options.decoder_channels, options.multiscale)
