"""The training configuration: typed dataclasses, loaded from YAML with ``key=value`` overrides.

A YAML file has one mapping per section (``model``, ``data``, ``augment``, ``optim``, ``train``,
``run``); every key is a field of that section's dataclass, and anything else is an error that
names the file, the key and the keys that exist. Overrides use dotted paths and YAML values::

    python -m sm_train --config configs/demo.yaml model.image_size=112 optim.lr=1e-4 run.num_workers=2

Sweeps (``sm_train.tune``) use the same dotted paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from sm_train.augment import AugmentConfig
from sm_train.model.config import ModelConfig

Precision = Literal["auto", "bf16", "fp32"]
OptimizerName = Literal["adam", "adamw", "sgd"]


@dataclass(frozen=True)
class DataConfig:
    """``shards``: a directory or ``s3://`` prefix written by ``pipelines.shard`` (relative paths
    are resolved against the directory ``sm_train`` is started from). ``s3_endpoint_url`` for
    S3-compatible stores. ``loader_workers`` decoding processes per training worker;
    ``shuffle_buffer`` pairs shuffled in memory (shard order is shuffled per epoch as well);
    ``val_split``: scored each epoch (``None``: no validation); ``val_batch_size`` pairs per
    validation batch."""

    shards: str = "data/demo-shards"
    train_split: str = "trn"
    val_split: str | None = "val"
    s3_endpoint_url: str | None = None
    loader_workers: int = 2
    shuffle_buffer: int = 256
    val_batch_size: int = 16


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and the per-iteration step schedule: the learning rate is multiplied by
    ``lr_gamma`` every ``lr_step_iterations`` optimizer steps (the official schedule).
    ``grad_clip_norm``: clip the global gradient norm (``None``: no clipping)."""

    optimizer: OptimizerName = "adam"
    lr: float = 6e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_step_iterations: int = 800
    lr_gamma: float = 0.95
    grad_clip_norm: float | None = None


@dataclass(frozen=True)
class LoopConfig:
    """``batch_size`` is per worker (the global batch is ``batch_size * run.num_workers``).
    ``precision``: ``auto`` is bfloat16 autocast on GPU and float32 on CPU.
    ``checkpoint_every_steps``: extra mid-epoch checkpoints (0: at the end of each epoch only).
    ``max_steps_per_epoch`` shortens epochs for smoke runs (``None``: the whole split).
    ``val_alphas``: PCK thresholds reported each epoch (0.1 picks the best checkpoint)."""

    epochs: int = 10
    batch_size: int = 8
    seed: int = 123
    precision: Precision = "auto"
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0
    max_steps_per_epoch: int | None = None
    val_alphas: tuple[float, ...] = (0.05, 0.1, 0.15)


@dataclass(frozen=True)
class RunSettings:
    """Where and how Ray Train runs. ``name`` and ``storage_path`` (a directory or ``s3://``
    prefix; relative paths resolve against the starting directory) identify the run: starting
    again with the same pair continues it. ``storage_endpoint_url`` for S3-compatible stores.
    ``num_workers`` training workers, each with ``cpus_per_worker`` CPUs and one GPU when
    ``use_gpu``; ``max_failures`` worker-group restarts from the last checkpoint;
    ``keep_checkpoints`` best checkpoints kept by val PCK@0.1 (the latest is always kept too)."""

    name: str = "simplematch"
    storage_path: str = "runs"
    storage_endpoint_url: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    keep_checkpoints: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    run: RunSettings = field(default_factory=RunSettings)


class ConfigError(ValueError):
    """A configuration that does not fit :class:`TrainConfig`; the message names the source and key."""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML; ``None`` starts from the defaults) and apply ``key=value`` overrides."""
    source = str(path) if path is not None else "defaults"
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(document).__name__}")
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(document, key, value, source=f"override {override!r}")
    if overrides:
        source += f" with overrides {' '.join(overrides)}"
    return from_dict(TrainConfig, document, source)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 0.0001)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {error}") from None


def set_dotted(document: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set ``document["a"]["b"] = value`` for ``key="a.b"``, creating sections as needed."""
    *sections, leaf = key.split(".")
    node = document
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {section!r} is a value, not a section")
        node = child
    node[leaf] = value


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-ready types (tuples become lists); :func:`from_dict` inverts it."""
    return _plain(dataclasses.asdict(config))


def dump_yaml(config: TrainConfig) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (``["model.backbone", ...]``), for validating sweep spaces."""
    keys = []
    for f in fields(cls):
        hint = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += config_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def from_dict(cls: type, document: Mapping[str, Any], source: str, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``document``, checking every key and value against the field types."""
    if not isinstance(document, Mapping):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, got {document!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [key for key in document if key not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown key {where + str(key)!r}{hint}; {where.rstrip('.') or 'top level'} accepts {names}")
    values = {}
    for name, value in document.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value or {}, source, f"{where}{name}.")
        else:
            values[name] = _coerce(value, hint, source, where + name)
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:  # a dataclass's own checks (__post_init__)
        raise ConfigError(f"{source}: {where.rstrip('.') or 'top level'}: {error}") from None


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, source, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}={value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _float_or_none(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{source}: {key} must be null, got {value!r}")
        return None
    raise ConfigError(f"{source}: {key} has an unsupported type {hint}")


def _float_or_none(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
