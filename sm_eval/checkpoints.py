"""Models to evaluate: found (a checkpoint file, a directory holding ``model.pt``, locally or on
S3; a released file or LPMFlow folder; ``zero-shot:NAME``), built once by the driver through the front door
(:func:`sm_model.factory.create_model`) with the run's overrides, shipped to every worker as a full
checkpoint whose config is the effective one, and named for the reports.

So every worker loads the same model without options, needs no network and no backbone file (a
trainable-only LoRA checkpoint's frozen backbone and a released LoRA file's are filled in here,
from the ``weights`` saved in its config or ``--backbone-weights``), and predicts bit for bit
what one process predicts; a ViT-B ships as about 350 MB, a ViT-G about 4.5 GB.

A released SimpleMatch checkpoint (``best_model.pth``, :mod:`sm_model.released`) takes its
run-time settings from a training config's ``model:`` section (:class:`OfficialSettings`) and
predicts in the official pixel convention and image resize. A released LPMFlow folder
(``args.pkl`` and ``model_best.pth``) needs no config: its arguments and weights say it all.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.storage import Location, split_s3_url
from sm_model.checkpoint import MODEL_FILE, checkpoint_bytes
from sm_model.config import ModelConfig, from_dict, load_yaml, to_dict
from sm_model.factory import ModelFile, create_model, read_model_file
from sm_model.matcher import MatchModel
from sm_model.registry import is_zero_shot_spec
from sm_model.released import (
    ARGS_FILE,
    FOLDER_FILES,
    MAX_ARGS_BYTES,
    WEIGHTS_FILE,
    missing_folder_file,
    read_released_args,
    read_released_weights,
)

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


@dataclass(frozen=True)
class CheckpointFile:
    """A model resolved by the driver: ``name`` for reports, ``source`` as the user gave it,
    ``path`` the file read (a zero-shot model's spec), ``data`` the full checkpoint of the model
    built from it with the run's overrides, ``config`` that model's config (a dict: the effective
    one, which every worker predicts with); ``official``: read from a released SimpleMatch file
    (converted with an official config)."""

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


def open_model(
    source: str,
    endpoint_url: str | None = None,
    official_config: ModelConfig | None = None,
    backbone_weights: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[MatchModel, str, bool]:
    """The model ``source`` names, built through the front door (:func:`sm_model.factory.create_model`)
    with the config ``overrides`` (a ``ConfigError`` naming the key for a bad one), the path it was
    read from (a zero-shot model's spec) and whether it is a released SimpleMatch file. ``source``: a
    checkpoint, local or S3 (:func:`checkpoint_file`); a released file, converted with
    ``official_config`` and ``backbone_weights`` (:class:`OfficialSettings`); a released LPMFlow
    folder, local or S3 (neither applies); or ``zero-shot:NAME`` with ``backbone_weights`` (``None``:
    the timm hub, :data:`~sm_model.factory.RANDOM_WEIGHTS`, or a local file)."""
    overrides = dict(overrides or {})
    if is_zero_shot_spec(source):
        model = create_model(source, backbone_weights=backbone_weights, **overrides)
        log.info("model %s: zero-shot, weights %s, image size %d", source, backbone_weights or "hub", model.config.image_size)
        return model, source, False
    file = _read_model_file(source, endpoint_url)
    official = file.released is not None and file.released_args is None
    if official and official_config is None:
        raise ValueError(
            f"{file.name} is a released SimpleMatch checkpoint without its --official-config: give the training config "
            "of its backbone and size (e.g. configs/dinov2_vitb14_448_spair.yaml; one for all released checkpoints, or "
            "one each in order), and for DINOv2 LoRA --backbone-weights dinov2_vitb14_pretrain.pth"
        )
    config = official_config if official else None  # a SimpleMatch config is no LPMFlow folder's
    model = create_model(file, config=config, backbone_weights=backbone_weights, **overrides)
    check_finite(model, file.name)
    return model, file.name, official


def check_finite(model: MatchModel, name: str) -> None:
    """A ValueError naming the model and its first tensors that hold NaN or infinite values: such
    weights predict NaN everywhere, which would score a silent 0 %."""
    broken = [key for key, value in model.state_dict().items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise ValueError(f"model {name} has NaN or infinite weights in {len(broken)} tensors ({shown}): refusing to evaluate it")


def resolve_model(
    source: str,
    name: str,
    endpoint_url: str | None = None,
    official_config: ModelConfig | None = None,
    backbone_weights: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> CheckpointFile:
    """:func:`open_model`'s model as a full checkpoint to ship, named ``name``."""
    model, path, official = open_model(source, endpoint_url, official_config, backbone_weights, overrides)
    return CheckpointFile(
        name=name, source=source, path=path, data=checkpoint_bytes(model), config=to_dict(model.config), official=official
    )


def _read_model_file(source: str, endpoint_url: str | None) -> ModelFile:
    folder = Location(source, endpoint_url)
    if not folder.exists(MODEL_FILE) and any(folder.exists(file) for file in FOLDER_FILES):
        return _read_released_folder(folder)
    directory, file_name = checkpoint_file(source, endpoint_url)
    path = directory.full(file_name)
    try:
        data = directory.read_bytes(file_name)
    except FileNotFoundError:
        raise FileNotFoundError(_not_found(source)) from None
    log.info("model file %s (%.1f MiB)", path, len(data) / 2**20)
    return read_model_file(data, path)


def _read_released_folder(folder: Location) -> ModelFile:
    for file in FOLDER_FILES:
        if not folder.exists(file):
            raise missing_folder_file(folder.url, file)
    args = read_released_args(folder.read_bytes(ARGS_FILE, MAX_ARGS_BYTES), folder.full(ARGS_FILE))
    data = folder.read_bytes(WEIGHTS_FILE)
    log.info("released folder %s (%.1f MiB of weights)", folder.url, len(data) / 2**20)
    return ModelFile(folder.url, released=read_released_weights(data, folder.full(WEIGHTS_FILE)), released_args=args)


def official_model_config(path: str) -> ModelConfig:
    """The ``model:`` section of the training config YAML at ``path`` (local) as a :class:`ModelConfig`."""
    try:
        document = load_yaml(Path(path).read_bytes(), f"--official-config {path}")
    except FileNotFoundError:
        raise FileNotFoundError(f"--official-config: no file at {path}") from None
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise ValueError(f"--official-config {path}: expected a training config with a model: section")  # noqa: TRY004
    return from_dict(ModelConfig, document["model"], path, "model.")


def _not_found(source: str) -> str:
    return (
        f"no checkpoint at {source}: expected a checkpoint file, a directory holding {MODEL_FILE}, or a released "
        f"LPMFlow folder holding {ARGS_FILE} and {WEIGHTS_FILE}"
    )


def resolve_models(
    sources: Sequence[str],
    endpoint_url: str | None = None,
    official: OfficialSettings | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[CheckpointFile]:
    """Every model of ``sources`` (:func:`resolve_model`), named by :func:`model_names`; released
    files paired with ``official.configs`` (one for all, or one each in order). ``ValueError`` when
    the number of official configs fits neither."""
    official = official or OfficialSettings()
    configs = [official_model_config(path) for path in official.configs]
    files: list[CheckpointFile] = []
    for source, name in zip(sources, model_names(sources)):
        released = sum(file.official for file in files)
        config = configs[0] if len(configs) == 1 else configs[released] if released < len(configs) else None
        files.append(resolve_model(source, name, endpoint_url, config, official.backbone_weights, overrides))
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
