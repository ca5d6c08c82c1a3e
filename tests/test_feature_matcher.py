"""The backbone-feature kinds (sm_model.feature_matcher, sm_model.registry) on random weights:
the survey baseline (ViT-S/14 at 28 px: a 2x2 token map, the last 2 blocks fine-tuned, final
LayerNorm) and zero-shot models; where gradients go; the final LayerNorm; zero-shot configs from
specs; checkpoints of every kind (strict round trips, trainable-only, kind mismatches, files from
before kinds); and predict_matches mapping cell centres of an image onto itself."""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sm_model.checkpoint import checkpoint_bytes, load_checkpoint, load_model, save_checkpoint
from sm_model.config import ModelConfig
from sm_model.feature_matcher.model import FeatureMatcher
from sm_model.matcher import MatchModel
from sm_model.registry import build_model, zero_shot_config
from sm_model.simplematch import SimpleMatchOptions
from sm_model.simplematch.model import SimpleMatch
from tests.random_inputs import random_images

BASELINE = ModelConfig(
    kind="baseline", backbone="dinov2_vits14", image_size=28, finetune="last_blocks", finetune_blocks=2, final_norm=True
)
"""ViT-S/14 (12 blocks) at 28 px: a 2x2 map at stride 14; blocks 10 and 11 train."""
ZERO_SHOT = zero_shot_config("zero-shot:dinov2_vits14", weights=None, image_size=28)
SIMPLEMATCH = ModelConfig(backbone="dinov2_vits14", image_size=28, window_size=3, options=SimpleMatchOptions(decoder_channels=8, coarse_window_sizes=(None, 3)))
"""SimpleMatch at 28 px: a 7x7 map at stride 4."""
LAST_BLOCKS = ("backbone.encoder.blocks.10.", "backbone.encoder.blocks.11.")
NORM_KEYS = {"backbone.encoder.norm.weight", "backbone.encoder.norm.bias"}


def _random_model(config: ModelConfig, seed: int = 123) -> MatchModel:
    """``build_model(config)`` with seeded random weights, fast: built on the meta device (no
    timm initialisation, about 1.5 s for ViT-S on CPU), then every parameter drawn afresh
    (normalisation weights near 1, BatchNorm statistics of unit scale). The trainability the build
    set is kept."""
    with torch.device("meta"):
        model = build_model(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, (nn.LayerNorm, nn.BatchNorm2d))
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if name == "num_batches_tracked":
                    tensor.fill_(7)
                elif name == "running_var":
                    tensor.uniform_(0.5, 2.0, generator=generator)
                elif norm and name == "weight":
                    tensor.normal_(1.0, 0.1, generator=generator)
                else:
                    tensor.normal_(0.0, 0.05, generator=generator)
    return model


def _assert_same_state(first: nn.Module, second: nn.Module) -> None:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key


@pytest.fixture(scope="module")
def baseline() -> FeatureMatcher:
    """Built as it is for training, timm's initialisation included."""
    torch.manual_seed(0)
    return FeatureMatcher(BASELINE)


@pytest.fixture(scope="module")
def zero_shot() -> MatchModel:
    return _random_model(ZERO_SHOT)


# ----------------------------------------------------------------------------------- baseline kind

# Input pixels 10 and 17 are cells 0.25 and 0.75 of the 2x2 stride-14 map (centre convention,
# (x - 6.5) / 14): strictly inside, where the Gaussian cross-entropy reads; pixel 3 is outside.
TARGETS = torch.tensor([[[10.0, 17.0], [17.0, 10.0], [3.0, 20.0]], [[13.5, 13.5], [10.0, 10.0], [0.0, 0.0]]])
VALID = torch.tensor([[True, True, True], [True, True, False]])


def test_baseline_forward_shapes(baseline: FeatureMatcher) -> None:
    assert isinstance(build_model(BASELINE), FeatureMatcher)
    assert baseline.config.localizer_method == "kernel"
    src, trg = random_images(2, 28)
    with torch.no_grad():
        outputs = baseline(src, trg, TARGETS, VALID)
    assert len(outputs) == 1
    ((points, scores, stride),) = outputs
    assert stride == 14 and scores.shape == (2, 3, 2, 2) and points.shape == (2, 3, 2)
    assert points.dtype == torch.float32 and torch.isfinite(points).all()
    # Kernel soft-argmax points lie between the outer cell centres, pixels 6.5 and 20.5.
    assert (points >= 6.5 - 1e-4).all() and (points <= 20.5 + 1e-4).all()


