"""ViTSC (kind ``vitsc``): the spec's hand-checkable tests (``shared/reference/vitsc.md`` section
10: shapes, the size check, the L-Encoder's strides and parameter count, identity at
initialisation, interleaving, the kernel soft-argmax, the lookup, the pseudo flow, EPE, the triplet
loss, their combination, the learned temperature, a resolution change, where gradients go), the
issue's outside checks (the paper's config, finite points inside the image, a tiny model that
overfits one pair, a checkpoint round trip), the ablation knobs, and the demo config trained
through Ray Train then evaluated by ``sm_eval`` (e2e)."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sm_model.backbones import BACKBONES, create_encoder
from sm_model.checkpoint import load_checkpoint, load_model, save_checkpoint
from sm_model.config import ConfigError, ModelConfig, from_dict, model_kinds, replace_fields, vit_patch
from sm_model.factory import create_model
from sm_model.matching import Matches
from sm_model.registry import build_model
from sm_model.vitsc import VitscOptions
from sm_model.vitsc.config import size_multiple
from sm_model.vitsc.correlation import coarse_flow, cosine_correlation, local_lookup, read_flow
from sm_model.vitsc.cross_perception import CrossPerception, CrossPerceptionBlock, sine_positions
from sm_model.vitsc.losses import epe_loss, pseudo_flow, triplet_loss
from sm_model.vitsc.low_encoder import LowEncoder
from sm_model.vitsc.model import FlowMatches, ViTSC
from sm_model.vitsc.upsampler import FlowUpsampler, upsample
from sm_train.config import load_config, resolve_paths, trainable_kinds
from tests.conftest import REPO_ROOT
from tests.random_inputs import random_images, random_keypoints
from tests.test_train_kinds import assert_evaluates, train_demo

TINY = ModelConfig(
    kind="vitsc", backbone="dinov2_vits14", image_size=56, finetune="last_blocks", finetune_blocks=4, final_norm=True
)
"""The paper's architecture on a ViT-S/14 at 56 px, random weights: 4 x 4 tokens, a 7 x 7 coarse
grid, a 14 x 14 low-level grid, a 56 x 56 flow."""

L_ENCODER_PARAMETERS = 2_782_784
PROJECTION_B14 = 768 * 256 + 256
CROSS_PERCEPTION_LAYER = 2 * (16 * 256**2 + 21 * 256)
UPSAMPLER = (81 * 256 + 256) + (256 * 192 * 9 + 192) + (2 * 128 * 49 + 128) + (128 * 64 * 9 + 64) + (256 * 256 * 9 + 256) + (256 * 2 * 9 + 2)


@pytest.fixture(scope="module")
def tiny() -> ViTSC:
    torch.manual_seed(0)
    return create_model(TINY)


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _meta_model(config: ModelConfig) -> ViTSC:
    with torch.device("meta"):
        return build_model(config)


# ---- the kind and its config -------------------------------------------------------------------


def test_vitsc_is_a_registered_trainable_kind_with_the_spec_defaults() -> None:
    info = model_kinds()["vitsc"]
    assert info.options is VitscOptions and info.trains and "vitsc" in trainable_kinds()
    options = VitscOptions()
    assert (options.dim, options.heads, options.layers, options.upsampler, options.radius) == (256, 8, 1, "guided_low", 4)
    assert (options.sigma, options.temperature, options.kernel, options.uses_low_encoder) == (5.0, 0.03, True, True)
    assert (options.epe_weight, options.aux_weight, options.margin, options.flow_halfwidth) == (1.0, 10.0, 0.3, None)
    assert [options.halfwidth(size) for size in (56, 224, 448)] == [2, 7, 14]
    assert VitscOptions(flow_halfwidth=1).halfwidth(224) == 1


def test_a_config_naming_the_kind_alone_is_the_papers_model() -> None:
    config = from_dict(ModelConfig, {"kind": "vitsc"}, "model section")
    assert config == ModelConfig.of_kind("vitsc")
    assert (config.backbone, config.image_size, config.finetune, config.finetune_blocks, config.final_norm) == (
        "dinov2_vitb14", 224, "last_blocks", 4, True
    )
    model = _meta_model(config)
    trainable = {name.split(".")[2] for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"8", "9", "10", "11"}
    assert 5.0e6 <= sum(p.numel() for name, p in model.named_parameters() if not name.startswith("backbone.")) <= 8.5e6
    assert from_dict(ModelConfig, {"kind": "vitsc", "image_size": 448}, "x").image_size == 448


@pytest.mark.parametrize("dataset", ["spair", "pfpascal"])
def test_the_paper_configs_build_dinov2_b14_at_224_with_blocks_8_to_11_trainable(dataset: str) -> None:
    config = load_config(REPO_ROOT / f"configs/vitsc_dinov2_vitb14_224_{dataset}.yaml")
    model_config, optim = config.model, config.optim
    assert (model_config.kind, model_config.backbone, model_config.weights, model_config.image_size) == (
        "vitsc", "dinov2_vitb14", "hub", 224
    )
    assert (model_config.finetune, model_config.finetune_blocks, model_config.final_norm) == ("last_blocks", 4, True)
    assert model_config.options == VitscOptions(low_weights="hub")
    assert (optim.optimizer, optim.lr, optim.backbone_lr, optim.weight_decay) == ("adam", 3e-5, 3e-6, 0.0)
    assert (optim.lr_schedule, optim.lr_milestones) == ("epochs", ())
    assert (config.train.batch_size * config.run.num_workers, config.train.epochs) == (16, {"spair": 10, "pfpascal": 50}[dataset])

    model = _meta_model(replace_fields(model_config, {"weights": None, "vitsc.low_weights": None}, "test"))
    trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
    blocks_8_to_11 = {
        f"encoder.blocks.{index}.{name}" for index in range(8, 12) for name, _ in model.backbone.encoder.blocks[index].named_parameters()
    }
    assert trainable == blocks_8_to_11
    besides_vit = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("backbone."))
    assert 5.0e6 <= besides_vit <= 8.5e6
    assert (_count(model.low_encoder), _count(model.proj), _count(model.cross), _count(model.upsampler)) == (
        L_ENCODER_PARAMETERS, PROJECTION_B14, CROSS_PERCEPTION_LAYER, UPSAMPLER
    )
    assert besides_vit == L_ENCODER_PARAMETERS + PROJECTION_B14 + CROSS_PERCEPTION_LAYER + UPSAMPLER + 1  # + tau
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("backbone."))


def test_the_demo_config_loads() -> None:
    config = load_config(REPO_ROOT / "configs/vitsc_demo.yaml")
    assert (config.model.kind, config.model.backbone, config.model.weights, config.model.options.low_weights) == (
        "vitsc", "dinov2_vits14", None, None
    )
    assert config.model.image_size % 56 == 0
    # Ray workers run elsewhere: a local L-Encoder weights file resolves like the backbone's.
    local = load_config(REPO_ROOT / "configs/vitsc_demo.yaml", ["model.vitsc.low_weights=weights/resnet18.pth"])
    resolved = resolve_paths(local, Path("/base"))
    assert resolved.model.options.low_weights == "/base/weights/resnet18.pth" and resolved.model.weights is None


def test_the_size_check_follows_the_backbone_patch() -> None:
    assert ModelConfig(kind="vitsc", image_size=224).image_size == 224  # spec test 2
    with pytest.raises(ValueError, match="multiple of 56 .*got 70 \\(e.g. 56"):
        ModelConfig(kind="vitsc", image_size=70)  # a multiple of 14, not of 8
    with pytest.raises(ConfigError, match="model: vitsc needs image_size a multiple of 56"):
        load_config(REPO_ROOT / "configs/vitsc_demo.yaml", ["model.image_size=84"])
    # iBOT's patch 16: lcm(16, 8) = 16.
    assert size_multiple("ibot_vitb16") == 16 and size_multiple("dinov2_vitl14_reg4") == 56
    ModelConfig(kind="vitsc", backbone="ibot_vitb16", image_size=64)
    with pytest.raises(ValueError, match="multiple of 16"):
        ModelConfig(kind="vitsc", backbone="ibot_vitb16", image_size=56)
    with pytest.raises(ValueError, match="vitsc needs a ViT backbone"):
        ModelConfig(kind="vitsc", backbone="resnet18", image_size=224)
    for name, spec in BACKBONES.items():  # the torch-free patch reading agrees with the registry
        assert vit_patch(name) == (spec.strides[0] if spec.kind == "vit" else None), name


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"vitsc": {"dim": 100, "heads": 8}}, "dim 100 must be a multiple of heads 8"),
        ({"vitsc": {"dim": 6, "heads": 2}}, "dim must be a multiple of 4"),
        ({"vitsc": {"radius": 33}}, "vitsc.radius must be between 0 and 32"),
        ({"vitsc": {"layers": -1}}, "vitsc.layers must be between 0 and 64"),
        ({"vitsc": {"temperature": 0.0}}, "vitsc.temperature must be a finite number above 0"),
        ({"vitsc": {"upsampler": "nearest"}}, "vitsc.upsampler='nearest' is not one of"),
        ({"vitsc": {"low_encoder": False}}, "low_encoder is off but the guided_low upsampler"),
        ({"vitsc": {"low_encoder": True, "upsampler": "cnn"}}, "low_encoder is on but the 'cnn' upsampler"),
        ({"localizer": "argmax"}, "localizer must be null"),
        ({"pixel_convention": "official"}, "'center' pixel convention"),
        ({"simplematch": {}}, "model.simplematch is the section of kind 'simplematch'"),
    ],
)
def test_options_out_of_range_are_errors_naming_the_key(settings: dict, message: str) -> None:
    document = {"kind": "vitsc", "backbone": "dinov2_vits14", "image_size": 56, **settings}
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, document, "f.yaml", "model.")
    # Off where nothing reads it: the L-Encoder is not built.
    for upsampler in ("guided_high", "cnn", "bilinear"):
        options = VitscOptions(upsampler=upsampler, low_encoder=False)
        assert not options.uses_low_encoder and not VitscOptions(upsampler=upsampler).uses_low_encoder


# ---- modules (spec section 10) -----------------------------------------------------------------


def test_module_shapes(tiny: ViTSC) -> None:
    """Spec test 1: every row of the shape table at S = 56, B = 2, N = 3."""
    seen: dict[str, object] = {}

    def keep(name: str):
        return lambda module, inputs, output: seen.__setitem__(name, (inputs, output))

    hooks = [getattr(tiny, name).register_forward_hook(keep(name)) for name in ("backbone", "proj", "cross", "low_encoder", "upsampler")]
    src, trg = random_images(2, 56)
    kps = random_keypoints(2, 3, 56)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    try:
        with torch.no_grad():
            encoded = tiny.encode(src, trg)
            outputs = tiny.match(encoded, kps, valid)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["backbone"][1][0].shape == (4, 384, 4, 4)  # F^A and F^B: [2B, C, t, t]
    assert seen["proj"][1].shape == (4, 16, 256)
    assert [y.shape for y in seen["cross"][1]] == [(2, 16, 256)] * 2  # enhanced F^A', F^B'
    assert encoded.src.shape == encoded.trg.shape == (2, 256, 7, 7)  # stride 8
    assert cosine_correlation(encoded.src, encoded.trg).shape == (2, 49, 7, 7)  # C, P: [B, 49, 49]
    assert encoded.coarse_flow.shape == (2, 2, 7, 7)
    assert seen["low_encoder"][1].shape == (4, 256, 14, 14)
    coarse_input, local, size = seen["upsampler"][0]
    assert coarse_input.shape == (2, 2, 7, 7) and local.shape == (2, 81, 7, 7) and size == 56
    assert encoded.flow.shape == (2, 2, 56, 56) and encoded.size == 56 and encoded.batch_size == 2
    coarse, fine = outputs
    assert isinstance(coarse, Matches) and isinstance(fine, FlowMatches)
    assert fine.flow.shape == (2, 2, 56, 56) and fine.src_features.shape == (2, 3, 256)
    for matches in outputs:
        assert matches.points.shape == (2, 3, 2) and matches.scores.shape == (2, 3, 7, 7) and matches.stride == 8
        assert torch.isfinite(matches.points).all()  # the padded keypoint too
    assert torch.equal(fine.scores, coarse.scores)


def test_the_l_encoder_keeps_stride_4_and_has_2_782_784_parameters() -> None:
    """Spec test 3."""
    torch.manual_seed(0)
    encoder = LowEncoder()
    assert _count(encoder) == L_ENCODER_PARAMETERS
    for layer in (encoder.layer2, encoder.layer3):
        assert layer[0].conv1.stride == (1, 1) and layer[0].downsample[0].stride == (1, 1)
    assert not hasattr(encoder, "layer4") and not hasattr(encoder, "fc")
    assert not any(isinstance(m, nn.Conv2d) and m.dilation != (1, 1) for m in encoder.modules())
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 56, 56)).shape == (1, 256, 14, 14)
        assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 256, 56, 56)


def test_the_l_encoder_reads_a_local_resnet18_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    resnet = create_encoder(BACKBONES["resnet18"])
    state = {**resnet.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}  # torchvision layout
    torch.save(state, tmp_path / "resnet18.pth")
    encoder = LowEncoder(str(tmp_path / "resnet18.pth"))
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, state[name]), name
    with pytest.raises(FileNotFoundError, match="L-Encoder"):
        LowEncoder(str(tmp_path / "missing.pth"))


def test_cross_perception_and_upsampler_are_the_identity_at_init() -> None:
    """Spec test 4: zero-initialised outputs make X3 == X, Y3 == Y and M' == up(M) exactly."""
    torch.manual_seed(0)
    cross = CrossPerception(256, 8, 1)
    x, y = torch.randn(2, 2, 16, 256).unbind(0)
    x3, y3 = cross(x, y, 4, 4)
    assert torch.equal(x3, x) and torch.equal(y3, y)
    upsampler = FlowUpsampler("guided_low", 4)
    flow, local = torch.randn(2, 2, 7, 7) * 8, torch.rand(2, 81, 7, 7)
    assert torch.equal(upsampler(flow, local, 56), upsample(flow, 56))
    assert torch.equal(FlowUpsampler("cnn", 4)(flow, None, 56), upsample(flow, 56))


