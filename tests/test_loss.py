"""Keypoint losses on hand-computed distances (sm_model.loss)."""

from __future__ import annotations

import pytest
import torch

from sm_model.loss import keypoint_loss, multiscale_loss


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