def test_baseline_loss_is_finite_and_trains_only_the_last_two_blocks(baseline: FeatureMatcher) -> None:
    model = copy.deepcopy(baseline)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith(LAST_BLOCKS) for name in trainable)
    assert {name for name, _ in model.named_parameters() if name.startswith(LAST_BLOCKS)} == trainable
    src, trg = random_images(2, 28)
    loss = model.loss(model(src, trg, TARGETS, VALID), TARGETS, VALID)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters()}
    with_gradient = {name for name, gradient in gradients.items() if gradient is not None}
    assert with_gradient == trainable
    assert all(torch.isfinite(gradients[name]).all() for name in trainable)
    assert sum(gradients[name].abs().sum() for name in trainable) > 0


def test_final_norm_applies_the_layer_norm() -> None:
    with_norm = _random_model(BASELINE).eval()
    without_norm = _random_model(dataclasses.replace(BASELINE, final_norm=False), seed=0).eval()
    state = with_norm.state_dict()
    assert state.keys() - without_norm.state_dict().keys() == NORM_KEYS
    assert without_norm.state_dict().keys() <= state.keys()
    without_norm.load_state_dict({key: value for key, value in state.items() if key not in NORM_KEYS}, strict=True)
    src, trg = random_images(2, 28)
    with torch.no_grad():
        (normed,) = with_norm.backbone(src)
        (raw,) = without_norm.backbone(src)
        norm = with_norm.backbone.encoder.norm
        expected = F.layer_norm(raw.permute(0, 2, 3, 1), (raw.shape[1],), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(normed, expected.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(normed, raw, atol=1e-3)
        scores_with = with_norm(src, trg, TARGETS, VALID)[0].scores
        scores_without = without_norm(src, trg, TARGETS, VALID)[0].scores
    assert not torch.allclose(scores_with, scores_without, atol=1e-3)


def test_final_norm_needs_a_vit() -> None:
    with pytest.raises(ValueError, match="final_norm needs a ViT"):
        build_model(ModelConfig(kind="baseline", backbone="resnet18", image_size=64, finetune="full", final_norm=True))


# ---------------------------------------------------------------------------------- zero-shot kind


def test_zero_shot_is_frozen_and_has_no_loss(zero_shot: MatchModel) -> None:
    assert isinstance(zero_shot, FeatureMatcher) and zero_shot.config.localizer_method == "argmax"
    assert not any(parameter.requires_grad for parameter in zero_shot.parameters())
    src, trg = random_images(1, 28)
    keypoints, valid = TARGETS[:1], VALID[:1]
    outputs = zero_shot(src, trg, keypoints, valid)
    assert outputs[0].scores.shape == (1, 3, 2, 2) and not outputs[0].scores.requires_grad
    # Argmax points are cell centres: pixel 14 j + 6.5.
    assert set(outputs[0].points.flatten().tolist()) <= {6.5, 20.5}
    with pytest.raises(RuntimeError, match="zero-shot model has no loss"):
        zero_shot.loss(outputs, keypoints, valid)
    with pytest.raises(ValueError, match="finetune must be 'frozen'"):
        ModelConfig(kind="zero-shot", finetune="lora")


def test_zero_shot_configs_from_specs() -> None:
    vit = zero_shot_config("zero-shot:dinov2_vits14", weights=None)
    assert (vit.kind, vit.backbone, vit.weights, vit.finetune) == ("zero-shot", "dinov2_vits14", None, "frozen")
    assert vit.final_norm is True and vit.image_size == 252 and vit.localizer_method == "argmax"
    resnet = zero_shot_config("zero-shot:resnet18", weights=None)
    assert resnet.final_norm is False and resnet.image_size == 256
    ibot = zero_shot_config("zero-shot:ibot_vitb16", weights=None)
    assert ibot.final_norm is True and ibot.image_size == 256
    assert zero_shot_config("zero-shot:dinov2_vitb14", weights=None).image_size == 252
    assert zero_shot_config("zero-shot:dinov2_vits14").weights == "hub"  # the default; nothing built here
    overridden = zero_shot_config("zero-shot:dinov2_vits14", weights=None, image_size=28, localizer="kernel")
    assert overridden.image_size == 28 and overridden.localizer_method == "kernel"
    with pytest.raises(ValueError, match=r"zero-shot:dinov2_vitz14: unknown backbone 'dinov2_vitz14'"):
        zero_shot_config("zero-shot:dinov2_vitz14", weights=None)
    with pytest.raises(ValueError, match="is not a zero-shot model"):
        zero_shot_config("dinov2_vits14", weights=None)


def test_resnet_zero_shot_matches_on_the_last_stage() -> None:
    model = _random_model(zero_shot_config("zero-shot:resnet18", weights=None, image_size=64))
    assert not any(parameter.requires_grad for parameter in model.parameters())
    src, trg = random_images(2, 64)
    with torch.no_grad():
        ((points, scores, stride),) = model(src, trg, torch.full((2, 3, 2), 20.0), torch.ones(2, 3, dtype=torch.bool))
    assert stride == 32 and scores.shape == (2, 3, 2, 2) and points.shape == (2, 3, 2)
    assert set(points.flatten().tolist()) <= {15.5, 47.5}  # cell centres 32 j + 15.5


# ------------------------------------------------------------------------------------- checkpoints


def _predict(model: MatchModel, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    src, trg = random_images(2, size, seed=5)
    keypoints = torch.rand(2, 4, 2, generator=torch.Generator().manual_seed(6)) * 60
    sizes = torch.tensor([[60, 50], [40, 64]])
    points, score = model.predict_matches(src, trg, keypoints, torch.ones(2, 4, dtype=torch.bool), sizes, sizes.flip(1))
    return points, score


@pytest.mark.parametrize("config", [SIMPLEMATCH, ZERO_SHOT, BASELINE], ids=lambda config: config.kind)
def test_full_checkpoint_round_trip_of_every_kind(config: ModelConfig, tmp_path: Path) -> None:
    source = _random_model(config)
    save_checkpoint(source, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert type(loaded) is type(source) and loaded.config == config and loaded.config.kind == config.kind
    _assert_same_state(source, loaded)
    for expected, actual in zip(_predict(source, 28), _predict(loaded, 28), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_trainable_only_baseline_checkpoint_holds_the_last_two_blocks() -> None:
    source = _random_model(BASELINE)
    data = checkpoint_bytes(source, trainable_only=True)
    saved = torch.load(io.BytesIO(data), weights_only=True)
    assert saved["trainable_only"] is True and saved["config"]["kind"] == "baseline"
    expected = {key for key in source.state_dict() if key.startswith(LAST_BLOCKS)}
    assert expected and set(saved["state_dict"]) == expected
    loaded = load_model(data)
    assert isinstance(loaded, FeatureMatcher) and loaded.config == BASELINE
    loaded_state = loaded.state_dict()
    for key in expected:
        assert torch.equal(loaded_state[key], source.state_dict()[key]), key


def test_a_baseline_checkpoint_does_not_load_into_a_zero_shot_model(
    baseline: FeatureMatcher, zero_shot: MatchModel
) -> None:
    for trainable_only in (False, True):
        data = checkpoint_bytes(baseline, trainable_only=trainable_only)
        with pytest.raises(ValueError, match="another architecture: kind: checkpoint 'baseline', model 'zero-shot'"):
            load_checkpoint(zero_shot, data)


def test_a_checkpoint_from_before_kinds_loads_as_simplematch(tmp_path: Path) -> None:
    source = _random_model(SIMPLEMATCH)
    assert isinstance(source, SimpleMatch)
    save_checkpoint(source, tmp_path / "model.pt")
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    del checkpoint["config"]["kind"]
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert isinstance(loaded, SimpleMatch) and loaded.config.kind == "simplematch" and loaded.config == SIMPLEMATCH
    _assert_same_state(source, loaded)


# ---------------------------------------------------------------------------------- predict_matches


IDENTITY_CASES = {
    "zero-shot-vit": (dataclasses.replace(ZERO_SHOT, image_size=42), 14),
    "zero-shot-resnet": (zero_shot_config("zero-shot:resnet18", weights=None, image_size=96), 32),
    "baseline": (dataclasses.replace(BASELINE, image_size=42, localizer="argmax"), 14),
    "simplematch": (dataclasses.replace(SIMPLEMATCH, localizer="argmax"), 4),
}


@pytest.mark.parametrize("case", IDENTITY_CASES)
def test_predict_matches_maps_cell_centres_of_an_image_onto_themselves(case: str) -> None:
    config, stride = IDENTITY_CASES[case]
    model = _random_model(config)
    size = config.image_size
    side = size // stride
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cells = torch.stack((columns, rows), dim=-1).view(1, -1, 2).float()
    centres = stride * cells + (stride - 1) / 2  # input pixels of the cell centres
    image, _ = random_images(1, size, seed=7)
    valid = torch.ones(1, side * side, dtype=torch.bool)
    square = torch.tensor([[size, size]])
    points, score = model.predict_matches(image, image, centres, valid, square, square)
    assert torch.equal(points, centres)
    torch.testing.assert_close(score, torch.ones_like(score), rtol=0, atol=1e-5)
    # Through original images of twice the width and height: (x + 0.5) * 2 - 0.5 and back, exactly.
    original = (centres + 0.5) * 2 - 0.5
    points, _ = model.predict_matches(image, image, original, valid, 2 * square, 2 * square)
    assert torch.equal(points, original)