def test_the_target_block_sees_the_updated_source() -> None:
    """Spec test 5: block 2 (target) depends on block 1's parameters; X3 not on block 2's."""
    torch.manual_seed(0)
    cross = CrossPerception(32, 4, 1)
    with torch.no_grad():
        for block in cross.modules():
            if isinstance(block, CrossPerceptionBlock):
                for last in (block.cross.out, block.self_attention.out, block.ffn[-1]):
                    last.weight.normal_(std=0.1)
    x, y = torch.randn(2, 1, 9, 32).unbind(0)
    x3, y3 = cross(x, y, 3, 3)
    (layer,) = cross.layers
    source, target = list(layer.source.parameters()), list(layer.target.parameters())
    from_source = torch.autograd.grad(y3.sum(), source, retain_graph=True, allow_unused=True)
    assert all(g is not None for g in from_source) and any(g.abs().sum() > 0 for g in from_source)
    assert all(g is None for g in torch.autograd.grad(x3.sum(), target, allow_unused=True))
    # The position encoding: [n, d], the first half from the row, the second from the column, and
    # the same for the same fraction of the image at any grid size (the centre of 3 x 3 and 5 x 5).
    positions = sine_positions(3, 3, 32).view(3, 3, 32)
    assert torch.equal(positions[:, :1, :16].expand(3, 3, 16), positions[..., :16])
    assert torch.equal(positions[:1, :, 16:].expand(3, 3, 16), positions[..., 16:])
    torch.testing.assert_close(positions[1, 1], sine_positions(5, 5, 32).view(5, 5, 32)[2, 2])


