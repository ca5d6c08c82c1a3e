"""LPMFlow (kind ``lpmflow``): the spec's hand-checkable tests (``shared/reference/lpmflow.md``
section 12; the Swin pieces and the losses have their own files) and transcriptions of the
released code (commit ``8ac9737``, ``models/LPMFlow.py``, ``models/encoder/...``,
``utils_training/utils.py``), written here from the released lines so that no released code runs:
the bounded activation, the flows from attention maps (identity, shift, the coarse chain, the
reshape/upsample order, the soft-argmax), the keypoint transfer (``flow2kps``), the encoder's
relative-position index and attention, the decoder block, the model's shapes (on the meta device
for the iBOT ViT-B/16 table), eval/train behaviour, gradients, the plumbing identity, the loss, the
config checks and the released-weights mapping."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import sm_model.lpmflow.model as lpmflow_model
import sm_model.lpmflow.released as lpmflow_released
from sm_model.config import ModelConfig
from sm_model.inputs import InputSpec
from sm_model.lpmflow.config import LpmflowOptions
from sm_model.lpmflow.decoder import DecoderBlock, bounded_activation
from sm_model.lpmflow.encoder import JointEncoder, RelativeAttention, relative_position_index
from sm_model.lpmflow.flow import attention_flow, attention_volume, soft_argmax_flow, to_flow_grid, transfer_keypoints
from sm_model.lpmflow.losses import epe_loss, released_flow_target
from sm_model.lpmflow.model import LPMFlow, LpmflowEncoded
from sm_model.lpmflow.released import lpmflow_from_released, released_key, to_released_key
from sm_model.registry import build_model
from tests.random_inputs import random_images, random_keypoints

SMALL = ModelConfig.of_kind(
    "lpmflow",
    backbone="dinov2_vits14",
    image_size=56,
    weights=None,
    finetune="last_blocks",
    finetune_blocks=2,
    options=LpmflowOptions(
        input_size=64, encoder_depth=1, heads=4, context_channels=8, topk_fraction=1.0, replace_fraction=0.25
    ),
)
"""ViT-S/14 at 56: g = 4 (16 patches), up grid 8, flow 32 x 32, input frame 64 (stride 2 px per
flow cell); all 16 patches are candidates and 4 are replaced, so the InfoNCE has negatives."""
SIDE = 64


@pytest.fixture(scope="module")
def small() -> LPMFlow:
    torch.manual_seed(0)
    model = build_model(SMALL)
    with torch.no_grad():  # the zero-initialised embeddings and the grids away from their init
        for name, parameter in model.named_parameters():
            if not name.startswith("backbone."):
                parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[Tensor, Tensor]:
    return random_images(2, SIDE, seed=3)


@pytest.fixture(scope="module")
def eval_encoded(small: LPMFlow, pair: tuple[Tensor, Tensor]) -> LpmflowEncoded:
    with torch.no_grad():
        return small.eval().encode(*pair)


def _meta_model(config: ModelConfig) -> LPMFlow:
    with torch.device("meta"):
        return build_model(config)


# ---- 1. the bounded activation ---------------------------------------------------------------------


def released_arf(x: Tensor) -> Tensor:
    """``MultiscaleDecoder.arf`` (``models/LPMFlow.py`` 197-201), literally."""
    exp = torch.exp
    zero = torch.zeros_like(x)
    tmp = (exp(x) - exp(-1 * x)) / (exp(x) + exp(-1 * x - 4))
    return torch.where(tmp < 0, zero, tmp)


def test_bounded_activation_hand_values() -> None:
    x = torch.tensor([0.0, -1.0, 0.5, 1.0, 2.0])
    expected = torch.tensor([0.0, 0.0, 0.627890, 0.862527, 0.981355])
    torch.testing.assert_close(bounded_activation(x), expected, atol=1e-6, rtol=0)
    extremes = bounded_activation(torch.tensor([100.0, -100.0, 1e30, -1e30]))
    assert extremes.tolist() == [1.0, 0.0, 1.0, 0.0]
    # The literal form is inf/inf there.
    assert released_arf(torch.tensor([100.0])).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bounded_activation_keeps_low_precision_dtypes_finite(dtype: torch.dtype) -> None:
    x = torch.tensor([-60000.0, -100.0, -1.0, 0.0, 0.5, 2.0, 12.0, 100.0, 60000.0], dtype=dtype)
    y = bounded_activation(x)
    assert y.dtype == dtype and y.isfinite().all()
    assert (y >= 0).all() and (y <= 1).all() and y[0] == 0 and y[-1] == 1
    torch.testing.assert_close(y.float(), bounded_activation(x.float()).to(dtype).float())


def test_bounded_activation_equals_the_released_formula_where_finite() -> None:
    x = torch.linspace(-10, 10, 2001)
    torch.testing.assert_close(bounded_activation(x), released_arf(x), atol=1e-6, rtol=1e-6)
    # A float64 input is computed in float32 (as documented) and returned in float64.
    wide = bounded_activation(x.double())
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, released_arf(x.double()), atol=3e-7, rtol=0)


# ---- 2. flows from attention maps ------------------------------------------------------------------


def released_volume(attention: Tensor, g: int, which: str) -> Tensor:
    """``models/LPMFlow.py`` 614-641 with 16 -> g, 32 -> 2g, 256 -> g^2, 1024 -> 4g^2: each map
    to ``[B, 4g^2 target, 2g, 2g source]``."""
    B, up = attention.shape[0], 2 * g
    if which == "11":
        corr = attention.view(B, -1, g, g)
        corr = F.interpolate(corr, up, None, "bilinear", True)
        corr = corr.view(B, g * g, up * up)
        corr = corr.view(B, g, g, -1).permute(0, 3, 1, 2)
        return F.interpolate(corr, up, None, "bilinear", True)
    if which == "12":
        corr = attention.view(B, g, g, -1).permute(0, 3, 1, 2)
        return F.interpolate(corr, up, None, "bilinear", True)
    if which == "21":
        corr = attention.view(B, -1, g, g)
        corr = F.interpolate(corr, up, None, "bilinear", True)
        corr = corr.view(B, up * up, up * up)
        return corr.view(B, up, up, -1).permute(0, 3, 1, 2)
    return attention.view(B, up, up, -1).permute(0, 3, 1, 2)


def released_soft_argmax_flow(corr: Tensor, x_normal: Tensor, y_normal: Tensor, beta: float) -> Tensor:
    """``soft_argmax`` (470-490) then ``unnormalise_and_convert_mapping_to_flow`` (``models/mod.py`` 34-54)."""
    b, _, h, w = corr.size()
    M, _ = corr.max(dim=1, keepdim=True)
    exp_x = torch.exp((corr - M) / beta)
    corr = exp_x / exp_x.sum(dim=1, keepdim=True)
    corr = corr.view(-1, h, w, h, w)
    grid_x = corr.sum(dim=1, keepdim=False)
    grid_x = (grid_x * x_normal.expand(b, w).view(b, w, 1, 1)).sum(dim=1, keepdim=True)
    grid_y = corr.sum(dim=2, keepdim=False)
    grid_y = (grid_y * y_normal.expand(b, h).view(b, h, 1, 1)).sum(dim=1, keepdim=True)
    mapping = torch.cat((grid_x, grid_y), dim=1)
    mapping = torch.stack([(mapping[:, 0] + 1) * (w - 1) / 2.0, (mapping[:, 1] + 1) * (h - 1) / 2.0], dim=1)
    xx = torch.arange(0, w).view(1, -1).repeat(h, 1)
    yy = torch.arange(0, h).view(-1, 1).repeat(1, w)
    grid = torch.stack((xx, yy)).float().unsqueeze(0)
    return mapping - grid


def test_identity_attention_gives_zero_flow() -> None:
    # side 5: linspace(-1, 1, 5) and its unnormalisation are exact, so the flow is exactly 0;
    # side 8 (g = 4): the off-diagonal weights e^-400 underflow, only the grid's rounding is left.
    for side, tolerance in ((5, 0.0), (8, 1e-6)):
        grid = torch.linspace(-1, 1, side)
        flow = attention_flow(8 * torch.eye(side * side)[None], side, grid, grid, 0.02)
        assert flow.shape == (1, 2, side, side)
        assert flow.abs().max().item() <= tolerance


def test_shift_attention_gives_one_cell_right_then_four_on_the_flow_grid() -> None:
    side = 8
    attention = torch.zeros(1, side * side, side * side)
    for cell in range(side * side):
        column = cell % side
        attention[0, cell, cell + 1 if column < side - 1 else cell] = 8
    grid = torch.linspace(-1, 1, side)
    flow = attention_flow(attention, side, grid, grid, 0.02)
    expected_x = torch.ones(side, side)
    expected_x[:, -1] = 0
    torch.testing.assert_close(flow[0, 0], expected_x, atol=1e-6, rtol=0)
    assert flow[0, 1].abs().max() <= 1e-6
    fine = to_flow_grid(flow, 4 * side)
    assert fine.shape == (1, 2, 32, 32)
    torch.testing.assert_close(
        fine[0, 0], 4 * expected_x.repeat_interleave(4, 0).repeat_interleave(4, 1), atol=4e-6, rtol=0
    )
    assert fine[0, 1].abs().max() <= 4e-6


def test_coarse_identity_through_the_upsampling_chain() -> None:
    """Spec test 5 at g = 16: the released chain quantises an identity A11; pinned numerically."""
    grid = torch.linspace(-1, 1, 32)
    flow = attention_flow(8 * torch.eye(256)[None], 32, grid, grid, 0.02)[0]
    fx, fy = flow
    assert flow.abs().max() <= 1 + 1e-3 and flow.abs().max() > 0.99
    row = fx[0]
    assert row[0:10:2].abs().max() <= 1e-5  # even columns of the left half: 0
    torch.testing.assert_close(row[1:11:2], torch.full((5,), -1.0), atol=2e-3, rtol=0)  # odd ones: about -1
    torch.testing.assert_close(row[[11, 13, 15]], torch.tensor([-0.88905, -0.00194, 0.0]), atol=1e-4, rtol=0)
    assert fx.abs().mean().item() == pytest.approx(0.3619, abs=5e-4)
    # Mirror symmetric left-right, and x and y are each other's transpose.
    torch.testing.assert_close(fx, -fx.flip(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(fy, fx.T, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("which", "n_src", "n_trg"), [("11", 16, 16), ("12", 16, 64), ("21", 64, 16), ("22", 64, 64)])
def test_attention_volume_is_the_released_reshape_and_upsample_order(which: str, n_src: int, n_trg: int) -> None:
    attention = torch.rand(2, n_src, n_trg, generator=torch.Generator().manual_seed(int(which)))
    volume = attention_volume(attention, 8)
    assert volume.shape == (2, 64, 8, 8)
    torch.testing.assert_close(volume, released_volume(attention, 4, which), atol=1e-7, rtol=0)


def test_soft_argmax_is_the_released_one_with_trained_grids() -> None:
    generator = torch.Generator().manual_seed(5)
    volume = torch.rand(2, 64, 8, 8, generator=generator) * 0.2
    grid_x = torch.linspace(-1, 1, 8) + 0.1 * torch.randn(8, generator=generator)
    grid_y = torch.linspace(-1, 1, 8) + 0.1 * torch.randn(8, generator=generator)
    ours = soft_argmax_flow(volume, grid_x, grid_y, 0.02)
    torch.testing.assert_close(ours, released_soft_argmax_flow(volume, grid_x, grid_y, 0.02), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert soft_argmax_flow(volume, grid_x, grid_y, 0.02).dtype == torch.float32


# ---- 3. keypoint transfer --------------------------------------------------------------------------


def released_flow2kps(points: Tensor, flow: Tensor, size: int) -> Tensor:
    """``flow2kps`` (``utils_training/utils.py`` 75-86) on ``[B, N, 2]`` points, all of them valid."""
    _, _, h, _ = flow.size()
    flow = F.interpolate(flow, (size, size), mode="bilinear") * (size / h)
    out = []
    for kps, one in zip(points.transpose(1, 2).long(), flow):
        kp = torch.clamp(kps, 0, size - 1)
        out.append(kp + one[:, kp[1, :], kp[0, :]])
    return torch.stack(out).transpose(1, 2)


@pytest.mark.parametrize(("side", "size"), [(32, 64), (128, 512), (16, 48)])
def test_transfer_keypoints_is_released_flow2kps(side: int, size: int) -> None:
    generator = torch.Generator().manual_seed(side)
    flow = torch.randn(2, 2, side, side, generator=generator) * 3
    # Inside, fractional, negative (truncated toward 0 then clamped) and beyond the border.
    points = torch.rand(2, 50, 2, generator=generator) * (size + 40) - 20
    points[0, :4] = torch.tensor([[-0.7, -0.2], [size - 0.4, size + 3.0], [0.0, 0.0], [size - 1.0, 12.999]])
    ours = transfer_keypoints(flow, points, size)
    assert ours.dtype == torch.float32 and ours.shape == points.shape
    torch.testing.assert_close(ours, released_flow2kps(points, flow, size), atol=1e-5, rtol=1e-6)
    # A zero flow leaves each point at its truncated, clamped pixel.
    still = transfer_keypoints(torch.zeros(2, 2, side, side), points, size)
    torch.testing.assert_close(still, points.trunc().clamp(0, size - 1), atol=0, rtol=0)


# ---- 4. the layout-aware encoder -------------------------------------------------------------------


def released_rpe_index(g: int) -> Tensor:
    """``generate_2d_concatenated_self_attention_relative_positional_encoding_index([g, g], [g, g])``
    (``models/encoder/layers/rpe.py`` 27-56)."""
    z_h, z_w = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    x_h, x_w = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    cat_h = torch.cat((z_h.flatten(0), x_h.flatten(0)))
    cat_w = torch.cat((z_w.flatten(0), x_w.flatten(0)))
    diff_h = cat_h[:, None] - cat_h[None, :]
    diff_w = cat_w[:, None] - cat_w[None, :]
    length = 2 * g * g
    a = torch.empty(length, dtype=torch.int64)
    a[: g * g] = 0
    a[g * g :] = 1
    b = a[:, None].repeat(1, length)
    c = a[None, :].repeat(length, 1)
    diff = torch.stack((diff_h, diff_w, b, c), dim=-1)
    _, indices = torch.unique(diff.view(length * length, 4), return_inverse=True, dim=0)
    return indices.view(length, length)


def test_relative_position_index_by_hand_at_g2() -> None:
    index = relative_position_index(2)
    assert index.shape == (8, 8) and index.dtype == torch.long
    assert index.unique().numel() == 36 == 4 * 3**2 and index.min() == 0 and index.max() == 35
    src00, src11, trg00 = 0, 3, 4  # source patches 0..3, target patches 4..7, row-major
    assert index[src00, src00] == index[src11, src11]
    assert index[src00, trg00] != index[src00, src00]
    assert index[trg00, trg00] not in (index[src00, src00], index[src00, trg00], index[trg00, src00])


@pytest.mark.parametrize("g", [2, 3, 4])
def test_relative_position_index_is_the_released_one(g: int) -> None:
    assert torch.equal(relative_position_index(g), released_rpe_index(g))


def released_rpe_attention(state: dict[str, Tensor], x: Tensor, heads: int, g: int) -> Tensor:
    """``models/encoder/layers/attn.py`` ``Attention.forward`` (rpe on, no mask, eval) with
    257 -> 1 + n, 256 -> n, 258 -> 2 + n."""
    n = g * g
    B, N, C = x.shape
    qkv = F.linear(x, state["qkv.weight"], state["qkv.bias"]).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
    bias = state["relative_position_bias_table"][:, released_rpe_index(g)].unsqueeze(0)
    attn_tmp = torch.cat(
        [
            torch.cat([attn[:, :, 1 : 1 + n, 1 : 1 + n], attn[:, :, 1 : 1 + n, 2 + n :]], dim=3),
            torch.cat([attn[:, :, 2 + n :, 1 : 1 + n], attn[:, :, 2 + n :, 2 + n :]], dim=3),
        ],
        dim=2,
    )
    attn_tmp += bias
    attn = torch.cat(
        [
            attn[:, :, 0:1, :],
            torch.cat(
                [
                    attn[:, :, 1 : 1 + n, 0:1],
                    attn_tmp[:, :, 0:n, 0:n],
                    attn[:, :, 1 : 1 + n, 1 + n : 2 + n],
                    attn_tmp[:, :, 0:n, n:],
                ],
                dim=3,
            ),
            attn[:, :, 1 + n : 2 + n, :],
            torch.cat(
                [
                    attn[:, :, 2 + n :, 0:1],
                    attn_tmp[:, :, n:, 0:n],
                    attn[:, :, 2 + n :, 1 + n : 2 + n],
                    attn_tmp[:, :, n:, n:],
                ],
                dim=3,
            ),
        ],
        dim=2,
    )
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(x, state["proj.weight"], state["proj.bias"])


def test_relative_attention_bias_and_forward_are_released() -> None:
    torch.manual_seed(1)
    g, heads = 3, 2
    attention = RelativeAttention(16, heads, g, dropout=0.1).eval()
    with torch.no_grad():
        attention.relative_position_bias_table.normal_()  # large enough to matter
    n = g * g
    bias = attention.bias()
    assert bias.shape == (heads, 2 + 2 * n, 2 + 2 * n)
    for cls in (0, 1 + n):  # both CLS tokens: no bias on their rows and columns
        assert (bias[:, cls, :] == 0).all() and (bias[:, :, cls] == 0).all()
    patches = torch.cat([torch.arange(1, 1 + n), torch.arange(2 + n, 2 + 2 * n)])
    table = attention.relative_position_bias_table
    assert torch.equal(bias[:, patches][:, :, patches], table[:, released_rpe_index(g)])
    x = torch.randn(2, 2 + 2 * n, 16)
    state = attention.state_dict()
    assert "relative_position_bias_table" in state and "bias_index" not in state  # derived, not stored
    torch.testing.assert_close(attention(x), released_rpe_attention(state, x, heads, g), atol=1e-5, rtol=1e-5)


def test_joint_encoder_is_the_released_single_tower() -> None:
    torch.manual_seed(2)
    g, dim, heads = 2, 16, 2
    encoder = JointEncoder(dim, g, depth=2, heads=heads, mlp_ratio=4, dropout=0.1).eval()
    # The two images' positions start equal (the released aliased views), then train apart.
    assert torch.equal(encoder.pos_embed_src, encoder.pos_embed_trg)
    assert torch.equal(encoder.cls_pos_embed_src, encoder.cls_pos_embed_trg)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    src, trg = torch.randn(2, 2, 1 + g * g, dim)
    p = encoder.state_dict()
    # single_tower_smask.py 59-93 and attn_blocks.py Block_nmask, eval mode.
    x = torch.cat(
        [
            src[:, :1] + p["cls_pos_embed_src"],
            src[:, 1:] + p["pos_embed_src"] + p["src_segment_pos_embed"],
            trg[:, :1] + p["cls_pos_embed_trg"],
            trg[:, 1:] + p["pos_embed_trg"] + p["trg_segment_pos_embed"],
        ],
        dim=1,
    )
    for i in range(2):
        b = {k[len(f"blocks.{i}.") :]: v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        attn_state = {k[len("attn.") :]: v for k, v in b.items() if k.startswith("attn.")}
        x = x + released_rpe_attention(
            attn_state, F.layer_norm(x, (dim,), b["norm1.weight"], b["norm1.bias"], 1e-6), heads, g
        )
        hidden = F.gelu(
            F.linear(
                F.layer_norm(x, (dim,), b["norm2.weight"], b["norm2.bias"], 1e-6),
                b["mlp.fc1.weight"],
                b["mlp.fc1.bias"],
            )
        )
        x = x + F.linear(hidden, b["mlp.fc2.weight"], b["mlp.fc2.bias"])
    x = F.layer_norm(x, (dim,), p["norm.weight"], p["norm.bias"], 1e-6)
    ours = encoder(src, trg)
    torch.testing.assert_close(ours[0], x[:, : 1 + g * g], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], x[:, 1 + g * g :], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 5, C\]"):
        encoder(src[:, :4], trg[:, :4])


# ---- the decoder block -----------------------------------------------------------------------------


def released_decoder(p: dict[str, Tensor], src: Tensor, tgt: Tensor, heads: int, g: int, src_mlp: bool) -> Tensor:
    """``MultiscaleDecoder.forward`` (``models/LPMFlow.py`` 203-235, eval) with 258 -> 2 + g^2."""
    dim = src.shape[-1]

    def norm(x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, (dim,), p[f"{name}.weight"], p[f"{name}.bias"], 1e-6)

    def mlp(x: Tensor) -> Tensor:
        return F.linear(
            F.gelu(F.linear(x, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
        )

    def attention(name: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        B, Nx, C = x.shape
        qx = (
            F.linear(x, p[f"{name}.qkv.weight"], p[f"{name}.qkv.bias"])
            .reshape(B, Nx, 3, heads, C // heads)
            .permute(2, 0, 3, 1, 4)[0]
        )
        kvy = (
            F.linear(y, p[f"{name}.qkv.weight"], p[f"{name}.qkv.bias"])
            .reshape(B, y.shape[1], 3, heads, C // heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = ((qx @ kvy[1].transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        out = F.linear(
            (attn @ kvy[2]).transpose(1, 2).reshape(B, Nx, C), p[f"{name}.proj.weight"], p[f"{name}.proj.bias"]
        )
        return out, attn.sum(1)

    src = src + (p["pos_embed_src_up"] if src.shape[1] > 2 + g * g else p["pos_embed_src"])
    tgt = tgt + (p["pos_embed_trg_up"] if tgt.shape[1] > 2 + g * g else p["pos_embed_trg"])
    src = src + released_arf(attention("sattn", norm(src, "norm1"), norm(src, "norm1"))[0])
    src = src + (mlp(norm(src, "norm2")) if src_mlp else norm(src, "norm2"))
    tgt = tgt + released_arf(attention("sattn", norm(tgt, "norm1"), norm(tgt, "norm1"))[0])
    tgt = tgt + mlp(norm(tgt, "norm2"))
    out, attn_src = attention("cattn", norm(src, "norm1"), norm(tgt, "norm1"))
    src = src + released_arf(out)
    src = src + mlp(norm(src, "norm2"))
    return src, tgt, attn_src[:, 1:, 1:]


@pytest.mark.parametrize("src_mlp", [False, True])
def test_decoder_block_is_the_released_multiscale_decoder(src_mlp: bool) -> None:
    torch.manual_seed(3)
    g, dim, heads = 2, 16, 2
    block = DecoderBlock(dim, heads, 4, 0.1, grid=g, grids=(g, 2 * g), src_mlp=src_mlp).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    p = block.state_dict()
    assert sorted(k for k in p if "pos_embed" in k) == [
        "pos_embed_src",
        "pos_embed_src_up",
        "pos_embed_trg",
        "pos_embed_trg_up",
    ]
    for n_src, n_trg in ((g, g), (g, 2 * g), (2 * g, g), (2 * g, 2 * g)):
        src, trg = torch.randn(2, 1 + n_src**2, dim), torch.randn(2, 1 + n_trg**2, dim)
        ours = block(src, trg)
        theirs = released_decoder(p, src, trg, heads, g, src_mlp)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert ours[2].shape == (2, n_src**2, n_trg**2) and ours[2].dtype == torch.float32
        rows = ours[2].sum(-1)  # each head's row sums to 1 over the CLS column and the patches
        assert (rows > 0).all() and (rows < heads).all()
    # D1 and D3 build only the positions they use; another token count is refused.
    assert sorted(k for k in DecoderBlock(dim, heads, 4, 0.1, g, (g,), False).state_dict() if "pos" in k) == [
        "pos_embed_src",
        "pos_embed_trg",
    ]
    with pytest.raises(ValueError, match="takes token grids"):
        DecoderBlock(dim, heads, 4, 0.1, g, (g,), False)(torch.randn(1, 17, dim), torch.randn(1, 5, dim))


# ---- 5. the model ----------------------------------------------------------------------------------


def _valid(batch: int, count: int) -> Tensor:
    return torch.ones(batch, count, dtype=torch.bool)


def test_encode_and_match_shapes(small: LPMFlow, eval_encoded: LpmflowEncoded) -> None:
    assert small.grid == 4 and small.input_spec.size == SIDE
    assert eval_encoded.flow.shape == (2, 2, 32, 32) and eval_encoded.flow.dtype == torch.float32
    assert eval_encoded.src.shape == eval_encoded.trg.shape == (2, 384, 8, 8)
    assert eval_encoded.size == SIDE and eval_encoded.contrastive is None and eval_encoded.flow.isfinite().all()
    kps = random_keypoints(2, 5, SIDE)
    (matches,) = small.match(eval_encoded, kps, _valid(2, 5))
    assert matches.points.shape == (2, 5, 2) and matches.scores.shape == (2, 5, 8, 8) and matches.stride == 8
    assert matches.flow is eval_encoded.flow and matches.contrastive is None
    assert matches.scores.abs().max() <= 1 + 1e-5


def test_eval_is_deterministic_and_padded_keypoints_are_finite(
    small: LPMFlow, pair: tuple[Tensor, Tensor], eval_encoded: LpmflowEncoded
) -> None:
    with torch.no_grad():
        again = small.eval().encode(*pair)
    assert torch.equal(again.flow, eval_encoded.flow) and torch.equal(again.src, eval_encoded.src)
    assert torch.equal(again.trg, eval_encoded.trg)
    kps = random_keypoints(2, 6, SIDE)
    valid = _valid(2, 6)
    kps[0, 4:] = float("nan")  # padding as a loader may leave it
    kps[1, 3:] = -1.0
    valid[0, 4:] = False
    valid[1, 3:] = False
    (matches,) = small.match(again, kps, valid)
    assert matches.points.isfinite().all() and matches.scores.isfinite().all()
    (first,) = small.match(again, kps[:, :3], valid[:, :3])
    torch.testing.assert_close(matches.points[:, :3], first.points, atol=0, rtol=0)


def test_eval_neither_replaces_tokens_nor_adds_the_training_position(
    small: LPMFlow, pair: tuple[Tensor, Tensor], eval_encoded: LpmflowEncoded, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, images = copy.deepcopy(small), (pair[0][:1], pair[1][:1])
    calls: list[tuple[int, int]] = []
    real = lpmflow_model.replace_tokens

    def spy(src: Tensor, trg: Tensor, topk: int, count: int) -> tuple[Tensor, Tensor]:
        calls.append((topk, count))
        return real(src, trg, topk, count)

    monkeypatch.setattr(lpmflow_model, "replace_tokens", spy)

    def train_flow() -> LpmflowEncoded:
        torch.manual_seed(7)  # the same dropout masks and draws
        with torch.no_grad():
            return model.train().encode(*images)

    before = train_flow()
    with torch.no_grad():
        model.train_pos_embed.fill_(50.0)
        evaluated = model.eval().encode(*images)
    assert calls == [(16, 4)]  # training only: all 16 patches candidates, 4 replaced
    # (Batch 1 against the batch-2 fixture: equal up to the matmul blocking.)
    torch.testing.assert_close(evaluated.flow, eval_encoded.flow[:1], atol=1e-4, rtol=1e-5)
    assert evaluated.contrastive is None
    after = train_flow()
    assert calls == [(16, 4), (16, 4)]
    assert not torch.allclose(after.flow, before.flow)
    for encoded in (before, after):
        assert encoded.contrastive.dim() == 0 and encoded.contrastive.isfinite() and encoded.contrastive > 0


def test_one_backward_reaches_every_trainable_parameter(small: LPMFlow, pair: tuple[Tensor, Tensor]) -> None:
    """DDP safety (spec test 15): no unused parameters; the trainable grids get gradients."""
    model = copy.deepcopy(small).train()
    torch.manual_seed(11)
    kps = random_keypoints(1, 8, SIDE)
    outputs = model(pair[0][:1], pair[1][:1], kps, _valid(1, 8))
    loss = model.loss(outputs, random_keypoints(1, 8, SIDE, seed=2), _valid(1, 8))
    assert loss.dim() == 0 and loss.isfinite()
    loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert not [name for name, p in trainable if p.grad is None]
    assert {"grid_x", "grid_y", "train_pos_embed"} <= {name for name, _ in trainable}
    assert model.grid_x.grad.abs().sum() > 0 and model.grid_y.grad.abs().sum() > 0
    frozen = {
        name.split(".")[2] for name, p in model.backbone.named_parameters() if p.requires_grad and "blocks" in name
    }
    assert frozen == {"10", "11"}  # finetune last_blocks 2 of ViT-S's 12


def test_fixed_grids_are_buffers_in_the_state_dict() -> None:
    config = ModelConfig.of_kind(
        "lpmflow",
        backbone="dinov2_vits14",
        image_size=56,
        weights=None,
        options=LpmflowOptions(input_size=64, learn_grid=False, train_pe=False),
    )
    model = _meta_model(config)
    names = dict(model.named_parameters())
    assert "grid_x" not in names and "grid_y" not in names and "train_pos_embed" not in names
    assert {"grid_x", "grid_y"} <= set(model.state_dict()) and {"grid_x", "grid_y"} <= dict(
        model.named_buffers()
    ).keys()
    learned = _meta_model(SMALL)
    assert {"grid_x", "grid_y", "train_pos_embed"} <= dict(learned.named_parameters()).keys()
    assert learned.grid_x.shape == learned.grid_y.shape == (8,)


# ---- 6. plumbing identity --------------------------------------------------------------------------


def test_zero_flows_and_head_transfer_points_to_their_pixels(
    small: LPMFlow, pair: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = copy.deepcopy(small)
    model.refinement.zero_head()

    def zero_flow(attention: Tensor, side: int, grid_x: Tensor, grid_y: Tensor, beta: float) -> Tensor:
        return attention.new_zeros(attention.shape[0], 2, side, side)

    monkeypatch.setattr(lpmflow_model, "attention_flow", zero_flow)
    with torch.no_grad():
        encoded = model.eval().encode(*pair)
    assert torch.equal(encoded.flow, torch.zeros(2, 2, 32, 32))
    # Original pixels, sources (W, H) = (100, 50) and (64, 64), targets (200, 80) and (32, 128).
    src_kps = torch.tensor(
        [
            [[30.0, 20.0], [120.0, -3.0], [-0.5, 49.9], [99.0, 0.0]],
            [[10.5, 63.99], [0.0, 0.0], [63.0, 31.5], [70.0, 2.0]],
        ]
    )
    src_sizes = torch.tensor([[100, 50], [64, 64]])
    trg_sizes = torch.tensor([[200, 80], [32, 128]])
    predicted = model.match_original(encoded, src_kps, _valid(2, 4), src_sizes, trg_sizes).points
    # Input pixels x * 64 / W, truncated, clamped to [0, 63] (the released transfer), then x * W' / 64.
    in_64 = torch.tensor(
        [[[19.0, 25.0], [63.0, 0.0], [0.0, 63.0], [63.0, 0.0]], [[10.0, 63.0], [0.0, 0.0], [63.0, 31.0], [63.0, 2.0]]]
    )
    torch.testing.assert_close(src_kps.mul(64 / src_sizes[:, None]).trunc().clamp(0, 63), in_64, atol=0, rtol=0)
    expected = in_64 * trg_sizes[:, None] / 64
    assert expected[0, 0].tolist() == [59.375, 31.25]
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=0)


# ---- 7. the loss -----------------------------------------------------------------------------------


def test_contrastive_weight_schedule() -> None:
    options = LpmflowOptions()
    assert [options.contrastive_weight_at(e) for e in (0, 1, 2, 4, 10, 15)] == pytest.approx(
        [0.2, 0.2, 0.1, 0.05, 0.02, 0.02]
    )
    assert options.contrastive_weight_at(3) == pytest.approx(0.2 / 3) and options.contrastive_weight_at(None) == 0.2


def test_loss_is_epe_on_the_released_target_plus_the_weighted_contrastive(
    small: LPMFlow, pair: tuple[Tensor, Tensor]
) -> None:
    model = copy.deepcopy(small).train()
    torch.manual_seed(13)
    src_kps, trg_kps = random_keypoints(2, 6, SIDE, seed=4), random_keypoints(2, 6, SIDE, seed=5)
    valid = _valid(2, 6)
    valid[1, 4:] = False
    outputs = model(*pair, src_kps, valid)
    prediction = outputs[-1]
    contrastive = prediction.contrastive
    assert contrastive is not None and contrastive > 0
    # Flow 32 x 32 over the 64 input frame: stride 2 px; the box half-width 4.25 cells = 8.5 px.
    gt, mask = released_flow_target(src_kps, trg_kps, valid, 32, 2.0, 8.5)
    assert mask.any()
    epe = epe_loss(prediction.flow, gt, mask)
    for epoch, weight in ((None, 0.2), (0, 0.2), (2, 0.1), (15, 0.02)):
        model.epoch = None
        if epoch is not None:
            model.set_epoch(epoch)
        loss = model.loss(outputs, trg_kps, valid)
        torch.testing.assert_close(loss, epe + weight * contrastive, atol=1e-6, rtol=1e-6)
    # Without the contrastive term (eval mode) the loss is the EPE alone.
    eval_outputs = [prediction._replace(contrastive=None)]
    torch.testing.assert_close(model.loss(eval_outputs, trg_kps, valid), epe, atol=0, rtol=0)


# ---- 8. config checks and the released model's shapes ---------------------------------------------


def test_config_checks() -> None:
    def config(**fields: object) -> ModelConfig:
        base = {"backbone": "dinov2_vits14", "image_size": 56, "weights": None}
        options = fields.pop("options", LpmflowOptions(input_size=64))
        return ModelConfig.of_kind("lpmflow", **{**base, **fields}, options=options)

    with pytest.raises(ValueError, match=r"image_size a multiple of 28 .*got 42"):
        config(image_size=42)  # a multiple of the 14-px patch, but an odd 3 x 3 grid
    with pytest.raises(ValueError, match=r"image_size a multiple of 32 .*got 48"):
        config(backbone="ibot_vitb16", image_size=48)
    with pytest.raises(ValueError, match="lpmflow needs a ViT backbone"):
        config(backbone="resnet18", image_size=64)
    with pytest.raises(ValueError, match="localizer must be null"):
        config(localizer="argmax")
    with pytest.raises(ValueError, match=r"input_size 48 must be a multiple of the 32 x 32 flow"):
        config(options=LpmflowOptions(input_size=48))
    with pytest.raises(ValueError, match=r"refine_windows 12 must divide the 32 x 32 map"):
        config(options=LpmflowOptions(input_size=64, refine_windows=(16, 12)))
    with pytest.raises(ValueError, match=r"fsr_window 3 must divide the 8 x 8 map"):
        config(options=LpmflowOptions(input_size=64, fsr_window=3))
    with pytest.raises(ValueError, match="at least one window"):
        LpmflowOptions(refine_windows=())
    # A window as large as the map is the whole map; 96 = 3 x 32 is a multiple of the flow side.
    wide = config(options=LpmflowOptions(refine_windows=(64, 8), input_size=96))
    assert wide.options.input_side(wide) == 96
    # Unset, the input frame has 4 pixels per flow cell as released: 128 for the 32 x 32 flow at g = 4.
    assert InputSpec.of(config(options=LpmflowOptions())).size == 128


def test_defaults_are_the_released_model() -> None:
    config = ModelConfig.of_kind("lpmflow")
    assert (config.backbone, config.image_size, config.finetune, config.final_norm) == (
        "ibot_vitb16",
        256,
        "full",
        True,
    )
    assert (config.position_resampling, config.pixel_convention, config.localizer) == ("official", "official", None)
    options = config.options
    assert options == LpmflowOptions() and options.input_side(config) == 512 and options.halfwidth(4) == 17
    assert (options.encoder_depth, options.heads, options.mlp_ratio, options.context_channels) == (6, 8, 4, 88)
    assert (options.fsr_window, options.refine_windows, options.flow_beta, options.dropout) == (
        4,
        (16, 8, 4),
        0.02,
        0.1,
    )
    assert (options.src_mlp, options.learn_grid, options.train_pe) == (False, True, True)
    assert (options.topk_fraction, options.replace_fraction, options.contrastive_temperature) == (0.25, 0.25, 0.1)

    model = _meta_model(ModelConfig.of_kind("lpmflow", weights=None))
    assert model.input_spec.size == 512 and model.grid == 16
    counts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("backbone", "encoder", "fsr", "refinement", "context")
    }
    # Spec 3.12: backbone 85.8M, encoder 43.1M used, FSR 14.3M, refinement 0.38M, context 0.07M, training PE 0.2M.
    assert counts == {
        "backbone": 85_798_656,
        "encoder": 43_109_568,
        "fsr": 14_327_056,
        "refinement": 377_690,
        "context": 768 * 88 + 88,
    }
    assert model.train_pos_embed.numel() == 257 * 768
    # Three released decoders are 3 x 11.4M = 34.3M; ours lack D1's 2g and D3's g positions and norm3/norm4.
    decoders = sum(
        sum(p.numel() for p in block.parameters())
        for block in (model.decoder_coarse, model.decoder_cross, model.decoder_fine)
    )
    unused = 2 * 1025 * 768 + 2 * 257 * 768 + 3 * 4 * 768
    assert decoders + unused == 3 * 11_422_464 and round((decoders + unused) / 1e6, 1) == 34.3


@pytest.mark.parametrize(("image_size", "g"), [(128, 8), (256, 16)])
def test_ibot_shape_table_on_the_meta_device(image_size: int, g: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spec 3.11's table (S = 128 the CPU column, S = 256 the released one), shapes only."""
    model = _meta_model(ModelConfig.of_kind("lpmflow", image_size=image_size, weights=None)).eval()
    n, side, flow_side = g * g, 2 * g, 8 * g
    seen: dict[str, list[tuple[int, ...]]] = {}

    def record(name: str, value: object) -> None:
        seen.setdefault(name, []).append(tuple(value.shape))

    tokens = model.backbone.tokens
    monkeypatch.setattr(model.backbone, "tokens", lambda images: record("images", images) or tokens(images))
    real_grid = lpmflow_model.to_flow_grid
    monkeypatch.setattr(lpmflow_model, "to_flow_grid", lambda flow, s: record("up_flow", flow) or real_grid(flow, s))

    def hook(name: str) -> Callable[..., None]:
        def record_outputs(module: object, args: object, out: Tensor | tuple[Tensor, ...]) -> None:
            for value in out if isinstance(out, tuple) else (out,):
                record(name, value)

        return record_outputs

    for name in ("encoder", "decoder_coarse", "decoder_cross", "decoder_fine", "fsr", "context_dropout", "refinement"):
        getattr(model, name).register_forward_hook(hook(name))
    model.refinement.register_forward_pre_hook(lambda module, args: record("refine_in", args[0]))
    src = torch.empty(1, 3, 2 * image_size, 2 * image_size, device="meta")
    encoded = model.encode(src, src)
    (matches,) = model.match(
        encoded, torch.zeros(1, 3, 2, device="meta"), torch.ones(1, 3, dtype=torch.bool, device="meta")
    )

    assert seen["images"] == [(2, 3, image_size, image_size)]  # the 2S input frame resized to S inside
    assert seen["encoder"] == [(1, 1 + n, 768)] * 2
    assert model.encoder.blocks[0].attn.relative_position_bias_table.shape == (8, 4 * (2 * g - 1) ** 2)
    assert seen["decoder_coarse"] == [(1, 1 + n, 768), (1, 1 + n, 768), (1, n, n)]
    assert seen["decoder_cross"] == [
        (1, 1 + n, 768),
        (1, 1 + 4 * n, 768),
        (1, n, 4 * n),
        (1, 1 + 4 * n, 768),
        (1, 1 + n, 768),
        (1, 4 * n, n),
    ]
    assert seen["decoder_fine"] == [(1, 1 + 4 * n, 768), (1, 1 + 4 * n, 768), (1, 4 * n, 4 * n)]
    assert seen["fsr"] == [(1, 1 + 4 * n, 768)] * 4
    assert seen["up_flow"] == [(1, 2, side, side)] * 4
    assert seen["context_dropout"] == [(1, 88, flow_side, flow_side)]
    assert seen["refine_in"] == [(1, 96, flow_side, flow_side)] and seen["refinement"] == [(1, 2, flow_side, flow_side)]
    assert encoded.flow.shape == (1, 2, flow_side, flow_side) and encoded.src.shape == (1, 768, side, side)
    assert matches.points.shape == (1, 3, 2) and matches.scores.shape == (1, 3, side, side)
    assert matches.stride == 2 * image_size / side == 16
    assert int(n * 0.25) == n // 4 and int(n // 4 * 0.25) == n // 16  # K / L: 16 / 4 at S = 128, 64 / 16 at 256


