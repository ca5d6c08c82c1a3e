"""Models by kind: :func:`build_model` builds the model of ``ModelConfig.kind``.

Each kind registers itself where it is defined (:func:`sm_model.config.register_kind` on its
options dataclass, in ``sm_model/<kind package>/config.py``): its config section, its model class
and its localizer. Every kind keeps the :class:`~sm_model.matcher.MatchModel` contract, and
checkpoints record the kind (:mod:`sm_model.checkpoint`). A zero-shot model needs no checkpoint:
:func:`zero_shot_config` builds its config from a spec such as ``zero-shot:dinov2_vitb14``. Any
model from a name (checkpoint, released file, ``zero-shot:NAME``): :func:`sm_model.factory.create_model`.
"""

from __future__ import annotations

import importlib

from sm_model.backbones import get_spec
from sm_model.config import ModelConfig, kind_info
from sm_model.matcher import MatchModel

ZERO_SHOT_PREFIX = "zero-shot:"


def build_model(config: ModelConfig) -> MatchModel:
    """The model of ``config.kind``, built from ``config``."""
    module, _, name = kind_info(config.kind).model.partition(":")
    return getattr(importlib.import_module(module), name)(config)


def is_zero_shot_spec(text: str) -> bool:
    """Whether ``text`` names a zero-shot model (``zero-shot:NAME``) rather than a checkpoint."""
    return text.startswith(ZERO_SHOT_PREFIX)


def zero_shot_config(spec: str, weights: str | None = "hub", **overrides: object) -> ModelConfig:
    """The config of ``spec`` = ``zero-shot:NAME``, ``NAME`` a backbone of
    :data:`sm_model.backbones.BACKBONES`: frozen, with ``weights`` (``"hub"``: timm's pretrained
    weights; a local file; ``None``: random, for smoke tests), the final LayerNorm on for ViTs,
    the default input side rounded to a multiple of the backbone's patch or stride, and
    ``overrides`` (any :class:`ModelConfig` field, e.g. ``image_size``, ``localizer``)."""
    if not is_zero_shot_spec(spec):
        raise ValueError(f"{spec!r} is not a zero-shot model: expected {ZERO_SHOT_PREFIX}BACKBONE")
    name = spec.removeprefix(ZERO_SHOT_PREFIX)
    try:
        backbone = get_spec(name)
    except ValueError as error:
        raise ValueError(f"{spec}: {error}") from None
    settings: dict[str, object] = {
        "kind": "zero-shot",
        "backbone": name,
        "weights": weights,
        "finetune": "frozen",
        "final_norm": backbone.kind == "vit",
        # The default input side, rounded to a size the backbone takes (252 for DINOv2, 256 otherwise).
        "image_size": max(1, round(ModelConfig.image_size / backbone.size_multiple)) * backbone.size_multiple,
    }
    return ModelConfig(**(settings | overrides))
