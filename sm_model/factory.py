"""One front door for models: :func:`create_model` turns any way of naming a model into one.

==============================================  ==============================================================
``ModelConfig``                                 a new model of its kind (:func:`sm_model.registry.build_model`)
``"zero-shot:NAME"``                            a frozen backbone's features (:func:`sm_model.registry.zero_shot_config`)
a project checkpoint (file, folder, bytes)      :mod:`sm_model.checkpoint`, a folder holding ``model.pt``
a released file (with its training config)      :func:`sm_model.released.load_released`
a released LPMFlow folder                       :func:`sm_model.released.load_released`: ``args.pkl``, ``model_best.pth``
==============================================  ==============================================================

    >>> model = create_model("runs/demo/checkpoint_000002")                      # a Ray Train checkpoint folder
    >>> model = create_model("zero-shot:dinov2_vits14", image_size=448)
    >>> model = create_model("best_model.pth", config=load_config("configs/dinov2_vitb14_448_spair.yaml").model,
    ...                      backbone_weights="dinov2_vitb14_pretrain.pth")
    >>> model = create_model("ckpts/lpmflow/spair")                              # a released LPMFlow folder

A file is read once (:func:`read_model_file`), so a caller that must know what it holds before
building (``sm_eval`` pairs released files with their configs) reads it first and passes the
:class:`ModelFile`. Remote files (``s3://``) are the callers' to fetch: they pass the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sm_model.checkpoint import MODEL_FILE, model_from_checkpoint, read_checkpoint
from sm_model.config import ModelConfig, replace_fields
from sm_model.matcher import MatchModel
from sm_model.registry import build_model, is_zero_shot_spec, zero_shot_config
from sm_model.released import (
    ARGS_FILE,
    FOLDER_FILES,
    WEIGHTS_FILE,
    load_released,
    read_released_folder,
    released_folder_model,
    released_state,
)

RANDOM_WEIGHTS = "random"
"""``backbone_weights`` of a zero-shot model with untrained weights (smoke tests), drawn from the
seed :data:`RANDOM_WEIGHTS_SEED`, so that runs compare."""
RANDOM_WEIGHTS_SEED = 0


@dataclass(frozen=True)
class ModelFile:
    """A model file read once: ``checkpoint``, a project checkpoint's document
    (:func:`sm_model.checkpoint.read_checkpoint`), or ``released``, a released file's state dict;
    for a released LPMFlow folder with ``released_args``, its training arguments (``args.pkl``)."""

    name: str
    checkpoint: dict[str, Any] | None = None
    released: dict[str, Tensor] | None = None
    released_args: dict[str, Any] | None = None


def read_model_file(source: str | Path | bytes, name: str | None = None) -> ModelFile:
    """``source`` (a file, a folder holding :data:`~sm_model.checkpoint.MODEL_FILE`, or a file's
    bytes) read as a project checkpoint, else as a released file; a folder holding ``args.pkl`` and
    ``model_best.pth`` as a released LPMFlow folder. The error says what a project checkpoint is
    when it is neither."""
    if not isinstance(source, bytes) and Path(source).is_dir():
        folder = Path(source)
        if (folder / MODEL_FILE).is_file():
            source = folder / MODEL_FILE
        elif any((folder / file).exists() for file in FOLDER_FILES):
            args, state = read_released_folder(folder)
            return ModelFile(name or str(folder), released=state, released_args=args)
        else:
            raise FileNotFoundError(
                f"{name or folder} holds neither {MODEL_FILE} (a project checkpoint folder) nor {ARGS_FILE} and "
                f"{WEIGHTS_FILE} (a released LPMFlow folder)"
            )
    name = name or ("model bytes" if isinstance(source, bytes) else str(source))
    try:
        return ModelFile(name, checkpoint=read_checkpoint(source, name))
    except ValueError as not_ours:
        try:
            return ModelFile(name, released=released_state(source, name))
        except Exception as error:  # neither: the first error says what was expected
            raise not_ours from error


def create_model(
    source: ModelConfig | ModelFile | str | Path | bytes,
    *,
    name: str | None = None,
    config: ModelConfig | None = None,
    backbone_weights: str | Path | None = None,
    **overrides: Any,
) -> MatchModel:
    """The model ``source`` names (see the module), on the CPU in training mode as any new module.

    ``overrides`` replace config fields (run-time ones for a checkpoint; a dotted key such as
    ``simplematch.coarse_window_sizes`` replaces a kind's option), each checked as a config file's
    value (``ConfigError`` naming the key). ``config``: the training config's model section of a
    released file (optional for a released folder: its run-time settings; ``overrides`` then
    replace fields of ``config`` or of the released model's own). ``backbone_weights``: a
    zero-shot model's backbone (``None``: the timm hub; :data:`RANDOM_WEIGHTS`: untrained, seeded;
    else a local file), or a released DINOv2 LoRA file's frozen backbone."""
    if isinstance(source, ModelConfig):
        return build_model(replace_fields(source, overrides, f"model config with {overrides}") if overrides else source)
    if isinstance(source, str) and is_zero_shot_spec(source):
        return _zero_shot(source, backbone_weights, overrides)
    file = source if isinstance(source, ModelFile) else read_model_file(source, name)
    if file.checkpoint is not None:
        return model_from_checkpoint(file.checkpoint, file.name, overrides)
    if file.released_args is not None:
        return released_folder_model(file.released_args, file.released, file.name, config, overrides)
    if config is not None and overrides:
        config = replace_fields(config, overrides, f"{file.name} config with {overrides}")
    return load_released(file.released, config, backbone_weights, name=file.name)


def _zero_shot(spec: str, backbone_weights: str | Path | None, overrides: dict[str, Any]) -> MatchModel:
    weights = (
        "hub" if backbone_weights is None else None if backbone_weights == RANDOM_WEIGHTS else str(backbone_weights)
    )
    config = zero_shot_config(spec)
    config = replace_fields(config, {"weights": weights, **overrides}, f"{spec} with {overrides}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)  # untrained weights are the same in every run
        return build_model(config)
