"""SimpleMatch: backbone -> upsampling decoder -> sparse matching -> window localization.

Coordinates follow :mod:`sm_train.model.matching`: keypoints are ``(x, y)`` pixels of the S x S
network input with pixel ``(0, 0)`` centred at ``(0.0, 0.0)``; :meth:`SimpleMatch.predict` maps
from and to the original images with the same pixel-centre convention.

Differences from the released code, on purpose:

- Source and target go through the backbone and the decoder as one batch of ``2B`` images (one
  forward each). BatchNorm in the decoder therefore normalises with statistics over both images
  in training, where the official ViT code ran source and target as two separate batches.
- Cell centres, not corners, are mapped to pixels (see :mod:`sm_train.model.matching`).
- Any number of keypoints; padded ones are masked by ``valid`` instead of a fixed 30.

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) are ``torch.save`` files holding
``{"format": "simplematch-v1", "config": dataclasses.asdict(cfg), "trainable_only": bool,
"state_dict": ...}``; :func:`load_official_checkpoint` reads the released ``best_model.pth`` layout.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from sm_train.model.backbones import BACKBONES, build_backbone, ibot_to_timm, read_state_dict
from sm_train.model.config import ModelConfig
from sm_train.model.decoder import ScaleFeatures, ViTDecoder, build_decoder
from sm_train.model.lora import LORA_PARAMETER_NAMES
from sm_train.model.loss import multiscale_loss
from sm_train.model.matching import cells_to_pixels, cosine_similarity, localize, sample_keypoint_features

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "simplematch-v1"

ARCHITECTURE_FIELDS = (
    "backbone",
    "finetune",
    "finetune_blocks",
    "lora_rank",
    "lora_alpha",
    "decoder_channels",
    "multiscale",
)
"""Config fields that decide the parameters (their names, shapes, trainability or meaning): a
checkpoint only loads into a model that agrees on all of them. The other fields (``weights``,
``image_size``, dropout, windows, ``beta``, loss weights, keypoint sampling) are run-time
settings that may legitimately differ, e.g. to evaluate with another window."""


class SimpleMatch(nn.Module):
    """The SimpleMatch model, built from a :class:`ModelConfig`.

    ``backbone`` (:func:`sm_train.model.backbones.build_backbone`, fine-tuning mode applied),
    ``decoder`` (:func:`sm_train.model.decoder.build_decoder`), then per decoder scale: source
    keypoint features -> cosine similarity with the whole target map -> window soft-argmax.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.decoder = build_decoder(config, tuple(self.backbone.channels))

    @property
    def window_sizes(self) -> tuple[int | None, ...]:
        """Soft-argmax window (cells) of each predicted scale, coarse to fine; ``None`` is dense.
        Multi-scale: ``config.coarse_window_sizes`` for the two coarse maps (1/16 and 1/8 for
        ResNet; the token map and the first upsampled map, 1/14 and 1/7, for DINOv2), then
        ``config.window_size`` at 1/4."""
        if self.config.multiscale:
            return (*self.config.coarse_window_sizes, self.config.window_size)
        return (self.config.window_size,)

    @property
    def scale_weights(self) -> tuple[float, ...]:
        """Loss weight of each predicted scale, coarse to fine. Single-scale uses the last (1/4)
        weight of ``config.scale_weights`` only."""
        if self.config.multiscale:
            return tuple(self.config.scale_weights)
        return (self.config.scale_weights[-1],)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> SimpleMatch:
        """Rebuild the model from a :func:`save_checkpoint` file's config and load its weights.

        ``overrides`` replace config fields (run-time ones; see :data:`ARCHITECTURE_FIELDS`). The
        backbone's initial ``weights`` are the saved ones for a trainable-only checkpoint (its
        frozen parameters come from there; pass ``weights=`` where the file lives elsewhere) and
        ``None`` for a full checkpoint, which holds every weight itself."""
        checkpoint = _read_checkpoint(path)
        config = config_from_dict(checkpoint["config"])
        if not checkpoint["trainable_only"]:
            config = dataclasses.replace(config, weights=None)
        model = cls(dataclasses.replace(config, **overrides))
        _load_state(model, checkpoint, path)
        return model

    def forward(self, src: Tensor, trg: Tensor, src_kps: Tensor, valid: Tensor) -> list[Tensor]:
        """Predict where each source keypoint lies in the target.

        ``src``, ``trg``: ``[B, 3, S, S]`` ImageNet-normalised (any S the backbone accepts: strides
        come from the actual maps, not ``config.image_size``); ``src_kps``: ``[B, N, 2]`` input
        pixels; ``valid``: ``[B, N]`` bool. Returns one ``[B, N, 2]`` float32 prediction (under
        autocast too) in input pixels per scale, coarse to fine (only the 1/4 one unless
        ``config.multiscale``).

        Invalid keypoints are read at pixel ``(0, 0)``, so their predictions are finite (and
        meaningless); ``valid`` is for the loss to mask them.
        """
        _check_inputs(src, trg, src_kps, valid)
        src_kps = torch.where(valid.unsqueeze(-1), src_kps, torch.zeros_like(src_kps))
        features = self.backbone(torch.cat([src, trg]))
        scales = self.decoder(features, src.shape[-1])
        return [
            self._match(scale, window, src_kps) for scale, window in zip(scales, self.window_sizes, strict=True)
        ]

    def _match(self, scale: ScaleFeatures, window: int | None, src_kps: Tensor) -> Tensor:
        """Sparse matching and localization on one scale: ``src_kps`` ``[B, N, 2]`` -> ``[B, N, 2]`` input pixels."""
        src_map, trg_map = scale.features.chunk(2)
        keypoint_features = sample_keypoint_features(src_map, src_kps, scale.stride, self.config.keypoint_sampling)
        scores = cosine_similarity(keypoint_features, trg_map)  # [B, N, h, w]
        return cells_to_pixels(localize(scores, window, self.config.beta), scale.stride)

    def loss(self, predictions: list[Tensor], target: Tensor, valid: Tensor) -> Tensor:
        """Weighted sum over scales of the mean Euclidean distance in input pixels over valid
        keypoints. ``predictions``: :meth:`forward`'s list; ``target``: ``[B, N, 2]`` input pixels;
        ``valid``: ``[B, N]`` bool. Weights: :attr:`scale_weights`."""
        return multiscale_loss(predictions, target, valid, self.scale_weights)

    @torch.no_grad()
    def predict(
        self, src: Tensor, trg: Tensor, src_kps: Tensor, valid: Tensor, src_sizes: Tensor, trg_sizes: Tensor
    ) -> Tensor:
        """Target keypoints in original target pixels, from the finest scale, in eval mode.

        ``src``, ``trg``: ``[B, 3, S, S]`` (the original images resized to S x S, normalised);
        ``src_kps``: ``[B, N, 2]`` original source pixels; ``valid``: ``[B, N]`` bool;
        ``src_sizes``, ``trg_sizes``: ``[B, 2]`` original ``(W, H)``. Returns ``[B, N, 2]`` float32.
        The model's training mode is restored afterwards.
        """
        input_size = src.shape[-1]
        input_kps = original_to_input_pixels(src_kps, src_sizes, input_size)
        was_training = self.training
        self.eval()
        try:
            finest = self(src, trg, input_kps, valid)[-1]
        finally:
            self.train(was_training)
        return input_to_original_pixels(finest, trg_sizes, input_size)


