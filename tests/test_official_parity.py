"""Released checkpoints predict what the official code predicts (issue 12), without the official
code: the released key layouts of the three backbones load strictly; the official pixel convention
(integer-cell sampling, cell ``j`` at pixel ``s*j``, ``x * S / W``) gives the pixel derived by hand
on a constructed input, and agrees with a small reference of the official matching written here
from ``shared/reference/simplematch-official.md`` (§2); the two conventions differ by exactly the
derived offset; matching runs in float32 under bfloat16 autocast; the official image resize is
OpenCV's bilinear, checked by hand; checkpoints record the convention; ``python -m sm_eval``
evaluates a released-layout file end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from sm_eval.__main__ import main
from sm_eval.checkpoints import official_model_config, resolve_model
from sm_model.checkpoint import load_model, save_checkpoint
from sm_model.config import ModelConfig, from_dict
from sm_model.localizers import Localization, localize
from sm_model.matching import cosine_similarity, match_keypoints, sample_keypoint_features
from sm_model.official import official_layout, official_model
from sm_model.pixels import (
    cells_to_pixels,
    default_sampling,
    original_to_input_pixels,
    pixels_to_cells,
    resize_image,
    resize_like_opencv,
    to_resized_square,
)
from sm_model.simplematch import SimpleMatchOptions
from sm_model.simplematch.decoder import ScaleFeatures
from sm_model.simplematch.model import SimpleMatch
from tests.conftest import REPO_ROOT
from tests.random_inputs import random_images
from tests.test_simplematch import OFFICIAL_DECODER_NAMES
from tests.test_simplematch import _perturb as perturb
from tests.test_simplematch import _weights_file as weights_file

WINDOW_15 = Localization("window", 0.02, 15)
"""The official window soft-argmax at 1/4: window 15 cells, beta 0.02."""

PREFIX = "pair_image_encoder.image_encoder."
RESNET_PREFIX = "pair_image_encoder.backbone."

# The released key names: the ViT decoder's (reference §9) as test_simplematch has them; the ResNet
# model's as its modules name them: the backbone under pair_image_encoder.backbone, the 1x1 "aligns"
# of layer1/3/4 (a ModuleList with an Identity for layer2), trans_conv1/2, conv_refine1-3, proj1-3.
VIT_NAMES = OFFICIAL_DECODER_NAMES
RESNET_NAMES = {
    "decoder.align.0.": "pair_image_encoder.aligns.0.",
    "decoder.align.2.": "pair_image_encoder.aligns.2.",
    "decoder.align.3.": "pair_image_encoder.aligns.3.",
    "decoder.up_conv_coarse.": "trans_conv1.",
    "decoder.up_conv_mid.": "trans_conv2.",
    "decoder.refine_coarse.first.": "conv_refine1.block1.",
    "decoder.refine_coarse.second.": "conv_refine1.block2.",
    "decoder.refine_mid.first.": "conv_refine2.block1.",
    "decoder.refine_mid.second.": "conv_refine2.block2.",
    "decoder.refine_fine.first.": "conv_refine3.block1.",
    "decoder.refine_fine.second.": "conv_refine3.block2.",
    "decoder.heads.coarse.": "proj1.",
    "decoder.heads.mid.": "proj2.",
    "decoder.heads.fine.": "proj3.",
}


def _perturb(model: SimpleMatch) -> SimpleMatch:
    """Noise on the trainable parameters and random BatchNorm statistics (the frozen backbone
    stays that of its weights file)."""
    return perturb(model, trainable_only=True)


def released_state(
    model: SimpleMatch, names: dict[str, str], backbone_keys: set[str], prefix: str = PREFIX
) -> dict[str, Tensor]:
    """``model`` written in the released layout: ``backbone_keys`` (timm names, which are the
    released ones) under the backbone prefix, every decoder entry under its released name."""
    state = model.state_dict()
    released = {prefix + key: state[f"backbone.encoder.{key}"] for key in backbone_keys}
    for key, value in state.items():
        if key.startswith("decoder."):
            ours = next(prefix for prefix in names if key.startswith(prefix))
            released[names[ours] + key.removeprefix(ours)] = value
    return released


def _lora_checkpoint(tmp_path: Path, image_size: int = 56) -> tuple[SimpleMatch, Path, str]:
    """A DINOv2 LoRA model (ViT-S/14, decoder as wide as the ViT, as released) and its
    released-layout file; returns the source model (center convention), the file and the
    backbone weights file."""
    weights = weights_file("dinov2_vits14", tmp_path / "dinov2_vits14_pretrain.pth")
    config = ModelConfig(backbone="dinov2_vits14", weights=weights, image_size=image_size, window_size=5, options=SimpleMatchOptions(decoder_channels=384))
    source = _perturb(SimpleMatch(config))
    lora = {key for key in source.backbone.encoder.state_dict() if key.endswith(("lora_A", "lora_B"))}
    state = released_state(source, VIT_NAMES, lora)
    state["trans_conv2.weight"], state["trans_conv2.bias"] = torch.randn(384, 384, 2, 2), torch.randn(384)
    torch.save(state, tmp_path / "best_model.pth")
    return source, tmp_path / "best_model.pth", weights


# --------------------------------------------------------------------------- released layouts


def test_released_dinov2_lora_layout(tmp_path: Path) -> None:
    source, path, weights = _lora_checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    assert official_layout(state) == "lora"
    # The run-time settings come from the config; the architecture from the keys (384 channels).
    model = official_model(path, ModelConfig(backbone="dinov2_vits14", image_size=56, window_size=5), weights)
    config = model.config
    assert (config.pixel_convention, config.image_resize, config.finetune) == ("official", "official", "lora")
    assert (config.options.decoder_channels, config.finetune_blocks, config.lora_rank, config.weights) == (384, 6, 16, weights)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    del state["proj.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['decoder.heads.fine.bias'\]"):
        official_model(state, config, weights)
    with pytest.raises(ValueError, match="pretrained weights"):
        official_model(path, ModelConfig(backbone="dinov2_vits14", image_size=56))


def test_released_ibot_full_layout_with_the_shipped_config(tmp_path: Path) -> None:
    shipped = official_model_config(str(REPO_ROOT / "configs/ibot_vitb16_256_spair.yaml"))
    config = dataclasses.replace(shipped, weights=None, image_size=64, pixel_convention="center")
    source = _perturb(SimpleMatch(dataclasses.replace(config, finetune="full")))
    state = released_state(source, VIT_NAMES, set(source.backbone.encoder.state_dict()))
    state |= {f"{PREFIX}norm.weight": torch.ones(768), f"{PREFIX}norm.bias": torch.zeros(768)}  # unused
    assert state[f"{PREFIX}pos_embed"].shape == (1, 197, 768) and official_layout(state) == "full"
    model = official_model(state, dataclasses.replace(shipped, image_size=64))
    assert (model.config.weights, model.config.pixel_convention, model.config.image_resize) == (
        None,
        "official",
        "official",
    )
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_released_resnet101_layout_all_684_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shipped = official_model_config(str(REPO_ROOT / "configs/resnet101_256_spair.yaml"))
    assert shipped.options.multiscale and shipped.window_size == 30 and shipped.options.coarse_window_sizes == (None, 15)
    source = _perturb(SimpleMatch(dataclasses.replace(shipped, weights=None, image_size=64)))
    state = released_state(source, RESNET_NAMES, set(source.backbone.encoder.state_dict()), RESNET_PREFIX)
    state[f"{RESNET_PREFIX}fc.weight"], state[f"{RESNET_PREFIX}fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    assert len(state) == 684 and official_layout(state) == "resnet"
    torch.save(state, tmp_path / "best_model.pth")
    with caplog.at_level("INFO", logger="sm_model.official"):
        model = official_model(tmp_path / "best_model.pth", dataclasses.replace(shipped, image_size=64))
    assert "fc.weight" in caplog.text  # saved by the released model, never used
    assert model.config.pixel_convention == "official" and model.config.options.decoder_channels == 512
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    src, trg = random_images(1, 64)
    kps, valid = torch.tensor([[[10.0, 20.0], [40.0, 33.0]]]), torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        predictions = model.eval()(src, trg, kps, valid)
    assert [tuple(p.points.shape) for p in predictions] == [(1, 2, 2)] * 3  # heads at 1/16, 1/8, 1/4
    state["proj2.weight"] = torch.zeros(512, 256)
    with pytest.raises(ValueError, match=r"decoder.heads.mid.weight \(512, 256\) != \(512, 512\)"):
        official_model(state, shipped)
    with pytest.raises(ValueError, match="holds a ResNet model"):
        official_model(state, ModelConfig())


# ----------------------------------------------------------------------------- conventions


def test_the_two_conventions_by_hand() -> None:
    points = torch.tensor([[[0.0, 0.0], [499.0, 374.0], [130.0, 200.0]]])
    sizes = torch.tensor([[500, 375]])
    official = original_to_input_pixels(points, sizes, 252, "official")
    torch.testing.assert_close(official[0, 2], torch.tensor([130 * 252 / 500, 200 * 252 / 375]))
    center = original_to_input_pixels(points, sizes, 252)
    torch.testing.assert_close(center[0, 2], torch.tensor([130.5 * 252 / 500 - 0.5, 200.5 * 252 / 375 - 0.5]))
    # The difference is (S / W - 1) / 2 per axis, the same for every point.
    torch.testing.assert_close(center - official, ((torch.tensor([252 / 500, 252 / 375]) - 1) / 2).expand(1, 3, 2))
    np.testing.assert_allclose(to_resized_square(np.array([130.0, 200.0]), (500, 375), 252, "official"), official[0, 2])
    cells = torch.tensor([0.0, 1.0, 62.0])
    assert cells_to_pixels(cells, 4.0, "official").tolist() == [0.0, 4.0, 248.0]
    assert cells_to_pixels(cells, 4.0).tolist() == [1.5, 5.5, 249.5]
    assert pixels_to_cells(torch.tensor([8.0, 11.9]), 4.0, "official").tolist() == pytest.approx([2.0, 2.975])
    assert (default_sampling("center"), default_sampling("official"), default_sampling("official", "bilinear")) == (
        "bilinear",
        "nearest",
        "bilinear",
    )
    with pytest.raises(ValueError, match="unknown pixel convention"):
        cells_to_pixels(cells, 4.0, "corner")  # type: ignore[arg-type]


def _one_peak_maps(side: int, target_cell: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """A source map that is the same vector everywhere (any sampling reads it) and a target map
    holding that vector at ``target_cell`` ``(x, y)`` only, an orthogonal one elsewhere."""
    src = torch.zeros(1, 2, side, side)
    src[:, 0] = 1.0
    trg = torch.zeros(1, 2, side, side)
    trg[:, 1] = 1.0
    trg[0, :, target_cell[1], target_cell[0]] = torch.tensor([1.0, 0.0])
    return src, trg


@pytest.mark.parametrize(("stride", "offset"), [(16, 7.5), (8, 3.5), (4, 1.5)])
def test_conventions_differ_by_the_derived_offset_at_every_scale(stride: int, offset: float) -> None:
    """The ResNet heads at 1/16, 1/8 and 1/4 of a 256 input: the official prediction is the
    matched cell's corner ``stride * j``, ours its centre, ``(stride - 1) / 2`` further."""
    side = 256 // stride
    src, trg = _one_peak_maps(side, (5, 3))
    kps = torch.tensor([[[100.0, 37.0]]])
    official = match_keypoints(src, trg, kps, float(stride), WINDOW_15, convention="official").points
    center = match_keypoints(src, trg, kps, float(stride), WINDOW_15).points
    assert official[0, 0].tolist() == [5.0 * stride, 3.0 * stride]
    torch.testing.assert_close(center - official, torch.full((1, 1, 2), offset), rtol=0, atol=1e-5)