def test_kernel_soft_argmax_of_identical_maps_is_zero_flow() -> None:
    """Spec test 6: F~^A = F~^B i.i.d. normal, T = 0.03, sigma = 5: |M| < 1e-4 px."""
    features = torch.randn(1, 256, 7, 7, generator=torch.Generator().manual_seed(0))
    flow, matches = coarse_flow(cosine_correlation(features, features), torch.tensor(0.03), 5.0, 8)
    assert flow.shape == (1, 2, 7, 7) and matches.shape == (1, 49, 2)
    assert flow.abs().max() < 1e-4


def test_kernel_soft_argmax_follows_a_one_column_shift() -> None:
    """Spec test 7: F~^B[..., c + 1] = F~^A[..., c]: source columns 0..h-2 move by (8, 0) px."""
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(1, 256, 7, 7, generator=generator)
    trg = torch.cat([torch.randn(1, 256, 7, 1, generator=generator), src[..., :-1]], dim=-1)
    temperature = torch.tensor(0.03, requires_grad=True)
    flow, _ = coarse_flow(cosine_correlation(src, trg), temperature, 5.0, 8)
    torch.testing.assert_close(flow[0, 0, :, :-1], torch.full((7, 6), 8.0), rtol=0, atol=1e-3)
    torch.testing.assert_close(flow[0, 1, :, :-1], torch.zeros(7, 6), rtol=0, atol=1e-3)
    flow.sum().backward()
    assert temperature.grad is not None  # the gradient reaches the temperature
    # Without the kernel: the plain soft-argmax, the same answer on such clean maps.
    plain, _ = coarse_flow(cosine_correlation(src, trg), 0.03, None, 8)
    torch.testing.assert_close(plain[0, 0, :, :-1], torch.full((7, 6), 8.0), rtol=0, atol=1e-3)