# ---- 9. the released weights ------------------------------------------------------------------------

RELEASED_ARGS = {"num_heads": 4, "mlp_ratio": 4, "feature_size": 128, "benchmark": "spair"}
RELEASED_UNUSED = {
    "masked_tokens": (17, 768),
    "encoder.pos_embed": (1, 17, 768),
    "encoder.cls_token": (1, 1, 768),
    "encoder.patch_embed.proj.weight": (768, 3, 16, 16),
    "encoder.blocks.0.spatial_attention.weight": (1, 1, 768),
    "encoder.blocks.0.attn.relative_position_index": (32, 32),
    "decoder_s1.last_block.0.norm3.weight": (768,),
    "decoder_s2.last_block.0.norm4.bias": (768,),
    "decoder_s1.last_block.0.pos_embed_src_up": (1, 65, 768),
    "decoder_s3.last_block.0.pos_embed_src": (1, 17, 768),
    "SRBranches.refine_swin_decoder_8.0.transformer.layers.0.blocks.0.attn.relative_position_index": (64, 64),
}


@pytest.fixture(scope="module")
def released_pair() -> tuple[LPMFlow, dict[str, Tensor]]:
    """A perturbed iBOT-B/16 LPMFlow at 64 (g = 4, input 128) and its state in the released layout."""
    config = ModelConfig.of_kind(
        "lpmflow",
        image_size=64,
        weights=None,
        options=LpmflowOptions(encoder_depth=1, heads=4, context_channels=8),
    )
    torch.manual_seed(21)
    model = build_model(config)
    with torch.no_grad():  # the head (zero-initialised embeddings and grids included) away from its init
        for name, parameter in model.named_parameters():
            if not name.startswith("backbone."):
                parameter.add_(0.05 * torch.randn_like(parameter))
    state = {to_released_key(key): value for key, value in model.state_dict().items()}
    assert len(state) == len(model.state_dict())  # one released key each
    assert {released_key(key) for key in state} == set(model.state_dict())
    assert "pos_embed_src" in state and "x_normal" in state and "SRBranches.refine2.2.weight" in state
    assert "SRBranch_feat.refine_swin_decoder_1_2.1.fc.0.weight" in state
    assert "SRBranches.refine_swin_decoder_4.0.transformer.norm.weight" in state
    assert "feature_extraction.backbone.cls_token" in state and "encoder.pos_embed_src" in state
    generator = torch.Generator().manual_seed(0)
    for key, shape in RELEASED_UNUSED.items():
        assert released_key(key) is None, key
        state[key] = torch.randn(shape, generator=generator)
    return model.eval(), state


