"""The released LPMFlow weights: the ``--pretrained`` folder of the official README (``args.pkl``
and ``model_best.pth``, read by :func:`sm_model.released.read_released_folder`), mapped onto
:class:`~sm_model.lpmflow.model.LPMFlow` strictly.

Every released key either becomes one of this model's parameters (same shape) or is one of the
released model's parameters that its forward never reads (:data:`UNUSED`); any other key is an
error naming it, and so is a parameter of this model that no key fills. The architecture is read
from the keys (encoder depth, image size, context width, Swin windows) and from ``args.pkl``
(heads, MLP ratio), which shapes cannot tell.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor

from sm_model.checkpoint import architecture
from sm_model.config import ModelConfig, replace_fields
from sm_model.lpmflow.config import LpmflowOptions
from sm_model.lpmflow.model import LPMFlow
from sm_model.state_dicts import listed

RELEASED_PATCH = 16
"""The released backbone: iBOT ViT-B/16."""

RENAMED = (
    ("feature_extraction.backbone.", "backbone.encoder."),
    ("pos_embed_src", "train_pos_embed"),
    ("x_normal", "grid_x"),
    ("y_normal", "grid_y"),
    ("decoder_s1.last_block.0.", "decoder_coarse."),
    ("decoder_s2.last_block.0.", "decoder_cross."),
    ("decoder_s3.last_block.0.", "decoder_fine."),
    ("SRBranch_feat.refine_swin_decoder_1_1.", "fsr.stages.0."),
    ("SRBranch_feat.refine_swin_decoder_1_2.", "fsr.stages.1."),
    ("SRBranches.refine_swin_decoder_16.", "refinement.stages.0."),
    ("SRBranches.refine_swin_decoder_8.", "refinement.stages.1."),
    ("SRBranches.refine_swin_decoder_4.", "refinement.stages.2."),
    ("SRBranches.refine2.", "refinement.head."),
    ("refine_proj_query_feat.", "context."),
    ("encoder.", "encoder."),
)
"""Released prefix -> this model's prefix, first match wins (``pos_embed_src`` only as a whole key)."""

SWIN_STAGE = (
    ("0.transformer.layers.0.blocks.0.", "block."),
    ("0.transformer.norm.", "norm."),
    ("1.", "channel_attention."),
)
"""Inside one released Swin stage (``Sequential(TransformerWarper2d(SwinTransformer2d), ChannelAttention)``)."""

UNUSED = re.compile(
    r"masked_tokens"
    r"|encoder\.(pos_embed|cls_token|patch_embed\..*|head\..*)"
    r"|encoder\.blocks\.\d+\.(spatial_attention\.weight|attn\.relative_position_index)"
    r"|decoder_s\d\.last_block\.0\.norm[34]\..*"
    r"|decoder_s1\.last_block\.0\.pos_embed_(src|trg)_up"
    r"|decoder_s3\.last_block\.0\.pos_embed_(src|trg)"
    r"|.*\.relative_position_index"
)
"""Released keys its forward never reads: an unused mask token, the encoder's inherited ViT
embedding and head, every encoder block's ``SpatialAttention_heat``, the decoders' ``norm3`` and
``norm4``, D1's 2g and D3's g positions, and the relative-position index buffers (this model
derives them)."""


def released_key(key: str) -> str | None:
    """This model's key of the released ``key``; ``None`` for a key of :data:`UNUSED`; the key
    unchanged when no rename applies (then it fits nothing and strict loading names it)."""
    if UNUSED.fullmatch(key):
        return None
    for old, new in RENAMED:
        if key == old or (old.endswith(".") and key.startswith(old)):
            key = new + key[len(old) :]
            break
    stage = re.match(r"(fsr|refinement)\.stages\.\d+\.", key)
    if stage:
        rest = key[stage.end() :]
        for old, new in SWIN_STAGE:
            if rest.startswith(old):
                return stage.group(0) + new + rest[len(old) :]
    return key


