"""The model's typed configuration (everything that decides SimpleMatch's architecture and
localization, with the official settings as defaults: DINOv2 ViT-B/14 at 252, LoRA, window 45),
and the typed reading of configs that checkpoints and ``sm_train``'s YAML files share: a dataclass
from a plain mapping, every key and value checked against the field types, and every number against
its range (:func:`require`, called by each config's ``__post_init__``).

Nothing here imports torch: a config loads and fails fast without the model stack."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

import yaml

FinetuneMode = Literal["frozen", "lora", "last_blocks", "full"]
KeypointSampling = Literal["bilinear", "nearest"]
PositionResampling = Literal["official", "timm"]
PixelConvention = Literal["center", "official"]
ImageResize = Literal["antialiased", "official"]
ModelKind = Literal["simplematch", "zero-shot", "baseline"]
Localizer = Literal["argmax", "dense", "window", "kernel"]
DEFAULT_LOCALIZERS: dict[str, Localizer] = {"simplematch": "window", "zero-shot": "argmax", "baseline": "kernel"}
"""The localizer of each model kind when ``ModelConfig.localizer`` is ``None``."""


class Bound(NamedTuple):
    """A range for :func:`require`: ``words`` say it in the error, ``holds`` tests a value."""

    words: str
    holds: Callable[[Any], bool]


AT_LEAST_ONE = Bound("at least 1", lambda value: value >= 1)
AT_LEAST_ZERO = Bound("at least 0", lambda value: value >= 0)
POSITIVE = Bound("a finite number above 0", lambda value: math.isfinite(value) and value > 0)
NON_NEGATIVE = Bound("a finite number, at least 0", lambda value: math.isfinite(value) and value >= 0)


class OutOfRange(ValueError):
    """A field's value outside its range; the message starts with the field's name, which
    :func:`from_dict` turns into the dotted key (``train.batch_size must be ...``)."""


def require(config: Any, names: str, bound: Bound) -> None:
    """For a config's ``__post_init__``: :class:`OutOfRange` naming the first field of ``names``
    (space-separated) whose value is out of ``bound``, and the value. ``None`` (an option left
    unset) passes; a tuple's items are checked one by one."""
    for name in names.split():
        value = getattr(config, name)
        for item in value if isinstance(value, tuple) else (value,):
            if item is not None and not bound.holds(item):
                raise OutOfRange(f"{name} must be {bound.words}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """``kind`` picks the model (:data:`sm_model.registry.MODEL_KINDS`): ``"simplematch"`` (backbone,
    upsampling decoder, window soft-argmax), ``"zero-shot"`` (a frozen backbone's last-layer
    features, nothing trained; ``finetune`` must be ``"frozen"``) or ``"baseline"`` (the survey's
    strong baseline: backbone features, the last blocks fine-tuned, Gaussian cross-entropy).
    Decoder fields only concern ``simplematch``; ``loss_temperature`` and ``target_window`` only
    ``baseline``.

    ``backbone``: a name of :data:`sm_model.backbones.BACKBONES`.
    ``weights``: ``None`` (random init), ``"hub"`` (timm's pretrained weights, needs network) or a
    local checkpoint path. ``image_size``: square network input side (a multiple of the patch size
    for ViTs). ``finetune`` with ``finetune_blocks`` (the last N transformer blocks) and the LoRA
    ``lora_rank``/``lora_alpha`` (scaling alpha / rank, loralib convention). ``decoder_channels`` and
    ``decoder_dropout`` shape the upsampling decoder. ``window_size`` is the soft-argmax window in
    cells of the 1/4-resolution map (``None``: dense soft-argmax over the whole map); coarser scales
    use ``coarse_window_sizes`` (1/16, 1/8). ``beta`` is the soft-argmax temperature.
    ``multiscale`` predicts and supervises at 1/16, 1/8 and 1/4 with ``scale_weights``;
    otherwise only at 1/4. ``position_resampling`` (ViTs) fits the pretrained positional embedding
    to the input's patch grid as the DINO, DINOv2 and iBOT code that trained the released weights
    does (``"official"``: bicubic, 0.1-cell offset, no antialiasing) or as timm does (``"timm"``:
    bicubic to the exact size, antialiased).

    ``pixel_convention`` says where a pixel is (:mod:`sm_model.pixels`): ``"center"`` (the
    project's, for the models it trains) maps points between the original image and the S x S input
    with pixel centres aligned, ``x' = (x + 0.5) * S / W - 0.5``, and cell ``j`` of a stride-``s``
    map to its centre ``s*j + (s - 1)/2``; ``"official"`` (the released code's; set by
    :func:`sm_model.official.official_model` for released checkpoints) uses ``x' = x * S / W`` and
    cell ``j`` at pixel ``s*j``, and reads source features at the integer cell ``floor(x' / s)``.
    ``keypoint_sampling`` overrides how source features are read: ``None`` (default) is the
    convention's own (``"bilinear"`` for center, ``"nearest"`` for official), ``"bilinear"``
    interpolates at the keypoint's cell coordinate, ``"nearest"`` reads the integer cell
    ``floor(x' / s)`` (kept so that configs and checkpoints that set it load as before).
    ``image_resize`` is how images are resized to S x S (:func:`sm_model.pixels.resize_image`):
    ``"antialiased"`` (PIL bilinear) or ``"official"`` (OpenCV's bilinear without antialiasing, as
    the released code; set for released checkpoints). The checkpoint saves all three with the
    config, so a model predicts in the convention it was trained or released with.

    ``final_norm`` (ViTs) applies the backbone's final LayerNorm to the features (SimpleMatch reads
    them before it; the survey after it). ``localizer`` (:data:`sm_model.localizers.LOCALIZERS`)
    turns score maps into points: ``None`` is the kind's own (``window`` for ``simplematch``, with
    ``window_size``/``coarse_window_sizes``; ``argmax`` for ``zero-shot``; ``kernel`` for
    ``baseline``); ``beta`` is the temperature of every soft-argmax and ``kernel_sigma`` (cells) the
    kernel soft-argmax's Gaussian width. ``baseline`` trains with a softmax at ``loss_temperature``
    against a Gaussian-smoothed ``target_window`` x ``target_window`` target
    (:func:`sm_model.loss.gaussian_cross_entropy`)."""

    kind: ModelKind = "simplematch"

    backbone: str = "dinov2_vitb14"
    weights: str | None = None
    image_size: int = 252
    finetune: FinetuneMode = "lora"
    finetune_blocks: int = 6
    lora_rank: int = 16
    lora_alpha: float = 1.0
    decoder_channels: int = 768
    decoder_dropout: float = 0.3
    window_size: int | None = 45
    coarse_window_sizes: tuple[int | None, int | None] = (None, 15)
    beta: float = 0.02
    multiscale: bool = False
    scale_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    keypoint_sampling: KeypointSampling | None = None
    position_resampling: PositionResampling = "official"
    pixel_convention: PixelConvention = "center"
    image_resize: ImageResize = "antialiased"
    final_norm: bool = False
    localizer: Localizer | None = None
    kernel_sigma: float = 7.0
    loss_temperature: float = 0.03
    target_window: int = 7

    def __post_init__(self) -> None:
        require(self, "image_size lora_rank decoder_channels window_size coarse_window_sizes", AT_LEAST_ONE)
        require(self, "lora_alpha beta kernel_sigma loss_temperature", POSITIVE)
        require(self, "target_window", Bound("an odd number of cells, at least 1", lambda value: value % 2 == 1))
        require(self, "scale_weights", NON_NEGATIVE)
        require(self, "decoder_dropout", Bound("in [0, 1)", lambda value: 0 <= value < 1))
        if self.kind == "zero-shot" and self.finetune != "frozen":
            raise ValueError(f"a zero-shot model trains nothing: finetune must be 'frozen', got {self.finetune!r}")

    @property
    def localizer_method(self) -> Localizer:
        """``localizer``, or the kind's own (:data:`DEFAULT_LOCALIZERS`) when it is ``None``."""
        return self.localizer or DEFAULT_LOCALIZERS[self.kind]


class ConfigError(ValueError):
    """A configuration that does not fit :class:`TrainConfig`; the message names the source and key."""


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-ready types (tuples become lists); :func:`from_dict` inverts it."""
    return _plain(dataclasses.asdict(config))


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
    except OutOfRange as error:
        raise ConfigError(f"{source}: {where}{error}") from None
    except (TypeError, ValueError) as error:  # a dataclass's own checks (__post_init__)
        raise ConfigError(f"{source}: {where.rstrip('.') or 'top level'}: {error}") from None


def parse_override(text: str, what: str = "override", form: str = "section.key=value") -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 0.0001)``: a ``key=value`` assignment, the value
    parsed as YAML. A ``ConfigError`` names ``what`` it is and the ``form`` expected otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{what} {text!r} is not of the form {form}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {text!r}: value is not valid YAML: {error}") from None


def replace_fields(config: Any, overrides: Mapping[str, Any], source: str) -> Any:
    """``config`` (a dataclass) with the fields in ``overrides`` replaced, each value checked as
    :func:`from_dict` checks a file's (a ``ConfigError`` naming ``source`` and the key otherwise)."""
    return from_dict(type(config), {**to_dict(config), **overrides}, source)


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