def original_to_input_pixels(points: Tensor, sizes: Tensor, input_size: int) -> Tensor:
    """Points ``[B, N, 2]`` in images of ``sizes`` ``[B, 2]`` ``(W, H)`` -> pixels of the
    ``input_size`` square they were resized to: ``x' = (x + 0.5) * S / W - 0.5`` (pixel centres)."""
    scale = input_size / _as_float(sizes, points).unsqueeze(1)
    return (points + 0.5) * scale - 0.5


def input_to_original_pixels(points: Tensor, sizes: Tensor, input_size: int) -> Tensor:
    """Inverse of :func:`original_to_input_pixels`: ``x = (x' + 0.5) * W / S - 0.5``."""
    scale = _as_float(sizes, points).unsqueeze(1) / input_size
    return (points + 0.5) * scale - 0.5


def _as_float(sizes: Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(sizes, device=like.device).to(torch.promote_types(like.dtype, torch.float32))


def _check_inputs(src: Tensor, trg: Tensor, src_kps: Tensor, valid: Tensor) -> None:
    if src.ndim != 4 or src.shape != trg.shape or src.shape[-1] != src.shape[-2]:
        raise ValueError(f"src and trg must both be [B, 3, S, S], got {tuple(src.shape)} and {tuple(trg.shape)}")
    batch = src.shape[0]
    if src_kps.ndim != 3 or src_kps.shape[0] != batch or src_kps.shape[-1] != 2:
        raise ValueError(f"src_kps must be [B={batch}, N, 2], got {tuple(src_kps.shape)}")
    if valid.shape != src_kps.shape[:-1] or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool [B, N] = {tuple(src_kps.shape[:-1])}, got {valid.dtype} {tuple(valid.shape)}"
        )


