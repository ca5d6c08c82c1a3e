"""The released SimpleMatch checkpoints (``best_model.pth``, a flat state dict) mapped onto this
project's model: :func:`official_model` builds the released model from one, in the official pixel
convention and image resize (:mod:`sm_model.pixels`), so that it predicts what the released code
predicts; :func:`load_official_checkpoint` loads one into a model built by hand.

Three layouts (:func:`official_layout`), all with the backbone under
``pair_image_encoder.image_encoder.``:

- ``"lora"`` (DINOv2 ViT-B/14): only the LoRA factors ``blocks.N.mlp.fc2.lora_A/lora_B`` of the
  backbone; its frozen weights come from the public ``dinov2_vitb14_pretrain.pth``. ViT decoder as
  ``trans_conv1``, ``conv_refine{1,2}.block{1,2}.{0,1}`` (conv, BatchNorm), ``proj``; the unused
  ``trans_conv2``.
- ``"full"`` (iBOT ViT-B/16): the whole backbone (with its unused final ``norm`` and ``head``) and
  the same ViT decoder.
- ``"resnet"`` (ResNet-101, 684 keys): the whole torchvision ResNet-101 (its unused ``fc``
  included) under ``pair_image_encoder.backbone.`` and the three-head decoder:
  ``pair_image_encoder.aligns.{0,2,3}`` (the 1x1 convs to 512 channels of layer1, 3, 4; layer2's
  is an Identity), ``trans_conv1`` (1/32 -> 1/16), ``trans_conv2`` (1/16 -> 1/8),
  ``conv_refine{1,2,3}.block{1,2}.{0,1}`` and the linear ``proj{1,2,3}`` at 1/16, 1/8, 1/4 (the
  released ``sc_resnet.py`` and ``pair_image_encoder_resnet.py`` module names).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor

from sm_model.backbones import BACKBONES, get_spec, ibot_to_timm
from sm_model.checkpoint import empty_model
from sm_model.config import ModelConfig
from sm_model.lora import LORA_PARAMETER_NAMES
from sm_model.simplematch.decoder import ResNetDecoder
from sm_model.simplematch.model import SimpleMatch
from sm_model.state_dicts import check_state, listed, read_state_dict

logger = logging.getLogger(__name__)

OfficialLayout = Literal["lora", "full", "resnet"]
OFFICIAL_BACKBONE_PREFIXES = ("pair_image_encoder.image_encoder.", "pair_image_encoder.backbone.")
"""Where the released models keep their backbone: the ViT models and the ResNet-101 model."""
_VIT_DECODER_PREFIXES = {
    "trans_conv1.": "decoder.up_conv.",
    "conv_refine1.block1.": "decoder.refine_mid.first.",
    "conv_refine1.block2.": "decoder.refine_mid.second.",
    "conv_refine2.block1.": "decoder.refine_fine.first.",
    "conv_refine2.block2.": "decoder.refine_fine.second.",
    "proj.": "decoder.heads.fine.",
}
_RESNET_DECODER_PREFIXES = {
    "pair_image_encoder.aligns.0.": "decoder.align.0.",
    "pair_image_encoder.aligns.2.": "decoder.align.2.",
    "pair_image_encoder.aligns.3.": "decoder.align.3.",
    "trans_conv1.": "decoder.up_conv_coarse.",
    "trans_conv2.": "decoder.up_conv_mid.",
    "conv_refine1.block1.": "decoder.refine_coarse.first.",
    "conv_refine1.block2.": "decoder.refine_coarse.second.",
    "conv_refine2.block1.": "decoder.refine_mid.first.",
    "conv_refine2.block2.": "decoder.refine_mid.second.",
    "conv_refine3.block1.": "decoder.refine_fine.first.",
    "conv_refine3.block2.": "decoder.refine_fine.second.",
    "proj1.": "decoder.heads.coarse.",
    "proj2.": "decoder.heads.mid.",
    "proj3.": "decoder.heads.fine.",
}
_VIT_UNUSED_PREFIXES = ("trans_conv2.",)
"""Defined by the released ViT decoder but never used by its forward."""
_OFFICIAL_UNUSED_BACKBONE_PREFIXES = ("norm.", "fc_norm.", "head.", "fc.")
"""Backbone parts the released model saves but never uses (no final LayerNorm, no classifier)."""

Source = str | Path | bytes
"""A released checkpoint's path, or its bytes."""
OFFICIAL_SETTINGS: dict[str, object] = {
    "pixel_convention": "official",
    "image_resize": "official",
    "keypoint_sampling": None,
}
"""The config fields a released model predicts with (the official convention's own sampling)."""


