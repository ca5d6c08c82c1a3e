"""SimpleMatch end to end: forward on tiny inputs (any number of keypoints, invalid ones finite),
the official DINOv2 ViT-B/14 LoRA config at 252, multi-scale for a ViT and for ResNet, where
gradients go, predict()'s coordinate mapping, checkpoint round trips with their strict errors,
and the released checkpoint layout (generated here from one model and loaded into another)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from sm_model.backbones import BACKBONES, create_encoder
from sm_model.checkpoint import load_checkpoint, load_model, save_checkpoint
from sm_model.config import ModelConfig, to_dict
from sm_model.loss import keypoint_loss
from sm_model.matching import Matches
from sm_model.official import load_official_checkpoint
from sm_model.simplematch import SimpleMatchOptions
from sm_model.simplematch.model import SimpleMatch
from tests.random_inputs import random_images, random_keypoints

TINY = ModelConfig(backbone="dinov2_vits14", image_size=56, window_size=5, options=SimpleMatchOptions(decoder_channels=16, coarse_window_sizes=(None, 3)))
"""ViT-S/14 with LoRA on blocks 6-11 at 56 px: 4x4 tokens, a 14x14 map at 1/4."""


def _perturb(model: nn.Module, trainable_only: bool = False) -> nn.Module:
    """Noise on (trainable) parameters and random BatchNorm statistics, so that LoRA's zero B and
    the BatchNorm defaults cannot hide a weight that failed to load."""
    torch.manual_seed(123)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad or not trainable_only:
                parameter.add_(torch.randn_like(parameter), alpha=0.05)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model


def _weights_file(backbone: str, path: Path) -> str:
    """A local backbone weights file (timm layout) saved from a random model."""
    torch.save(create_encoder(BACKBONES[backbone]).state_dict(), path)
    return str(path)


def _run(model: SimpleMatch, size: int, count: int = 3) -> list[torch.Tensor]:
    src, trg = random_images(2, size)
    with torch.no_grad():
        outputs = model.eval()(src, trg, random_keypoints(2, count, size), torch.ones(2, count, dtype=torch.bool))
    return [matches.points for matches in outputs]


def _assert_same_state(first: nn.Module, second: nn.Module) -> None:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key


# ------------------------------------------------------------------------------------------ forward


def test_forward_predicts_inside_the_input_and_keeps_invalid_keypoints_finite() -> None:
    torch.manual_seed(0)
    model = SimpleMatch(TINY)
    src, trg = random_images(2, 56)
    keypoints = random_keypoints(2, 4, 56)
    keypoints[0, 3] = float("nan")
    keypoints[1, 2:] = -1.0  # the official padding value
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    ((predictions, scores, stride),) = model(src, trg, keypoints, valid)
    assert scores.shape == (2, 4, 14, 14) and stride == 4
    assert predictions.shape == (2, 4, 2) and predictions.dtype == torch.float32
    assert torch.isfinite(predictions).all()
    # Cell centres of the 14x14 stride-4 map span pixels 1.5 .. 53.5.
    assert (predictions >= 1.5).all() and (predictions <= 53.5).all()


@pytest.mark.parametrize("count", [0, 1, 45])
def test_any_number_of_keypoints(count: int) -> None:
    (predictions,) = _run(SimpleMatch(TINY), 56, count)
    assert predictions.shape == (2, count, 2)


def test_official_dinov2_config_at_252() -> None:
    torch.manual_seed(0)
    model = SimpleMatch(ModelConfig())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 24_193_536 + 368_640  # decoder + LoRA on fc2 of blocks 6-11, r = 16
    src, trg = random_images(1, 252)
    with torch.no_grad():
        (matches,) = model.eval()(src, trg, random_keypoints(1, 2, 252), torch.ones(1, 2, dtype=torch.bool))
    predictions = matches.points
    assert predictions.shape == (1, 2, 2) and torch.isfinite(predictions).all()


def test_multiscale_vit_predicts_coarse_to_fine_and_weighs_each_scale() -> None:
    model = SimpleMatch(dataclasses.replace(TINY, options=dataclasses.replace(TINY.options, multiscale=True, scale_weights=(0.5, 2.0, 3.0))))
    assert model.window_sizes == (None, 3, 5)
    src, trg = random_images(2, 56)
    keypoints, target = random_keypoints(2, 3, 56), random_keypoints(2, 3, 56, seed=2)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    outputs = model(src, trg, keypoints, valid)
    assert [matches.points.shape for matches in outputs] == [(2, 3, 2)] * 3
    assert [matches.stride for matches in outputs] == [14, 7, 4]
    points = [matches.points for matches in outputs]
    expected = sum(w * keypoint_loss(p, target, valid) for w, p in zip((0.5, 2.0, 3.0), points, strict=True))
    torch.testing.assert_close(model.loss(outputs, target, valid), expected)


def test_single_scale_loss_uses_the_last_weight() -> None:
    model = SimpleMatch(dataclasses.replace(TINY, options=dataclasses.replace(TINY.options, scale_weights=(5.0, 3.0, 2.0))))
    src, trg = random_images(2, 56)
    keypoints, target, valid = random_keypoints(2, 3, 56), random_keypoints(2, 3, 56, seed=2), torch.ones(2, 3, dtype=torch.bool)
    outputs = model(src, trg, keypoints, valid)
    expected = 2.0 * keypoint_loss(outputs[0].points, target, valid)
    torch.testing.assert_close(model.loss(outputs, target, valid), expected)


def test_multiscale_resnet() -> None:
    config = ModelConfig(backbone="resnet101", image_size=64, finetune="full", window_size=5, options=SimpleMatchOptions(decoder_channels=16, multiscale=True))
    predictions = _run(SimpleMatch(config), 64)
    assert [p.shape for p in predictions] == [(2, 3, 2)] * 3
    assert all(torch.isfinite(p).all() for p in predictions)


def test_gradients_reach_decoder_and_lora_and_not_the_frozen_backbone() -> None:
    model = SimpleMatch(TINY)
    with torch.no_grad():  # a non-zero B, so that A receives gradient too
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.normal_(std=0.1)
    src, trg = random_images(2, 56)
    keypoints, target, valid = random_keypoints(2, 3, 56), random_keypoints(2, 3, 56, seed=2), torch.ones(2, 3, dtype=torch.bool)
    model.loss(model(src, trg, keypoints, valid), target, valid).backward()
    gradients = {name: p.grad for name, p in model.named_parameters()}
    lora = {name for name in gradients if name.endswith(("lora_A", "lora_B"))}
    decoder = {name for name in gradients if name.startswith("decoder.")}
    assert len(lora) == 12 and decoder
    for name in lora | decoder:
        assert gradients[name] is not None and gradients[name].abs().sum() > 0, name
    assert all(gradients[name] is None for name in gradients.keys() - lora - decoder)


# ------------------------------------------------------------------------------------------ predict


def test_predict_maps_original_pixels_through_the_input_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = SimpleMatch(TINY).train()
    seen: dict[str, object] = {}

    def fake_match(encoded, src_kps, valid):
        seen.update(kps=src_kps.clone(), training=model.training, grad=torch.is_grad_enabled())
        finest = torch.tensor([[[4.75, 6.5], [-0.5, 55.5]]])  # input pixels
        scores = torch.arange(2 * 14 * 14, dtype=torch.float32).view(1, 2, 14, 14) / 1000
        coarse = Matches(torch.full_like(finest, float("nan")), torch.full_like(scores, float("nan")), 16)
        return [coarse, Matches(finest, scores, 4)]  # coarse first: predict must take the last

    monkeypatch.setattr(model, "match", fake_match)
    src, trg = random_images(1, 56)
    src_kps = torch.tensor([[[10.0, 3.0], [0.0, 0.0]]])
    src_sizes, trg_sizes = torch.tensor([[112, 28]]), torch.tensor([[28, 112]])
    predictions = model.predict(src, trg, src_kps, torch.ones(1, 2, dtype=torch.bool), src_sizes, trg_sizes)
    # Source, W = 112, H = 28 -> 56: x' = (10 + 0.5) * 56 / 112 - 0.5 = 4.75, y' = (3 + 0.5) * 2 - 0.5 = 6.5;
    # x' = (0 + 0.5) / 2 - 0.5 = -0.25, y' = 0.5 * 2 - 0.5 = 0.5.
    torch.testing.assert_close(seen["kps"], torch.tensor([[[4.75, 6.5], [-0.25, 0.5]]]))
    # Target, W = 28, H = 112: x = (4.75 + 0.5) / 2 - 0.5 = 2.125, y = (6.5 + 0.5) * 2 - 0.5 = 13.5;
    # the input's outer edges (-0.5, 55.5) land on the original's (-0.5, 111.5).
    torch.testing.assert_close(predictions, torch.tensor([[[2.125, 13.5], [-0.5, 111.5]]]))
    assert seen["training"] is False and seen["grad"] is False
    assert model.training  # restored
    # The match score is each finest map's peak: cells 195 and 391 of the arange.
    matched = model.predict_matches(src, trg, src_kps, torch.ones(1, 2, dtype=torch.bool), src_sizes, trg_sizes)
    torch.testing.assert_close(matched.score, torch.tensor([[0.195, 0.391]]))


# -------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def tiny_weights(tmp_path: Path) -> str:
    return _weights_file("dinov2_vits14", tmp_path / "vits14.pth")


def test_full_checkpoint_round_trip(tmp_path: Path) -> None:
    source = _perturb(SimpleMatch(TINY))
    save_checkpoint(source, tmp_path / "full.pt")
    target = SimpleMatch(TINY)
    load_checkpoint(target, tmp_path / "full.pt")
    _assert_same_state(source, target)
    rebuilt = load_model(tmp_path / "full.pt", window_size=7)
    assert rebuilt.config == dataclasses.replace(TINY, window_size=7)
    _assert_same_state(source, rebuilt)


def test_trainable_only_checkpoint_round_trip(tmp_path: Path, tiny_weights: str) -> None:
    config = dataclasses.replace(TINY, weights=tiny_weights)
    source = _perturb(SimpleMatch(config), trainable_only=True)
    save_checkpoint(source, tmp_path / "lora.pt", trainable_only=True)
    saved = torch.load(tmp_path / "lora.pt", weights_only=True)
    assert saved["format"] == "simplematch-v2" and saved["config"] == to_dict(config)
    lora = {key for key in source.state_dict() if key.endswith(("lora_A", "lora_B"))}
    decoder = {key for key in source.state_dict() if key.startswith("decoder.")}  # BatchNorm statistics included
    assert len(lora) == 12 and any(key.endswith("running_var") for key in decoder)
    assert set(saved["state_dict"]) == lora | decoder
    target = SimpleMatch(config)
    load_checkpoint(target, tmp_path / "lora.pt")
    _assert_same_state(source, target)  # the frozen rest came from the same weights file
    _assert_same_state(source, load_model(tmp_path / "lora.pt"))
    with pytest.raises(ValueError, match="frozen parameters would not be the ones"):
        load_checkpoint(SimpleMatch(TINY), tmp_path / "lora.pt")


def test_checkpoint_errors_name_keys_and_fields(tmp_path: Path) -> None:
    model = SimpleMatch(TINY)
    save_checkpoint(model, tmp_path / "full.pt")
    checkpoint = torch.load(tmp_path / "full.pt", weights_only=True)
    del checkpoint["state_dict"]["decoder.heads.fine.bias"]
    checkpoint["state_dict"]["decoder.extra"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "edited.pt")
    expected = r"missing keys \(1\): \['decoder.heads.fine.bias'\]; unexpected keys \(1\): \['decoder.extra'\]"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(model, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="decoder_channels: checkpoint 16, model 8"):
        load_checkpoint(SimpleMatch(dataclasses.replace(TINY, options=SimpleMatchOptions(decoder_channels=8))), tmp_path / "full.pt")
    save_checkpoint(model, tmp_path / "lora.pt", trainable_only=True)
    frozen = SimpleMatch(dataclasses.replace(TINY, finetune="frozen"))
    with pytest.raises(ValueError, match="finetune: checkpoint 'lora', model 'frozen'"):
        load_checkpoint(frozen, tmp_path / "lora.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a simplematch-v2 checkpoint"):
        load_checkpoint(model, tmp_path / "bare.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(model, tmp_path / "nowhere.pt")


# ----------------------------------------------------------------------- released checkpoint layout

OFFICIAL_DECODER_NAMES = {
    "decoder.up_conv.": "trans_conv1.",
    "decoder.refine_mid.first.": "conv_refine1.block1.",
    "decoder.refine_mid.second.": "conv_refine1.block2.",
    "decoder.refine_fine.first.": "conv_refine2.block1.",
    "decoder.refine_fine.second.": "conv_refine2.block2.",
    "decoder.heads.fine.": "proj.",
}


def _export_official(model: SimpleMatch, backbone_keys: set[str]) -> dict[str, torch.Tensor]:
    """``model`` in the released layout (reference §9): the backbone's ``backbone_keys`` (timm
    names, which are the released names for blocks, embeddings and LoRA factors) under
    ``pair_image_encoder.image_encoder.``, the decoder under its released names, plus the unused
    ``trans_conv2``."""
    state = model.state_dict()
    official = {f"pair_image_encoder.image_encoder.{key}": state[f"backbone.encoder.{key}"] for key in backbone_keys}
    for key, value in state.items():
        for ours, theirs in OFFICIAL_DECODER_NAMES.items():
            if key.startswith(ours):
                official[theirs + key.removeprefix(ours)] = value
    assert len(official) == len(backbone_keys) + len([key for key in state if key.startswith("decoder.")])
    official["trans_conv2.weight"] = torch.randn(768, 768, 2, 2)
    official["trans_conv2.bias"] = torch.randn(768)
    return official


def test_official_dinov2_lora_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights = _weights_file("dinov2_vitb14", tmp_path / "dinov2_vitb14_pretrain.pth")
    config = ModelConfig(image_size=56, weights=weights)
    source = _perturb(SimpleMatch(config), trainable_only=True)
    lora = {key for key in source.backbone.encoder.state_dict() if key.endswith(("lora_A", "lora_B"))}
    assert {key.split(".")[1] for key in lora} == {"6", "7", "8", "9", "10", "11"}
    official = _export_official(source, lora)
    assert official["pair_image_encoder.image_encoder.blocks.6.mlp.fc2.lora_A"].shape == (16, 3072)
    assert official["pair_image_encoder.image_encoder.blocks.6.mlp.fc2.lora_B"].shape == (768, 16)
    assert official["conv_refine1.block1.1.running_mean"].shape == (768,)
    torch.save(official, tmp_path / "best_model.pth")

    target = SimpleMatch(config)
    with caplog.at_level(logging.INFO, logger="sm_model.official"):
        load_official_checkpoint(target, tmp_path / "best_model.pth")
    assert "trans_conv2.bias" in caplog.text
    _assert_same_state(source, target)
    assert (target.config.pixel_convention, target.config.image_resize) == ("official", "official")
    source.config = target.config  # the released weights predict in the official convention
    for expected, loaded in zip(_run(source, 56), _run(target, 56), strict=True):
        torch.testing.assert_close(loaded, expected, rtol=0, atol=0)

    del official["proj.bias"]
    official["conv_refine3.weight"] = torch.zeros(1)
    torch.save(official, tmp_path / "broken.pth")
    expected = r"missing keys \(1\): \['decoder.heads.fine.bias'\]; unexpected keys \(1\): \['conv_refine3.weight'\]"
    with pytest.raises(ValueError, match=expected):
        load_official_checkpoint(target, tmp_path / "broken.pth")
    with torch.device("meta"):  # its weights are never read
        random_base = SimpleMatch(dataclasses.replace(config, weights=None))
    with pytest.raises(ValueError, match="config.weights"):
        load_official_checkpoint(random_base, tmp_path / "best_model.pth")


def test_official_ibot_full_checkpoint(tmp_path: Path) -> None:
    config = ModelConfig(backbone="ibot_vitb16", image_size=64, finetune="full")
    source = _perturb(SimpleMatch(config))
    official = _export_official(source, set(source.backbone.encoder.state_dict()))
    # The released iBOT backbone also carries its final norm and classifier, which it never uses.
    prefix = "pair_image_encoder.image_encoder."
    official |= {
        f"{prefix}norm.weight": torch.ones(768),
        f"{prefix}norm.bias": torch.zeros(768),
        f"{prefix}head.weight": torch.zeros(1000, 768),
        f"{prefix}head.bias": torch.zeros(1000),
    }
    assert official[f"{prefix}pos_embed"].shape == (1, 197, 768)  # 14x14 + CLS, as iBOT at 224
    torch.save(official, tmp_path / "best_model.pth")
    with torch.device("meta"):  # every weight comes from the file: skip the random initialisation
        target = SimpleMatch(config)
    target.to_empty(device="cpu")
    load_official_checkpoint(target, tmp_path / "best_model.pth")
    _assert_same_state(source, target)
    source.config = target.config  # the official pixel convention, set by load_official_checkpoint
    for expected, loaded in zip(_run(source, 64), _run(target, 64), strict=True):
        torch.testing.assert_close(loaded, expected, rtol=0, atol=0)


def test_bfloat16_autocast_predicts_float32_close_to_float32() -> None:
    torch.manual_seed(0)
    model = SimpleMatch(TINY).eval()
    src, trg = random_images(2, 56)
    keypoints, valid = random_keypoints(2, 3, 56), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        full = model(src, trg, keypoints, valid)[0].points
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(src, trg, keypoints, valid)[0].points
    assert half.dtype == torch.float32
    # Random features give flat similarity maps, where bfloat16 scores move the soft-argmax most;
    # a few pixels on a 56-pixel input.
    assert (half - full).abs().max() < 4.0