def test_the_lookup_reads_the_window_around_the_coarse_match() -> None:
    """Spec test 8: a single 1 in C_low at (v=5, u=6) lands in the centre channel when the coarse
    match is that cell's centre (25.5, 21.5), one channel left when the match moves +4 px in x."""
    radius, i0 = 4, 10
    correlation = torch.zeros(1, 49, 14, 14)
    correlation[0, i0, 5, 6] = 1.0
    matches = torch.zeros(1, 49, 2)
    centre = radius * (2 * radius + 1) + radius
    for shift, channel in ((0.0, centre), (4.0, centre - 1)):
        matches[0, i0] = torch.tensor([25.5 + shift, 21.5])
        local = local_lookup(correlation, (matches - 1.5) / 4, radius, (7, 7))
        assert local.shape == (1, 81, 7, 7)
        expected = torch.zeros(1, 81, 7, 7)
        expected[0, channel, i0 // 7, i0 % 7] = 1.0
        torch.testing.assert_close(local, expected, rtol=0, atol=1e-6)


def test_the_flow_is_read_bilinearly_at_keypoints() -> None:
    """Spec 3.8: ``M'`` read at the sub-pixel keypoint (centre convention), the border's flow beyond it."""
    flow = torch.zeros(1, 2, 4, 4)
    flow[0, 0] = torch.arange(4.0)  # x-flow = the column
    flow[0, 1] = torch.arange(4.0)[:, None] * 10  # y-flow = 10 x the row
    points = torch.tensor([[[1.0, 2.0], [1.25, 2.5], [-0.5, 3.5], [9.0, -3.0]]])
    expected = torch.tensor([[[1.0, 20.0], [1.25, 25.0], [0.0, 30.0], [3.0, 0.0]]])
    torch.testing.assert_close(read_flow(flow, points), expected)


def test_the_pseudo_flow_supervises_the_square_around_each_keypoint() -> None:
    """Spec test 9, then the overlap, border and validity rules."""
    src, trg = torch.tensor([[[10.0, 10.0]]]), torch.tensor([[[30.0, 20.0]]])
    flow, mask = pseudo_flow(src, trg, torch.ones(1, 1, dtype=torch.bool), 56, 1)
    rows, columns = torch.nonzero(mask[0], as_tuple=True)
    assert sorted(zip(rows.tolist(), columns.tolist())) == [(y, x) for y in (9, 10, 11) for x in (9, 10, 11)]
    assert torch.equal(flow[0][:, mask[0]], torch.tensor([[20.0] * 9, [10.0] * 9]))
    assert flow[0][:, ~mask[0]].abs().sum() == 0

    # Overlap: pixel x = 11 is 1.2 from p1 (9.8) and 1.0 from p2 (12.0): p2 wins; equal distances go to the lower index.
    src = torch.tensor([[[9.8, 20.0], [12.0, 20.0], [30.0, 30.0], [32.0, 30.0]]])
    trg = src + torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]])
    flow, mask = pseudo_flow(src, trg, torch.ones(1, 4, dtype=torch.bool), 56, 1)
    assert flow[0, 0, 20, 10].item() == 1.0 and flow[0, 0, 20, 11].item() == 2.0
    assert flow[0, 0, 30, 31].item() == 3.0  # 1 px from both 30 and 32: the first keypoint
    # Clipped at the image border; an invalid keypoint supervises nothing, even with a NaN target.
    src = torch.tensor([[[0.2, 55.0], [20.0, 20.0]]])
    trg = torch.tensor([[[5.0, 50.0], [float("nan"), 0.0]]])
    flow, mask = pseudo_flow(src, trg, torch.tensor([[True, False]]), 56, 1)
    assert mask[0].sum() == 4 and mask[0, 54:, :2].all() and torch.isfinite(flow).all()


