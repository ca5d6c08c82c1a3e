"""The training configuration: typed dataclasses, loaded from YAML with ``key=value`` overrides.

A YAML file has one mapping per section (``model``, ``data``, ``augment``, ``optim``, ``train``,
``run``); every key is a field of that section's dataclass, and anything else is an error that
names the file, the key and the keys that exist. Overrides use dotted paths and YAML values::

    python -m sm_train --config configs/demo.yaml model.image_size=112 optim.lr=1e-4 run.num_workers=2

Sweeps (``sm_train.tune``) use the same dotted paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from sm_model.config import (
    AT_LEAST_ONE,
    AT_LEAST_ZERO,
    NON_NEGATIVE,
    POSITIVE,
    Bound,
    ConfigError,
    ModelConfig,
    OutOfRange,
    from_dict,
    load_yaml,
    model_kinds,
    parse_override,
    require,
    set_dotted,
    to_dict,
)

SELECTION_ALPHA = 0.1
"""Validation PCK at this alpha (per image) ranks checkpoints and sweep trials."""

Precision = Literal["auto", "bf16", "fp32"]
ValFrame = Literal["original", "resized"]
"""The PCK frames of :mod:`sm_eval.pck` (``FRAMES``), named here so that reading a config needs no torch."""
PairDraws = Literal["independent", "official"]
OptimizerName = Literal["adam", "adamw", "sgd"]
LrSchedule = Literal["iterations", "epochs"]


@dataclass(frozen=True)
class DataConfig:
    """``shards``: a directory or ``s3://`` prefix written by ``pipelines.shard`` (relative paths
    are resolved against the directory ``sm_train`` is started from; S3 endpoint: ``run.s3_endpoint_url``). ``loader_workers`` decoding processes per training worker;
    ``shuffle_buffer`` pairs shuffled in memory (shard order is shuffled per epoch as well);
    ``val_split``: scored each epoch (``None``: no validation); ``val_batch_size`` pairs per
    validation batch."""

    shards: str = "data/demo-shards"
    train_split: str = "trn"
    val_split: str | None = "val"
    loader_workers: int = 2
    shuffle_buffer: int = 256
    val_batch_size: int = 16

    def __post_init__(self) -> None:
        require(self, "loader_workers shuffle_buffer", AT_LEAST_ZERO)
        require(self, "val_batch_size", AT_LEAST_ONE)


@dataclass(frozen=True)
class AugmentConfig:
    """Every probability and range of :class:`sm_train.augment.PairAugmentation`; defaults are the official values.

    ``enabled=False`` turns the whole augmentation off (the inputs are returned as they are).
    Probabilities are per image, except the geometry's under ``pair_draws="official"``.

    ``pair_draws``: how source and target of a pair draw their geometry. ``independent`` (default):
    each image draws its own crop and rotation. ``official`` (the official code, used by the paper
    configs): the crop is all-or-nothing for the pair (``crop_p`` per pair; each side still draws
    its own window), and a rotated pair (``rotation_p`` per pair) turns the source only, the target
    only, or both by the same angle, a third each. Appearance is per image in both.

    Pairs: ``exchange_p`` (swap source and target; official PF-PASCAL 0.5, otherwise 0).
    Geometry: ``crop_p`` (crop keeping the object bbox, resized back), ``rotation_p`` with
    ``rotation_degrees`` (angle ``U(-d, d)``; ``wide_rotation_degrees`` instead for the
    categories in ``wide_rotation_categories``, official ``[bottle]`` and 180) and
    ``rotation_expand`` (grow the canvas to fit, then resize back, as the official code; ``False``
    keeps the canvas). Appearance: ``grayscale_p``;
    ``posterize_p``, ``posterize_bits`` (bits kept, 0..8); ``equalize_p``; ``sharpen_p`` with the
    ``(low, high)`` ranges ``sharpen_alpha`` (blend with the identity kernel) and
    ``sharpen_lightness``; ``brightness_contrast_p`` with ``brightness_limit`` (additive, in
    ``[0, 1]`` intensity) and ``contrast_limit`` (multiplicative, around 1); ``solarize_p`` with
    ``solarize_threshold`` (official 128 / 255 on 8-bit images); ``color_jitter_p`` with the
    torchvision-style ``jitter_brightness``, ``jitter_contrast``, ``jitter_saturation`` (factors in
    ``[1 - v, 1 + v]``) and ``jitter_hue`` (shift in ``[-v, v]`` of the hue circle, ``v <= 0.5``).
    """

    enabled: bool = True
    pair_draws: PairDraws = "independent"
    exchange_p: float = 0.0
    crop_p: float = 0.5
    rotation_p: float = 0.5
    rotation_degrees: float = 30.0
    wide_rotation_categories: tuple[str, ...] = ()
    wide_rotation_degrees: float = 180.0
    rotation_expand: bool = True
    grayscale_p: float = 0.1
    posterize_p: float = 0.2
    posterize_bits: int = 4
    equalize_p: float = 0.2
    sharpen_p: float = 0.2
    sharpen_alpha: tuple[float, float] = (0.2, 0.5)
    sharpen_lightness: tuple[float, float] = (0.5, 1.0)
    brightness_contrast_p: float = 0.2
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5
    color_jitter_p: float = 0.2
    jitter_brightness: float = 0.2
    jitter_contrast: float = 0.2
    jitter_saturation: float = 0.2
    jitter_hue: float = 0.2

    def __post_init__(self) -> None:
        for name in (f.name for f in fields(self)):
            if name.endswith("_p") and not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.posterize_bits <= 8:
            raise ValueError(f"posterize_bits must be in 0..8, got {self.posterize_bits}")
        for name in ("sharpen_alpha", "sharpen_lightness"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high:
                raise ValueError(f"{name} must be a range 0 <= low <= high, got {(low, high)}")
        if self.sharpen_alpha[1] > 1.0:
            raise ValueError(f"sharpen_alpha must lie in [0, 1], got {self.sharpen_alpha}")
        ranges = ("rotation_degrees", "wide_rotation_degrees", "brightness_limit", "contrast_limit")
        for name in (*ranges, "jitter_brightness", "jitter_contrast", "jitter_saturation", "jitter_hue"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.jitter_hue > 0.5:
            raise ValueError(f"jitter_hue must be at most 0.5 (half the hue circle), got {self.jitter_hue}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning rates and the learning-rate schedule.

    ``lr``: the learning rate of every trainable parameter, or, when ``backbone_lr`` is set, of
    those outside the backbone (the head: SimpleMatch's decoder); ``backbone_lr``: the learning
    rate of the backbone's trainable parameters (``None``: ``lr`` for all, one parameter group).
    ``weight_decay`` (both groups) and ``momentum`` (``sgd``).

    ``lr_schedule``: ``iterations`` (the SimpleMatch official schedule; default) multiplies every
    learning rate by ``lr_gamma`` every ``lr_step_iterations`` optimizer steps; ``epochs`` (the
    survey's baseline: ``MultiStepLR``) multiplies them by ``lr_gamma`` at the end of each epoch
    listed in ``lr_milestones`` (positive, increasing; e.g. ``[1, 2]``: halved after the first and
    the second epoch with ``lr_gamma: 0.5``; empty: a constant rate). ``lr_milestones`` belong to
    the ``epochs`` schedule and ``lr_step_iterations`` to ``iterations``.
    ``grad_clip_norm``: clip the global gradient norm (``None``: no clipping)."""

    optimizer: OptimizerName = "adam"
    lr: float = 6e-4
    backbone_lr: float | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_schedule: LrSchedule = "iterations"
    lr_step_iterations: int = 800
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.95
    grad_clip_norm: float | None = None

    def __post_init__(self) -> None:
        require(self, "lr backbone_lr grad_clip_norm", POSITIVE)
        require(self, "weight_decay momentum", NON_NEGATIVE)
        require(self, "lr_step_iterations lr_milestones", AT_LEAST_ONE)
        require(self, "lr_gamma", Bound("in (0, 1]", lambda value: 0 < value <= 1))
        if any(a >= b for a, b in zip(self.lr_milestones, self.lr_milestones[1:])):
            raise OutOfRange(f"lr_milestones must be increasing epochs, got {list(self.lr_milestones)}")
        if self.lr_milestones and self.lr_schedule != "epochs":
            raise OutOfRange(
                f"lr_milestones {list(self.lr_milestones)} need lr_schedule 'epochs' "
                f"(the '{self.lr_schedule}' schedule steps every lr_step_iterations)"
            )