class _Features(nn.Module):
    """Stands in for backbone + decoder: the constructed stride-4 maps, whatever the images."""

    def __init__(self, src_map: Tensor, trg_map: Tensor) -> None:
        super().__init__()
        self.maps = torch.cat([src_map, trg_map])

    def forward(self, features: object, image_size: int | None = None) -> list[ScaleFeatures] | list[Tensor]:
        if image_size is None:  # called as the backbone
            return [features]
        return [ScaleFeatures(self.maps, image_size / self.maps.shape[-1])]


def _constructed_model(convention: str, src_map: Tensor, trg_map: Tensor) -> SimpleMatch:
    config = ModelConfig(backbone="resnet18", image_size=32, finetune="full", window_size=5, options=SimpleMatchOptions(decoder_channels=8))
    with torch.device("meta"):
        model = SimpleMatch(dataclasses.replace(config, pixel_convention=convention))
    model.backbone = model.decoder = _Features(src_map, trg_map)
    return model


def test_official_prediction_is_the_hand_derived_pixel() -> None:
    """An 8 x 8 stride-4 map (input S = 32) whose every source cell has its own code, and a target
    map holding the source's codes turned by 180 degrees: the target cell that matches tells which
    source cell was read.

    Source image 500 x 375, keypoint (130, 200): official resize ``x * S / W`` = (8.32, 17.07),
    integer cell ``floor(/ 4)`` = (2, 4) (the centre convention's pixel (7.85, 16.58) lies in cell
    (1, 4)); its code sits at target cell (7 - 2, 7 - 4) = (5, 3), i.e. input pixel (20, 12) at the
    cell's corner; the 320 x 240 target maps it back with ``x * W / S``: (200, 90)."""
    side = 8
    codes = torch.eye(side * side).view(side * side, side, side).unsqueeze(0)  # cell (y, x) = e_{8y + x}
    src_map, trg_map = codes, codes.flip(2, 3)
    model = _constructed_model("official", src_map, trg_map)
    images = torch.zeros(1, 3, 32, 32)
    kps, valid = torch.tensor([[[130.0, 200.0]]]), torch.ones(1, 1, dtype=torch.bool)
    predicted = model.predict(images, images, kps, valid, torch.tensor([[500, 375]]), torch.tensor([[320, 240]]))
    torch.testing.assert_close(predicted, torch.tensor([[[200.0, 90.0]]]), rtol=0, atol=1e-4)


