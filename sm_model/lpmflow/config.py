"""LPMFlow's options, registered with its kind (no torch here: configs load without it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

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

RELEASED_DEFAULTS = {
    "backbone": "ibot_vitb16",
    "image_size": 256,
    "finetune": "full",
    "final_norm": True,
    "position_resampling": "official",
    "pixel_convention": "official",
    "image_resize": "antialiased",
}
"""The released model: iBOT ViT-B/16 at 256, fully fine-tuned, every token after the final
LayerNorm, DINO's position resampling; images resized by PIL's bilinear (torchvision's ``Resize``
of a PIL image, as the released loader does) and points scaled ``x * S / W`` (the ``official``
convention, as the released loader scales keypoints)."""

RELEASED_PIXELS_PER_FLOW_CELL = 4
"""The released input frame, 512 pixels, over its 128 x 128 flow."""
RELEASED_GT_HALFWIDTH = 17
"""Half the side of the released ground-truth box around each flow cell, in pixels of the
512 x 512 frame (a 35 x 35 receptive field)."""


def flow_side(config: ModelConfig) -> int:
    """The side of LPMFlow's flow grid, ``8g`` for the token grid ``g = image_size / patch``."""
    return 8 * config.image_size // vit_patch(config.backbone)


@register_kind("lpmflow", model="sm_model.lpmflow.model:LPMFlow", localizer="argmax", defaults=RELEASED_DEFAULTS)
@dataclass(frozen=True)
class LpmflowOptions:
    """``model.lpmflow:`` (``sm_model/README.md``, section LPMFlow, has every choice and its reason).

    Frames: images come at ``input_size`` (``None``: 4 pixels per flow cell, the released loader's
    512) and the network resizes them to ``image_size`` (256) itself; the flow is at 8 cells per
    token (128 x 128), in flow cells. Architecture: ``encoder_depth`` blocks of the joint
    encoder, ``heads`` attention heads and an MLP ``mlp_ratio`` x wide everywhere, ``dropout`` in
    the encoder and decoders, the context feature of ``context_channels`` (``context_dropout``
    drops whole channels in training), the feature super-resolution's Swin window ``fsr_window``
    and the refinement's windows ``refine_windows``, coarse to fine. ``flow_beta``: the soft-argmax
    temperature of the four flows. Released quirks: ``src_mlp`` (false as released: the decoder's
    source self-attention branch adds ``LN(s)`` where an MLP belongs), ``learn_grid`` (true as
    released: the soft-argmax coordinate grids train), ``train_pe`` (true as released: a positional
    embedding added to the source tokens in training only). Training: ``topk_fraction`` of the
    source patch tokens most like the two CLS tokens, of which ``replace_fraction`` are replaced
    by the CLS sum; InfoNCE at ``contrastive_temperature`` with the weight
    ``max(contrastive_weight / max(epoch, 1), contrastive_floor)``; the ground-truth flow gives
    every flow cell within ``gt_halfwidth`` input pixels of a source keypoint (``None``: 17 at 512,
    4.25 flow cells) its displacement."""

    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "encoder_depth",
        "heads",
        "mlp_ratio",
        "context_channels",
        "fsr_window",
        "refine_windows",
        "src_mlp",
        "train_pe",
    )
    """The options that decide the parameters (``train_pe`` whether the training-only embedding exists)."""

    input_size: int | None = None
    encoder_depth: int = 6
    heads: int = 8
    mlp_ratio: int = 4
    dropout: float = 0.1
    context_channels: int = 88
    context_dropout: float = 0.5
    fsr_window: int = 4
    refine_windows: tuple[int, ...] = (16, 8, 4)
    flow_beta: float = 0.02
    src_mlp: bool = False
    learn_grid: bool = True
    train_pe: bool = True
    topk_fraction: float = 0.25
    replace_fraction: float = 0.25
    contrastive_temperature: float = 0.1
    contrastive_weight: float = 0.2
    contrastive_floor: float = 0.02
    gt_halfwidth: float | None = None

    def __post_init__(self) -> None:
        require(self, "input_size", between(1, MAX_IMAGE_SIZE))
        require(self, "encoder_depth", between(0, MAX_BLOCKS))
        require(self, "heads mlp_ratio", between(1, MAX_CHANNELS))
        require(self, "context_channels", between(1, MAX_CHANNELS))
        require(self, "fsr_window refine_windows", between(1, MAX_IMAGE_SIZE))
        require(self, "flow_beta contrastive_temperature", POSITIVE)
        require(self, "contrastive_weight contrastive_floor gt_halfwidth", NON_NEGATIVE)
        fraction = Bound("a fraction in [0, 1]", lambda value: 0 <= value <= 1)
        require(self, "dropout context_dropout topk_fraction replace_fraction", fraction)
        if not self.refine_windows:
            raise ValueError("refine_windows needs at least one window (the released model has 16, 8, 4)")

    def input_side(self, config: ModelConfig) -> int:
        """The side images come at: ``input_size``, or 4 pixels per flow cell as released (512 for
        the 128 x 128 flow of a 16 x 16 token grid)."""
        if self.input_size is not None:
            return self.input_size
        return RELEASED_PIXELS_PER_FLOW_CELL * flow_side(config)

    def halfwidth(self, stride: float) -> float:
        """The ground-truth box's half-width in input pixels for flow cells of ``stride`` input
        pixels: ``gt_halfwidth``, or 17 pixels per 4-pixel cell as released (4.25 cells)."""
        if self.gt_halfwidth is not None:
            return self.gt_halfwidth
        return RELEASED_GT_HALFWIDTH / RELEASED_PIXELS_PER_FLOW_CELL * stride

    def contrastive_weight_at(self, epoch: int | None) -> float:
        """The InfoNCE weight of (0-based) ``epoch`` as released: ``contrastive_weight`` for
        epochs 0 and 1, then divided by the epoch, never below ``contrastive_floor`` (0.2, 0.2,
        0.1, 0.067, ..., 0.02); ``contrastive_weight`` when no epoch was set."""
        if epoch is None:
            return self.contrastive_weight
        return max(self.contrastive_weight / max(epoch, 1), self.contrastive_floor)

    def check(self, config: ModelConfig) -> None:
        """The shared fields LPMFlow needs: a ViT backbone whose token grid ``g = S / patch`` is
        even (the ``2g`` and ``8g`` maps must tile into the Swin windows), an input side that is a
        multiple of the flow grid, and no localizer (points come from the flow)."""
        patch = vit_patch(config.backbone)
        if patch is None:
            raise ValueError(f"lpmflow needs a ViT backbone (its CLS token joins the encoder), got {config.backbone!r}")
        multiple = 2 * patch
        if config.image_size % multiple:
            nearest = max(multiple, round(config.image_size / multiple) * multiple)
            raise ValueError(
                f"lpmflow needs image_size a multiple of {multiple} (an even token grid of {config.backbone}'s "
                f"{patch}-pixel patches), got {config.image_size} (e.g. {nearest}; the released model runs at 256)"
            )
        grid = config.image_size // patch
        for name, side, windows in (
            ("fsr_window", 2 * grid, (self.fsr_window,)),
            ("refine_windows", 8 * grid, self.refine_windows),
        ):
            for window in windows:
                if side > window and side % window:
                    raise ValueError(
                        f"lpmflow.{name} {window} must divide the {side} x {side} map it windows at image_size "
                        f"{config.image_size} (or be at least its side)"
                    )
        side = flow_side(config)
        if self.input_side(config) % side:
            raise ValueError(
                f"lpmflow.input_size {self.input_side(config)} must be a multiple of the {side} x "
                f"{side} flow at image_size {config.image_size} (the released model: 512 and 128)"
            )
        if config.localizer is not None:
            raise ValueError(
                f"lpmflow reads its points from its flow: localizer must be null, got {config.localizer!r}"
            )
