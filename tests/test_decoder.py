"""Decoders: output shapes and strides at the official input sizes, the official parameter counts,
the ConvBlock's residual form and the ViT decoder's upsampling path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sm_model.config import ModelConfig
from sm_model.simplematch import SimpleMatchOptions
from sm_model.simplematch.decoder import ConvBlock, ResNetDecoder, ViTDecoder, build_decoder

RESNET_CHANNELS = (256, 512, 1024, 2048)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("image_size", "patch", "expected_sides"),
    [(252, 14, (18, 36, 63)), (448, 14, (32, 64, 112)), (256, 16, (16, 32, 64))],
    ids=["dinov2-252", "dinov2-448", "ibot-256"],
)
def test_vit_decoder_shapes_and_strides(image_size: int, patch: int, expected_sides: tuple[int, int, int]) -> None:
    decoder = ViTDecoder(in_channels=12, channels=8, dropout=0.3, multiscale=True).eval()
    tokens = torch.randn(2, 12, image_size // patch, image_size // patch)
    outputs = decoder([tokens], image_size)
    assert [tuple(o.features.shape) for o in outputs] == [(2, 8, side, side) for side in expected_sides]
    assert [o.stride for o in outputs] == [image_size / side for side in expected_sides]
    assert outputs[-1].stride == 4.0

    single = ViTDecoder(in_channels=12, channels=8, dropout=0.3, multiscale=False).eval()
    (fine,) = single([tokens], image_size)
    assert fine.features.shape == (2, 8, expected_sides[-1], expected_sides[-1]) and fine.stride == 4.0


def test_resnet_decoder_shapes_and_strides() -> None:
    levels = (8, 16, 32, 64)
    decoder = ResNetDecoder(levels, channels=16, multiscale=True).eval()
    assert isinstance(decoder.align[1], nn.Identity)  # layer2 already has C channels
    features = [torch.randn(2, c, 256 // s, 256 // s) for c, s in zip(levels, (4, 8, 16, 32), strict=True)]
    outputs = decoder(features, 256)
    assert [tuple(o.features.shape) for o in outputs] == [(2, 16, 16, 16), (2, 16, 32, 32), (2, 16, 64, 64)]
    assert [o.stride for o in outputs] == [16.0, 8.0, 4.0]


def test_resnet_decoder_at_a_size_that_is_not_a_multiple_of_32() -> None:
    # 200 px: stages of 50, 25, 13, 7 cells; the transposed convs give 14 and 26 and are resized.
    levels = (8, 16, 32, 64)
    features = [torch.randn(1, c, side, side) for c, side in zip(levels, (50, 25, 13, 7), strict=True)]
    outputs = ResNetDecoder(levels, channels=16, multiscale=True).eval()(features, 200)
    assert [o.features.shape[-1] for o in outputs] == [13, 25, 50]
    assert outputs[-1].stride == 4.0


def test_official_vit_decoder_parameter_count() -> None:
    decoder = build_decoder(ModelConfig(), backbone_channels=(768,))
    assert isinstance(decoder, ViTDecoder) and isinstance(decoder.align, nn.Identity)
    assert _count(decoder) == 24_193_536
    assert _count(decoder.up_conv) == 2_360_064
    assert _count(decoder.refine_mid) == _count(decoder.refine_fine) == 10_621_440
    assert _count(decoder.heads.fine) == 590_592


def test_vit_decoder_adds_a_1x1_conv_only_for_other_widths() -> None:
    vit_s = build_decoder(ModelConfig(backbone="dinov2_vits14"), backbone_channels=(384,))
    assert _count(vit_s) == 24_193_536 + 384 * 768 + 768
    multiscale = build_decoder(ModelConfig(options=SimpleMatchOptions(multiscale=True)), backbone_channels=(768,))
    assert _count(multiscale) == 24_193_536 + 2 * 590_592


def test_official_resnet_decoder_parameter_count() -> None:
    decoder = build_decoder(ModelConfig(backbone="resnet101", options=SimpleMatchOptions(decoder_channels=512, multiscale=True)), RESNET_CHANNELS)
    assert isinstance(decoder, ResNetDecoder)
    assert _count(decoder) == 18_756_608
    assert _count(decoder.align) == 1_705_472
    assert _count(decoder.up_conv_coarse) + _count(decoder.up_conv_mid) == 2_098_176
    blocks = (decoder.refine_coarse, decoder.refine_mid, decoder.refine_fine)
    assert sum(_count(block) for block in blocks) == 14_164_992
    assert sum(_count(head) for head in (decoder.heads.coarse, decoder.heads.mid, decoder.heads.fine)) == 787_968
    single = build_decoder(ModelConfig(backbone="resnet101", options=SimpleMatchOptions(decoder_channels=512)), RESNET_CHANNELS)
    assert _count(single) == 18_756_608 - 2 * 262_656


def test_conv_block_is_two_residual_conv_bn_relu_units() -> None:
    torch.manual_seed(0)
    block = ConvBlock(4).eval()
    for unit in (block.first, block.second):
        unit[1].running_mean.uniform_(-1, 1)
        unit[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 5, 5)
    expected = x + F.relu(block.first[1](block.first[0](x)))
    expected = expected + F.relu(block.second[1](block.second[0](expected)))
    torch.testing.assert_close(block(x), expected)
    assert (block(x) < 0).any()  # no activation after the second residual sum


def test_vit_decoder_path_reduces_to_bilinear_upsampling_when_its_layers_are_zero() -> None:
    """With zero transposed conv and ConvBlocks (their units then output ReLU(BN(0)) = 0) and an
    identity head, the decoder is bilinear x2 followed by the bilinear resize to S/4."""
    decoder = ViTDecoder(in_channels=3, channels=3, dropout=0.0, multiscale=False).eval()
    with torch.no_grad():
        for parameter in decoder.up_conv.parameters():
            parameter.zero_()
        for block in (decoder.refine_mid, decoder.refine_fine):
            for unit in (block.first, block.second):
                unit[0].weight.zero_()
                unit[0].bias.zero_()
        decoder.heads.fine.weight.copy_(torch.eye(3))
        decoder.heads.fine.bias.zero_()
    tokens = torch.randn(1, 3, 18, 18)
    doubled = F.interpolate(tokens, scale_factor=2, mode="bilinear", align_corners=False)
    expected = F.interpolate(doubled, size=(63, 63), mode="bilinear", align_corners=False)
    torch.testing.assert_close(decoder([tokens], 252)[0].features, expected)


def test_dropout_acts_on_tokens_in_training_only() -> None:
    decoder = ViTDecoder(in_channels=4, channels=4, dropout=0.5, multiscale=False)
    tokens = torch.randn(1, 4, 4, 4)
    decoder.eval()
    torch.testing.assert_close(decoder([tokens], 56)[0].features, decoder([tokens], 56)[0].features)
    decoder.train()
    torch.manual_seed(0)
    first = decoder([tokens], 56)[0].features
    torch.manual_seed(1)
    assert not torch.equal(first, decoder([tokens], 56)[0].features)
