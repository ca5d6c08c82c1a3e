"""Keypoint losses on hand-computed distances (sm_model.loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sm_model.loss import gaussian_cross_entropy, keypoint_loss, multiscale_loss


def three_four_five() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions 5, 10 and 0 pixels away (3-4-5 and 6-8-10 triangles) plus one invalid far one."""
    target = torch.tensor([[[10.0, 20.0], [0.0, 0.0]], [[7.0, 7.0], [100.0, 100.0]]])
    pred = torch.tensor([[[13.0, 24.0], [6.0, -8.0]], [[7.0, 7.0], [0.0, 0.0]]], requires_grad=True)
    valid = torch.tensor([[True, True], [True, False]])
    return pred, target, valid


def test_mean_euclidean_distance_over_valid_keypoints() -> None:
    pred, target, valid = three_four_five()
    loss = keypoint_loss(pred, target, valid)
    assert torch.allclose(loss, torch.tensor(5.0))  # (5 + 10 + 0) / 3; the invalid 141-pixel miss is ignored
    loss.backward()
    assert pred.grad is not None
    # d|p - t|/dp = (p - t) / |p - t| / 3; zero at a perfect prediction and at the invalid keypoint.
    expected = torch.tensor([[[0.6, 0.8], [0.6, -0.8]], [[0.0, 0.0], [0.0, 0.0]]]) / 3
    assert torch.allclose(pred.grad, expected)


def test_per_keypoint_mean_across_the_batch() -> None:
    target = torch.zeros(2, 3, 2)
    pred = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]], [[0.0, 8.0], [0.0, 8.0], [0.0, 8.0]]])
    valid = torch.tensor([[True, False, False], [True, True, True]])
    # Every keypoint weighs the same: (5 + 8 + 8 + 8) / 4, not the mean of the pair means (5 + 8) / 2.
    assert torch.allclose(keypoint_loss(pred, target, valid), torch.tensor(29 / 4))


def test_garbage_in_invalid_keypoints_does_not_leak() -> None:
    pred, target, valid = three_four_five()
    target = target.clone()
    target[1, 1] = float("nan")
    with torch.no_grad():
        pred[1, 1] = float("inf")
    loss = keypoint_loss(pred, target, valid)
    loss.backward()
    assert torch.allclose(loss, torch.tensor(5.0)) and pred.grad is not None and torch.isfinite(pred.grad).all()