@dataclass(frozen=True)
class LoopConfig:
    """``batch_size`` is per worker (the global batch is ``batch_size * run.num_workers``).
    ``precision``: ``auto`` is bfloat16 autocast on GPU and float32 on CPU.
    ``checkpoint_every_steps``: extra mid-epoch checkpoints (0: at the end of each epoch only).
    ``max_steps_per_epoch`` shortens epochs for smoke runs (``None``: the whole split).
    ``val_alphas``: PCK thresholds reported each epoch; they must hold :data:`SELECTION_ALPHA`.
    ``val_frame``: the frame validation PCK is measured in (:mod:`sm_eval.pck`): ``original`` image
    pixels, or ``resized``, the ``S x S`` network input in which the official code picks
    ``best_model.pth``; the metric names (``val/pck@...``) are the same in both."""

    epochs: int = 10
    batch_size: int = 8
    seed: int = 123
    precision: Precision = "auto"
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0
    max_steps_per_epoch: int | None = None
    val_alphas: tuple[float, ...] = (0.05, 0.1, 0.15)
    val_frame: ValFrame = "original"

    def __post_init__(self) -> None:
        require(self, "epochs batch_size log_every_steps max_steps_per_epoch", AT_LEAST_ONE)
        require(self, "checkpoint_every_steps", AT_LEAST_ZERO)
        require(self, "val_alphas", POSITIVE)
        if SELECTION_ALPHA not in self.val_alphas:
            raise ValueError(
                f"val_alphas {list(self.val_alphas)} must hold {SELECTION_ALPHA}: "
                f"{SELECTION_METRIC} ranks the checkpoints"
            )


