"""The checkpoint file format: the one place that writes and reads model checkpoints, of any kind.

A checkpoint is a ``torch.save`` file holding ``{"format": "simplematch-v2", "config":
to_dict(ModelConfig), "trainable_only": bool, "state_dict": ...}``; the config's ``kind`` says
which model to rebuild (:func:`sm_model.registry.build_model`) and its section under the kind's
name holds the kind's options. ``simplematch-v1`` files (a flat config holding every kind's
fields; no ``kind`` in files written before there were kinds: ``simplematch``) still load. A
checkpoint directory (a Ray Train checkpoint) holds it as :data:`MODEL_FILE`. It is read with
``weights_only=True``, so no pickled code runs. Released files of other layouts:
:mod:`sm_model.released`; any of them by name: :func:`sm_model.factory.create_model`.

    >>> save_checkpoint(model, "model.pt")
    >>> model = load_model("model.pt", window_size=7)   # a run-time field overridden
"""

from __future__ import annotations

import io
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sm_model.config import ModelConfig, from_dict, model_kinds, plain_value, replace_fields, to_dict
from sm_model.matcher import MatchModel
from sm_model.registry import build_model
from sm_model.state_dicts import check_state

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "simplematch-v2"
LEGACY_FORMAT = "simplematch-v1"
"""The format before kinds had config sections: a flat config of every field of every kind."""
MODEL_FILE = "model.pt"
"""The model file inside a checkpoint directory."""

ARCHITECTURE_FIELDS = ("kind", "backbone", "finetune", "finetune_blocks", "lora_rank", "lora_alpha", "final_norm")
"""Shared config fields that decide the parameters (their names, shapes, trainability or
meaning); each kind's options name theirs (``ARCHITECTURE``, e.g. SimpleMatch's
``decoder_channels`` and ``multiscale``). A checkpoint only loads into a model that agrees on all
of them (:func:`architecture`). The other fields (``weights``, ``image_size``, dropout, windows,
``beta``, loss weights, keypoint sampling) are run-time settings that may legitimately differ, e.g.
to evaluate with another window."""

Source = str | Path | bytes
"""A checkpoint file's path, or its bytes."""


def architecture(config: ModelConfig) -> dict[str, Any]:
    """The fields of ``config`` that decide the parameters, by name (a kind's options as
    ``<kind>.<option>``)."""
    shared = {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}
    return shared | {f"{config.kind}.{name}": getattr(config.options, name) for name in config.options.ARCHITECTURE}


def weight_file_options(config: ModelConfig) -> tuple[str, ...]:
    """The options of ``config``'s kind that name pretrained weights of a part every checkpoint
    holds in full (``WEIGHT_FILES``, e.g. ViTSC's ``low_weights``): loading a checkpoint sets them
    to ``None`` (the file is not read; its weights come from the checkpoint)."""
    return tuple(getattr(config.options, "WEIGHT_FILES", ()))


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


