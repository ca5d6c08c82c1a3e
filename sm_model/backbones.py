"""Image encoders for SimpleMatch, built from timm: DINOv2 ViTs (patch 14, with or without 4
register tokens), iBOT ViT-B/16 and ResNet-101 (plus ResNet-18/50 for CPU demos), with their weights (random, timm hub or a local
file) and fine-tuning mode (frozen, LoRA, last N blocks, full).

A :class:`Backbone` maps ImageNet-normalised images [B, 3, H, W] to a list of feature maps, finest
first: ViTs return the last transformer block's patch tokens [B, C, H/p, W/p] (no CLS or register
tokens; no final LayerNorm, as the official SimpleMatch code, unless ``final_norm``); ResNets return their four stages
at strides 4, 8, 16, 32."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from sm_model.config import FinetuneMode, ModelConfig, PositionResampling
from sm_model.lora import apply_lora, mark_only_lora_trainable
from sm_model.state_dicts import StateDict, load_state_dict_strictly, read_state_dict

logger = logging.getLogger(__name__)

CheckpointLayout = Literal["dinov2", "ibot", "resnet"]


@dataclass(frozen=True)
class BackboneSpec:
    """``timm_name``: the timm architecture. ``kind``: "vit" or "resnet". ``strides`` and
    ``channels``: those of the returned feature maps, finest first. ``checkpoint_layout``: the
    local-file layout :func:`load_local_weights` reads besides timm's own ("dinov2":
    facebookresearch's ``dinov2_*_pretrain.pth``; "ibot": an iBOT teacher checkpoint; "resnet":
    a classifier state dict, whose ``fc`` is dropped). ``hub_tag``: the timm pretrained tag used
    for ``weights="hub"``; ``None`` where timm has no such weights."""

    timm_name: str
    kind: Literal["vit", "resnet"]
    strides: tuple[int, ...]
    channels: tuple[int, ...]
    checkpoint_layout: CheckpointLayout
    hub_tag: str | None

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this: the patch size for a ViT; the coarsest stride
        for a ResNet, so that every stage halves its input exactly and skip connections align."""
        return self.strides[-1]


BACKBONES: dict[str, BackboneSpec] = {
    "dinov2_vits14": BackboneSpec("vit_small_patch14_dinov2", "vit", (14,), (384,), "dinov2", "lvd142m"),
    "dinov2_vitb14": BackboneSpec("vit_base_patch14_dinov2", "vit", (14,), (768,), "dinov2", "lvd142m"),
    "dinov2_vitl14": BackboneSpec("vit_large_patch14_dinov2", "vit", (14,), (1024,), "dinov2", "lvd142m"),
    "dinov2_vitg14": BackboneSpec("vit_giant_patch14_dinov2", "vit", (14,), (1536,), "dinov2", "lvd142m"),
    "dinov2_vits14_reg4": BackboneSpec("vit_small_patch14_reg4_dinov2", "vit", (14,), (384,), "dinov2", "lvd142m"),
    "dinov2_vitb14_reg4": BackboneSpec("vit_base_patch14_reg4_dinov2", "vit", (14,), (768,), "dinov2", "lvd142m"),
    "dinov2_vitl14_reg4": BackboneSpec("vit_large_patch14_reg4_dinov2", "vit", (14,), (1024,), "dinov2", "lvd142m"),
    "dinov2_vitg14_reg4": BackboneSpec("vit_giant_patch14_reg4_dinov2", "vit", (14,), (1536,), "dinov2", "lvd142m"),
    # timm's ViT-B/16 (qkv bias, LayerNorm eps 1e-6) is iBOT's architecture; timm has no iBOT weights.
    "ibot_vitb16": BackboneSpec("vit_base_patch16_224", "vit", (16,), (768,), "ibot", None),
    # The official code starts from torchvision's ImageNet weights, which timm serves as tv_in1k.
    "resnet101": BackboneSpec("resnet101", "resnet", (4, 8, 16, 32), (256, 512, 1024, 2048), "resnet", "tv_in1k"),
    # Smaller ResNets for CPU demos and quick ablations (not in the paper).
    "resnet50": BackboneSpec("resnet50", "resnet", (4, 8, 16, 32), (256, 512, 1024, 2048), "resnet", "tv_in1k"),
    "resnet18": BackboneSpec("resnet18", "resnet", (4, 8, 16, 32), (64, 128, 256, 512), "resnet", "tv_in1k"),
}

