"""The model's typed configuration: everything that decides SimpleMatch's architecture and
localization, with the official settings as defaults (DINOv2 ViT-B/14 at 252, LoRA, window 45)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinetuneMode = Literal["frozen", "lora", "last_blocks", "full"]
KeypointSampling = Literal["bilinear", "nearest"]
PositionResampling = Literal["official", "timm"]


@dataclass(frozen=True)
class ModelConfig:
    """``backbone``: a name of :data:`sm_train.model.backbones.BACKBONES`.
    ``weights``: ``None`` (random init), ``"hub"`` (timm's pretrained weights, needs network) or a
    local checkpoint path. ``image_size``: square network input side (a multiple of the patch size
    for ViTs). ``finetune`` with ``finetune_blocks`` (the last N transformer blocks) and the LoRA
    ``lora_rank``/``lora_alpha`` (scaling alpha / rank, loralib convention). ``decoder_channels`` and
    ``decoder_dropout`` shape the upsampling decoder. ``window_size`` is the soft-argmax window in
    cells of the 1/4-resolution map (``None``: dense soft-argmax over the whole map); coarser scales
    use ``coarse_window_sizes`` (1/16, 1/8). ``beta`` is the soft-argmax temperature.
    ``multiscale`` predicts and supervises at 1/16, 1/8 and 1/4 with ``scale_weights``;
    otherwise only at 1/4. ``keypoint_sampling`` reads source features bilinearly or, for parity
    with the official code, from the integer cell holding the keypoint. ``position_resampling``
    (ViTs) fits the pretrained positional embedding to the input's patch grid as the DINO, DINOv2
    and iBOT code that trained the released weights does (``"official"``: bicubic, 0.1-cell offset,
    no antialiasing) or as timm does (``"timm"``: bicubic to the exact size, antialiased)."""

    backbone: str = "dinov2_vitb14"
    weights: str | None = None
    image_size: int = 252
    finetune: FinetuneMode = "lora"
    finetune_blocks: int = 6
    lora_rank: int = 16
    lora_alpha: float = 1.0
    decoder_channels: int = 768
    decoder_dropout: float = 0.3
    window_size: int | None = 45
    coarse_window_sizes: tuple[int | None, int | None] = (None, 15)
    beta: float = 0.02
    multiscale: bool = False
    scale_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    keypoint_sampling: KeypointSampling = "bilinear"
    position_resampling: PositionResampling = "official"
