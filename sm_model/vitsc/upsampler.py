"""The correlation-guided upsampler's flow head (the paper's Sec. 4.2; its Fig. 4, the head's
architecture, is missing from the text, so every width here is a choice, RAFT's motion encoder
in spirit). The coarse flow ``M`` and the local correlation ``C_local`` are bilinearly upsampled
to the full input resolution, encoded separately, concatenated, and a small CNN predicts a
correction ``dM``::

    corr encoder: Conv1x1(K -> 256), Conv3x3(256 -> 192)                  on up(C_local)
    flow encoder: Conv7x7(2 -> 128), Conv3x3(128 -> 64)                   on up(M) / 8
    flow head:    Conv3x3(256 -> 256), Conv3x3(256 -> 2)                  on concat -> dM
    M' = up(M) + dM

ReLU after every conv but the last, no normalisation; the last conv starts at zero, so at
initialisation ``M' = up(M)``, the paper's "bilinear" ablation. ``cnn`` drops the correlation
branch (the head then reads the 64 flow channels), ``bilinear`` is ``up(M)`` alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sm_model.vitsc.config import COARSE_STRIDE, Upsampler

CORR_CHANNELS, FLOW_CHANNELS, HEAD_CHANNELS = 192, 64, 256


def upsample(maps: Tensor, size: int) -> Tensor:
    """``maps`` ``[B, C, h, w]`` bilinearly to ``[B, C, size, size]`` (``align_corners=False``,
    the centre convention); flow values stay in input pixels."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


def _conv(inputs: int, outputs: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2)


class FlowUpsampler(nn.Module):
    """The coarse flow ``[B, 2, h, w]`` (and, when guided, the local correlation ``[B, (2r+1)^2,
    h, w]``) -> the full-resolution flow ``[B, 2, S, S]`` in input pixels (see the module)."""

    def __init__(self, mode: Upsampler, radius: int) -> None:
        super().__init__()
        self.mode = mode
        self.guided = mode in ("guided_low", "guided_high")
        if mode == "bilinear":
            return
        if self.guided:
            window = (2 * radius + 1) ** 2
            self.corr_encoder = nn.Sequential(
                _conv(window, 256, 1), nn.ReLU(inplace=True), _conv(256, CORR_CHANNELS, 3), nn.ReLU(inplace=True)
            )
        self.flow_encoder = nn.Sequential(
            _conv(2, 128, 7), nn.ReLU(inplace=True), _conv(128, FLOW_CHANNELS, 3), nn.ReLU(inplace=True)
        )
        head_inputs = FLOW_CHANNELS + (CORR_CHANNELS if self.guided else 0)
        self.head = nn.Sequential(_conv(head_inputs, HEAD_CHANNELS, 3), nn.ReLU(inplace=True), _conv(HEAD_CHANNELS, 2, 3))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        # Full-resolution convolutions run channels-last (weights and inputs): about 1.6x faster on
        # the CPU (oneDNN), and the layout tensor cores prefer.
        self.to(memory_format=torch.channels_last)

    def forward(self, flow: Tensor, local_correlation: Tensor | None, size: int) -> Tensor:
        """``flow`` ``[B, 2, h, w]`` input pixels; ``local_correlation`` (guided modes only); ``size``: S."""
        upsampled = upsample(flow, size)
        if self.mode == "bilinear":
            return upsampled
        features = self.flow_encoder(_channels_last(upsampled / COARSE_STRIDE))
        if self.guided:
            if local_correlation is None:
                raise ValueError(f"the {self.mode} upsampler needs the local correlation")
            correlation = self.corr_encoder(_channels_last(upsample(local_correlation, size)))
            features = torch.cat([correlation, features], dim=1)
        return upsampled + self.head(features).to(upsampled.dtype).contiguous()


def _channels_last(maps: Tensor) -> Tensor:
    return maps.contiguous(memory_format=torch.channels_last)
