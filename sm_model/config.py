"""The model's typed configuration (everything that decides SimpleMatch's architecture and
localization, with the official settings as defaults: DINOv2 ViT-B/14 at 252, LoRA, window 45),
and the typed reading of configs that checkpoints and ``sm_train``'s YAML files share: a dataclass
from a plain mapping, every key and value checked against the field types, and every number against
its range (:func:`require`, called by each config's ``__post_init__``).

Nothing here imports torch: a config loads and fails fast without the model stack."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import re
import reprlib
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
Localizer = Literal["argmax", "dense", "window", "kernel"]


class Bound(NamedTuple):
    """A range for :func:`require`: ``words`` say it in the error, ``holds`` tests a value."""

    words: str
    holds: Callable[[Any], bool]


AT_LEAST_ONE = Bound("at least 1", lambda value: value >= 1)
AT_LEAST_ZERO = Bound("at least 0", lambda value: value >= 0)
POSITIVE = Bound("a finite number above 0", lambda value: math.isfinite(value) and value > 0)
NON_NEGATIVE = Bound("a finite number, at least 0", lambda value: math.isfinite(value) and value >= 0)


def between(low: int, high: int) -> Bound:
    """An integer range: sizes are checked against it before anything is allocated."""
    return Bound(f"between {low} and {high:,}", lambda value: low <= value <= high)


MAX_IMAGE_SIZE = 4096
"""The largest network input side: at 4096 a ViT-B/14 attends over 85,000 tokens per image."""
MAX_CHANNELS = 8192
"""The widest layer a config may ask for (decoder channels, LoRA rank)."""
MAX_BLOCKS = 64
"""The most transformer blocks a config may fine-tune (a ViT-G has 40)."""
MAX_WINDOW = 1024
"""The widest localization window, in cells."""


_VIT_PATCH = re.compile(r"vit[a-z](\d+)")


def vit_patch(backbone: str) -> int | None:
    """The patch size of the ViT ``backbone`` (a name of :data:`sm_model.backbones.BACKBONES`,
    read from it without torch: ``dinov2_vitb14`` -> 14, ``ibot_vitb16`` -> 16); ``None`` for a
    backbone that is not a ViT."""
    found = _VIT_PATCH.search(backbone)
    return int(found.group(1)) if found else None


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
                raise OutOfRange(f"{name} must be {bound.words}, got {_shown(value)}")


@dataclass(frozen=True)
class KindInfo:
    """A registered model kind (:func:`register_kind`): ``options``, the dataclass of its config
    section; ``model``, where its model class is (``"module:Class"``, imported when a model is
    built, so that configs load without torch); ``localizer``, its own localizer; ``trains``,
    whether it has anything to train; ``defaults``, the kind's own values of shared fields
    (a config that names the kind and leaves them out gets these: :meth:`ModelConfig.of_kind`)."""

    name: str
    options: type
    model: str
    localizer: Localizer
    trains: bool
    defaults: Mapping[str, Any]


KINDS: dict[str, KindInfo] = {}
"""Every registered model kind by name; read it through :func:`model_kinds`."""
KIND_PACKAGES = ("sm_model.simplematch", "sm_model.feature_matcher", "sm_model.vitsc", "sm_model.lpmflow")
"""The packages whose import registers the kinds (their ``config`` modules; no torch)."""


def register_kind(
    name: str, *, model: str, localizer: Localizer, trains: bool = True, defaults: Mapping[str, Any] | None = None
) -> Callable[[type], type]:
    """Class decorator for a kind's options dataclass, next to the kind: it registers ``name``
    with its config section (the decorated class), its model class (``"module:Class"``), its
    localizer and its ``defaults`` of shared fields (e.g. its paper's backbone and input size), as
    timm's ``register_model`` registers a model where it is defined."""

    def register(options: type) -> type:
        if name in KINDS and KINDS[name].options is not options:
            raise ValueError(f"model kind {name!r} is registered twice")
        KINDS[name] = KindInfo(name, options, model, localizer, trains, dict(defaults or {}))
        return options

    return register


def model_kinds() -> dict[str, KindInfo]:
    """Every registered model kind by name, in name order (whichever was imported first),
    :data:`KIND_PACKAGES` imported first."""
    for package in KIND_PACKAGES:
        importlib.import_module(package)
    return dict(sorted(KINDS.items()))


def kind_info(kind: str) -> KindInfo:
    """The registered kind ``kind``; a ValueError listing the registered ones otherwise."""
    kinds = model_kinds()
    if kind not in kinds:
        raise ValueError(f"unknown model kind {kind!r}; registered: {', '.join(kinds)}")
    return kinds[kind]


@dataclass(frozen=True)
class ModelConfig:
    """The fields every model kind shares, and ``options``: the section of ``kind``, a dataclass
    registered with the kind (:func:`register_kind`; ``None`` means its defaults). In a YAML config
    or a checkpoint the section is a mapping under the kind's name::

        model:
          kind: simplematch
          backbone: dinov2_vitb14
          simplematch: {decoder_channels: 768, multiscale: false}

    A key of another kind's section is an error naming both kinds. A shared field the document
    leaves out takes the kind's registered default where it has one (ViTSC: DINOv2-B/14 at 224),
    else the default below. The flat layout of configs and
    checkpoints written before kinds had sections (``decoder_channels: 768`` beside ``backbone``)
    still loads: a flat key of the kind's own section moves into it.

    ``kind`` picks the model (:func:`model_kinds`): ``simplematch`` (the default), ``zero-shot``,
    ``baseline``, each documented with its options.

    ``backbone``: a name of :data:`sm_model.backbones.BACKBONES`. ``weights``: ``None`` (random
    init), ``"hub"`` (timm's pretrained weights, needs network) or a local checkpoint path.
    ``image_size``: the square network input side (a multiple of the patch size for ViTs).
    ``finetune`` with ``finetune_blocks`` (the last N transformer blocks) and the LoRA
    ``lora_rank``/``lora_alpha`` (scaling alpha / rank, loralib convention).
    ``position_resampling`` (ViTs) fits the pretrained positional embedding to the input's patch
    grid as the DINO, DINOv2 and iBOT code that trained the released weights does (``"official"``:
    bicubic, 0.1-cell offset, no antialiasing) or as timm does (``"timm"``). ``final_norm`` (ViTs)
    applies the backbone's final LayerNorm to the features.

    ``pixel_convention`` says where a pixel is (:mod:`sm_model.pixels`): ``"center"`` (the
    project's) or ``"official"`` (the released code's; set for released checkpoints).
    ``keypoint_sampling`` overrides how source features are read (``None``: the convention's own).
    ``image_resize`` is how images are resized to S x S: ``"antialiased"`` (PIL bilinear) or
    ``"official"`` (OpenCV's bilinear, as the released code). The model's whole input is
    :class:`sm_model.inputs.InputSpec`.

    ``localizer`` (:data:`sm_model.localizers.LOCALIZERS`) turns score maps into points: ``None``
    is the kind's own; ``window_size`` is the ``window`` localizer's window in cells of the finest
    map (``None``: dense), ``beta`` the temperature of every soft-argmax, ``kernel_sigma`` (cells)
    the kernel soft-argmax's Gaussian width."""

    kind: str = "simplematch"

    backbone: str = "dinov2_vitb14"
    weights: str | None = None
    image_size: int = 252
    finetune: FinetuneMode = "lora"
    finetune_blocks: int = 6
    lora_rank: int = 16
    lora_alpha: float = 1.0
    position_resampling: PositionResampling = "official"
    final_norm: bool = False
    pixel_convention: PixelConvention = "center"
    keypoint_sampling: KeypointSampling | None = None
    image_resize: ImageResize = "antialiased"
    localizer: Localizer | None = None
    window_size: int | None = 45
    beta: float = 0.02
    kernel_sigma: float = 7.0
    options: Any = None

    def __post_init__(self) -> None:
        info = kind_info(self.kind)
        if self.options is None:
            object.__setattr__(self, "options", info.options())
        elif type(self.options) is not info.options:
            raise ValueError(
                f"options of kind {self.kind!r} must be {info.options.__name__}, got {type(self.options).__name__}"
            )
        require(self, "image_size", between(1, MAX_IMAGE_SIZE))
        require(self, "lora_rank", between(1, MAX_CHANNELS))
        require(self, "finetune_blocks", between(0, MAX_BLOCKS))
        require(self, "window_size", between(1, MAX_WINDOW))
        require(self, "lora_alpha beta kernel_sigma", POSITIVE)
        check = getattr(self.options, "check", None)
        if check is not None:
            check(self)

    @property
    def localizer_method(self) -> Localizer:
        """``localizer``, or the kind's own when it is ``None``."""
        return self.localizer or kind_info(self.kind).localizer

    @classmethod
    def of_kind(cls, kind: str, **fields: Any) -> ModelConfig:
        """The config of a ``kind`` model: its registered defaults of shared fields, then
        ``fields`` (``options`` included). ``ModelConfig(kind=...)`` takes the shared defaults
        (SimpleMatch's) instead."""
        return cls(**{"kind": kind, **kind_info(kind).defaults, **fields})

    @classmethod
    def from_document(cls, document: Any, source: str, where: str = "") -> ModelConfig:
        """:func:`from_dict` for a model config: the kind's section read as its options (a flat
        key of that section moved into it, the earlier layout), a key of another kind's section
        refused naming both kinds."""
        if not isinstance(document, Mapping):
            raise ConfigError(f"{source}: {where.rstrip('.') or 'top level'} must be a mapping, got {_shown(document)}")
        document = dict(document)
        kinds = model_kinds()
        kind = document.get("kind", cls.kind)
        if not isinstance(kind, str) or kind not in kinds:
            raise ConfigError(f"{source}: {where}kind={_shown(kind)} is not one of {list(kinds)}")
        info = kinds[kind]
        document = {**info.defaults, **document}
        section = document.pop(kind, None)
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(f"{source}: {where}{kind} must be a mapping of {kind} options, got {_shown(section)}")
        shared = {f.name for f in fields(cls)} - {"options"}
        own = _field_names(info.options)
        flat = {}
        for key in [key for key in document if key not in shared]:
            if key in own:
                flat[key] = document.pop(key)
                continue
            owner = key if key in kinds else next((k for k, i in kinds.items() if key in _field_names(i.options)), None)
            if owner is not None:
                what = f"the section of kind {owner!r}" if key == owner else f"an option of kind {owner!r}"
                raise ConfigError(f"{source}: {where}{key} is {what}, but the model's kind is {kind!r}")
        options = from_dict(info.options, {**(section or {}), **flat}, source, f"{where}{kind}.")
        return _build(cls, document, source, where, given={"options": options})

    def to_document(self) -> dict[str, Any]:
        """The config as plain YAML-ready values, the options under the kind's name."""
        document = {f.name: plain_value(getattr(self, f.name)) for f in fields(self) if f.name != "options"}
        document[self.kind] = to_dict(self.options)
        return document


class ConfigError(ValueError):
    """A configuration that does not fit its typed config; the message names the source and key."""


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-ready types (tuples become lists); :func:`from_dict` inverts it."""
    to_document = getattr(config, "to_document", None)
    if to_document is not None:
        return to_document()
    return {f.name: plain_value(getattr(config, f.name)) for f in fields(config)}


def from_dict(cls: type, document: Mapping[str, Any], source: str, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``document``, checking every key and value against the field
    types (a class with a ``from_document`` classmethod reads its documents itself)."""
    from_document = getattr(cls, "from_document", None)
    if from_document is not None:
        return from_document(document, source, where)
    return _build(cls, document, source, where)


def _build(cls: type, document: Any, source: str, where: str, given: Mapping[str, Any] | None = None) -> Any:
    """:func:`from_dict`'s body; ``given``: fields already built, not read from ``document``."""
    given = given or {}
    if not isinstance(document, Mapping):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, got {_shown(document)}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name not in given]
    unknown = [key for key in document if key not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown key {_shown(where + str(key))}{hint}; {where.rstrip('.') or 'top level'} accepts {names}")
    values = {}
    for name, value in document.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value or {}, source, f"{where}{name}.")
        else:
            values[name] = _coerce(value, hint, source, where + name)
    try:
        return cls(**values, **given)
    except OutOfRange as error:
        raise ConfigError(f"{source}: {where}{error}") from None
    except (TypeError, ValueError) as error:  # a dataclass's own checks (__post_init__)
        raise ConfigError(f"{source}: {where.rstrip('.') or 'top level'}: {error}") from None