_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def get_spec(name: str) -> BackboneSpec:
    """The registered spec called ``name``; a ValueError listing the registered names otherwise."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def create_encoder(spec: BackboneSpec, *, pretrained: bool = False, **timm_overrides: object) -> nn.Module:
    """The bare timm model behind ``spec``: a ViT at any input size that is a multiple of its patch
    (``dynamic_img_size``) without classifier, or a ResNet returning its four stages.
    ``pretrained`` downloads the hub weights; ``timm_overrides`` go to ``timm.create_model``."""
    if spec.kind == "vit":
        kwargs: dict[str, object] = {"dynamic_img_size": True, "num_classes": 0}
    else:
        kwargs = {"features_only": True, "out_indices": (1, 2, 3, 4)}
    model_name = f"{spec.timm_name}.{spec.hub_tag}" if pretrained else spec.timm_name
    return timm.create_model(model_name, pretrained=pretrained, **kwargs, **timm_overrides)


class Backbone(nn.Module):
    """A timm ``encoder`` with the ``strides`` and ``channels`` of its output maps, finest first.
    ``forward(images [B, 3, H, W], ImageNet-normalised) -> [B, C_i, H / s_i, W / s_i]`` per level."""

    def __init__(self, name: str, spec: BackboneSpec, encoder: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        self.strides: tuple[int, ...] = spec.strides
        self.channels: tuple[int, ...] = spec.channels
        self.encoder = encoder

    def tunable_blocks(self) -> list[nn.Module]:
        """The units ``finetune="last_blocks"`` counts from the end: transformer blocks or stages."""
        raise NotImplementedError

    def check_input(self, images: torch.Tensor) -> None:
        """A ValueError unless ``images`` is [B, 3, H, W] with H and W multiples of the size multiple."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects images [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        multiple = self.spec.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"{self.name} needs input sides that are multiples of {multiple}, got {height}x{width}")


