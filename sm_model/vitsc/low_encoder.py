"""The L-Encoder (low-level texture encoder): ResNet-18 with ``layer4`` and the classifier removed
and stride 1 in the first block of ``layer2`` and ``layer3`` (its 3x3 ``conv1`` and its 1x1
``downsample`` conv), so that it ends at 1/4 of the input with 256 channels::

    conv1 7x7/2 (64) -> BN -> ReLU -> maxpool 3x3/2     [N, 64,  S/4, S/4]
    layer1 (64)                                          [N, 64,  S/4, S/4]
    layer2 (128, first block stride 1)                   [N, 128, S/4, S/4]
    layer3 (256, first block stride 1)                   [N, 256, S/4, S/4]

2,782,784 parameters. No dilation. Weights as a backbone's (:mod:`sm_model.backbones`): random,
timm's ``resnet18.tv_in1k`` (``hub``) or a local torchvision/timm state dict (its ``fc`` and
``layer4`` are read, then dropped).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sm_model.backbones import BACKBONES, create_encoder, load_local_weights

STAGES = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3")
CHANNELS = 256


class LowEncoder(nn.Module):
    """The ResNet-18 stem and ``layer1``-``layer3`` of ``weights`` (see the module), strides changed."""

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        resnet = _resnet18(weights)
        for name in STAGES:
            setattr(self, name, getattr(resnet, name))
        for layer in (self.layer2, self.layer3):
            first = layer[0]
            first.conv1.stride = (1, 1)
            first.downsample[0].stride = (1, 1)

    def forward(self, images: Tensor) -> Tensor:
        """``images`` ``[N, 3, S, S]`` ImageNet-normalised (S a multiple of 4) -> ``[N, 256, S/4, S/4]``."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))


def _resnet18(weights: str | None) -> nn.Module:
    spec = BACKBONES["resnet18"]
    if weights is None:
        return create_encoder(spec)
    if weights == "hub":
        return create_encoder(spec, pretrained=True)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file for the vitsc L-Encoder (resnet18) not found: {path}")
    encoder = create_encoder(spec)
    with torch.no_grad():
        load_local_weights(encoder, spec, path)
    return encoder
