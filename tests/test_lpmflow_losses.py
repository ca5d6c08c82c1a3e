"""LPMFlow's losses (``shared/reference/lpmflow.md`` sections 3.2 and 4, tests 7-10 of section 12):
token replacement, the neighbour mean, InfoNCE with the other replaced tokens as negatives, the
released pseudo-dense flow (hand cases and a slow transcription of the released ``KeypointToFlow``)
and the end-point error."""

from __future__ import annotations

import math

import pytest
import torch

from sm_model.lpmflow.losses import (
    contrastive_loss,
    epe_loss,
    info_nce,
    neighbour_mean,
    released_flow_target,
    replace_tokens,
)

SMALL = math.log1p(math.exp(-10))  # 4.539890e-05
LARGE = math.log1p(math.exp(10))  # 10.0000454


# ---------------------------------------------------------------- InfoNCE


def test_info_nce_hand_values() -> None:
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # q1 = e1 matches its positive e1, its only negative q2 = e2 is orthogonal: logits (10, 0); q2 alike.
    aligned = info_nce(torch.tensor([[e1, e2]]), torch.tensor([[e1, e2]]), 0.1)
    # float32 cross-entropy is log-sum-exp(10, 0) - 10: about 1e-6 absolute, not relative, accuracy.
    assert aligned.item() == pytest.approx(SMALL, abs=1e-6)
    # Both queries e1, both positives e2: logits (0, 10) for each query.
    crossed = info_nce(torch.tensor([[e1, e1]]), torch.tensor([[e2, e2]]), 0.1)
    assert crossed.item() == pytest.approx(LARGE, rel=1e-6)
    # The mean over pairs; lengths do not matter (vectors are normalised).
    both = info_nce(torch.tensor([[e1, e2], [e1, e1]]) * 3, torch.tensor([[e1, e2], [e2, e2]]) * 0.5, 0.1)
    assert both.dtype == torch.float32 and both.dim() == 0
    assert both.item() == pytest.approx((SMALL + LARGE) / 2, rel=1e-6)
    # Three orthogonal queries, each its own positive: logits (10, 0, 0).
    eye = torch.eye(3)[None]
    assert info_nce(eye, eye, 0.1).item() == pytest.approx(math.log1p(2 * math.exp(-10)), abs=1e-6)


