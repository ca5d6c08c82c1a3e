"""Backbones: every registered one builds and runs at two input sizes with the right maps; input
size errors; the fine-tuning modes' exact trainable sets; LoRA (official parameter count,
identity at start, gradients); local weights in timm, facebookresearch DINOv2 and iBOT teacher
layouts, generated here from random models. ViT-G is built in full (about 40 s of random
initialisation each) only with SM_TEST_GIANT=1; otherwise its spec runs with 1 of its 40 blocks."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from sm_model.backbones import (
    BACKBONES,
    Backbone,
    ViTBackbone,
    apply_finetune,
    build_backbone,
    create_encoder,
    load_ibot_teacher,
    resample_positions_official,
)
from sm_model.config import ModelConfig
from sm_model.lora import LoRALinear

GIANTS = ("dinov2_vitg14", "dinov2_vitg14_reg4")
TEST_SIZES = {14: (28, 42), 16: (32, 48), 32: (64, 96)}  # two input sides per size multiple


def _config(name: str, **overrides: object) -> ModelConfig:
    fields: dict[str, object] = {
        "backbone": name,
        "image_size": TEST_SIZES[BACKBONES[name].size_multiple][0],
        "finetune": "frozen",
    }
    return ModelConfig(**{**fields, **overrides})


def _assert_maps(backbone: Backbone, size: int, batch: int = 2) -> None:
    """Forward a [batch, 3, size, size] batch; one map per stride with the registered channels."""
    with torch.no_grad():
        maps = backbone(torch.randn(batch, 3, size, size))
    expected = [(batch, c, size // s, size // s) for c, s in zip(backbone.channels, backbone.strides, strict=True)]
    assert [tuple(m.shape) for m in maps] == expected


def _perturb(model: nn.Module) -> nn.Module:
    """Add noise to every parameter so that no block is close to the identity (timm starts
    DINOv2's LayerScale at 1e-5) and a wrongly loaded tensor shows in the output."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.02)
    return model.eval()


def _last_tokens(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vit.forward_intermediates(images, indices=1, norm=False, intermediates_only=True)[0]


def _trainable(module: nn.Module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def _names_under(module: nn.Module, prefixes: tuple[str, ...]) -> set[str]:
    return {name for name, _ in module.named_parameters() if name.startswith(prefixes)}


# ---------------------------------------------------------------- every backbone, two input sizes


@pytest.fixture(scope="module")
def random_backbone() -> Callable[[str], Backbone]:
    """Frozen backbones with random weights, each built once per module."""
    built: dict[str, Backbone] = {}

    def get(name: str) -> Backbone:
        if name not in built:
            torch.manual_seed(0)
            built[name] = build_backbone(_config(name))
        return built[name]

    return get


@pytest.mark.parametrize("name", [name for name in BACKBONES if name not in GIANTS])
def test_builds_and_runs_at_two_sizes(name: str, random_backbone: Callable[[str], Backbone]) -> None:
    backbone, spec = random_backbone(name), BACKBONES[name]
    assert (backbone.strides, backbone.channels) == (spec.strides, spec.channels)
    for size in TEST_SIZES[spec.size_multiple]:
        _assert_maps(backbone, size)


def test_dinov2_at_official_sizes(random_backbone: Callable[[str], Backbone]) -> None:
    for size in (252, 448):
        _assert_maps(random_backbone("dinov2_vits14"), size, batch=1)


@pytest.mark.parametrize("name", GIANTS)
def test_giant_spec_runs_with_one_block(name: str) -> None:
    spec = BACKBONES[name]
    backbone = ViTBackbone(name, spec, create_encoder(spec, depth=1))
    for size in TEST_SIZES[14]:
        _assert_maps(backbone, size)


@pytest.mark.parametrize("name", GIANTS)
def test_giant_architecture(name: str) -> None:
    with torch.device("meta"):
        encoder = create_encoder(BACKBONES[name])
    assert len(encoder.blocks) == 40 and encoder.embed_dim == 1536
    assert encoder.blocks[-1].mlp.fc2.in_features == 4096  # SwiGLU hidden width, timm's packed layout
    assert (encoder.reg_token is not None) == name.endswith("_reg4")


@pytest.fixture(scope="module", params=GIANTS)
def giant(request: pytest.FixtureRequest) -> Backbone:
    if not os.environ.get("SM_TEST_GIANT"):
        pytest.skip("full ViT-G builds take about 40 s each; set SM_TEST_GIANT=1")
    return build_backbone(_config(request.param))


def test_giant_builds_and_runs(giant: Backbone) -> None:
    _assert_maps(giant, 28)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_meta_build_leaves_nothing_uninitialised(name: str) -> None:
    """Local weights load into an encoder built on the meta device: that is only sound when the
    state dict covers every buffer (no non-persistent ones)."""
    with torch.device("meta"):
        encoder = create_encoder(BACKBONES[name])
    assert {buffer_name for buffer_name, _ in encoder.named_buffers()} <= set(encoder.state_dict())


# ---------------------------------------------------------------- positional embedding resampling


def _dinov2_reference_resample(grid: torch.Tensor, new_side: int) -> torch.Tensor:
    """The DINOv2 / iBOT ``interpolate_pos_encoding`` for a square input: ``[1, M*M, C]`` ->
    ``[1, new_side**2, C]`` by the scale factor ``(new_side + 0.1) / M``, bicubic, no antialiasing."""
    side, dim = int(grid.shape[1] ** 0.5), grid.shape[-1]
    scale = (new_side + 0.1) / side
    image = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = nn.functional.interpolate(image, scale_factor=(scale, scale), mode="bicubic")
    return resized.permute(0, 2, 3, 1).reshape(1, -1, dim)


def test_official_resampling_by_hand() -> None:
    grid = torch.randn(1, 37 * 37, 8)
    assert resample_positions_official(grid, (37, 37), (37, 37)) is grid
    constant = torch.full((1, 14 * 14, 3), 2.5)
    torch.testing.assert_close(resample_positions_official(constant, (14, 14), (16, 16)), torch.full((1, 256, 3), 2.5))
    official = resample_positions_official(grid, (37, 37), (18, 18))
    torch.testing.assert_close(official, _dinov2_reference_resample(grid, 18), rtol=0, atol=0)
    timm_style = nn.functional.interpolate(
        grid.reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(18, 18), mode="bicubic", antialias=True
    ).permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert (official - timm_style).abs().max() > 0.1  # downsampling 37 -> 18: antialiasing matters


@pytest.mark.parametrize(("name", "size"), [("dinov2_vits14", 42), ("dinov2_vits14_reg4", 42), ("ibot_vitb16", 48)])
def test_official_resampling_equals_a_model_built_at_that_grid(name: str, size: int) -> None:
    """The backbone with ``position_resampling="official"`` computes exactly what timm's own
    forward computes on a copy whose positional grid was resampled once by the DINOv2 formula
    (so timm resamples nothing): prefix tokens, registers and positions are wired as timm does.
    With ``"timm"`` it computes timm's forward on the native grid."""
    torch.manual_seed(5)
    backbone = _perturb(build_backbone(_config(name, image_size=size)))
    side = size // BACKBONES[name].size_multiple
    encoder = backbone.encoder
    prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
    at_grid = copy.deepcopy(encoder)
    with torch.no_grad():
        grid = _dinov2_reference_resample(encoder.pos_embed[:, prefix:], side)
        at_grid.pos_embed = nn.Parameter(torch.cat([encoder.pos_embed[:, :prefix], grid], dim=1))
    at_grid.patch_embed.grid_size = (side, side)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images)[0], _last_tokens(at_grid, images))
        backbone.position_resampling = "timm"
        torch.testing.assert_close(backbone(images)[0], _last_tokens(encoder, images))
        assert not torch.allclose(_last_tokens(at_grid, images), _last_tokens(encoder, images))


# ---------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [("dinov2_vits14", 250, "250.*patch size 14.*252"), ("ibot_vitb16", 250, "250.*patch size 16"),
     ("resnet101", 252, "252.*stride 32")],
)
def test_image_size_must_be_a_multiple(name: str, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_backbone(_config(name, image_size=size))


def test_forward_rejects_a_non_multiple_input(random_backbone: Callable[[str], Backbone]) -> None:
    with pytest.raises(ValueError, match="multiples of 14, got 30x28"):
        random_backbone("dinov2_vits14")(torch.randn(1, 3, 30, 28))


def test_unknown_backbone_lists_the_registry() -> None:
    with pytest.raises(ValueError, match="dinov2_vitb14.*resnet101"):
        build_backbone(ModelConfig(backbone="vit_huge"))


def test_missing_weights_file_names_path_and_backbone(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=f"dinov2_vitb14.*{missing}"):
        build_backbone(_config("dinov2_vitb14", weights=str(missing)))


def test_ibot_has_no_hub_weights() -> None:
    with pytest.raises(ValueError, match="no hub weights for ibot_vitb16"):
        build_backbone(_config("ibot_vitb16", weights="hub"))


# ---------------------------------------------------------------- fine-tuning modes and LoRA


@pytest.fixture(scope="module")
def dinov2_source() -> Callable[[str], nn.Module]:
    """Bare timm DINOv2 encoders with perturbed random weights, each created once per module."""
    created: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in created:
            torch.manual_seed(3)
            created[name] = _perturb(create_encoder(BACKBONES[name]))
        return created[name]

    return get


def _finetuned(
    random_backbone: Callable[[str], Backbone],
    name: str,
    mode: str,
    blocks: int = 6,
    rank: int = 16,
    alpha: float = 1.0,
) -> Backbone:
    """A copy of a random backbone with ``mode`` applied as build_backbone applies it."""
    backbone = copy.deepcopy(random_backbone(name))
    apply_finetune(backbone, mode, blocks, rank, alpha)
    return backbone


LORA_KEYS = {f"encoder.blocks.{i}.mlp.fc2.lora_{ab}" for i in range(6, 12) for ab in "AB"}


def test_lora_official_settings(random_backbone: Callable[[str], Backbone]) -> None:
    backbone = _finetuned(random_backbone, "dinov2_vitb14", "lora", blocks=6, rank=16, alpha=1.0)
    assert _trainable(backbone) == LORA_KEYS
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == 368_640
    fc2 = backbone.encoder.blocks[11].mlp.fc2
    assert isinstance(fc2, LoRALinear) and fc2.scaling == 1 / 16
    assert (fc2.lora_A.shape, fc2.lora_B.shape) == ((16, 3072), (768, 16))
    assert not isinstance(backbone.encoder.blocks[5].mlp.fc2, LoRALinear)


@pytest.mark.parametrize(
    ("mode", "blocks", "trainable_prefixes"),
    [("frozen", 6, ()), ("full", 6, ("encoder.",)),
     ("last_blocks", 2, ("encoder.blocks.10.", "encoder.blocks.11."))],
)
def test_vit_trainable_sets(
    random_backbone: Callable[[str], Backbone], mode: str, blocks: int, trainable_prefixes: tuple[str, ...]
) -> None:
    backbone = _finetuned(random_backbone, "dinov2_vitb14", mode, blocks)
    assert _trainable(backbone) == _names_under(backbone, trainable_prefixes)


def test_vit_full_has_no_unused_parameters(random_backbone: Callable[[str], Backbone]) -> None:
    """The final LayerNorm is not part of the features, so it is not part of the model either."""
    backbone = _finetuned(random_backbone, "dinov2_vits14_reg4", "full")
    backbone(torch.randn(1, 3, 28, 28))[0].sum().backward()
    assert [name for name, p in backbone.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("blocks", [0, 13])
def test_vit_block_count_out_of_range(random_backbone: Callable[[str], Backbone], blocks: int) -> None:
    with pytest.raises(ValueError, match="finetune_blocks must be in 1..12 for dinov2_vitb14"):
        _finetuned(random_backbone, "dinov2_vitb14", "last_blocks", blocks)


def test_lora_gradients_reach_only_the_factors(random_backbone: Callable[[str], Backbone]) -> None:
    backbone = _finetuned(random_backbone, "dinov2_vitb14", "lora")
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if name.endswith("lora_B"):
                parameter.normal_()
    backbone(torch.randn(2, 3, 28, 28))[0].square().sum().backward()
    for name, parameter in backbone.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_lora_from_pretrained_file_starts_as_the_pretrained_function(
    dinov2_source: Callable[[str], nn.Module], tmp_path: Path
) -> None:
    """build_backbone loads the file before the LoRA swap: base weights keep timm's names, and
    with B = 0 the adapted model computes exactly what the pretrained one does."""
    torch.save(dinov2_source("dinov2_vits14").state_dict(), tmp_path / "vits14.pth")
    frozen, lora = (
        build_backbone(_config("dinov2_vits14", weights=str(tmp_path / "vits14.pth"), finetune=mode))
        for mode in ("frozen", "lora")
    )
    assert _trainable(lora) == LORA_KEYS
    images = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        assert torch.equal(lora(images)[0], frozen(images)[0])
    assert set(lora.state_dict()) == set(frozen.state_dict()) | LORA_KEYS


def test_lora_linear_by_hand() -> None:
    torch.manual_seed(2)
    base = nn.Linear(5, 3)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(7, 5)
    expected = base(x) + (x @ lora.lora_A.T @ lora.lora_B.T) * 2.0
    torch.testing.assert_close(lora(x), expected)
    assert lora.weight is base.weight
    assert [name for name, _ in lora.named_parameters()] == ["weight", "bias", "lora_A", "lora_B"]


def test_resnet_trainable_sets(random_backbone: Callable[[str], Backbone]) -> None:
    backbone = _finetuned(random_backbone, "resnet101", "last_blocks", blocks=2)
    assert _trainable(backbone) == _names_under(backbone, ("encoder.layer3.", "encoder.layer4."))
    with pytest.raises(ValueError, match="finetune_blocks must be in 1..4 for resnet101"):
        _finetuned(random_backbone, "resnet101", "last_blocks", blocks=5)
    with pytest.raises(ValueError, match="finetune='lora' needs a ViT backbone"):
        build_backbone(_config("resnet101", finetune="lora"))


# ---------------------------------------------------------------- local weights round trips


def _to_facebookresearch_dinov2(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv2 state dict in the layout of facebookresearch's ``dinov2_*_pretrain.pth``:
    with ``mask_token``; with registers, ``register_tokens`` and a pos_embed that has a CLS
    entry again (timm folds that entry into cls_token)."""
    state = dict(timm_state)
    width = state["cls_token"].shape[-1]
    state["mask_token"] = torch.randn(1, width)
    if "reg_token" in state:
        cls_position = torch.randn(1, 1, width)
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_position
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
    return state


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg4"])
@pytest.mark.parametrize("layout", ["timm", "facebookresearch"])
def test_dinov2_weights_round_trip(
    dinov2_source: Callable[[str], nn.Module], name: str, layout: str, tmp_path: Path
) -> None:
    source = dinov2_source(name)
    state = source.state_dict()
    if layout == "facebookresearch":
        state = _to_facebookresearch_dinov2(state)
        assert len(state["pos_embed"][0]) == 1 + 37 * 37
    torch.save(state, tmp_path / "weights.pth")
    backbone = build_backbone(_config(name, weights=str(tmp_path / "weights.pth"), position_resampling="timm"))
    for key, value in backbone.encoder.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], msg=key)
    images = torch.randn(2, 3, 42, 42)
    torch.testing.assert_close(backbone(images)[0], _last_tokens(source, images))


@pytest.fixture(scope="module")
def ibot_source() -> nn.Module:
    """A random timm ViT-B/16 cut to 2 blocks: the key mapping does not depend on depth."""
    torch.manual_seed(4)
    return _perturb(create_encoder(BACKBONES["ibot_vitb16"], depth=2))


def _ibot_target(depth: int) -> nn.Module:
    with torch.device("meta"):
        target = create_encoder(BACKBONES["ibot_vitb16"], depth=depth)
    return target.to_empty(device="cpu")


def _ibot_teacher(backbone_state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Backbone keys under ``prefix`` plus iBOT projection-head entries."""
    head = {"head.mlp.0.weight": torch.randn(8, 768), "head.last_layer.weight_g": torch.randn(8, 1)}
    return {**{prefix + key: value for key, value in backbone_state.items()}, **head}


@pytest.mark.parametrize(
    "wrap",
    [lambda s: {"teacher": _ibot_teacher(s, "backbone.")}, lambda s: _ibot_teacher(s, "module.backbone."),
     lambda s: {"state_dict": _ibot_teacher(s, "")}, lambda s: s],
    ids=["teacher-backbone", "module-backbone", "state_dict-bare-with-head", "timm"],
)
def test_ibot_teacher_round_trip(ibot_source: nn.Module, wrap: Callable, tmp_path: Path) -> None:
    torch.save(wrap(ibot_source.state_dict()), tmp_path / "checkpoint_teacher.pth")
    target = _ibot_target(depth=2)
    load_ibot_teacher(target, tmp_path / "checkpoint_teacher.pth")
    assert target.state_dict().keys() == ibot_source.state_dict().keys()
    for key, value in ibot_source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_ibot_backbone_from_teacher_file(random_backbone: Callable[[str], Backbone], tmp_path: Path) -> None:
    source = random_backbone("ibot_vitb16")
    # The backbone has dropped the final LayerNorm; a real teacher checkpoint still holds it.
    state = {**source.encoder.state_dict(), "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}
    torch.save({"teacher": _ibot_teacher(state, "backbone.")}, tmp_path / "teacher.pth")
    backbone = build_backbone(_config("ibot_vitb16", weights=str(tmp_path / "teacher.pth"), finetune="full"))
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images)[0], source(images)[0])


def test_ibot_mismatch_names_the_keys(ibot_source: nn.Module, tmp_path: Path) -> None:
    state = _ibot_teacher(ibot_source.state_dict(), "backbone.")
    del state["backbone.blocks.1.norm1.weight"]
    state["backbone.blocks.1.gamma_1"] = torch.ones(768)
    state["backbone.pos_embed"] = torch.zeros(1, 10, 768)
    torch.save({"teacher": state}, tmp_path / "teacher.pth")
    with pytest.raises(ValueError) as error:
        load_ibot_teacher(_ibot_target(depth=2), tmp_path / "teacher.pth")
    message = str(error.value)
    assert "missing keys (1): ['blocks.1.norm1.weight']" in message
    assert "unexpected keys (1): ['blocks.1.gamma_1']" in message
    assert "pos_embed (1, 10, 768) != (1, 197, 768)" in message


def test_file_without_state_dict(tmp_path: Path) -> None:
    torch.save({"epoch": 3}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        build_backbone(_config("dinov2_vits14", weights=str(tmp_path / "odd.pth")))


def test_resnet_weights_round_trip(random_backbone: Callable[[str], Backbone], tmp_path: Path) -> None:
    """A classifier state dict (timm and torchvision share the names) loads without its ``fc``."""
    source = random_backbone("resnet101").eval()
    state = {**source.encoder.state_dict(), "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    torch.save(state, tmp_path / "resnet101.pth")
    backbone = build_backbone(_config("resnet101", weights=str(tmp_path / "resnet101.pth"))).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), source(images))