def test_predictions_of_the_two_conventions_differ_by_the_derived_offset() -> None:
    """Same matched cell (5, 3) at stride 4 and S = 32 into a 320 x 240 target: the official
    pixel (5 * 4 * 10, 3 * 4 * 7.5) = (200, 90); ours ((21.5 + 0.5) * 10 - 0.5, (13.5 + 0.5) * 7.5
    - 0.5) = (219.5, 104.5): apart by (stride / 2) * W / S - 0.5 per axis."""
    src_map, trg_map = _one_peak_maps(8, (5, 3))
    images, kps, valid = torch.zeros(1, 3, 32, 32), torch.tensor([[[130.0, 200.0]]]), torch.ones(1, 1, dtype=torch.bool)
    sizes = (torch.tensor([[500, 375]]), torch.tensor([[320, 240]]))
    official = _constructed_model("official", src_map, trg_map).predict(images, images, kps, valid, *sizes)
    center = _constructed_model("center", src_map, trg_map).predict(images, images, kps, valid, *sizes)
    torch.testing.assert_close(official, torch.tensor([[[200.0, 90.0]]]), rtol=0, atol=1e-4)
    torch.testing.assert_close(center, torch.tensor([[[219.5, 104.5]]]), rtol=0, atol=1e-4)
    torch.testing.assert_close(center - official, torch.tensor([[[2 * 10 - 0.5, 2 * 7.5 - 0.5]]]), rtol=0, atol=1e-4)