def test_info_nce_degenerate_lengths() -> None:
    query = torch.randn(2, 1, 4, requires_grad=True)
    single = info_nce(query, torch.randn(2, 1, 4), 0.1)
    assert single.item() == 0.0
    empty = torch.zeros(2, 0, 4, requires_grad=True)
    loss = info_nce(empty, torch.zeros(2, 0, 4), 0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert empty.grad is not None


def test_info_nce_ignores_autocast() -> None:
    query, positive = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = info_nce(query.bfloat16(), positive.bfloat16(), 0.1)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(info_nce(query.bfloat16(), positive.bfloat16(), 0.1).item(), abs=0)


# ---------------------------------------------------------------- neighbour mean


def test_neighbour_mean_corner_edge_inside() -> None:
    grid = 8
    value = torch.arange(grid * grid, dtype=torch.float32) ** 2  # distinct, not linear in the index
    patches = torch.stack((value, -value), dim=-1)[None].requires_grad_()  # [1, 64, 2]
    index = torch.tensor([[0 * 8 + 0, 0 * 8 + 3, 3 * 8 + 3]])
    means = neighbour_mean(patches, index, grid)
    neighbours = [
        [1, 8, 9],  # (0, 0): a corner, 3
        [2, 4, 10, 11, 12],  # (0, 3): an edge, 5
        [18, 19, 20, 26, 28, 34, 35, 36],  # (3, 3): inside, 8
    ]
    expected = torch.tensor([sum(k * k for k in ks) / len(ks) for ks in neighbours])
    assert means.shape == (1, 3, 2)
    torch.testing.assert_close(means[0, :, 0], expected)
    torch.testing.assert_close(means[0, :, 1], -expected)
    assert not means.requires_grad


def test_contrastive_loss_uses_replaced_outputs_and_neighbour_means() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + 16, 6, requires_grad=True)
    index = torch.tensor([[0, 5, 15], [3, 9, 10]])
    loss = contrastive_loss(tokens, index, 4, 0.1)
    query = torch.stack([tokens[b, 1 + index[b]] for b in range(2)])
    expected = info_nce(query, neighbour_mean(tokens[:, 1:], index, 4), 0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # Positives are detached: only the replaced tokens (queries and negatives) get a gradient.
    for b in range(2):
        touched = tokens.grad[b].abs().sum(-1) > 0
        assert touched.nonzero().flatten().tolist() == (index[b] + 1).tolist()


def _released_contrastive(tokens: torch.Tensor, index: torch.Tensor, grid: int) -> torch.Tensor:
    """A slow transcription of the released loop (``optimize.py`` 57-101) with the released
    ``InfoNCE(negative_mode='paired')`` (temperature 0.1) written out: per pair, per replaced token."""
    total = 0.0
    for b in range(tokens.shape[0]):
        losses = []
        for m, k in enumerate(index[b].tolist()):
            row, col = divmod(k, grid)
            near = [
                tokens[b, 1 + r * grid + c]
                for r in range(row - 1, row + 2)
                for c in range(col - 1, col + 2)
                if (r, c) != (row, col) and 0 <= r < grid and 0 <= c < grid
            ]
            query = torch.nn.functional.normalize(tokens[b, 1 + k], dim=-1)
            positive = torch.nn.functional.normalize(torch.stack(near).mean(0), dim=-1)
            others = torch.cat((index[b, :m], index[b, m + 1 :])) + 1
            negatives = torch.nn.functional.normalize(tokens[b, others], dim=-1)
            logits = torch.cat((query.dot(positive)[None], negatives @ query)) / 0.1
            losses.append(torch.logsumexp(logits, 0) - logits[0])
        total = total + torch.stack(losses).mean()
    return total / tokens.shape[0]


def test_contrastive_loss_matches_released_loop() -> None:
    torch.manual_seed(2)
    tokens = torch.randn(3, 1 + 64, 16)
    index = torch.stack([torch.randperm(64)[:5] for _ in range(3)])
    index[0, :3] = torch.tensor([0, 7, 63])  # corners too
    torch.testing.assert_close(contrastive_loss(tokens, index, 8, 0.1), _released_contrastive(tokens, index, 8))


# ---------------------------------------------------------------- token replacement


def _heat(src: torch.Tensor, trg: torch.Tensor) -> torch.Tensor:
    """The released heat with the released FeatureL2Norm, as matrix products."""

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x / (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()

    patches = norm(src[:, 1:])
    return (patches @ norm(src[:, :1]).transpose(1, 2) + patches @ norm(trg[:, :1]).transpose(1, 2))[..., 0]


def test_replace_tokens_seeded() -> None:
    torch.manual_seed(1)
    src = torch.randn(3, 1 + 64, 8, requires_grad=True)
    trg = torch.randn(3, 1 + 64, 8, requires_grad=True)
    out, index = replace_tokens(src, trg, 16, 4, generator=torch.Generator().manual_seed(7))
    assert out.shape == src.shape and index.shape == (3, 4) and index.dtype == torch.long
    top = _heat(src.detach(), trg.detach()).topk(16, dim=1).indices
    for b in range(3):
        changed = (out[b] != src[b]).any(-1).nonzero().flatten()
        assert changed.tolist() == sorted((index[b] + 1).tolist())  # exactly 4 rows, the CLS row kept
        assert len(set(index[b].tolist())) == 4
        assert set(index[b].tolist()) <= set(top[b].tolist())
        torch.testing.assert_close(out[b, changed], (src[b, :1] + trg[b, :1]).expand(4, -1), rtol=0, atol=0)
    torch.testing.assert_close(out[:, 0], src[:, 0], rtol=0, atol=0)
    again = replace_tokens(src, trg, 16, 4, generator=torch.Generator().manual_seed(7))[1]
    assert torch.equal(again, index)
    out.sum().backward()
    replaced = torch.zeros(3, 65, dtype=torch.bool).scatter_(1, index + 1, True)
    assert torch.equal(src.grad, (~replaced).float()[..., None].expand_as(src))
    assert trg.grad is None  # the replacement values are detached


def test_replace_tokens_edge_cases() -> None:
    src, trg = torch.randn(2, 1 + 16, 4), torch.randn(2, 1 + 16, 4)
    out, index = replace_tokens(src, trg, 4, 0)
    assert out is src and index.shape == (2, 0) and index.dtype == torch.long
    for topk, count in [(4, 5), (17, 1), (4, -1)]:
        with pytest.raises(ValueError):
            replace_tokens(src, trg, topk, count)
    out, index = replace_tokens(src, trg, 16, 16)  # every patch replaced
    assert sorted(index[0].tolist()) == list(range(16))
    torch.testing.assert_close(out[:, 1:], (src[:, :1] + trg[:, :1]).expand(-1, 16, -1))


# ---------------------------------------------------------------- ground-truth flow and EPE


def _one(n: int = 1) -> torch.Tensor:
    return torch.ones(1, n, dtype=torch.bool)


def test_flow_target_one_keypoint() -> None:
    # 512 px frame, stride 4, 128 cells, half-width 17: |4j + 2 - 10| <= 17 <=> j in 0..6.
    flow, mask = released_flow_target(
        torch.tensor([[[10.0, 10.0]]]), torch.tensor([[[30.0, 20.0]]]), _one(), 128, 4, 17
    )
    assert flow.shape == (1, 2, 128, 128) and flow.dtype == torch.float32 and mask.shape == (1, 128, 128)
    expected = torch.zeros(128, 128, dtype=torch.bool)
    expected[:7, :7] = True
    assert torch.equal(mask[0], expected) and mask.sum().item() == 49
    assert torch.equal(flow[0, :, mask[0]], torch.tensor([[5.0], [2.5]]).expand(2, 49))
    assert flow[0, :, ~mask[0]].abs().sum().item() == 0
    epe = epe_loss(torch.zeros_like(flow), flow, mask)
    assert epe.item() == pytest.approx(math.sqrt(5**2 + 2.5**2))  # 5.5901699
    # The project's frame (S = 256, stride 2, half-width 8.5): |2j + 1 - 10| <= 8.5 <=> j in 1..8.
    flow, mask = released_flow_target(
        torch.tensor([[[10.0, 10.0]]]), torch.tensor([[[30.0, 20.0]]]), _one(), 128, 2, 8.5
    )
    expected = torch.zeros(128, 128, dtype=torch.bool)
    expected[1:9, 1:9] = True
    assert torch.equal(mask[0], expected) and mask.sum().item() == 64
    assert torch.equal(flow[0, :, mask[0]], torch.tensor([[10.0], [5.0]]).expand(2, 64))
    assert epe_loss(torch.zeros_like(flow), flow, mask).item() == pytest.approx(math.sqrt(125))  # 11.18034


def test_flow_target_boundary_is_inclusive() -> None:
    # Cell 0's centre is x = 2: a keypoint at x = 19 is exactly 17 px away and reaches it; x = 19.01 does not.
    for x, reached in [(19.0, True), (19.01, False)]:
        _, mask = released_flow_target(torch.tensor([[[x, 2.0]]]), torch.tensor([[[x, 2.0]]]), _one(), 128, 4, 17)
        assert mask[0, 0, 0].item() is reached


def test_flow_target_overlap_invalid_and_zero_displacement() -> None:
    src = torch.tensor([[[10.0, 10.0], [14.0, 10.0], [10.0, 10.0]]])
    trg = torch.tensor([[[30.0, 20.0], [50.0, 50.0], [400.0, 400.0]]])
    valid = torch.tensor([[True, True, False]])
    flow, mask = released_flow_target(src, trg, valid, 128, 4, 17)
    # Keypoint 0 reaches columns 0..6, keypoint 1 columns 0..7 (|4j + 2 - 14| <= 17), both rows 0..6.
    assert mask.sum().item() == 7 * 8
    # Both reach cell (0, 0): the last one's target minus the mean source (12, 10), over the stride.
    assert flow[0, :, 0, 0].tolist() == [(50 - 12) / 4, (50 - 10) / 4]
    # Only keypoint 1 reaches column 7.
    assert flow[0, :, 3, 7].tolist() == [(50 - 14) / 4, (50 - 10) / 4]
    # The invalid keypoint 2 changes nothing.
    flow2, mask2 = released_flow_target(src[:, :2], trg[:, :2], valid[:, :2], 128, 4, 17)
    assert torch.equal(flow, flow2) and torch.equal(mask, mask2)
    # A zero displacement is supervised (the released code would drop it).
    still, still_mask = released_flow_target(src[:, :1], src[:, :1], _one(), 128, 4, 17)
    assert still_mask.sum().item() == 49 and still.abs().sum().item() == 0
    # No keypoint at all.
    empty, empty_mask = released_flow_target(
        torch.zeros(2, 0, 2), torch.zeros(2, 0, 2), torch.zeros(2, 0, dtype=torch.bool), 8, 4, 17
    )
    assert empty.shape == (2, 2, 8, 8) and not empty_mask.any()


def _released_keypoint_to_flow(src: list, trg: list, rf: int = 35, jsz: int = 4, side: int = 128, img: int = 512):
    """A slow transcription of the released ``KeypointToFlow.__call__`` for one pair: the valid
    keypoints ``src``, ``trg`` as lists of (x, y). Box of cell (i, j): x in [j*jsz - rf//2 + jsz//2,
    j*jsz + rf//2 + jsz//2], y alike with i, inclusive; value (trg of the last keypoint in the box -
    mean of the sources in it) / (img // side); cells with no keypoint stay 0."""
    flow = [[[0.0] * side for _ in range(side)] for _ in range(2)]
    for i in range(side):
        for j in range(side):
            xmin, xmax = j * jsz - rf // 2 + jsz // 2, j * jsz + rf // 2 + jsz // 2
            ymin, ymax = i * jsz - rf // 2 + jsz // 2, i * jsz + rf // 2 + jsz // 2
            inside = [k for k, (x, y) in enumerate(src) if xmin <= x <= xmax and ymin <= y <= ymax]
            if inside:
                for c in range(2):
                    mean = sum(src[k][c] for k in inside) / len(inside)
                    flow[c][i][j] = (trg[inside[-1]][c] - mean) / (img // side)
    return torch.tensor(flow)


def test_flow_target_matches_released_transcription() -> None:
    generator = torch.Generator().manual_seed(3)
    # Integer positions (so box edges are hit), most of them crowded into one corner to overlap.
    src = torch.randint(0, 60, (2, 8, 2), generator=generator).float()
    src[:, 6:] = torch.randint(0, 512, (2, 2, 2), generator=generator).float()
    trg = torch.randint(0, 512, (2, 8, 2), generator=generator).float()
    valid = torch.tensor([[True] * 8, [True, False, True, True, False, True, True, True]])
    flow, mask = released_flow_target(src, trg, valid, 128, 4, 17)
    for b in range(2):
        kept = valid[b].nonzero().flatten().tolist()
        released = _released_keypoint_to_flow([src[b, k].tolist() for k in kept], [trg[b, k].tolist() for k in kept])
        torch.testing.assert_close(flow[b], released, rtol=0, atol=1e-5)
        marked = (released != 0).any(0)  # the released code's own mask: nonzero cells
        assert marked.any() and (mask[b] | ~marked).all()
    assert (mask.sum((1, 2)) > 81).all()  # the keypoints overlap


def test_epe_loss_hand_case_and_empty_mask() -> None:
    target = torch.zeros(1, 2, 2, 2)
    target[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    prediction = torch.zeros(1, 2, 2, 2, requires_grad=True)
    mask = torch.tensor([[[True, True], [False, False]]])
    loss = epe_loss(prediction, target, mask)
    assert loss.item() == pytest.approx((5.0 + 0.0) / 2)
    loss.backward()
    assert torch.isfinite(prediction.grad).all()  # a zero error has no NaN gradient
    empty = epe_loss(prediction, target, torch.zeros(1, 2, 2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