def save_checkpoint(model: MatchModel, path: str | Path, trainable_only: bool = False) -> None:
    """Write ``model``'s config and weights to ``path`` (a local file, replaced atomically).

    ``trainable_only`` keeps only :func:`trainable_state_keys` (for LoRA: the LoRA factors, the
    decoder and its BatchNorm statistics; the frozen backbone is rebuilt from ``config.weights``).
    Tensors are saved on the CPU."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(_checkpoint_document(model, trainable_only), partial)
    partial.replace(path)


def checkpoint_bytes(model: MatchModel, trainable_only: bool = False) -> bytes:
    """What :func:`save_checkpoint` would write, as bytes (for :func:`load_model` on a worker)."""
    buffer = io.BytesIO()
    torch.save(_checkpoint_document(model, trainable_only), buffer)
    return buffer.getvalue()


def _checkpoint_document(model: MatchModel, trainable_only: bool) -> dict[str, Any]:
    state = model.state_dict()
    if trainable_only:
        keep = trainable_state_keys(model)
        state = {key: value for key, value in state.items() if key in keep}
    return {
        "format": CHECKPOINT_FORMAT,
        "config": to_dict(model.config),
        "trainable_only": trainable_only,
        "state_dict": {key: value.detach().cpu() for key, value in state.items()},
    }


def read_checkpoint(source: Source, name: str | None = None) -> dict[str, Any]:
    """The checkpoint in ``source`` as saved (tensors on the CPU), checked to be one of ours.
    ``name`` names it in errors (default: the path). Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` for anything that is not a :data:`CHECKPOINT_FORMAT` checkpoint."""
    if isinstance(source, bytes):
        name, file = name or "checkpoint bytes", io.BytesIO(source)
    else:
        name, file = name or str(source), Path(source)
        if not file.is_file():
            raise FileNotFoundError(f"no checkpoint at {source}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{name} is not a readable torch checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in (CHECKPOINT_FORMAT, LEGACY_FORMAT):
        raise ValueError(
            f"{name} is not a {CHECKPOINT_FORMAT} checkpoint (save_checkpoint writes one; a released file "
            "loads through sm_model.factory.create_model or sm_model.released.load_released)"
        )
    _check_document(checkpoint, name)
    return checkpoint


def _check_document(checkpoint: dict[str, Any], name: str) -> None:
    """A ValueError naming ``name`` unless the checkpoint holds a config mapping, a
    ``trainable_only`` flag and a state dict of names to tensors."""
    config, state = checkpoint.get("config"), checkpoint.get("state_dict")
    problem = None
    if not isinstance(config, dict):
        problem = f"its config is {'missing' if config is None else f'a {type(config).__name__}, not a mapping'}"
    elif not isinstance(checkpoint.get("trainable_only"), bool):
        problem = "its trainable_only flag is missing or not true/false"
    elif not isinstance(state, dict):
        problem = f"its state_dict is {'missing' if state is None else f'a {type(state).__name__}, not a mapping'}"
    else:
        tensors_by_name = (isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items())
        wrong = next((key for key, ok in zip(state, tensors_by_name) if not ok), None)
        if wrong is not None:
            problem = f"its state_dict entry {str(wrong)[:80]!r} is not a tensor under a name"
    if problem:
        raise ValueError(f"{name} is a {checkpoint['format']} checkpoint, but {problem}")


def saved_config(checkpoint: dict[str, Any], name: str = "checkpoint") -> ModelConfig:
    """The :class:`ModelConfig` a :func:`read_checkpoint` result was saved with."""
    document = checkpoint["config"]
    if checkpoint["format"] == LEGACY_FORMAT and isinstance(document, dict):
        document = legacy_config(document)
    return from_dict(ModelConfig, document, f"{name} config")


def legacy_config(document: dict[str, Any]) -> dict[str, Any]:
    """A ``simplematch-v1`` config, flat with every field of every kind (``dataclasses.asdict``
    of the flat config of the time), without the fields of the other kinds, which it held at their
    defaults. The kind's own flat fields move into its section when the document is read."""
    kinds = model_kinds()
    kind = document.get("kind", ModelConfig.kind)
    own = {f.name for f in fields(kinds[kind].options)} if kind in kinds else set()
    defaults = {
        f.name: f.default
        for name, info in kinds.items()
        if name != kind
        for f in fields(info.options)
        if f.name not in own
    }
    return {
        key: value
        for key, value in document.items()
        if key not in defaults or plain_value(value) != plain_value(defaults[key])
    }


def load_checkpoint(model: MatchModel, source: Source, name: str | None = None) -> None:
    """Load a :func:`save_checkpoint` file into ``model``, strictly.

    A full checkpoint must hold exactly the keys of ``model.state_dict()``; a trainable-only one
    exactly :func:`trainable_state_keys` of ``model``. Missing or unexpected keys, a differing
    :data:`ARCHITECTURE_FIELDS` config field, or (trainable-only) frozen weights that would be random
    on one side only raise ``ValueError`` naming them."""
    name = name or (str(source) if not isinstance(source, bytes) else None)
    _load_state(model, read_checkpoint(source, name), name or "checkpoint bytes")


def load_model(source: Source, name: str | None = None, **overrides: Any) -> MatchModel:
    """The model saved in ``source``, rebuilt from its config with its weights loaded (CPU, in
    training mode as any new module). ``overrides`` replace config fields (run-time ones; see
    :data:`ARCHITECTURE_FIELDS`), each checked as a config file's value (``ConfigError``).

    A full checkpoint holds every weight, so the model is built on the meta device (no random
    initialisation: seconds for a ViT-B) with ``weights=None`` and filled from the file. A
    trainable-only one builds its frozen backbone from the saved ``weights`` (pass ``weights=``
    where that file lives elsewhere), then loads the trainable part. Either way a kind's weight
    files of fully trained parts (:func:`weight_file_options`: ViTSC's ``low_weights``) are not read."""
    name = name or (str(source) if not isinstance(source, bytes) else "checkpoint bytes")
    return model_from_checkpoint(read_checkpoint(source, name), name, overrides)


def model_from_checkpoint(checkpoint: dict[str, Any], name: str, overrides: dict[str, Any] | None = None) -> MatchModel:
    """:func:`load_model` of a checkpoint already read (:func:`read_checkpoint`)."""
    overrides = dict(overrides or {})
    config = saved_config(checkpoint, name)
    # Weight files of parts every checkpoint holds in full (a kind's WEIGHT_FILES options) are never read.
    overrides = {f"{config.kind}.{option}": None for option in weight_file_options(config)} | overrides
    if not checkpoint["trainable_only"]:
        overrides = {"weights": None, **overrides}
    config = replace_fields(config, overrides, f"{name} with {overrides}") if overrides else config
    model = build_model(config) if checkpoint["trainable_only"] else empty_model(config)
    _load_state(model, checkpoint, name)
    return model


def empty_model(config: ModelConfig) -> MatchModel:
    """A model whose every state entry a full checkpoint overwrites: built on the meta device and
    materialised uninitialised, unless it has buffers no checkpoint holds (they need their init)."""
    with torch.device("meta"):
        model = build_model(config)
    unsaved = set(dict(model.named_buffers())) - set(model.state_dict())
    if unsaved:
        logger.debug("model has non-persistent buffers %s; building it with initialisation", sorted(unsaved))
        return build_model(config)
    return model.to_empty(device="cpu")


def _load_state(model: MatchModel, checkpoint: dict[str, Any], name: str) -> None:
    trainable_only = bool(checkpoint["trainable_only"])
    _check_config(model.config, saved_config(checkpoint, name), trainable_only, name)
    state = checkpoint["state_dict"]
    expected = model.state_dict()
    if trainable_only:
        keep = trainable_state_keys(model)
        expected = {key: value for key, value in expected.items() if key in keep}
    check_state(expected, state, f"{'trainable-only' if trainable_only else 'full'} checkpoint {name}")
    # The key sets agree exactly; strict=False only because a trainable-only state is a subset.
    model.load_state_dict(state, strict=not trainable_only)


def _check_config(model_config: ModelConfig, saved: ModelConfig, trainable_only: bool, source: str) -> None:
    saved_architecture, model_architecture = architecture(saved), architecture(model_config)
    differing = [
        f"{field}: checkpoint {saved_architecture.get(field)!r}, model {model_architecture.get(field)!r}"
        for field in dict.fromkeys([*saved_architecture, *model_architecture])
        if saved_architecture.get(field) != model_architecture.get(field)
    ]
    if differing:
        raise ValueError(f"checkpoint {source} was saved from another architecture: " + "; ".join(differing))
    if trainable_only and (saved.weights is None) != (model_config.weights is None):
        raise ValueError(
            f"trainable-only checkpoint {source} was saved on backbone weights {saved.weights!r} but the model was built "
            f"with weights {model_config.weights!r}: its frozen parameters would not be the ones it was trained on"
        )
    runtime_differences = [
        field.name for field in fields(ModelConfig) if getattr(saved, field.name) != getattr(model_config, field.name)
    ]
    if runtime_differences:
        logger.info("checkpoint %s: the model's own %s are used, not the saved ones", source, runtime_differences)
    if saved.pixel_convention != model_config.pixel_convention:
        logger.warning(
            "checkpoint %s was saved with pixel_convention %r but the model uses %r: its predictions move by about "
            "(stride - 1) / 2 input pixels",
            source,
            saved.pixel_convention,
            model_config.pixel_convention,
        )