RUN_NAME = Bound(
    "one directory name (not empty, '.' or '..', no '/' or '\\')",
    lambda name: name not in ("", ".", "..") and not {"/", "\\", "\0"} & set(name),
)
"""``run.name`` is a directory of ``run.storage_path``: it must not climb out of it."""


@dataclass(frozen=True)
class RunSettings:
    """Where and how Ray Train runs. ``name`` and ``storage_path`` (a directory or ``s3://``
    prefix; relative paths resolve against the starting directory) identify the run: starting
    again with the same pair continues it. ``s3_endpoint_url``: the S3-compatible endpoint of every
    ``s3://`` path of the run, shards and storage alike (else ``AWS_ENDPOINT_URL``, else AWS).
    ``num_workers`` training workers, each with ``cpus_per_worker`` CPUs and one GPU when
    ``use_gpu``; ``max_failures`` worker-group restarts from the last checkpoint;
    ``keep_checkpoints`` best checkpoints kept by :data:`SELECTION_METRIC` (the latest is always kept too)."""

    name: str = "simplematch"
    storage_path: str = "runs"
    s3_endpoint_url: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    keep_checkpoints: int = 1

    def __post_init__(self) -> None:
        require(self, "name", RUN_NAME)
        require(self, "num_workers keep_checkpoints", AT_LEAST_ONE)
        require(self, "max_failures", AT_LEAST_ZERO)
        require(self, "cpus_per_worker", POSITIVE)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; one section per concern. ``model.kind`` must be one of
    :func:`trainable_kinds`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        if self.model.kind not in trainable_kinds():
            raise OutOfRange(untrainable_kind(self.model.kind, self.model.backbone))


def trainable_kinds() -> list[str]:
    """The model kinds ``sm_train`` trains: every registered one with something to train
    (``zero-shot`` trains nothing: ``sm_eval`` scores it as it is)."""
    return [name for name, info in model_kinds().items() if info.trains]


def untrainable_kind(kind: str, backbone: str) -> str:
    """Why ``model.kind`` cannot be trained (an :class:`OutOfRange` message naming the key)."""
    return (
        f"model.kind must be one of {trainable_kinds()} to train, got {kind!r}: a zero-shot model "
        f"trains nothing; evaluate it with python -m sm_eval --model zero-shot:{backbone}"
    )


def val_metric(alpha: float, per_keypoint: bool = False) -> str:
    """The name training reports validation PCK at ``alpha`` under: ``val/pck@0.1`` per image,
    ``val/pck_kp@0.1`` per keypoint."""
    return f"val/pck{'_kp' if per_keypoint else ''}@{alpha:g}"


SELECTION_METRIC = val_metric(SELECTION_ALPHA)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML; ``None`` starts from the defaults) and apply ``key=value`` overrides."""
    source = str(path) if path is not None else "defaults"
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = load_yaml(Path(path).read_bytes(), str(path)) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(document).__name__}")
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(document, key, value, source=f"override {override!r}")
    if overrides:
        source += f" with overrides {' '.join(overrides)}"
    return train_config(document, source)


def train_config(document: dict[str, Any], source: str) -> TrainConfig:
    """:func:`from_dict` of a whole training config document, refusing a model kind that trains
    nothing before the model section's own checks (which would ask a zero-shot model to be
    frozen, a setting training refuses anyway; ``TrainConfig`` checks the kind too)."""
    model = document.get("model") if isinstance(document.get("model"), dict) else {}
    if model.get("kind") in model_kinds() and model["kind"] not in trainable_kinds():
        raise ConfigError(f"{source}: {untrainable_kind(model['kind'], model.get('backbone', ModelConfig.backbone))}")
    return from_dict(TrainConfig, document, source)


def dump_yaml(config: TrainConfig) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (``["model.backbone", ...]``), for validating sweep spaces."""
    keys = []
    for f in fields(cls):
        hint = get_type_hints(cls)[f.name]
        if cls is ModelConfig and f.name == "options":  # a section per kind, under its name
            for name, info in model_kinds().items():
                keys += config_keys(info.options, f"{prefix}{name}.")
        elif dataclasses.is_dataclass(hint):
            keys += config_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def resolve_paths(config: TrainConfig, base: Path) -> TrainConfig:
    """Make local shard, storage and weight-file paths absolute against ``base`` (Ray workers
    run in their own directories); URLs and ``weights: hub`` are kept as they are."""

    def absolute(path: str) -> str:
        return path if "://" in path else str((base / path).resolve())

    def weights_path(weights: str | None) -> str | None:
        return weights if weights in (None, "hub") else absolute(weights)

    model = config.model
    weight_files = getattr(model.options, "WEIGHT_FILES", ())  # a kind's own weight files (ViTSC's low_weights)
    options = dataclasses.replace(model.options, **{name: weights_path(getattr(model.options, name)) for name in weight_files})
    return dataclasses.replace(
        config,
        model=dataclasses.replace(model, weights=weights_path(model.weights), options=options),
        data=dataclasses.replace(config.data, shards=absolute(config.data.shards)),
        run=dataclasses.replace(config.run, storage_path=absolute(config.run.storage_path)),
    )