def official_layout(state: Mapping[str, Tensor]) -> OfficialLayout:
    """Which released model ``state`` (a released ``best_model.pth`` state dict) holds, from its
    keys: ``"resnet"`` (ResNet stages under the backbone prefix), ``"lora"`` (only LoRA factors
    there) or ``"full"`` (a whole ViT). ``ValueError`` when nothing is under the backbone prefix."""
    backbone = [name for name in map(_backbone_key, state) if name is not None]
    if not backbone:
        raise ValueError(f"not a released SimpleMatch checkpoint: no key starts with one of {OFFICIAL_BACKBONE_PREFIXES}")
    if any(key.startswith("layer1.") for key in backbone):
        return "resnet"
    if all(key.endswith(LORA_PARAMETER_NAMES) for key in backbone):
        return "lora"
    return "full"


def released_config(
    config: ModelConfig, state: Mapping[str, Tensor], backbone_weights: str | Path | None = None
) -> ModelConfig:
    """``config`` (the run-time settings: ``image_size``, windows, ``beta``; e.g. a shipped config's
    model section) made the released model of ``state``: the official pixel convention and image
    resize, the convention's keypoint sampling, official positional resampling, and the
    architecture read from the keys (``finetune``; LoRA rank and blocks; ``decoder_channels``;
    ``multiscale`` for ResNet). A LoRA model's frozen backbone comes from ``backbone_weights``, else
    ``config.weights``; the other layouts hold every weight (``weights`` becomes ``None``).
    ``ValueError`` when the config's backbone is of another kind than the checkpoint's model, or a
    LoRA model has no backbone weights."""
    layout = official_layout(state)
    kind = get_spec(config.backbone).kind
    if (layout == "resnet") != (kind == "resnet"):
        held = "a ResNet" if layout == "resnet" else "a ViT"
        raise ValueError(f"the released checkpoint holds {held} model, but the config's backbone is {config.backbone}")
    if config.kind != "simplematch":
        raise ValueError(f"a released SimpleMatch checkpoint needs a simplematch model config, got kind {config.kind!r}")
    options: dict[str, object] = {"multiscale": layout == "resnet"}
    head = state.get("proj3.weight" if layout == "resnet" else "proj.weight")
    if head is not None:
        options["decoder_channels"] = int(head.shape[0])
    fields: dict[str, object] = {
        **OFFICIAL_SETTINGS,
        "position_resampling": "official",
        "finetune": "full",
        "weights": None,
        "options": dataclasses.replace(config.options, **options),
    }
    if layout == "lora":
        weights = backbone_weights if backbone_weights is not None else config.weights
        if weights is None:
            raise ValueError(
                "a released DINOv2 LoRA checkpoint holds only the LoRA factors: give the backbone's pretrained "
                "weights (e.g. dinov2_vitb14_pretrain.pth)"
            )
        factors = {key: value for key, value in state.items() if key.endswith("lora_A")}
        blocks = {_backbone_key(key).split(".")[1] for key in factors}
        rank = {int(value.shape[0]) for value in factors.values()}
        fields |= {"finetune": "lora", "weights": str(weights), "finetune_blocks": len(blocks), "lora_rank": min(rank)}
    return dataclasses.replace(config, **fields)


def official_model(
    checkpoint: Source | Mapping[str, Tensor],
    config: ModelConfig,
    backbone_weights: str | Path | None = None,
    name: str | None = None,
) -> SimpleMatch:
    """The released model in ``checkpoint`` (a ``best_model.pth`` path, its bytes, or its state
    dict) with ``config``'s run-time settings, built by :func:`released_config` and loaded
    strictly (:func:`load_official_checkpoint`): it predicts in the official pixel convention, and
    its config asks for the official image resize, which ``save_checkpoint`` records. ``name``
    names the checkpoint in messages. The model is on the CPU, in training mode as any new module.

        >>> model = official_model("best_model.pth", load_config("configs/dinov2_vitb14_448_spair.yaml").model,
        ...                        backbone_weights="dinov2_vitb14_pretrain.pth")
    """
    if isinstance(checkpoint, Mapping):
        state, name = dict(checkpoint), name or "released checkpoint"
    else:
        state, name = _read_official(checkpoint), name or _name(checkpoint)
    config = released_config(config, state, backbone_weights)
    # Only a LoRA model has weights that the file lacks; otherwise skip the random initialisation.
    model = SimpleMatch(config) if config.weights is not None else empty_model(config)
    _load_official_state(model, state, name)
    logger.info("released checkpoint %s: %s model, pixel convention official", name, official_layout(state))
    return model