def resample_positions_official(grid: torch.Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> torch.Tensor:
    """A positional-embedding grid ``[1, h*w, C]`` of ``old_size`` ``(h, w)`` fitted to ``new_size``
    as the DINO, DINOv2 and iBOT code does: bicubic by the scale factor ``(new + 0.1) / old``
    (which also sets where output cells sample the input), no antialiasing, unchanged when the
    sizes agree. Returns ``[1, H*W, C]`` in ``grid``'s dtype."""
    if tuple(old_size) == tuple(new_size):
        return grid
    (old_h, old_w), (new_h, new_w) = old_size, new_size
    image = grid.float().reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(image, scale_factor=((new_h + 0.1) / old_h, (new_w + 0.1) / old_w), mode="bicubic")
    if resized.shape[-2:] != (new_h, new_w):
        raise RuntimeError(f"positional grid {old_size} resampled to {tuple(resized.shape[-2:])}, expected {new_size}")
    return resized.permute(0, 2, 3, 1).reshape(1, new_h * new_w, -1).to(grid.dtype)


class ViTBackbone(Backbone):
    """A timm VisionTransformer; ``forward`` returns ``[tokens [B, C, H/p, W/p]]``: the last
    block's patch tokens, after the final LayerNorm when ``final_norm``. The pretrained positional embedding keeps its native grid (37 x 37 for
    DINOv2, 14 x 14 for iBOT) and is resampled to the input's grid at each call, as
    ``position_resampling`` says (see :class:`sm_model.config.ModelConfig`)."""

    def __init__(
        self,
        name: str,
        spec: BackboneSpec,
        encoder: nn.Module,
        position_resampling: PositionResampling = "official",
        final_norm: bool = False,
    ) -> None:
        # Drop the head, and the final LayerNorm unless the features are read after it (SimpleMatch
        # reads them before): no parameter stays unused, which full fine-tuning under DDP requires.
        encoder.prune_intermediate_layers(indices=1, prune_norm=not final_norm, prune_head=True)
        super().__init__(name, spec, encoder)
        self.position_resampling = position_resampling
        self.final_norm = final_norm

    def tunable_blocks(self) -> list[nn.Module]:
        return list(self.encoder.blocks)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] -> [tokens [B, C, H/p, W/p]]."""
        x, (height, width) = self._encode(images)
        patches = x[:, self.encoder.num_prefix_tokens :]
        return [patches.reshape(len(x), height, width, -1).permute(0, 3, 1, 2).contiguous()]

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> ``[B, 1 + h*w, C]``: the CLS token, then the patch tokens in
        row-major order (registers left out), as :meth:`forward` reads them."""
        x, _ = self._encode(images)
        return torch.cat([x[:, :1], x[:, self.encoder.num_prefix_tokens :]], dim=1)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Every output token ``[B, prefix + h*w, C]`` and the patch grid ``(h, w)``."""
        self.check_input(images)
        encoder = self.encoder
        patches = encoder.patch_embed(images)  # [B, h, w, C]
        height, width = patches.shape[1:3]
        if self.position_resampling == "timm":
            x = encoder._pos_embed(patches)
        else:
            x = self._add_positions_official(patches)
        x = encoder.norm_pre(encoder.patch_drop(x))
        for block in encoder.blocks:
            x = block(x)
        if self.final_norm:
            x = encoder.norm(x)
        return x, (height, width)

    def _add_positions_official(self, patches: torch.Tensor) -> torch.Tensor:
        """``patches`` ``[B, h, w, C]`` -> tokens ``[B, prefix + h*w, C]`` with prefix tokens
        (CLS, registers) and positions added, as timm's ``_pos_embed`` does, but with the grid part
        resampled by :func:`resample_positions_official`."""
        encoder = self.encoder
        batch, height, width, channels = patches.shape
        prefix = [encoder.cls_token, encoder.reg_token]
        prefix = [token.expand(batch, -1, -1) for token in prefix if token is not None]
        embedded_prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
        grid = resample_positions_official(
            encoder.pos_embed[:, embedded_prefix:], encoder.patch_embed.grid_size, (height, width)
        )
        x = patches.reshape(batch, height * width, channels)
        if encoder.no_embed_class:  # DINOv2 with registers: positions for patches only
            x = torch.cat([*prefix, x + grid], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + torch.cat([encoder.pos_embed[:, :embedded_prefix], grid], dim=1)
        return encoder.pos_drop(x)


class ResNetBackbone(Backbone):
    """A timm ResNet in ``features_only`` mode; ``forward`` returns its four stages
    [B, C_i, H / s_i, W / s_i] at strides 4, 8, 16, 32."""

    def tunable_blocks(self) -> list[nn.Module]:
        return [getattr(self.encoder, stage) for stage in _RESNET_STAGES]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] -> four maps, finest first."""
        self.check_input(images)
        return list(self.encoder(images))


def build_backbone(cfg: ModelConfig) -> Backbone:
    """The backbone ``cfg.backbone`` with ``cfg.weights`` loaded, then set up for ``cfg.finetune``
    (weights load before the LoRA swap, under timm's parameter names)."""
    spec = get_spec(cfg.backbone)
    _check_image_size(cfg.backbone, spec, cfg.image_size)
    encoder = _encoder_with_weights(cfg.backbone, spec, cfg.weights)
    if spec.kind == "vit":
        backbone: Backbone = ViTBackbone(cfg.backbone, spec, encoder, cfg.position_resampling, cfg.final_norm)
    elif cfg.final_norm:
        raise ValueError(f"final_norm needs a ViT backbone: {cfg.backbone} has no final LayerNorm")
    else:
        backbone = ResNetBackbone(cfg.backbone, spec, encoder)
    apply_finetune(backbone, cfg.finetune, cfg.finetune_blocks, cfg.lora_rank, cfg.lora_alpha)
    return backbone


def _check_image_size(name: str, spec: BackboneSpec, image_size: int) -> None:
    multiple = spec.size_multiple
    if image_size <= 0 or image_size % multiple:
        what = "patch size" if spec.kind == "vit" else "coarsest stride"
        nearest = max(multiple, round(image_size / multiple) * multiple)
        raise ValueError(
            f"image_size {image_size} is not a multiple of the {what} {multiple} of {name} (e.g. {nearest})"
        )


