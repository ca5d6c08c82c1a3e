"""LPMFlow's Swin pieces (``sm_model.lpmflow.swin``): the spec's hand checks 12 (channel
attention) and 13 (windows), the released relative-position index, equivalence with a functional
transcription of the released forward math (``models/base/swin.py``'s ``SwinTransformerBlock`` and
``TransformerWarper2d``, ``models/LPMFlow.py``'s ``ChannelAttention``, ``SRBranch_feat`` and
``SRBranch``) run on released-named weights, shapes, key names and the window check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sm_model.lpmflow.swin import (
    ChannelAttention,
    FeatureSuperResolution,
    FlowRefinement,
    SwinBlock,
    SwinStage,
    effective_window,
    relative_position_index,
)

# ---- the released math, transcribed functionally over released state-dict names ------------------


def released_index(w: int) -> Tensor:
    """The released ``WindowAttention.relative_position_index`` for a ``w x w`` window."""
    coords = torch.stack(torch.meshgrid([torch.arange(w), torch.arange(w)], indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += w - 1
    relative[:, :, 1] += w - 1
    relative[:, :, 0] *= 2 * w - 1
    return relative.sum(-1)


def sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def released_window_attention(p: dict[str, Tensor], x: Tensor, heads: int, w: int) -> Tensor:
    n, length, dim = x.shape
    qkv = F.linear(x, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(n, length, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    bias = p["attn.relative_position_bias_table"][released_index(w).view(-1)].view(length, length, -1)
    attention = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1) + bias.permute(2, 0, 1)).softmax(-1)
    return F.linear((attention @ v).transpose(1, 2).reshape(n, length, dim), p["attn.proj.weight"], p["attn.proj.bias"])


def released_swin_block(p: dict[str, Tensor], x: Tensor, height: int, width: int, heads: int, window: int) -> Tensor:
    """``SwinTransformerBlock`` (shift 0, no dropout) on tokens ``[B, H*W, C]``, a loop over windows."""
    w = min(height, width, window)  # released: min(resolution) <= window -> window = min(resolution)
    batch, length, dim = x.shape
    normed = F.layer_norm(x, (dim,), p["norm1.weight"], p["norm1.bias"]).view(batch, height, width, dim)
    attended = torch.empty_like(normed)
    for i in range(0, height, w):
        for j in range(0, width, w):
            window_tokens = normed[:, i : i + w, j : j + w].reshape(batch, w * w, dim)
            attended[:, i : i + w, j : j + w] = released_window_attention(p, window_tokens, heads, w).view(
                batch, w, w, dim
            )
    x = x + attended.view(batch, length, dim)
    hidden = F.linear(
        F.layer_norm(x, (dim,), p["norm2.weight"], p["norm2.bias"]), p["mlp.fc1.weight"], p["mlp.fc1.bias"]
    )
    return x + F.linear(F.gelu(hidden), p["mlp.fc2.weight"], p["mlp.fc2.bias"])


def released_stage(p: dict[str, Tensor], x: Tensor, heads: int, window: int) -> Tensor:
    """``nn.Sequential(TransformerWarper2d(SwinTransformer2d(depths=[1])), ChannelAttention)`` on a map."""
    batch, dim, height, width = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    block = released_swin_block(sub(p, "0.transformer.layers.0.blocks.0."), tokens, height, width, heads, window)
    tokens = tokens + F.layer_norm(block, (dim,), p["0.transformer.norm.weight"], p["0.transformer.norm.bias"])
    x = tokens.transpose(1, 2).reshape(batch, dim, height, width)

    def fc(pooled: Tensor) -> Tensor:
        return F.conv2d(F.relu(F.conv2d(pooled, p["1.fc.0.weight"])), p["1.fc.2.weight"])

    return x + x * torch.sigmoid(fc(F.adaptive_avg_pool2d(x, 1)) + fc(F.adaptive_max_pool2d(x, 1)))


def released_fsr(p: dict[str, Tensor], x: Tensor, heads: int, window: int) -> Tensor:
    batch, length, dim = x.shape
    grid = round((length - 1) ** 0.5)
    patches = F.interpolate(
        x[:, 1:, :].transpose(-2, -1).view(batch, dim, grid, grid), 2 * grid, None, "bilinear", False
    )
    patches = released_stage(sub(p, "refine_swin_decoder_1_1."), patches, heads, window)
    patches = released_stage(sub(p, "refine_swin_decoder_1_2."), patches, heads, window)
    return torch.cat([x[:, 0:1, :], patches.flatten(-2, -1).transpose(-2, -1)], dim=1)


def released_refinement(p: dict[str, Tensor], x: Tensor, heads: int, windows: tuple[int, ...]) -> Tensor:
    outputs = []
    for window in windows:
        x = released_stage(sub(p, f"refine_swin_decoder_{window}."), x, heads, window)
        outputs.append(x)
    hidden = F.relu(F.conv2d(sum(outputs), p["refine2.0.weight"], p["refine2.0.bias"], padding=1))
    return F.conv2d(hidden, p["refine2.2.weight"], p["refine2.2.bias"], padding=1)


# ---- our names -> released names ---------------------------------------------------------------

STAGE_NAMES = {"block.": "0.transformer.layers.0.blocks.0.", "norm.": "0.transformer.norm.", "channel_attention.": "1."}


def released_stage_key(key: str) -> str:
    ours = next(prefix for prefix in STAGE_NAMES if key.startswith(prefix))
    return STAGE_NAMES[ours] + key[len(ours) :]


def released_names(state: dict[str, Tensor], stage_names: list[str], head: str = "") -> dict[str, Tensor]:
    """``stages.i.*`` -> ``{stage_names[i]}.<released stage key>``, ``head.*`` -> ``{head}.*``."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("head."):
            renamed[head + key[len("head") :]] = value
        else:
            _, index, rest = key.split(".", 2)
            renamed[f"{stage_names[int(index)]}.{released_stage_key(rest)}"] = value
    return renamed


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (LayerNorm weights around 1), so nothing is at its special init; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.2
            is_norm_weight = name.endswith("weight") and parameter.dim() == 1
            parameter.copy_(noise + 1 if is_norm_weight else noise)
    return module.eval()


