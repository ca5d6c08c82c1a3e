"""Checkpoints to evaluate: found (a file, or a directory holding ``model.pt``, locally or on S3),
read once by the driver, shipped as bytes to every worker, and named for the reports.

A checkpoint is a :mod:`sm_model.checkpoint` file. A Ray Train checkpoint directory
holds one as ``model.pt`` beside the optimizer state. A trainable-only (LoRA) checkpoint rebuilds
its frozen backbone from the ``weights`` saved in its config, which must be readable wherever the
model is loaded (a hub name or a path every worker sees).

A released SimpleMatch checkpoint (``best_model.pth``, :mod:`sm_model.official`) is recognised by
its keys and converted once, here in the driver, into a full ``simplematch-v1`` checkpoint of the
released model (:func:`sm_model.official.official_model`: official pixel convention and image
resize, frozen backbone included), so that workers load it like any other and need no backbone
file. Its run-time settings come from a training config's ``model:`` section
(:class:`OfficialSettings`).

A zero-shot model (``zero-shot:NAME``, :func:`sm_model.registry.zero_shot_config`) has no file: it
is built here from its backbone weights (the timm hub, a local file, or ``random``) and shipped
as a full checkpoint like the others, so that every worker predicts with the same weights and no
worker downloads anything (a ViT-B is about 350 MB, a ViT-G about 4.5 GB).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from pipelines.storage import Location, split_s3_url
from sm_model.checkpoint import MODEL_FILE, checkpoint_bytes, read_checkpoint
from sm_model.config import ModelConfig, from_dict
from sm_model.official import official_layout, official_model
from sm_model.registry import build_model, is_zero_shot_spec, zero_shot_config
from sm_model.state_dicts import read_state_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfficialSettings:
    """How released checkpoints among those evaluated become models. ``configs``: training config
    YAML files (e.g. the shipped ``configs/dinov2_vitb14_448_spair.yaml``) whose ``model:`` section
    gives the run-time settings (image size, windows, beta; the architecture is read from the
    checkpoint's keys): one for every released checkpoint, or one per released checkpoint in the
    order given. ``backbone_weights``: the frozen backbone's pretrained file of a DINOv2 LoRA
    checkpoint (e.g. ``dinov2_vitb14_pretrain.pth``; else the config's ``weights``), read here only."""

    configs: tuple[str, ...] = ()
    backbone_weights: str | None = None


RANDOM_WEIGHTS = "random"
"""``--backbone-weights`` value for a zero-shot model with untrained weights (smoke tests), drawn
from the seed :data:`RANDOM_WEIGHTS_SEED`, so that runs compare."""
RANDOM_WEIGHTS_SEED = 0


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint read into memory: ``name`` for reports, ``source`` as the user gave it,
    ``path`` the file read, ``data`` its bytes, ``config`` the saved model config (a dict);
    ``official``: read from a released checkpoint, ``data`` being its conversion; a zero-shot
    model's ``path`` is its spec and ``data`` the checkpoint of the model built from it."""

    name: str
    source: str
    path: str
    data: bytes = dataclasses.field(repr=False)
    config: dict[str, Any]
    official: bool = False


def checkpoint_file(source: str, endpoint_url: str | None = None) -> tuple[Location, str]:
    """``(directory, file name)`` of the checkpoint ``source``: ``model.pt`` inside a directory
    that holds one, else ``source`` itself as a file. Raises ``FileNotFoundError`` naming
    ``source`` for a local path that is neither."""
    location = Location(source, endpoint_url)
    if location.exists(MODEL_FILE):
        return location, MODEL_FILE
    parent, _, name = location.url.rstrip("/").rpartition("/")
    if (location.remote and split_s3_url(location.url)[1]) or Path(location.url).is_file():
        return Location(parent, endpoint_url), name
    raise FileNotFoundError(_not_found(source))


def read_checkpoint_file(
    source: str,
    name: str,
    endpoint_url: str | None = None,
    official_config: ModelConfig | None = None,
    backbone_weights: str | None = None,
) -> CheckpointFile:
    """Read ``source`` (see :func:`checkpoint_file`) and check that it is a SimpleMatch checkpoint,
    or a released one, then converted with ``official_config`` and ``backbone_weights`` (see
    :class:`OfficialSettings`; ``ValueError`` when it is released and ``official_config`` is None)."""
    directory, file_name = checkpoint_file(source, endpoint_url)
    path = directory.full(file_name)
    try:
        data = directory.read_bytes(file_name)
    except FileNotFoundError:
        raise FileNotFoundError(_not_found(source)) from None
    log.info("checkpoint %s: %s (%.1f MiB)", name, path, len(data) / 2**20)
    try:
        saved = read_checkpoint(data, path)
    except ValueError as not_ours:
        data, config = _converted_official(data, path, not_ours, official_config, backbone_weights)
        return CheckpointFile(name=name, source=source, path=path, data=data, config=config, official=True)
    return CheckpointFile(name=name, source=source, path=path, data=data, config=dict(saved["config"]))


def _converted_official(
    data: bytes, path: str, not_ours: ValueError, config: ModelConfig | None, backbone_weights: str | None
) -> tuple[bytes, dict[str, Any]]:
    """A released checkpoint's bytes -> the bytes and config of a full ``simplematch-v1``
    checkpoint of its model; ``not_ours`` is raised again when ``data`` is not a released one either."""
    try:
        state = read_state_dict(data)
        layout = official_layout(state)
    except Exception as error:  # neither ours nor released: the first error says what was expected
        raise not_ours from error
    if config is None:
        raise ValueError(
            f"{path} is a released SimpleMatch checkpoint ({layout} layout) without its --official-config: give the "
            "training config of its backbone and size (e.g. configs/dinov2_vitb14_448_spair.yaml; one for all released "
            "checkpoints, or one each in order), and for DINOv2 LoRA --backbone-weights dinov2_vitb14_pretrain.pth"
        )
    model = official_model(state, config, backbone_weights, name=path)
    log.info("checkpoint %s: released %s model converted (pixel convention official)", path, layout)
    return checkpoint_bytes(model), dataclasses.asdict(model.config)


def zero_shot_file(
    spec: str, name: str, backbone_weights: str | None = None, overrides: Mapping[str, Any] | None = None
) -> CheckpointFile:
    """The zero-shot model ``spec`` (``zero-shot:NAME``) built with ``backbone_weights`` (``None``:
    the timm hub; :data:`RANDOM_WEIGHTS`: untrained, seeded; else a local file) and the config
    ``overrides`` (e.g. ``image_size``, ``localizer``, ``final_norm``), as a full checkpoint."""
    weights = "hub" if backbone_weights is None else None if backbone_weights == RANDOM_WEIGHTS else backbone_weights
    config = zero_shot_config(spec, weights, **dict(overrides or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)  # untrained weights are the same in every run
        model = build_model(config)
    log.info("model %s: zero-shot %s, weights %s, image size %d", name, config.backbone, weights or "random", config.image_size)
    return CheckpointFile(
        name=name, source=spec, path=spec, data=checkpoint_bytes(model), config=dataclasses.asdict(config)
    )


def official_model_config(path: str) -> ModelConfig:
    """The ``model:`` section of the training config YAML at ``path`` (local) as a :class:`ModelConfig`."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--official-config: no file at {path}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--official-config {path}: not valid YAML: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise ValueError(f"--official-config {path}: expected a training config with a model: section")  # noqa: TRY004
    return from_dict(ModelConfig, document["model"], path, "model.")


def _not_found(source: str) -> str:
    return f"no checkpoint at {source}: expected a checkpoint file or a directory holding {MODEL_FILE}"


def read_checkpoint_files(
    sources: Sequence[str],
    endpoint_url: str | None = None,
    official: OfficialSettings | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[CheckpointFile]:
    """Every model of ``sources`` (checkpoints, or ``zero-shot:NAME`` specs built by
    :func:`zero_shot_file` with ``official.backbone_weights`` and the config ``overrides``), named
    by :func:`model_names`; released checkpoints converted as ``official`` says. ``ValueError``
    when the number of official configs fits neither one for all released checkpoints nor one each."""
    official = official or OfficialSettings()
    configs = [official_model_config(path) for path in official.configs]
    files: list[CheckpointFile] = []
    for source, name in zip(sources, model_names(sources)):
        if is_zero_shot_spec(source):
            files.append(zero_shot_file(source, name, official.backbone_weights, overrides))
            continue
        released = sum(file.official for file in files)
        config = configs[0] if len(configs) == 1 else configs[released] if released < len(configs) else None
        files.append(read_checkpoint_file(source, name, endpoint_url, config, official.backbone_weights))
    released = sum(file.official for file in files)
    if configs and len(configs) not in (1, released):
        raise ValueError(
            f"{len(configs)} --official-config for {released} released checkpoints: give one for all of them, "
            "or one per released checkpoint in the order of --checkpoint"
        )
    if official.backbone_weights and not released and not any(map(is_zero_shot_spec, sources)):
        log.warning("--backbone-weights is unused: no model is a released checkpoint or zero-shot")
    return files


def model_names(sources: Sequence[str]) -> list[str]:
    """Short distinct names for checkpoint ``sources``: the last path component (without
    ``.pt``/``.pth``; a trailing ``/model.pt`` is dropped), with as many parent components as it
    takes to tell them apart (``zero-shot:NAME`` becomes ``zero-shot-NAME``); identical sources get
    ``#2``, ``#3``. Characters other than letters, digits and ``._-`` become ``_`` (the names go
    into file names)."""
    parts = [_components(source) for source in sources]
    depth = [1] * len(sources)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = {name for name in names if names.count(name) > 1}
        grow = [i for i, name in enumerate(names) if name in clashes and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return [re.sub(r"[^A-Za-z0-9._#-]", "_", name.replace("/", "-").replace(":", "-")) for name in unique]


def _components(source: str) -> list[str]:
    path = PurePosixPath(source.removeprefix("s3://").rstrip("/"))
    components = [part for part in path.parts if part not in ("/", ".", "..")]
    if components and components[-1] == MODEL_FILE and len(components) > 1:
        components = components[:-1]
    if components:
        components[-1] = re.sub(r"\.(pt|pth)$", "", components[-1])
    return components or [source]