def test_released_state_loads_exactly_the_original(
    released_pair: tuple[LPMFlow, dict[str, Tensor]],
) -> None:
    original, state = released_pair
    loaded = lpmflow_from_released(RELEASED_ARGS, state, "folder").eval()
    assert loaded.config == original.config
    assert loaded.input_spec.size == 128
    loaded_state = loaded.state_dict()
    # The same class, config and state: the same predictions (tools/check_lpmflow_release.py
    # compares predictions against the released code itself).
    assert [key for key, value in original.state_dict().items() if not torch.equal(loaded_state[key], value)] == []


def test_released_state_errors(
    released_pair: tuple[LPMFlow, dict[str, Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, state = released_pair
    # The checks read only the names and shapes of the model's state: build it on the meta device.
    monkeypatch.setattr(lpmflow_released, "LPMFlow", _meta_model)
    missing = dict(state)
    del missing["decoder_s3.last_block.0.cattn.qkv.weight"]
    with pytest.raises(
        ValueError, match=r"folder/model_best.pth lacks parameters LPMFlow uses \(1\): \['decoder_s3.last_block.0.cattn.qkv.weight'\]"
    ):
        lpmflow_from_released(RELEASED_ARGS, missing, "folder")
    extra = dict(state)
    extra["decoder_s2.last_block.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(
        ValueError, match=r"folder: released keys that fit no parameter .*decoder_s2.last_block.0.extra.weight"
    ):
        lpmflow_from_released(RELEASED_ARGS, extra, "folder")
    with pytest.raises(ValueError, match="folder/args.pkl: num_heads and mlp_ratio"):
        lpmflow_from_released({"mlp_ratio": 4}, state, "folder")
    with pytest.raises(ValueError, match="has no encoder.pos_embed_src"):
        lpmflow_from_released(RELEASED_ARGS, {k: v for k, v in state.items() if k != "encoder.pos_embed_src"}, "folder")