def load_official_checkpoint(model: SimpleMatch, path: Source) -> None:
    """Load a released SimpleMatch checkpoint (``best_model.pth``, a flat state dict; a path or its
    bytes) into ``model``, which must have the released architecture (:func:`official_model` builds
    it from the file), and set ``model.config`` to the official pixel convention, sampling and image
    resize (:data:`OFFICIAL_SETTINGS`), which the released weights were trained with. Layouts: see
    the module docstring.

    ``model``: a ViT whose width equals ``decoder_channels`` (no 1x1 conv), single-scale,
    ``finetune`` "lora" (then its frozen base weights come from ``config.weights``, which must be
    set) or "full"; or a ResNet, multi-scale (three heads), ``finetune`` "full".

    Strict over everything the released model has: every parameter and buffer of ``model`` that
    the released model also has must be in the file, and every key of the file must map onto
    ``model``, apart from parts the released model never uses (the ViT's ``trans_conv2``; the
    backbone's final ``norm``, ``head``, ``fc_norm``, ResNet's ``fc``, and DINOv2/iBOT mask tokens),
    which are logged and skipped.
    """
    _load_official_state(model, _read_official(path), _name(path))
    model.config = dataclasses.replace(model.config, **OFFICIAL_SETTINGS)
    logger.info("official checkpoint %s: the model predicts in the official pixel convention", _name(path))


def _name(source: Source) -> str:
    return "released checkpoint bytes" if isinstance(source, bytes) else str(source)


def _read_official(source: Source) -> dict[str, Tensor]:
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise FileNotFoundError(f"no official checkpoint at {source}")
    return read_state_dict(source)


def _load_official_state(model: SimpleMatch, official: dict[str, Tensor], path: str) -> None:
    config = model.config
    resnet = isinstance(model.decoder, ResNetDecoder)
    if resnet and (config.finetune != "full" or not config.options.multiscale):
        raise ValueError("the released ResNet model is fully fine-tuned with three heads: finetune 'full', multiscale")
    if config.finetune not in ("lora", "full"):
        raise ValueError(f"the released models use finetune 'lora' (DINOv2) or 'full' (iBOT), not {config.finetune!r}")
    if config.finetune == "lora" and config.weights is None:
        raise ValueError(
            "a LoRA official checkpoint holds only the LoRA factors: build the model with config.weights set to the "
            "backbone's pretrained weights (e.g. dinov2_vitb14_pretrain.pth), not None"
        )
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
    resnet = isinstance(model.decoder, ResNetDecoder)
    names = _RESNET_DECODER_PREFIXES if resnet else _VIT_DECODER_PREFIXES
    prefixes = {}
    for key, value in official.items():
        if (name := _backbone_key(key)) is not None:
            backbone_state[name], prefixes[name] = value, key.removesuffix(name)
        elif not resnet and key.startswith(_VIT_UNUSED_PREFIXES):
            skipped.append(key)
        else:
            mapped[_official_decoder_key(key, names)] = value
    encoder = model.backbone.encoder
    for key, value in _official_backbone_to_timm(backbone_state, model).items():
        if key not in encoder.state_dict() and key.startswith(_OFFICIAL_UNUSED_BACKBONE_PREFIXES):
            skipped.append(prefixes.get(key, "") + key)
        else:
            mapped[f"backbone.encoder.{key}"] = value
    return mapped, sorted(skipped)


def _backbone_key(key: str) -> str | None:
    """``key`` without its released backbone prefix, ``None`` for a key outside the backbone."""
    prefix = next((prefix for prefix in OFFICIAL_BACKBONE_PREFIXES if key.startswith(prefix)), None)
    return None if prefix is None else key.removeprefix(prefix)


def _official_decoder_key(key: str, names: Mapping[str, str]) -> str:
    for official_prefix, prefix in names.items():
        if key.startswith(official_prefix):
            return prefix + key.removeprefix(official_prefix)
    return key


def _official_backbone_to_timm(state: dict[str, Tensor], model: SimpleMatch) -> dict[str, Tensor]:
    """The released backbone state (facebookresearch DINOv2, iBOT or torchvision ResNet key names)
    under timm's names. LoRA factors keep their names, which already agree
    (``blocks.N.mlp.fc2.lora_A``), and so do torchvision's ResNet names."""
    lora = {key: value for key, value in state.items() if key.endswith(LORA_PARAMETER_NAMES)}
    base = {key: value for key, value in state.items() if key not in lora}
    if base:
        layout = BACKBONES[model.config.backbone].checkpoint_layout
        if layout == "dinov2":
            # timm's converter drops mask_token and resamples a differently sized pos_embed.
            base = checkpoint_filter_fn(base, model.backbone.encoder)
        elif layout == "ibot":
            base = ibot_to_timm(base)
    return {**base, **lora}
