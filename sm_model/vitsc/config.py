"""ViTSC's options, registered with its kind (no torch here: configs load without it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from sm_model.config import (
    MAX_BLOCKS,
    MAX_CHANNELS,
    MAX_IMAGE_SIZE,
    NON_NEGATIVE,
    POSITIVE,
    Bound,
    between,
    register_kind,
    require,
    vit_patch,
)

if TYPE_CHECKING:
    from sm_model.config import ModelConfig

Upsampler = Literal["guided_low", "guided_high", "cnn", "bilinear"]
"""How the coarse flow becomes the full-resolution flow (the paper's Table 6): ``guided_low`` (the
paper's: a local window of the L-Encoder's correlation around each coarse match, encoded beside
the flow), ``guided_high`` (the same window read from the stride-8 high-level correlation, no
L-Encoder), ``cnn`` (the flow branch only: "no guidance"), ``bilinear`` (no parameters)."""

COARSE_STRIDE = 8
"""The stride of the coarse correlation and flow, in input pixels."""
LOW_STRIDE = 4
"""The stride of the L-Encoder's features."""
MAX_RADIUS = 32
"""The largest lookup radius: (2r + 1)^2 = 4,225 correlation channels."""

def size_multiple(backbone: str) -> int:
    """What ViTSC's input side must be a multiple of: lcm(patch, 8), so that the token grid, the
    stride-8 grid and the stride-4 grid all tile the input (56 for patch 14, 16 for patch 16)."""
    patch = vit_patch(backbone)
    if patch is None:
        raise ValueError(f"vitsc needs a ViT backbone (DINOv2, iBOT), got {backbone!r}")
    return math.lcm(patch, COARSE_STRIDE)


PAPER_DEFAULTS = {
    "backbone": "dinov2_vitb14",
    "image_size": 224,
    "finetune": "last_blocks",
    "finetune_blocks": 4,
    "final_norm": True,
}
"""The paper's model: DINOv2-B/14 at 224, its last 4 blocks (8-11) fine-tuned, final LayerNorm on."""


@register_kind("vitsc", model="sm_model.vitsc.model:ViTSC", localizer="kernel", defaults=PAPER_DEFAULTS)
@dataclass(frozen=True)
class VitscOptions:
    """``model.vitsc:`` (``sm_model/README.md``, section ViTSC, has every choice and its reason).

    ``dim``: the matching width (a ``Linear(C, dim)`` projection of the ViT tokens); ``heads``:
    attention heads; ``layers``: cross-perception layers (0: no projection, no enhancement: the
    paper's "None" and its simple baseline). ``upsampler``: :data:`Upsampler`; ``radius``: the
    lookup window's radius in cells ((2r+1)^2 channels). ``kernel``: the Gaussian kernel (of
    ``sigma`` coarse cells) around each row's argmax before the soft-argmax; ``temperature``: the
    learned temperature's initial value. ``low_encoder``: whether the L-Encoder (ResNet-18 to
    layer3 at stride 4) is built; ``None``: exactly when the upsampler reads it (``guided_low``).
    ``low_weights``: its weights, as the backbone's ``weights`` (``None`` random, ``hub`` timm's
    ``resnet18.tv_in1k``, or a local torchvision/timm state dict). Loss: ``epe_weight`` x EPE on
    the pseudo-dense flow (every pixel within ``flow_halfwidth`` pixels of a source keypoint gets
    its displacement; ``None``: round(S / 32)) + ``aux_weight`` x the keypoint triplet loss with
    ``margin``."""

    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("dim", "heads", "layers", "upsampler", "radius")
    """The options that decide the parameters (``upsampler`` decides the L-Encoder too)."""
    WEIGHT_FILES: ClassVar[tuple[str, ...]] = ("low_weights",)
    """Options naming pretrained weights of a part that every checkpoint holds in full (the
    L-Encoder trains whole): loading a checkpoint never reads them; training resolves their paths."""

    dim: int = 256
    heads: int = 8
    layers: int = 1
    upsampler: Upsampler = "guided_low"
    radius: int = 4
    kernel: bool = True
    sigma: float = 5.0
    temperature: float = 0.03
    low_encoder: bool | None = None
    low_weights: str | None = None
    flow_halfwidth: int | None = None
    epe_weight: float = 1.0
    aux_weight: float = 10.0
    margin: float = 0.3

    def __post_init__(self) -> None:
        require(self, "dim", between(4, MAX_CHANNELS))
        require(self, "heads", between(1, MAX_CHANNELS))
        require(self, "layers", between(0, MAX_BLOCKS))
        require(self, "radius", between(0, MAX_RADIUS))
        require(self, "flow_halfwidth", between(0, MAX_IMAGE_SIZE))
        require(self, "sigma temperature", POSITIVE)
        require(self, "epe_weight aux_weight margin", NON_NEGATIVE)
        require(self, "dim", Bound("a multiple of 4 (the 2D sine position encoding)", lambda value: value % 4 == 0))
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if self.low_encoder is not None and self.low_encoder != (self.upsampler == "guided_low"):
            if self.low_encoder:
                raise ValueError(
                    f"low_encoder is on but the {self.upsampler!r} upsampler reads no low-level features: "
                    "the L-Encoder would train nothing (use upsampler guided_low, or leave low_encoder null)"
                )
            raise ValueError(
                "low_encoder is off but the guided_low upsampler reads the L-Encoder's correlation: "
                "use upsampler guided_high (the same lookup in the high-level correlation), cnn or bilinear"
            )

    @property
    def uses_low_encoder(self) -> bool:
        """Whether the L-Encoder is built: exactly for the ``guided_low`` upsampler (an explicit
        ``low_encoder`` must agree, :meth:`__post_init__`)."""
        return self.upsampler == "guided_low"

    def halfwidth(self, image_size: int) -> int:
        """The pseudo-flow square's half-width in pixels at ``image_size``: ``flow_halfwidth`` or round(S / 32)."""
        return self.flow_halfwidth if self.flow_halfwidth is not None else round(image_size / 32)

    def check(self, config: ModelConfig) -> None:
        """The shared fields ViTSC needs: a ViT backbone, an input side that is a multiple of
        lcm(patch, 8) (56 for DINOv2), the ``center`` pixel convention, and no other localizer."""
        multiple = size_multiple(config.backbone)
        if config.image_size % multiple:
            nearest = max(multiple, round(config.image_size / multiple) * multiple)
            raise ValueError(
                f"vitsc needs image_size a multiple of {multiple} (lcm of the patch {vit_patch(config.backbone)} of "
                f"{config.backbone} and the coarse stride {COARSE_STRIDE}), got {config.image_size} (e.g. {nearest}; "
                "the paper trains at 224)"
            )
        if config.pixel_convention != "center":
            raise ValueError(f"vitsc works in the 'center' pixel convention, got {config.pixel_convention!r}")
        if config.localizer is not None:
            raise ValueError(
                f"vitsc reads its points from its flow and localizes its coarse flow itself (vitsc.kernel, vitsc.sigma, "
                f"the learned temperature): localizer must be null, got {config.localizer!r}"
            )