# ---- hand checks -------------------------------------------------------------------------------


def test_channel_attention_all_ones() -> None:
    attention = ChannelAttention(96)
    nn.init.zeros_(attention.fc[2].weight)
    output = attention(torch.ones(1, 96, 4, 4))
    assert torch.equal(output, torch.full((1, 96, 4, 4), 1.5))


@pytest.mark.parametrize("w", [1, 2, 4, 7, 16])
def test_relative_position_index_is_released(w: int) -> None:
    index = relative_position_index(w)
    assert torch.equal(index, released_index(w))
    assert index.shape == (w * w, w * w)
    assert index.min() == 0 and index.max() == (2 * w - 1) ** 2 - 1
    assert index.unique().numel() == (2 * w - 1) ** 2
    assert torch.equal(index.diagonal(), torch.full((w * w,), (2 * w - 1) ** 2 // 2))  # (0, 0) offset: the centre
    block = SwinBlock(32, 4, w)
    assert torch.equal(block.attn.relative_position_index, released_index(w))
    assert "attn.relative_position_index" not in block.state_dict()
    assert block.attn.relative_position_bias_table.shape == ((2 * w - 1) ** 2, 4)


def test_whole_map_window_is_full_attention_with_bias() -> None:
    torch.manual_seed(0)
    dim, heads, side = 32, 4, 16
    block = randomise(SwinBlock(dim, heads, window=16))
    x = torch.randn(2, side, side, dim)
    tokens = x.reshape(2, side * side, dim)
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(tokens)).view(2, side * side, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    rows, columns = torch.div(torch.arange(side * side), side, rounding_mode="floor"), torch.arange(side * side) % side
    index = (rows[:, None] - rows + side - 1) * (2 * side - 1) + columns[:, None] - columns + side - 1
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)
    weights = (q @ k.transpose(-2, -1) / (dim // heads) ** 0.5 + bias).softmax(-1)
    direct = tokens + attn.proj((weights @ v).transpose(1, 2).reshape(2, side * side, dim))
    direct = direct + block.mlp(block.norm2(direct))
    torch.testing.assert_close(block(x), direct.view(2, side, side, dim), atol=1e-5, rtol=1e-5)


def test_window_four_attends_inside_its_block_only() -> None:
    torch.manual_seed(0)
    block = randomise(SwinBlock(32, 4, window=4))
    x = torch.randn(1, 16, 16, 32)
    reference = block(x)

    def perturbed(row: int, column: int) -> Tensor:
        changed = x.clone()
        changed[0, row, column] += torch.randn(32)  # not a constant: LayerNorm would remove it
        return block(changed)[0, :4, :4]

    for row, column in [(4, 4), (0, 4), (4, 0), (15, 15)]:  # outside the top-left 4x4 window
        torch.testing.assert_close(perturbed(row, column), reference[0, :4, :4], atol=1e-6, rtol=0)
    inside = perturbed(3, 2)
    assert (inside[0, 0] - reference[0, 0, 0]).abs().max() > 1e-3  # another token of the same window moves


def test_window_must_tile_the_map() -> None:
    block = SwinBlock(32, 4, window=4)
    with pytest.raises(ValueError, match="4x4 windows"):
        block(torch.randn(1, 6, 6, 32))
    with pytest.raises(ValueError, match="4x4 windows"):
        SwinStage(32, 4, window=4)(torch.randn(1, 32, 8, 10))
    assert effective_window(16, 8) == 8 and effective_window(4, 32) == 4
    SwinBlock(32, 4, window=effective_window(16, 6))(torch.randn(1, 6, 6, 32))  # a smaller map: one window


# ---- equivalence with the released math --------------------------------------------------------
# In float64: the random weights amplify (refinement outputs reach ~700), so float32 rounding alone
# (~1e-6 relative) would exceed an absolute 1e-5; the checks are about the math.


@pytest.mark.parametrize(("side", "window"), [(16, 4), (16, 16), (8, 16)])
def test_stage_matches_released(side: int, window: int) -> None:
    stage = randomise(SwinStage(96, 8, effective_window(window, side))).double()
    released = {released_stage_key(key): value.clone() for key, value in stage.state_dict().items()}
    x = torch.randn(2, 96, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stage(x), released_stage(released, x, 8, window), atol=1e-5, rtol=1e-5)


def test_feature_super_resolution_matches_released() -> None:
    fsr = randomise(FeatureSuperResolution(64, 8, effective_window(4, 8))).double()
    released = released_names(fsr.state_dict(), ["refine_swin_decoder_1_1", "refine_swin_decoder_1_2"])
    tokens = torch.randn(2, 1 + 16, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        output = fsr(tokens)
        torch.testing.assert_close(output, released_fsr(released, tokens, 8, 4), atol=1e-5, rtol=1e-5)
    assert output.shape == (2, 1 + 64, 64)
    assert torch.equal(output[:, 0], tokens[:, 0])


def test_flow_refinement_matches_released() -> None:
    windows = (16, 8, 4)
    refinement = randomise(FlowRefinement(96, 8, tuple(effective_window(w, 32) for w in windows))).double()
    released = released_names(refinement.state_dict(), [f"refine_swin_decoder_{w}" for w in windows], head="refine2")
    x = torch.randn(2, 96, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        output = refinement(x)
        torch.testing.assert_close(output, released_refinement(released, x, 8, windows), atol=1e-5, rtol=1e-5)
    assert output.shape == (2, 2, 32, 32)


# ---- shapes and names --------------------------------------------------------------------------

RELEASED_STAGE_KEYS = {
    "0.transformer.layers.0.blocks.0." + name
    for name in [
        "norm1.weight",
        "norm1.bias",
        "attn.relative_position_bias_table",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
} | {"0.transformer.norm.weight", "0.transformer.norm.bias", "1.fc.0.weight", "1.fc.2.weight"}
"""The released stage's parameters (its persistent ``relative_position_index`` buffer aside)."""


def test_state_dict_names_and_shapes() -> None:
    stage = SwinStage(96, 8, 16).state_dict()
    assert {released_stage_key(key) for key in stage} == RELEASED_STAGE_KEYS
    assert stage["block.attn.relative_position_bias_table"].shape == (31**2, 8)
    assert stage["block.attn.qkv.weight"].shape == (3 * 96, 96)
    assert stage["block.mlp.fc1.weight"].shape == (4 * 96, 96)
    assert stage["channel_attention.fc.0.weight"].shape == (96 // 16, 96, 1, 1)
    fsr = FeatureSuperResolution(768, 8, 4).state_dict()
    assert {"stages.0.block.norm1.weight", "stages.1.norm.bias", "stages.1.channel_attention.fc.2.weight"} <= set(fsr)
    assert len(fsr) == 2 * len(RELEASED_STAGE_KEYS)
    refinement = FlowRefinement(96, 8, (16, 8, 4)).state_dict()
    assert {"stages.2.block.attn.proj.bias", "head.0.weight", "head.2.bias"} <= set(refinement)
    assert refinement["head.0.weight"].shape == (32, 96, 3, 3) and refinement["head.2.weight"].shape == (2, 32, 3, 3)


def test_zero_head_gives_zero_flow() -> None:
    refinement = FlowRefinement(96, 8, (16, 8, 4))
    refinement.zero_head()
    output = refinement(torch.randn(1, 96, 16, 16))
    assert output.shape == (1, 2, 16, 16)
    assert torch.equal(output, torch.zeros_like(output))


def test_feature_super_resolution_needs_a_square_grid() -> None:
    with pytest.raises(ValueError, match="square"):
        FeatureSuperResolution(64, 8, 4)(torch.randn(1, 1 + 12, 64))
