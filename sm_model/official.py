"""The released SimpleMatch checkpoints (``best_model.pth``, a flat state dict) mapped onto this
project's model: :func:`load_official_checkpoint`."""

from __future__ import annotations

import logging
from pathlib import Path

from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor

from sm_model.backbones import BACKBONES, ibot_to_timm
from sm_model.decoder import ViTDecoder
from sm_model.lora import LORA_PARAMETER_NAMES
from sm_model.simplematch import SimpleMatch
from sm_model.state_dicts import check_state, listed, read_state_dict

logger = logging.getLogger(__name__)

OFFICIAL_BACKBONE_PREFIX = "pair_image_encoder.image_encoder."
_OFFICIAL_DECODER_PREFIXES = {
    "trans_conv1.": "decoder.up_conv.",
    "conv_refine1.block1.": "decoder.refine_mid.first.",
    "conv_refine1.block2.": "decoder.refine_mid.second.",
    "conv_refine2.block1.": "decoder.refine_fine.first.",
    "conv_refine2.block2.": "decoder.refine_fine.second.",
    "proj.": "decoder.heads.fine.",
}
_OFFICIAL_UNUSED_PREFIXES = ("trans_conv2.",)
"""Defined by the released decoder but never used by its forward."""
_OFFICIAL_UNUSED_BACKBONE_PREFIXES = ("norm.", "fc_norm.", "head.")
"""Backbone parts the released model saves but never uses (no final LayerNorm, no classifier)."""


def load_official_checkpoint(model: SimpleMatch, path: str | Path) -> None:
    """Load a released SimpleMatch ViT checkpoint (``best_model.pth``, a flat state dict) into ``model``.

    Layout: the backbone under ``pair_image_encoder.image_encoder.`` (only the LoRA factors
    ``blocks.*.mlp.fc2.lora_A/lora_B`` for the DINOv2 LoRA models, the whole backbone for iBOT's
    full fine-tuning); the decoder as ``trans_conv1``, ``conv_refine{1,2}.block{1,2}.{0,1}``
    (conv, BatchNorm) and ``proj``. ``model`` must have the released architecture: a ViT whose
    width equals ``decoder_channels`` (no 1x1 conv), single-scale, ``finetune`` "lora" (then its
    frozen base weights come from ``config.weights``, which must be set) or "full".

    Strict over everything the released model has: every parameter and buffer of ``model`` that
    the released model also has must be in the file, and every key of the file must map onto
    ``model``, apart from parts the released model never uses (``trans_conv2``; the backbone's
    final ``norm``, ``head``, ``fc_norm``, and DINOv2/iBOT mask tokens), which are logged and skipped.
    """
    config = model.config
    if not isinstance(model.decoder, ViTDecoder):
        raise ValueError(f"official checkpoints are loaded into ViT models only, not {config.backbone}")
    if config.finetune not in ("lora", "full"):
        raise ValueError(f"the released models use finetune 'lora' (DINOv2) or 'full' (iBOT), not {config.finetune!r}")
    if config.finetune == "lora" and config.weights is None:
        raise ValueError(
            "a LoRA official checkpoint holds only the LoRA factors: build the model with config.weights set to the "
            "backbone's pretrained weights (e.g. dinov2_vitb14_pretrain.pth), not None"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no official checkpoint at {path}")
    official = read_state_dict(path)
    mapped, skipped = _map_official_state(official, model)
    if skipped:
        logger.info("official checkpoint %s: skipped parts the released model never uses: %s", path, listed(skipped))
    state = model.state_dict()
    expected = {
        key: value
        for key, value in state.items()
        if key.startswith("decoder.")
        or (key.startswith("backbone.encoder.") and (config.finetune == "full" or key.endswith(LORA_PARAMETER_NAMES)))
    }
    check_state(expected, mapped, f"official checkpoint {path} (mapped onto this model's names)")
    # Exactly the released model's part of the state; the rest (LoRA base weights) is already loaded.
    model.load_state_dict(mapped, strict=False)


def _map_official_state(official: dict[str, Tensor], model: SimpleMatch) -> tuple[dict[str, Tensor], list[str]]:
    """Official keys -> this model's keys. Returns the mapped state and the official keys skipped
    as unused; keys that are neither stay under their official name (and so show as unexpected)."""
    mapped: dict[str, Tensor] = {}
    skipped: list[str] = []
    backbone_state: dict[str, Tensor] = {}
    for key, value in official.items():
        if key.startswith(OFFICIAL_BACKBONE_PREFIX):
            backbone_state[key.removeprefix(OFFICIAL_BACKBONE_PREFIX)] = value
        elif key.startswith(_OFFICIAL_UNUSED_PREFIXES):
            skipped.append(key)
        else:
            mapped[_official_decoder_key(key)] = value
    encoder = model.backbone.encoder
    for key, value in _official_backbone_to_timm(backbone_state, model).items():
        if key not in encoder.state_dict() and key.startswith(_OFFICIAL_UNUSED_BACKBONE_PREFIXES):
            skipped.append(OFFICIAL_BACKBONE_PREFIX + key)
        else:
            mapped[f"backbone.encoder.{key}"] = value
    return mapped, sorted(skipped)


def _official_decoder_key(key: str) -> str:
    for official_prefix, prefix in _OFFICIAL_DECODER_PREFIXES.items():
        if key.startswith(official_prefix):
            return prefix + key.removeprefix(official_prefix)
    return key


def _official_backbone_to_timm(state: dict[str, Tensor], model: SimpleMatch) -> dict[str, Tensor]:
    """The released backbone state (facebookresearch DINOv2 or iBOT key names) under timm's names.
    LoRA factors keep their names, which already agree (``blocks.N.mlp.fc2.lora_A``)."""
    lora = {key: value for key, value in state.items() if key.endswith(LORA_PARAMETER_NAMES)}
    base = {key: value for key, value in state.items() if key not in lora}
    if base:
        layout = BACKBONES[model.config.backbone].checkpoint_layout
        if layout == "dinov2":
            # timm's converter drops mask_token and resamples a differently sized pos_embed.
            base = checkpoint_filter_fn(base, model.backbone.encoder)
        else:
            base = ibot_to_timm(base)
    return {**base, **lora}