def trainable_state_keys(model: nn.Module) -> set[str]:
    """The ``state_dict`` keys a trainable-only checkpoint holds: every parameter with
    ``requires_grad``, plus the persistent buffers of every module that directly owns such a
    parameter (e.g. a decoder BatchNorm's running mean/var and ``num_batches_tracked``; a frozen
    backbone's BatchNorm statistics are left out with its weights)."""
    state_keys = set(model.state_dict())
    keys: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        trainable = [prefix + name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
        keys.update(trainable)
        if trainable:
            keys.update(prefix + name for name, _ in module.named_buffers(recurse=False) if prefix + name in state_keys)
    return keys


def save_checkpoint(model: SimpleMatch, path: str | Path, trainable_only: bool = False) -> None:
    """Write ``model``'s config and weights to ``path`` (a local file, replaced atomically).

    ``trainable_only`` keeps only :func:`trainable_state_keys` (for LoRA: the LoRA factors, the
    decoder and its BatchNorm statistics; the frozen backbone is rebuilt from ``config.weights``).
    Tensors are saved on the CPU."""
    state = model.state_dict()
    if trainable_only:
        keep = trainable_state_keys(model)
        state = {key: value for key, value in state.items() if key in keep}
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(model.config),
        "trainable_only": trainable_only,
        "state_dict": {key: value.detach().cpu() for key, value in state.items()},
    }
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    partial.replace(path)


def load_checkpoint(model: SimpleMatch, path: str | Path) -> None:
    """Load a :func:`save_checkpoint` file into ``model``, strictly.

    A full checkpoint must hold exactly the keys of ``model.state_dict()``; a trainable-only one
    exactly :func:`trainable_state_keys` of ``model``. Missing or unexpected keys, a differing
    :data:`ARCHITECTURE_FIELDS` config field, or (trainable-only) frozen weights that would be random
    on one side only raise ``ValueError`` naming them."""
    _load_state(model, _read_checkpoint(path), path)


def config_from_dict(fields: dict[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from ``dataclasses.asdict`` output (lists accepted for tuples)."""
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model config fields {unknown}")
    return ModelConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a {CHECKPOINT_FORMAT} checkpoint "
            "(for the released best_model.pth use load_official_checkpoint)"
        )
    return checkpoint


def _load_state(model: SimpleMatch, checkpoint: dict[str, Any], path: str | Path) -> None:
    trainable_only = bool(checkpoint["trainable_only"])
    _check_config(model.config, config_from_dict(checkpoint["config"]), trainable_only, path)
    state = checkpoint["state_dict"]
    expected = trainable_state_keys(model) if trainable_only else set(model.state_dict())
    _raise_on_key_mismatch(expected, set(state), f"{'trainable-only' if trainable_only else 'full'} checkpoint {path}")
    # The key sets agree exactly; strict=False only because a trainable-only state is a subset.
    model.load_state_dict(state, strict=not trainable_only)


def _check_config(model_config: ModelConfig, saved: ModelConfig, trainable_only: bool, path: str | Path) -> None:
    differing = [
        f"{name}: checkpoint {getattr(saved, name)!r}, model {getattr(model_config, name)!r}"
        for name in ARCHITECTURE_FIELDS
        if getattr(saved, name) != getattr(model_config, name)
    ]
    if differing:
        raise ValueError(f"checkpoint {path} was saved from another architecture: " + "; ".join(differing))
    if trainable_only and (saved.weights is None) != (model_config.weights is None):
        raise ValueError(
            f"trainable-only checkpoint {path} was saved on backbone weights {saved.weights!r} but the model was built "
            f"with weights {model_config.weights!r}: its frozen parameters would not be the ones it was trained on"
        )
    runtime_differences = [
        field.name
        for field in dataclasses.fields(ModelConfig)
        if getattr(saved, field.name) != getattr(model_config, field.name)
    ]
    if runtime_differences:
        logger.info("checkpoint %s: the model's own %s are used, not the saved ones", path, runtime_differences)


def _raise_on_key_mismatch(expected: set[str], found: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing keys {_listed(missing)}, unexpected keys {_listed(unexpected)}"
        )


def _listed(keys: list[str], shown: int = 20) -> str:
    """``keys`` for an error message: all of them, or the first ``shown`` and how many more."""
    if len(keys) <= shown:
        return str(keys)
    return f"{keys[:shown]} and {len(keys) - shown} more"


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
        logger.info("official checkpoint %s: skipped parts the released model never uses: %s", path, _listed(skipped))
    expected = {f"decoder.{key}" for key in model.decoder.state_dict()}
    encoder_keys = model.backbone.encoder.state_dict()
    if config.finetune == "lora":
        expected |= {f"backbone.encoder.{key}" for key in encoder_keys if key.endswith(LORA_PARAMETER_NAMES)}
    else:
        expected |= {f"backbone.encoder.{key}" for key in encoder_keys}
    _raise_on_key_mismatch(expected, set(mapped), f"official checkpoint {path} (mapped onto this model's names)")
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