def test_no_valid_keypoint_is_zero_with_a_gradient() -> None:
    pred, target, _ = three_four_five()
    loss = keypoint_loss(pred, target, torch.zeros(2, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert pred.grad is not None and torch.equal(pred.grad, torch.zeros_like(pred))
    assert keypoint_loss(torch.zeros(2, 0, 2), torch.zeros(2, 0, 2), torch.zeros(2, 0, dtype=torch.bool)).item() == 0.0


def test_multiscale_is_the_weighted_sum_over_scales() -> None:
    pred, target, valid = three_four_five()
    coarse = torch.tensor([[[10.0, 30.0], [0.0, 0.0]], [[7.0, 7.0], [0.0, 0.0]]])  # (10 + 0 + 0) / 3
    middle = target + torch.tensor([0.0, 3.0])  # 3 everywhere
    loss = multiscale_loss([coarse, middle, pred], target, valid, weights=(0.5, 2.0, 1.0))
    assert torch.allclose(loss, torch.tensor(0.5 * 10 / 3 + 2.0 * 3 + 1.0 * 5))
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert torch.allclose(multiscale_loss([pred], target, valid, [1.0]), torch.tensor(5.0))


def test_bad_inputs_are_clear_errors() -> None:
    pred, target, valid = three_four_five()
    with pytest.raises(ValueError, match="one weight per scale"):
        multiscale_loss([pred, pred], target, valid, weights=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="at least one"):
        multiscale_loss([], target, valid, weights=())
    with pytest.raises(ValueError, match="valid must be"):
        keypoint_loss(pred, target, valid.float())
    with pytest.raises(ValueError, match="pred and target"):
        keypoint_loss(pred, target[:, :1], valid)


# ----------------------------------------------------------------- Gaussian-smoothed cross-entropy

GCE_SCORES = [
    [[0.1, 0.4, -0.2, 0.0], [0.3, 0.9, 0.6, -0.1], [0.0, 0.5, 0.8, 0.2], [-0.3, 0.1, 0.2, 0.4]],
    [[0.2, -0.1, 0.3, 0.5], [0.0, 0.2, 0.7, 0.1], [0.4, 0.6, 0.3, -0.2], [0.1, 0.0, -0.4, 0.3]],
]
"""Two 4x4 score maps, rows of ``[y][x]``."""


def softmax_grid(rows: list[list[float]], temperature: float) -> list[list[float]]:
    """``softmax(scores / temperature)`` over every cell of ``rows`` (``[y][x]``), in plain Python."""
    total = sum(math.exp(value / temperature) for row in rows for value in row)
    return [[math.exp(value / temperature) / total for value in row] for row in rows]


def bilinear(grid: list[list[float]], x: float, y: float) -> float:
    """``grid[y][x]`` between its four nearest cells (``x``, ``y`` inside the grid)."""
    x0, y0 = min(math.floor(x), len(grid[0]) - 2), min(math.floor(y), len(grid) - 2)
    fx, fy = x - x0, y - y0
    top = grid[y0][x0] * (1 - fx) + grid[y0][x0 + 1] * fx
    bottom = grid[y0 + 1][x0] * (1 - fx) + grid[y0 + 1][x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def reference_gaussian_ce(rows: list[list[float]], temperature: float, x: float, y: float, window: int) -> float:
    """One keypoint's loss written out: ``-sum g(dx, dy) log p(x + dx, y + dy)`` over the window's
    integer offsets whose point lies strictly inside the map."""
    probabilities = softmax_grid(rows, temperature)
    height, width = len(rows), len(rows[0])
    radius = window // 2
    s = radius / 2
    loss = 0.0
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            px, py = x + dx, y + dy
            if not (0 < px < width - 1 and 0 < py < height - 1):
                continue
            g = math.exp(-(dx**2 + dy**2) / (2 * s**2)) / (2 * math.pi * s**2) if radius else 1.0
            loss -= g * math.log(bilinear(probabilities, px, py))
    return loss


def test_gaussian_cross_entropy_equals_a_hand_computation() -> None:
    temperature = 0.5
    # Pair 0: an integer target (1, 1) and a fractional one (1.5, 1.25); pair 1: (2, 1) and an invalid one.
    targets = torch.tensor([[[1.0, 1.0], [1.5, 1.25]], [[2.0, 1.0], [float("nan"), float("nan")]]])
    valid = torch.tensor([[True, True], [True, False]])
    exact = torch.tensor([[GCE_SCORES[0], GCE_SCORES[1]], [GCE_SCORES[1], GCE_SCORES[0]]], dtype=torch.float64)
    loss = gaussian_cross_entropy(exact.float(), targets, valid, temperature, window=3)

    # Window 3: radius 1, s = 1/2, g(d^2) = exp(-2 d^2) / (pi / 2). At (1, 1) only the offsets
    # (0, 0), (1, 0), (0, 1), (1, 1) fall strictly inside the 4x4 map (x and y in 1..2).
    p = softmax_grid(GCE_SCORES[0], temperature)
    g0, g1, g2 = 2 / math.pi, 2 / math.pi * math.exp(-2), 2 / math.pi * math.exp(-4)
    integer = -(g0 * math.log(p[1][1]) + g1 * math.log(p[1][2]) + g1 * math.log(p[2][1]) + g2 * math.log(p[2][2]))
    assert integer == pytest.approx(reference_gaussian_ce(GCE_SCORES[0], temperature, 1.0, 1.0, 3), rel=1e-12)
    # (1.5, 1.25): all nine points, x in 0.5..2.5 and y in 0.25..2.25, are inside; read bilinearly.
    q = softmax_grid(GCE_SCORES[1], temperature)
    centre = q[1][1] * 0.5 * 0.75 + q[1][2] * 0.5 * 0.75 + q[2][1] * 0.5 * 0.25 + q[2][2] * 0.5 * 0.25
    assert bilinear(q, 1.5, 1.25) == pytest.approx(centre, rel=1e-12)
    fractional = reference_gaussian_ce(GCE_SCORES[1], temperature, 1.5, 1.25, 3)
    # (2, 1) on pair 1's first map (GCE_SCORES[1]): offsets (-1, 0), (0, 0), (-1, 1), (0, 1).
    border = -(g1 * math.log(q[1][1]) + g0 * math.log(q[1][2]) + g2 * math.log(q[2][1]) + g1 * math.log(q[2][2]))
    assert border == pytest.approx(reference_gaussian_ce(GCE_SCORES[1], temperature, 2.0, 1.0, 3), rel=1e-12)
    # The mean over each pair's valid keypoints, then over the pairs.
    expected = ((integer + fractional) / 2 + border) / 2
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Float64 scores: computed in float64, to float64 precision.
    loss64 = gaussian_cross_entropy(exact, targets, valid, temperature, window=3)
    assert loss64.dtype == torch.float64 and loss64.item() == pytest.approx(expected, rel=1e-12)


def test_gaussian_cross_entropy_with_window_seven_matches_the_reference() -> None:
    # A 7x7 window on a 9x9 map: s = 1.5; offsets beyond the map's interior are dropped.
    rows = torch.rand(9, 9, generator=torch.Generator().manual_seed(3)).mul(2).sub(1).tolist()
    targets = [(4.0, 4.0), (1.3, 6.8), (0.0, 8.0), (7.5, 0.5)]
    scores = torch.tensor([[rows] * len(targets)])
    loss = gaussian_cross_entropy(scores, torch.tensor([targets]), torch.ones(1, 4, dtype=torch.bool), 0.1)
    expected = sum(reference_gaussian_ce(rows, 0.1, x, y, 7) for x, y in targets) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gaussian_cross_entropy_with_window_one_is_plain_cross_entropy() -> None:
    scores = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cells = torch.tensor([[[1, 1], [4, 3], [2, 2]], [[3, 1], [1, 3], [4, 2]]])  # strictly inside: x 1..4, y 1..3
    valid = torch.ones(2, 3, dtype=torch.bool)
    loss = gaussian_cross_entropy(scores, cells.float(), valid, temperature=0.05, window=1)
    index = (cells[..., 1] * 6 + cells[..., 0]).flatten()
    expected = F.cross_entropy(scores.flatten(2).flatten(0, 1) / 0.05, index)
    torch.testing.assert_close(loss, expected)
    # A target on the border has no offset strictly inside: it adds 0.
    border = gaussian_cross_entropy(scores[:1, :1], torch.tensor([[[0.0, 2.0]]]), valid[:1, :1], 0.05, window=1)
    assert border.item() == 0.0


def test_gaussian_cross_entropy_ignores_invalid_keypoints_with_finite_gradients() -> None:
    generator = torch.Generator().manual_seed(1)
    scores = (torch.rand(2, 3, 6, 6, generator=generator) * 2 - 1).requires_grad_(True)
    targets = torch.rand(2, 3, 2, generator=generator) * 5
    valid = torch.tensor([[True, False, True], [True, True, False]])
    garbage = targets.clone()
    garbage[0, 1] = float("nan")
    garbage[1, 2] = torch.tensor([float("inf"), -1e9])
    loss = gaussian_cross_entropy(scores, garbage, valid, 0.1)
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    assert not scores.grad[0, 1].any() and not scores.grad[1, 2].any()
    # The same value as without the invalid keypoints at all.
    kept = gaussian_cross_entropy(scores[:, [0, 2]][:1], targets[:1, [0, 2]], valid[:1, [0, 2]], 0.1)
    kept_second = gaussian_cross_entropy(scores[1:, :2], targets[1:, :2], valid[1:, :2], 0.1)
    torch.testing.assert_close(loss, (kept + kept_second) / 2)


def test_gaussian_cross_entropy_pair_without_valid_keypoints_does_not_count() -> None:
    generator = torch.Generator().manual_seed(2)
    scores = (torch.rand(2, 2, 5, 5, generator=generator) * 2 - 1).requires_grad_(True)
    targets = torch.rand(2, 2, 2, generator=generator) * 4
    valid = torch.tensor([[True, True], [False, False]])
    loss = gaussian_cross_entropy(scores, targets, valid, 0.1)
    torch.testing.assert_close(loss, gaussian_cross_entropy(scores[:1], targets[:1], valid[:1], 0.1))  # not halved
    none = gaussian_cross_entropy(scores, targets, torch.zeros(2, 2, dtype=torch.bool), 0.1)
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert scores.grad is not None and not scores.grad.any()


def test_gaussian_cross_entropy_gradient_pushes_probability_toward_the_target() -> None:
    scores = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1).requires_grad_(True)
    target, valid = torch.tensor([[[2.3, 4.6]]]), torch.ones(1, 1, dtype=torch.bool)
    temperature = 0.1

    def near_target(values: torch.Tensor) -> float:
        """Softmax mass on the four cells around the target."""
        return torch.softmax(values.flatten() / temperature, 0).view(8, 8)[4:6, 2:4].sum().item()

    loss = gaussian_cross_entropy(scores, target, valid, temperature)
    loss.backward()
    assert scores.grad is not None
    assert (scores.grad[0, 0, 4:6, 2:4] < 0).all()  # descent raises the target's scores
    stepped = (scores - 0.01 * scores.grad).detach()
    assert gaussian_cross_entropy(stepped, target, valid, temperature) < loss
    assert near_target(stepped) > near_target(scores.detach())
    # Window 1 at an integer cell: d loss / d score = (p - onehot) / T, negative only at the target.
    one_hot_scores = scores.detach().clone().requires_grad_(True)
    gaussian_cross_entropy(one_hot_scores, torch.tensor([[[3.0, 4.0]]]), valid, temperature, window=1).backward()
    p = torch.softmax(one_hot_scores.detach().flatten() / temperature, 0).view(1, 1, 8, 8)
    expected = p.clone()
    expected[0, 0, 4, 3] -= 1
    torch.testing.assert_close(one_hot_scores.grad, expected / temperature)


def test_gaussian_cross_entropy_bad_inputs_are_clear_errors() -> None:
    scores, targets, valid = torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="odd number of cells"):
        gaussian_cross_entropy(scores, targets, valid, 0.1, window=4)
    with pytest.raises(ValueError, match="needs target_cells"):
        gaussian_cross_entropy(scores, targets[:, :1], valid, 0.1)
    with pytest.raises(ValueError, match="needs target_cells"):
        gaussian_cross_entropy(scores, targets, valid.float(), 0.1)