MAX_YAML_BYTES = 1 << 20
"""The largest YAML config or value read (:func:`load_yaml`): configs are a few kB."""
MAX_YAML_VALUES = 100_000
"""The most values a YAML document may build, aliases expanded: a 500-byte alias bomb builds billions."""
MAX_YAML_DEPTH = 50
"""The deepest nesting of a YAML document (configs nest three levels)."""


def load_yaml(text: str | bytes, source: str) -> Any:
    """``yaml.safe_load(text)`` within bounds: at most :data:`MAX_YAML_BYTES`, and a document that
    would build at most :data:`MAX_YAML_VALUES` values with aliases expanded, nested at most
    :data:`MAX_YAML_DEPTH` deep, both counted on the parsed node graph before anything is built.
    A ``ConfigError`` naming ``source`` otherwise, as for text that is not YAML."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {len(text):,} bytes, more than a config may hold ({MAX_YAML_BYTES:,})")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values, depth = _node_extent(node)
        if values > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}: the YAML expands to more than {MAX_YAML_VALUES:,} values (aliases included), "
                "more than a config may hold"
            )
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{source}: the YAML nests {depth} levels deep, more than {MAX_YAML_DEPTH}")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: the YAML nests deeper than {MAX_YAML_DEPTH} levels") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    finally:
        loader.dispose()


def _node_extent(root: yaml.Node) -> tuple[int, int]:
    """(values built, nesting depth) of a composed YAML node graph; an alias is a second reference
    to the same node, so each node is measured once and counted at every reference."""
    extent: dict[int, tuple[int, int]] = {}
    pending: list[tuple[yaml.Node, bool]] = [(root, False)]
    while pending:  # iterative post-order: the graph may be deep
        node, children_done = pending.pop()
        if id(node) in extent:
            continue
        if isinstance(node, yaml.ScalarNode):
            extent[id(node)] = (1, 0)
            continue
        children = [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else node.value
        if not children_done:
            pending.append((node, True))
            pending.extend((child, False) for child in children if id(child) not in extent)
            continue
        sizes = [extent.get(id(child), (0, 0)) for child in children]
        extent[id(node)] = (
            min(1 + sum(size for size, _ in sizes), MAX_YAML_VALUES + 1),
            1 + max((depth for _, depth in sizes), default=0),
        )
    return extent[id(root)]


def parse_override(text: str, what: str = "override", form: str = "section.key=value") -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 0.0001)``: a ``key=value`` assignment, the value
    parsed as YAML. A ``ConfigError`` names ``what`` it is and the ``form`` expected otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{what} {_shown(text)} is not of the form {form}")
    return key.strip(), load_yaml(value, f"{what} {_shown(text)}")


def replace_fields(config: Any, overrides: Mapping[str, Any], source: str) -> Any:
    """``config`` (a dataclass) with the fields in ``overrides`` replaced, each value checked as
    :func:`from_dict` checks a file's (a ``ConfigError`` naming ``source`` and the key otherwise).
    A dotted key (``simplematch.multiscale``) replaces a field of a section."""
    document = to_dict(config)
    for key, value in overrides.items():
        set_dotted(document, key, value, source)
    return from_dict(type(config), document, source)


def set_dotted(document: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set ``document["a"]["b"] = value`` for ``key="a.b"``, creating sections as needed."""
    *sections, leaf = key.split(".")
    node = document
    for section in sections:
        child = node.setdefault(section, {})
        if child is None:
            child = node[section] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {section!r} is a value, not a section")
        node = child
    node[leaf] = value


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
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}={_shown(value)} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}={_shown(value)} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {_shown(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must have {len(args)} items, got {_shown(value)}")
        return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {_shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {_shown(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _float_or_none(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {_shown(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {_shown(value)}")
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{source}: {key} must be null, got {_shown(value)}")
        return None
    raise ConfigError(f"{source}: {key} has an unsupported type {hint}")


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: a value from a config file may be huge."""
    short = reprlib.Repr()
    short.maxlevel, short.maxtuple, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, 4, 60, 60
    return short.repr(value)


def _float_or_none(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def plain_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value