def test_epe_is_the_mean_end_point_error_over_supervised_pixels() -> None:
    """Spec test 10: 5.0 for one keypoint with displacement (3, 4); 2.5 with a second, zero one."""
    prediction = torch.zeros(1, 2, 56, 56, requires_grad=True)
    one = torch.ones(1, 1, dtype=torch.bool)
    flow, mask = pseudo_flow(torch.tensor([[[10.0, 10.0]]]), torch.tensor([[[13.0, 14.0]]]), one, 56, 1)
    assert epe_loss(prediction, flow, mask).item() == pytest.approx(5.0)
    src = torch.tensor([[[10.0, 10.0], [40.0, 40.0]]])
    flow, mask = pseudo_flow(src, src + torch.tensor([[[3.0, 4.0], [0.0, 0.0]]]), torch.ones(1, 2, dtype=torch.bool), 56, 1)
    assert mask.sum() == 18
    loss = epe_loss(prediction, flow, mask)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    assert torch.isfinite(prediction.grad).all()  # zero error at the unsupervised pixels: no NaN
    empty = epe_loss(prediction, flow, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_triplet_loss_by_hand() -> None:
    """Spec test 11."""
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    positives = torch.tensor([[[0.6, 0.8], [0.8, 0.6]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    term = math.sqrt(0.8) - math.sqrt(0.4) + 0.3
    assert term == pytest.approx(0.561972, abs=1e-6)
    assert triplet_loss(anchors, positives, valid, 0.3).item() == pytest.approx(term, abs=1e-6)
    assert triplet_loss(anchors, positives.flip(1), valid, 0.3).item() == pytest.approx(0.038029, abs=1e-6)
    assert triplet_loss(anchors, anchors.clone(), valid, 0.3).item() == pytest.approx(0.0, abs=1e-6)
    # Unnormalised features are L2-normalised first.
    assert triplet_loss(anchors * 7, positives * 0.1, valid, 0.3).item() == pytest.approx(term, abs=1e-6)
    # One valid keypoint (or none): 0, connected to the graph; invalid ones are no negatives either.
    features = anchors.clone().requires_grad_()
    single = triplet_loss(features, positives, torch.tensor([[True, False]]), 0.3)
    assert single.item() == 0.0 and single.requires_grad
    three = torch.cat([anchors, torch.tensor([[[0.0, 1.0]]])], dim=1), torch.cat([positives, torch.tensor([[[1.0, 0.0]]])], dim=1)
    assert triplet_loss(*three, torch.tensor([[True, True, False]]), 0.3).item() == pytest.approx(term, abs=1e-6)
    # The mean over pairs with at least two valid keypoints: the second pair's 0 counts, the third not.
    batch = torch.cat([anchors, anchors, anchors]), torch.cat([positives, anchors, positives])
    mixed = torch.tensor([[True, True], [True, True], [True, False]])
    assert triplet_loss(*batch, mixed, 0.3).item() == pytest.approx(term / 2, abs=1e-6)


def test_the_loss_is_epe_plus_ten_triplet() -> None:
    """Spec test 12: 1 x 5.0 + 10 x 0.561972 = 10.61972. Target keypoints at stride-8 cell centres
    (11.5 = cell 1, 35.5 = cell 4) read exactly the features put there."""
    config = ModelConfig(
        kind="vitsc", backbone="dinov2_vits14", image_size=56, options=VitscOptions(flow_halfwidth=1)
    )
    target = torch.tensor([[[11.5, 11.5], [35.5, 35.5]]])
    src_kps = target - torch.tensor([[[3.0, 4.0], [4.0, 3.0]]])  # |displacement| = 5 for both
    trg_map = torch.zeros(1, 2, 7, 7)
    trg_map[0, :, 1, 1] = torch.tensor([0.6, 0.8])
    trg_map[0, :, 4, 4] = torch.tensor([0.8, 0.6])
    fine = FlowMatches(
        points=src_kps, scores=torch.zeros(1, 2, 7, 7), stride=8, flow=torch.zeros(1, 2, 56, 56), src_kps=src_kps,
        src_features=torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), trg_map=trg_map,
    )
    model = SimpleNamespace(config=config)  # the loss reads only the config
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert ViTSC.loss(model, [fine], target, valid).item() == pytest.approx(10.61972, abs=1e-5)
    epe_only = SimpleNamespace(config=replace_fields(config, {"vitsc.aux_weight": 0.0}, "test"))
    assert ViTSC.loss(epe_only, [fine], target, valid).item() == pytest.approx(5.0, abs=1e-6)


def test_the_temperature_is_learned(tiny: ViTSC) -> None:
    """Spec test 13: T starts at 0.03, gets a gradient from the EPE alone, stays positive after a step."""
    model = copy.deepcopy(tiny)
    model.config = replace_fields(model.config, {"vitsc.aux_weight": 0.0}, "test")
    assert model.temperature.item() == pytest.approx(0.03) and model.log_temperature.item() == pytest.approx(math.log(0.03))
    src, trg = random_images(1, 56)
    kps, valid = random_keypoints(1, 4, 56), torch.ones(1, 4, dtype=torch.bool)
    model.loss(model(src, trg, kps, valid), random_keypoints(1, 4, 56, seed=2), valid).backward()
    assert model.log_temperature.grad is not None and model.log_temperature.grad.abs() > 0
    torch.optim.Adam([model.log_temperature], lr=1.0).step()
    assert model.temperature.item() > 0 and model.temperature.item() != pytest.approx(0.03)


def test_where_the_gradients_go(tiny: ViTSC) -> None:
    """Spec test 15: blocks 8-11 of the ViT get gradients, 0-7 none; the L-Encoder, the projection,
    the cross-perception, the upsampler and tau all get some. The flow head's last conv starts at
    zero, so on the very first step nothing reaches the L-Encoder (its only path): the check is on
    the second step, as in training."""
    model = copy.deepcopy(tiny).train()
    src, trg = random_images(2, 56)
    kps, valid = random_keypoints(2, 5, 56), torch.ones(2, 5, dtype=torch.bool)
    target = random_keypoints(2, 5, 56, seed=2)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.loss(model(src, trg, kps, valid), target, valid).backward()
    assert all(p.grad is not None for p in model.low_encoder.parameters())
    assert all(p.grad.abs().sum() == 0 for p in model.low_encoder.parameters())  # the zero-initialised head
    optimizer.step()
    optimizer.zero_grad()
    model.loss(model(src, trg, kps, valid), target, valid).backward()
    blocks = model.backbone.encoder.blocks
    for index, block in enumerate(blocks):
        gradients = [p.grad for p in block.parameters()]
        if index < 8:
            assert all(not p.requires_grad and p.grad is None for p in block.parameters()), index
        else:
            assert all(g is not None for g in gradients) and sum(g.abs().sum() for g in gradients) > 0, index
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if not n.startswith("encoder.blocks."))
    for part in (model.low_encoder, model.proj, model.cross, model.upsampler):
        assert all(p.grad is not None for p in part.parameters())  # every trainable parameter is in the graph (DDP)
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0
    assert model.log_temperature.grad.abs() > 0


# ---- outside checks ----------------------------------------------------------------------------


def test_points_are_finite_and_inside_the_image_on_every_scale(tiny: ViTSC) -> None:
    src, trg = random_images(2, 56, seed=5)
    kps = torch.tensor([[[0.0, 0.0], [55.0, 55.0], [-0.5, 27.0], [30.0, 1e9]], [[10.0, 40.0], [27.5, 27.5], [3.0, 50.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    with torch.no_grad():
        outputs = tiny.eval()(src, trg, kps, valid)
    tiny.train()
    for matches in outputs:
        assert torch.isfinite(matches.points).all()
        assert (matches.points >= -0.5).all() and (matches.points <= 55.5).all()
    # Under bfloat16 autocast the points and the flow stay float32.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = tiny(src, trg, kps, valid)
    assert all(m.points.dtype == torch.float32 and torch.isfinite(m.points).all() for m in outputs)
    assert outputs[-1].flow.dtype == torch.float32


def test_a_tiny_vitsc_overfits_one_pair() -> None:
    """ViT-S/14 at 56 px with random weights (the paper's config with ``backbone`` and
    ``image_size`` overridden): 40 Adam steps at 1e-3 halve the loss and bring the points closer."""
    config = load_config(REPO_ROOT / "configs/vitsc_dinov2_vitb14_224_spair.yaml").model
    config = replace_fields(
        config, {"backbone": "dinov2_vits14", "image_size": 56, "weights": None, "vitsc.low_weights": None}, "test"
    )
    torch.manual_seed(0)
    model = create_model(config).train()
    src, trg = random_images(1, 56, seed=7)
    kps, target = random_keypoints(1, 6, 56, seed=8), random_keypoints(1, 6, 56, seed=9)
    valid = torch.ones(1, 6, dtype=torch.bool)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, errors = [], []
    for _ in range(40):
        outputs = model(src, trg, kps, valid)
        loss = model.loss(outputs, target, valid)
        losses.append(loss.item())
        errors.append((outputs[-1].points - target).norm(dim=-1).mean().item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < losses[0] / 2, losses
    assert errors[-1] < errors[0], errors


def test_checkpoint_round_trip(tiny: ViTSC, tmp_path: Path) -> None:
    """Full and trainable-only checkpoints predict what the saved model predicts; the L-Encoder's
    weight file is not read again (it is in the checkpoint)."""
    low_file = tmp_path / "resnet18.pth"
    torch.save(create_encoder(BACKBONES["resnet18"]).state_dict(), low_file)
    config = replace_fields(TINY, {"vitsc.low_weights": str(low_file), "vitsc.layers": 2}, "test")
    torch.manual_seed(1)
    model = create_model(config).eval()
    with torch.no_grad():  # non-trivial cross-perception and flow head, moved BatchNorm statistics
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter), alpha=0.02)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
    src, trg = random_images(1, 56, seed=3)
    kps, valid = random_keypoints(1, 5, 56), torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        expected = model(src, trg, kps, valid)
    save_checkpoint(model, tmp_path / "full.pt")
    torch.manual_seed(1)  # the frozen random ViT of a trainable-only checkpoint is rebuilt from the seed
    save_checkpoint(model, tmp_path / "trainable.pt", trainable_only=True)
    low_file.unlink()
    for name in ("full.pt", "trainable.pt"):
        torch.manual_seed(1)
        loaded = load_model(tmp_path / name).eval()
        assert loaded.config.options.layers == 2 and loaded.config.options.low_weights is None
        with torch.no_grad():
            got = loaded(src, trg, kps, valid)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a.points, b.points, rtol=0, atol=1e-5)
            torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="vitsc.dim: checkpoint 256, model 128"):
        load_checkpoint(create_model(replace_fields(TINY, {"vitsc.dim": 128}, "test")), tmp_path / "full.pt")


def test_a_model_saved_at_one_size_predicts_at_another(tiny: ViTSC, tmp_path: Path) -> None:
    """Spec test 14 at CPU sizes: saved at 56, loaded and run at 112 (``load_model(...,
    image_size=112)``; the same weights, as the paper's 224 -> 448); and a 224 checkpoint of the
    paper's architecture loads at 448."""
    save_checkpoint(tiny, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt", image_size=112).eval()
    assert loaded.input_spec.size == 112 and loaded.config.options.halfwidth(112) == 4
    src, trg = random_images(1, 112)
    kps, valid = random_keypoints(1, 3, 112), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        encoded = loaded.encode(src, trg)
        coarse, fine = loaded.match(encoded, kps, valid)
    assert encoded.flow.shape == (1, 2, 112, 112) and encoded.src.shape == (1, 256, 14, 14)
    assert fine.scores.shape == coarse.scores.shape == (1, 3, 14, 14)
    assert torch.isfinite(fine.points).all() and torch.isfinite(coarse.points).all()
    for (name, value), saved in zip(loaded.state_dict().items(), tiny.state_dict().values(), strict=True):
        assert torch.equal(value, saved), name
    torch.manual_seed(0)
    save_checkpoint(create_model(replace_fields(TINY, {"image_size": 224}, "test")), tmp_path / "224.pt")
    at_448 = load_model(tmp_path / "224.pt", image_size=448)
    assert at_448.config.image_size == 448 and at_448.input_spec.size == 448


def test_ablation_knobs(tiny: ViTSC) -> None:
    """The paper's tables vary: cross-perception layers (0: none), the upsampler (bilinear, cnn,
    guided by C_high, guided by C_low), the L-Encoder, the kernel, the backbone."""
    src, trg = random_images(1, 56)
    kps, valid = random_keypoints(1, 4, 56), torch.ones(1, 4, dtype=torch.bool)
    target = random_keypoints(1, 4, 56, seed=4)
    variants = {  # knobs paired up to build fewer models; each knob is in one
        "layers=0, bilinear": ({"vitsc.layers": 0, "vitsc.upsampler": "bilinear"}, 384),
        "layers=3, cnn, no kernel": ({"vitsc.layers": 3, "vitsc.upsampler": "cnn", "vitsc.kernel": False}, 256),
        "guided_high": ({"vitsc.upsampler": "guided_high", "vitsc.low_encoder": False}, 256),
    }
    for name, (overrides, channels) in variants.items():
        torch.manual_seed(0)
        model = create_model(replace_fields(TINY, overrides, name))
        options = model.config.options
        assert (model.low_encoder is not None) == (options.upsampler == "guided_low"), name
        assert (model.cross is None) == (options.layers == 0) and (model.proj is None) == (options.layers == 0), name
        if model.cross is not None:
            assert len(model.cross.layers) == options.layers
        outputs = model(src, trg, kps, valid)
        assert outputs[0].scores.shape == (1, 4, 7, 7) and outputs[-1].src_features.shape == (1, 4, channels), name
        loss = model.loss(outputs, target, valid)
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert math.isfinite(loss.item()) and all(p.grad is not None for p in trainable), name  # DDP: no unused parameter
    upsampler_parameters = {
        name: _count(_meta_model(replace_fields(TINY, {"vitsc.upsampler": name}, name)).upsampler)
        for name in ("bilinear", "cnn", "guided_high", "guided_low")
    }
    assert upsampler_parameters["bilinear"] == 0
    assert upsampler_parameters["guided_high"] == upsampler_parameters["guided_low"] == UPSAMPLER
    assert upsampler_parameters["cnn"] == UPSAMPLER - (81 * 256 + 256) - (256 * 192 * 9 + 192) - 192 * 256 * 9
    # Other backbones (meta device, nothing computed): DINOv2-L/14 and iBOT ViT-B/16, its size a multiple of 16.
    large = _meta_model(dataclasses.replace(TINY, backbone="dinov2_vitl14", image_size=224))
    assert _count(large.proj) == 1024 * 256 + 256
    ibot = _meta_model(dataclasses.replace(TINY, backbone="ibot_vitb16", image_size=224, finetune_blocks=8))
    assert ibot.backbone.spec.strides == (16,) and _count(ibot.proj) == PROJECTION_B14
    with pytest.raises(ValueError, match="multiples of 56"):
        tiny.encode(*random_images(1, 84))


@pytest.mark.e2e
def test_the_demo_trains_through_ray_train_and_evaluates(ray_cluster: str, demo_shards: Path, tmp_path: Path) -> None:
    _, result = train_demo(REPO_ROOT / "configs/vitsc_demo.yaml", demo_shards, tmp_path, "vitsc", 3)
    assert result.metrics["lr"] == pytest.approx(3e-5) and result.metrics["lr/backbone"] == pytest.approx(3e-6)
    with result.checkpoint.as_directory() as directory:
        assert_evaluates(Path(directory) / "model.pt", demo_shards, tmp_path / "eval", "vitsc")