def official_reference(
    src_map: Tensor, trg_map: Tensor, kps: Tensor, src_wh: Tensor, trg_wh: Tensor, size: int, k: int, beta: float
) -> Tensor:
    """The official matching as the reference (§2, §4) describes it, one keypoint at a time:
    keypoints resized ``x * S / W``; features at ``floor(x / d) + floor(y / d) * w`` with
    ``d = S / h``; cosine with eps 1e-8; argmax; a ``k x k`` window from ``clamp(argmax - k // 2,
    0, h - k)``; ``softmax(window / beta)`` marginals against ``linspace(-1, 1, k)``, mapped by
    ``(g + 1)(k - 1) / 2`` plus the window's corner; times ``d``; back with ``x * W / S``."""
    batch, _, height, width = trg_map.shape
    down = size / height
    k = min(k, height, width)
    grid = torch.linspace(-1, 1, k)
    out = torch.zeros(kps.shape)
    for b in range(batch):
        resized = kps[b] * size / src_wh[b].float()
        index = (resized[:, 0] / down).long() + (resized[:, 1] / down).long() * width
        features = F.normalize(src_map[b].flatten(1)[:, index].T, dim=1, eps=1e-8)
        correlation = features @ F.normalize(trg_map[b].flatten(1), dim=0, eps=1e-8)  # [N, h*w]
        for n, row in enumerate(correlation):
            peak = int(row.argmax())
            top = min(max(peak // width - k // 2, 0), height - k)
            left = min(max(peak % width - k // 2, 0), width - k)
            window = row.view(height, width)[top : top + k, left : left + k]
            weights = torch.softmax(window.flatten() / beta, dim=0).view(k, k)
            x = ((weights.sum(0) * grid).sum() + 1) * (k - 1) / 2 + left
            y = ((weights.sum(1) * grid).sum() + 1) * (k - 1) / 2 + top
            out[b, n] = torch.stack([x, y]) * down * trg_wh[b].float() / size
    return out


@pytest.mark.parametrize("layout", ["lora", "resnet"])
def test_released_model_predicts_what_the_official_code_predicts(tmp_path: Path, layout: str) -> None:
    """A model loaded from a released-layout file predicts, in original-image pixels, what the
    reference of the official matching predicts from the same decoder features: within 0.01 px."""
    if layout == "lora":
        _, path, weights = _lora_checkpoint(tmp_path)
        model = official_model(path, ModelConfig(backbone="dinov2_vits14", image_size=56, window_size=5), weights)
        size = 56
    else:
        config = ModelConfig(backbone="resnet101", image_size=64, window_size=5, options=SimpleMatchOptions(decoder_channels=512, multiscale=True))
        source = _perturb(SimpleMatch(dataclasses.replace(config, finetune="full")))
        state = released_state(source, RESNET_NAMES, set(source.backbone.encoder.state_dict()), RESNET_PREFIX)
        model, size = official_model(state, config), 64
    model.eval()
    src, trg = random_images(2, size, seed=3)
    generator = torch.Generator().manual_seed(4)
    src_wh, trg_wh = torch.tensor([[500, 375], [333, 500]]), torch.tensor([[320, 240], [500, 281]])
    kps = torch.rand(2, 6, 2, generator=generator) * (src_wh.unsqueeze(1) - 1)
    predicted = model.predict(src, trg, kps, torch.ones(2, 6, dtype=torch.bool), src_wh, trg_wh)
    with torch.no_grad():
        src_map, trg_map = model.decoder(model.backbone(torch.cat([src, trg])), size)[-1].features.chunk(2)
    expected = official_reference(src_map, trg_map, kps, src_wh, trg_wh, size, model.config.window_size, 0.02)
    torch.testing.assert_close(predicted, expected, rtol=0, atol=0.01)


# ----------------------------------------------------------------------- float32 matching


def _smooth_features(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Spatially smooth random maps, as a decoder's are (scores near 1 over several cells of a
    window, where bfloat16 scores hurt most), rounded to bfloat16 as the decoder returns them."""
    generator = torch.Generator().manual_seed(seed)
    trg = F.interpolate(torch.randn(2, 64, 6, 6, generator=generator), size=(32, 32), mode="bicubic")
    src = trg + 0.05 * torch.randn(2, 64, 32, 32, generator=generator)
    kps = torch.rand(2, 20, 2, generator=generator) * 127
    return src.bfloat16(), trg.bfloat16(), kps


def test_bfloat16_and_float32_predictions_agree_within_0_05_cells() -> None:
    src, trg, kps = _smooth_features(seed=0)
    in_float32 = match_keypoints(src.float(), trg.float(), kps, 4.0, WINDOW_15).points
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = match_keypoints(src, trg, kps, 4.0, WINDOW_15).points
        # What the scores were before: cosine and bmm in bfloat16.
        bfloat16_scores = cosine_similarity(sample_keypoint_features(src, kps, 4.0), trg)
    assert under_autocast.dtype == torch.float32 and bfloat16_scores.dtype == torch.bfloat16
    assert ((under_autocast - in_float32).abs() / 4).max() < 0.05
    torch.testing.assert_close(under_autocast, in_float32, rtol=0, atol=1e-4)
    before = cells_to_pixels(localize(bfloat16_scores, WINDOW_15), 4.0)
    assert ((before - in_float32).abs() / 4).max() > 0.05  # the test tells the two apart


def test_the_model_matches_in_float32_under_autocast() -> None:
    src, trg, _ = _smooth_features(seed=1)
    kps = torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(2)) * 127
    valid = torch.ones(2, 5, dtype=torch.bool)
    images = torch.zeros(2, 3, 128, 128)  # stride 4 on the 32 x 32 maps
    ((in_float32, *_),) = _constructed_model("center", src.float(), trg.float())(images, images, kps, valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ((under_autocast, *_),) = _constructed_model("center", src, trg)(images, images, kps, valid)
    torch.testing.assert_close(under_autocast, in_float32, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- image resize


def test_official_resize_by_hand() -> None:
    # A linear image is resized exactly: output pixel d samples (d + 0.5) * 3/2 - 0.5 = 0.25, 1.75.
    linear = np.array([[80 * x + 8 * y for x in range(3)] for y in range(3)], dtype=np.uint8)[..., None]
    np.testing.assert_array_equal(resize_like_opencv(linear, 2)[..., 0], [[22, 142], [34, 154]])
    # Upscaling 1 x 2 [0, 2] to 4 x 4: columns sample -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to
    # 1), i.e. 0, 0.5, 1.5, 2 in real arithmetic. OpenCV's fixed point (weights in 1/2048, the
    # vertical pass ((v >> 4) * w >> 16) for each of its two rows, then (sum + 2) >> 2) truncates
    # the halves: 1024 -> (64 * 512 >> 16) + (64 * 1536 >> 16) = 0 + 1 -> (1 + 2) >> 2 = 0, and
    # 3072 -> 1 + 4 -> 1, and 4096 -> 2 + 6 -> 2.
    ramp = np.array([[[0], [2]]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_like_opencv(ramp, 4)[..., 0], [[0, 0, 1, 2]] * 4)
    # Shrinking by 2 averages pixel pairs, no wider: no antialiasing, unlike PIL's bilinear.
    row = np.array([[0, 100, 200, 40]] * 4, dtype=np.uint8)[..., None].repeat(3, axis=2)
    official = resize_image(row, 2, "official")
    assert official.shape == (3, 2, 2) and official.dtype == torch.uint8
    assert official[0].tolist() == [[50, 120], [50, 120]]
    assert resize_image(row, 2)[0, 0].tolist() != [50, 120]
    with pytest.raises(ValueError, match="unknown image resize"):
        resize_image(row, 2, "nearest")  # type: ignore[arg-type]


def test_official_resize_is_opencv_where_opencv_is_installed() -> None:
    cv2 = pytest.importorskip("cv2")
    generator = np.random.default_rng(0)
    for height, width, size in [(375, 500, 252), (333, 500, 448), (5, 7, 12), (480, 640, 256)]:
        image = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(resize_like_opencv(image, size), expected)


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoints_record_the_convention_and_old_configs_load(tmp_path: Path) -> None:
    _, path, weights = _lora_checkpoint(tmp_path)
    model = official_model(path, ModelConfig(backbone="dinov2_vits14", image_size=56, window_size=5), weights)
    save_checkpoint(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert (loaded.config.pixel_convention, loaded.config.image_resize) == ("official", "official")
    assert loaded.config == dataclasses.replace(model.config, weights=None)  # a full checkpoint needs no weights
    # Configs and checkpoints written before the convention existed set keypoint_sampling.
    for sampling in ("bilinear", "nearest"):
        old = from_dict(ModelConfig, {"keypoint_sampling": sampling}, "old checkpoint config")
        assert (old.keypoint_sampling, old.pixel_convention, old.image_resize) == (sampling, "center", "antialiased")
    assert ModelConfig().keypoint_sampling is None


# ---------------------------------------------------------------------------------- sm_eval


def test_sm_eval_evaluates_a_released_checkpoint(demo_shards: Path, tmp_path: Path) -> None:
    """A released-layout file plus its config and backbone weights: converted once in the driver
    into a full checkpoint of the official model (what the Ray workers receive), then
    evaluated end to end on the demo shards."""
    _, path, weights = _lora_checkpoint(tmp_path, image_size=28)
    model_section = {"backbone": "dinov2_vits14", "weights": "hub", "image_size": 28, "window_size": 5}
    (tmp_path / "released.yaml").write_text(yaml.safe_dump({"model": model_section}))
    file = resolve_model(
        str(path), "released", official_config=official_model_config(str(tmp_path / "released.yaml")),
        backbone_weights=weights,
    )  # fmt: skip
    assert file.official and file.config["pixel_convention"] == "official"
    direct = official_model(path, ModelConfig(**model_section), weights).state_dict()
    for key, value in load_model(file.data).state_dict().items():
        assert torch.equal(value, direct[key]), key

    out = tmp_path / "out"
    common = [
        "--shards", str(demo_shards), "--out", str(out), "--workers", "0", "--device", "cpu",
        "--loader-workers", "0", "--threads", "2", "--matches", "1", "--no-progress", "--batch-size", "8",
    ]  # fmt: skip
    released = ["--checkpoint", str(path), "--official-config", str(tmp_path / "released.yaml")]
    assert main([*released, "--backbone-weights", weights, *common]) == 0
    report = json.loads((out / "report.json").read_text())
    config = report["models"][0]["config"]
    assert (config["pixel_convention"], config["image_resize"], config["finetune"]) == ("official", "official", "lora")
    assert main(["--checkpoint", str(path), *common]) == 1  # no --official-config: a clear error