def released_config(args: Mapping[str, Any], state: Mapping[str, Tensor], name: str) -> ModelConfig:
    """The config of the released model whose training ``args`` and ``state`` are given."""
    try:
        heads, mlp_ratio = int(args["num_heads"]), int(args["mlp_ratio"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{name}/args.pkl: num_heads and mlp_ratio must be integers ({error!r})") from None
    positions = _tensor(state, "encoder.pos_embed_src", name)
    grid = round(positions.shape[1] ** 0.5)
    depth = len({match.group(1) for key in state if (match := re.match(r"encoder\.blocks\.(\d+)\.", key))})
    options = LpmflowOptions(
        encoder_depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        context_channels=_tensor(state, "refine_proj_query_feat.0.weight", name).shape[0],
        fsr_window=_window(state, "SRBranch_feat.refine_swin_decoder_1_1.", name),
        refine_windows=tuple(_window(state, f"SRBranches.refine_swin_decoder_{w}.", name) for w in (16, 8, 4)),
        train_pe="pos_embed_src" in state,
    )
    return ModelConfig.of_kind("lpmflow", image_size=grid * RELEASED_PATCH, weights=None, options=options)


def lpmflow_from_released(
    args: Mapping[str, Any],
    state: Mapping[str, Tensor],
    name: str,
    config: ModelConfig | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LPMFlow:
    """The released model of ``args`` (``args.pkl`` as a mapping) and ``state`` (the
    ``state_dict`` of ``model_best.pth``), loaded strictly, on the CPU in training mode.
    ``config``: run-time settings (e.g. another ``lpmflow.input_size``) for a model whose
    architecture must be the released one, its ``weights`` never read; ``overrides``: fields
    replaced in it, or in the released config (:func:`sm_model.config.replace_fields`)."""
    released = released_config(args, state, name)
    if overrides:
        config = replace_fields(config or released, overrides, f"{name} config with {dict(overrides)}")
    if config is not None:
        config = replace(config, weights=None)
        if _shape(config) != _shape(released):
            differ = sorted(k for k, v in _shape(released).items() if _shape(config).get(k) != v)
            raise ValueError(f"{name}: the given config's architecture differs from the released model's in {differ}")
        released = config
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        new = released_key(key)
        if new is None:
            continue
        if new in mapped:
            raise ValueError(f"{name}: released keys map twice onto {new}")
        mapped[new] = value
    model = LPMFlow(released)
    expected = model.state_dict()
    unmapped = sorted(
        key for key, new in ((k, released_key(k)) for k in state) if new is not None and new not in expected
    )
    if unmapped:
        raise ValueError(
            f"{name}: released keys that fit no parameter of LPMFlow ({len(unmapped)}): {listed(unmapped)}"
        )
    missing = sorted(to_released_key(key) for key in expected.keys() - mapped.keys())
    misshapen = [
        f"{to_released_key(key)} {tuple(mapped[key].shape)} != {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & mapped.keys())
        if mapped[key].shape != expected[key].shape
    ]
    for problem, keys in (("lacks parameters LPMFlow uses", missing), ("has parameters of the wrong shape", misshapen)):
        if keys:
            raise ValueError(f"{name}/model_best.pth {problem} ({len(keys)}): {listed(keys)}")
    model.load_state_dict(mapped, strict=True)
    return model


def to_released_key(key: str) -> str:
    """The released name of this model's state key ``key`` (the inverse of :func:`released_key`),
    for messages that point into the released file."""
    for old, new in RENAMED:
        if key == new or (new.endswith(".") and key.startswith(new)):
            rest = key[len(new) :]
            for old_stage, new_stage in SWIN_STAGE if re.fullmatch(r"(fsr|refinement)\.stages\.\d+\.", new) else ():
                if rest.startswith(new_stage):
                    rest = old_stage + rest[len(new_stage) :]
                    break
            return old + rest
    return key


def _shape(config: ModelConfig) -> dict[str, Any]:
    """What decides LPMFlow's parameter shapes: its architecture fields and ``image_size`` (the
    position embeddings, bias tables and grids are sized by the token grid)."""
    return {**architecture(config), "image_size": config.image_size}


def _tensor(state: Mapping[str, Tensor], key: str, name: str) -> Tensor:
    if key not in state:
        raise ValueError(f"{name}/model_best.pth has no {key}: not a released LPMFlow state dict")
    return state[key]


def _window(state: Mapping[str, Tensor], prefix: str, name: str) -> int:
    """A released Swin stage's window, from its ``(2w - 1)^2``-row bias table."""
    table = _tensor(state, f"{prefix}0.transformer.layers.0.blocks.0.attn.relative_position_bias_table", name)
    return (round(table.shape[0] ** 0.5) + 1) // 2