def _encoder_with_weights(name: str, spec: BackboneSpec, weights: str | None) -> nn.Module:
    if weights is None:
        return create_encoder(spec)
    if weights == "hub":
        if spec.hub_tag is None:
            raise ValueError(f"timm has no hub weights for {name}; pass the path of a local checkpoint")
        return create_encoder(spec, pretrained=True)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file for backbone {name!r} not found: {path}")
    # Every parameter and buffer comes from the file, so skip the random initialisation (about
    # 40 s for ViT-G on CPU): build on the meta device, then allocate uninitialised memory.
    with torch.device("meta"):
        encoder = create_encoder(spec)
    encoder.to_empty(device="cpu")
    load_local_weights(encoder, spec, path)
    return encoder


def apply_finetune(backbone: Backbone, mode: FinetuneMode, num_blocks: int, lora_rank: int, lora_alpha: float) -> None:
    """Set which backbone parameters train. "frozen": none; "full": all; "last_blocks": those of
    the last ``num_blocks`` transformer blocks (ResNet: stages); "lora" (ViTs only): the MLP
    ``fc2`` of the last ``num_blocks`` blocks becomes a :class:`~sm_model.lora.LoRALinear`
    and only its ``lora_A``/``lora_B`` train."""
    if mode not in ("frozen", "lora", "last_blocks", "full"):
        raise ValueError(f"unknown finetune mode {mode!r}; expected frozen, lora, last_blocks or full")
    if mode == "lora" and backbone.spec.kind != "vit":
        raise ValueError(f"finetune='lora' needs a ViT backbone; for {backbone.name} use frozen, last_blocks or full")
    backbone.requires_grad_(mode == "full")
    if mode in ("frozen", "full"):
        return
    blocks = backbone.tunable_blocks()
    if not 1 <= num_blocks <= len(blocks):
        raise ValueError(f"finetune_blocks must be in 1..{len(blocks)} for {backbone.name}, got {num_blocks}")
    first = len(blocks) - num_blocks
    if mode == "last_blocks":
        for block in blocks[first:]:
            block.requires_grad_(True)
        return
    apply_lora(backbone.encoder, [f"blocks.{i}.mlp.fc2" for i in range(first, len(blocks))], lora_rank, lora_alpha)
    mark_only_lora_trainable(backbone)


def load_local_weights(encoder: nn.Module, spec: BackboneSpec, path: str | Path) -> None:
    """Load the state dict in ``path`` into the bare timm ``encoder`` of ``spec``, strictly. Besides
    timm's own layout it reads the spec's ``checkpoint_layout`` (see :class:`BackboneSpec`)."""
    state_dict = read_state_dict(path)
    if spec.checkpoint_layout == "dinov2":
        # timm's own filter: drops mask_token, moves register_tokens to reg_token (folding the CLS
        # position into cls_token), renames SwiGLU w12/w3 and resamples a differently sized pos_embed.
        state_dict = checkpoint_filter_fn(dict(state_dict), encoder)
    elif spec.checkpoint_layout == "ibot":
        state_dict = ibot_to_timm(state_dict)
    else:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    load_state_dict_strictly(encoder, state_dict, f"{path} ({spec.timm_name})")
    logger.info("Loaded %s weights from %s", spec.timm_name, path)


def load_ibot_teacher(model: nn.Module, path: str | Path) -> None:
    """Load an iBOT teacher checkpoint (``{"teacher": state_dict}``, ``{"state_dict": ...}`` or a
    bare state dict; keys optionally under ``backbone.`` or ``module.backbone.``) into a timm
    ViT-B/16 ``model``, strictly over the backbone keys."""
    load_local_weights(model, BACKBONES["ibot_vitb16"], path)


def ibot_to_timm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """iBOT/DINO teacher keys -> timm VisionTransformer keys. Block and embedding names already
    match timm's; only the ``module.`` and ``backbone.`` prefixes go, and with them everything
    outside the backbone (the projection ``head.*``), plus the masked-image-modelling token."""
    under_backbone = any(key.removeprefix("module.").startswith("backbone.") for key in state_dict)
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if under_backbone:
            if not key.startswith("backbone."):
                continue
            key = key.removeprefix("backbone.")
        if key.startswith("head.") or key == "masked_embed":
            continue
        converted[key] = value
    return converted
