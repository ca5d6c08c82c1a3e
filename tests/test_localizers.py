"""Localizers on small hand-computed score maps (sm_model.localizers): the exact cell of the
argmax; the dense, window and kernel soft-argmax written out as softmax expectations over a few
distinct scores (a background of 0 weighs exp(0) = 1 at temperature 1, and the kernel leaves a 0
score at 0); peaks at the centre, on a border and in a corner; dispatch, dtypes, shapes, errors
and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from sm_model.localizers import (
    Localization,
    argmax_cells,
    dense_soft_argmax,
    kernel_soft_argmax,
    localize,
    window_soft_argmax,
)

LOW = -1.0  # the lowest cosine: at beta 0.02 its softmax weight is below 1e-40 of a peak at 1


def score_map(height: int, width: int, cells: dict[tuple[int, int], float], background: float = 0.0) -> torch.Tensor:
    """A ``[1, 1, h, w]`` float32 map at ``background`` with ``cells[(x, y)]`` at each ``(x, y)``."""
    scores = torch.full((1, 1, height, width), background)
    for (x, y), value in cells.items():
        scores[0, 0, y, x] = value
    return scores


def point(x: float, y: float) -> torch.Tensor:
    """The expected ``[1, 1, 2]`` result."""
    return torch.tensor([[[x, y]]], dtype=torch.float32)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=0, atol=atol)


def random_maps(batch: int, keypoints: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, keypoints, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------- argmax


@pytest.mark.parametrize(
    ("x", "y"),
    [(2, 1), (0, 1), (4, 2), (2, 0), (0, 0), (4, 0), (0, 3), (4, 3)],
    ids=["centre", "left", "right", "top", "top-left", "top-right", "bottom-left", "bottom-right"],
)
def test_argmax_is_the_exact_cell_of_the_peak(x: int, y: int) -> None:
    scores = score_map(4, 5, {(x, y): 0.9, ((x + 2) % 5, (y + 1) % 4): 0.8}, background=LOW)
    cells = argmax_cells(scores)
    assert cells.dtype == torch.float32 and torch.equal(cells, point(x, y))


def test_argmax_ties_go_to_the_first_cell_in_row_major_order() -> None:
    scores = score_map(3, 3, {(2, 0): 1.0, (0, 1): 1.0, (1, 2): 1.0})
    assert torch.equal(argmax_cells(scores), point(2, 0))


# ------------------------------------------------------------------------------------------ dense


def test_dense_soft_argmax_two_values_written_out() -> None:
    # 3x3 at temperature 1: 0 everywhere (weight 1) but cell (2, 1) at ln 3 (weight 3); Z = 8 + 3.
    # Columns weigh 3, 3, 2 + 3; rows weigh 3, 2 + 3, 3.
    scores = score_map(3, 3, {(2, 1): math.log(3)})
    close(dense_soft_argmax(scores, beta=1.0), point((0 * 3 + 1 * 3 + 2 * 5) / 11, (0 * 3 + 1 * 5 + 2 * 3) / 11))
    # The same map scaled by beta at temperature beta is the same softmax.
    close(dense_soft_argmax(scores * 0.02, beta=0.02), point(13 / 11, 1.0))


def test_dense_soft_argmax_peak_at_the_centre_is_exact() -> None:
    # A centred peak over a constant background: symmetric, so exactly the centre.
    close(dense_soft_argmax(score_map(5, 7, {(3, 2): 1.0}), beta=0.5), point(3.0, 2.0))


def test_dense_soft_argmax_peak_in_a_corner_is_pulled_inward() -> None:
    # 3x3, peak weight 4 at (0, 0), 8 cells of weight 1: x = (1 * 3 + 2 * 3) / (4 + 8); same for y.
    scores = score_map(3, 3, {(0, 0): math.log(4)})
    close(dense_soft_argmax(scores, beta=1.0), point(9 / 12, 9 / 12))


def test_dense_soft_argmax_peak_on_a_border() -> None:
    # 3x3, weight 4 at (2, 1) on the right border: x = (3 + 2 * (2 + 4)) / 12 = 15 / 12, y = 1.
    close(dense_soft_argmax(score_map(3, 3, {(2, 1): math.log(4)}), beta=1.0), point(15 / 12, 1.0))


# ----------------------------------------------------------------------------------------- window


def test_window_soft_argmax_at_the_centre_written_out() -> None:
    # 5x5 at temperature 1, background 0 (weight 1): the argmax 3 at (2, 2) (weight e^3) and ln 2
    # at (3, 2) (weight 2); the 3x3 window spans x, y in 1..3, where Z = 7 + e^3 + 2; columns weigh
    # 3, 2 + e^3, 2 + 2 and rows 3, 1 + e^3 + 2, 3. The cell (0, 4) outside the window, at 2.9, is
    # ignored (the dense soft-argmax would weigh it e^2.9).
    scores = score_map(5, 5, {(2, 2): 3.0, (3, 2): math.log(2), (0, 4): 2.9})
    peak = math.exp(3.0)
    z = 7 + peak + 2
    x = (1 * 3 + 2 * (2 + peak) + 3 * (2 + 2)) / z
    y = (1 * 3 + 2 * (1 + peak + 2) + 3 * 3) / z
    close(window_soft_argmax(scores, window=3, beta=1.0), point(x, y))


def test_window_soft_argmax_on_a_border_shifts_the_window_inward() -> None:
    # 5x5, weight 4 at (0, 2): the window's columns are clamped to 0..2 (not -1..1), rows 1..3; Z = 12.
    # Columns weigh 1 + 4 + 1, 3, 3 -> x = (3 + 6) / 12; rows 3, 4 + 2, 3 -> y = (3 + 12 + 9) / 12 = 2.
    scores = score_map(5, 5, {(0, 2): math.log(4)})
    close(window_soft_argmax(scores, window=3, beta=1.0), point(0.75, 2.0))


def test_window_soft_argmax_in_a_corner() -> None:
    # 5x5, weight 4 at (4, 4): window x, y in 2..4; each axis weighs 3, 3, 1 + 1 + 4 -> (6 + 9 + 24) / 12.
    scores = score_map(5, 5, {(4, 4): math.log(4)})
    close(window_soft_argmax(scores, window=3, beta=1.0), point(3.25, 3.25))


def test_window_larger_than_the_map_is_the_dense_soft_argmax() -> None:
    scores = random_maps(2, 3, 4, 6)
    close(window_soft_argmax(scores, window=99, beta=0.1), dense_soft_argmax(scores, beta=0.1))


# ----------------------------------------------------------------------------------------- kernel


def test_kernel_soft_argmax_three_values_written_out() -> None:
    # 3x3 over a 0 background (which the kernel leaves at 0: weight 1 each at temperature 1): the
    # argmax 2 at (1, 1) keeps its score (kernel 1); 1.5 at (2, 1) (distance 1) and 1 at (2, 2)
    # (distance sqrt 2) are multiplied by exp(-d^2 / (2 sigma^2)) before the softmax.
    sigma = 1.5
    k1, k2 = math.exp(-1 / (2 * sigma**2)), math.exp(-2 / (2 * sigma**2))
    scores = score_map(3, 3, {(1, 1): 2.0, (2, 1): 1.5, (2, 2): 1.0})
    w_peak, w_right, w_corner = math.exp(2.0), math.exp(1.5 * k1), math.exp(1.0 * k2)
    z = 6 + w_peak + w_right + w_corner
    # Columns: 0 -> 3 background; 1 -> 2 background + peak; 2 -> 1 background + right + corner.
    x = (1 * (2 + w_peak) + 2 * (1 + w_right + w_corner)) / z
    # Rows: 0 -> 3 background; 1 -> 1 background + peak + right; 2 -> 2 background + corner.
    y = (1 * (1 + w_peak + w_right) + 2 * (2 + w_corner)) / z
    close(kernel_soft_argmax(scores, sigma=sigma, beta=1.0), point(x, y))


def test_kernel_soft_argmax_of_a_symmetric_peak_is_the_argmax_cell() -> None:
    # The peak plus equal neighbours symmetric around it (both neighbours along an axis, where
    # both are inside the map), anywhere on a 7 x 9 map over LOW, whose weights vanish.
    width, height = 7, 9
    for x, y in [(3, 4), (1, 6), (0, 4), (6, 0), (0, 0), (6, 8)]:
        cells = {(x, y): 1.0}
        if 0 < x < width - 1:
            cells |= {(x - 1, y): 0.9, (x + 1, y): 0.9}
        if 0 < y < height - 1:
            cells |= {(x, y - 1): 0.9, (x, y + 1): 0.9}
        scores = score_map(height, width, cells, background=LOW)
        close(kernel_soft_argmax(scores, sigma=7.0, beta=0.02), point(x, y))
    # Over a 0 background, whose weights do not vanish, a symmetric peak at the map's centre: the
    # whole map is symmetric, so the result is exact (in float64 too).
    scores = score_map(5, 5, {(2, 2): 1.0, (1, 2): 0.5, (3, 2): 0.5, (2, 1): 0.5, (2, 3): 0.5})
    close(kernel_soft_argmax(scores.double(), sigma=1.0, beta=0.1), point(2.0, 2.0), atol=1e-12)


def test_kernel_soft_argmax_in_a_corner_is_pulled_inward_by_a_computable_amount() -> None:
    # 3x3 over 0: the argmax 1 at (0, 0) and u = 0.9 at (1, 0) and (0, 1), at distance 1 (kernel
    # k1 = exp(-1 / (2 sigma^2))). At beta 0.1: weights e^(1 / beta) at the peak, w_n = e^(u k1 / beta)
    # at each neighbour and 1 at the six background cells (2, 0) (1, 1) (2, 1) (0, 2) (1, 2) (2, 2),
    # whose x sum to 8; x = (w_n * 1 + 8) / Z, and y the same by symmetry.
    sigma, beta, u = 1.0, 0.1, 0.9
    scores = score_map(3, 3, {(0, 0): 1.0, (1, 0): u, (0, 1): u})
    background_x = 2 + 1 + 2 + 0 + 1 + 2

    def pulled(kernel: float) -> float:
        w_peak, w_neighbour = math.exp(1.0 / beta), math.exp(u * kernel / beta)
        return (w_neighbour * 1 + background_x) / (w_peak + 2 * w_neighbour + 6)

    expected = pulled(math.exp(-1 / (2 * sigma**2)))
    close(kernel_soft_argmax(scores, sigma=sigma, beta=beta), point(expected, expected))
    assert 0.01 < expected < 0.012  # inward from 0, by about 0.011 cell
    # The dense soft-argmax is the same with kernel 1, and pulled much further (about 0.21 cell).
    close(dense_soft_argmax(scores, beta=beta), point(pulled(1.0), pulled(1.0)))
    assert pulled(1.0) > 0.2


def test_kernel_suppresses_a_far_second_mode_that_the_dense_soft_argmax_follows() -> None:
    # 10x10 over LOW: 1 at (1, 1), 0.98 at (8, 8). At beta 0.02 the dense soft-argmax weighs the
    # second mode e^-1; the kernel (sigma 2, d^2 = 98) takes it to about 0, which weighs e^-50.
    scores = score_map(10, 10, {(1, 1): 1.0, (8, 8): 0.98}, background=LOW)
    second = math.exp(-1.0)
    close(dense_soft_argmax(scores, beta=0.02), point(*[(1 + 8 * second) / (1 + second)] * 2), atol=1e-5)
    kernel = math.exp(-98 / (2 * 2.0**2))
    weight = math.exp((0.98 * kernel - 1.0) / 0.02)
    close(kernel_soft_argmax(scores, sigma=2.0, beta=0.02), point(*[(1 + 8 * weight) / (1 + weight)] * 2))
    assert weight < 1e-21  # the kernel result is the peak cell to float32 precision
    close(kernel_soft_argmax(scores, sigma=2.0, beta=0.02), point(1.0, 1.0))


def test_kernel_soft_argmax_sends_gradient_through_the_scores_of_the_whole_map() -> None:
    scores = random_maps(2, 3, 5, 6).requires_grad_(True)
    cells = kernel_soft_argmax(scores, sigma=2.0, beta=0.5)
    weights = torch.randn(cells.shape, generator=torch.Generator().manual_seed(1))
    (cells * weights).sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    assert (scores.grad != 0).all()  # every cell, the far ones too (unlike the window soft-argmax)


# ---------------------------------------------------------------------------- dispatch and contract


def test_localize_dispatches_by_method() -> None:
    scores = random_maps(2, 3, 6, 7)
    beta = 0.1
    assert torch.equal(localize(scores, Localization("argmax")), argmax_cells(scores))
    assert torch.equal(localize(scores, Localization("dense", beta)), dense_soft_argmax(scores, beta))
    assert torch.equal(localize(scores, Localization("window", beta, None)), dense_soft_argmax(scores, beta))
    assert torch.equal(localize(scores, Localization("window", beta, 3)), window_soft_argmax(scores, 3, beta))
    assert torch.equal(localize(scores, Localization("kernel", beta, sigma=1.5)), kernel_soft_argmax(scores, 1.5, beta))
    # The dense and kernel methods ignore the window.
    assert torch.equal(localize(scores, Localization("dense", beta, 3)), dense_soft_argmax(scores, beta))
    assert torch.equal(localize(scores, Localization("kernel", beta, 3, 1.5)), kernel_soft_argmax(scores, 1.5, beta))
    with pytest.raises(ValueError, match="unknown localizer 'nearest'"):
        localize(scores, Localization("nearest", beta))  # type: ignore[arg-type]


LOCALIZATIONS = [
    Localization("argmax"),
    Localization("dense", 0.05),
    Localization("window", 0.05, 3),
    Localization("window", 0.05, None),
    Localization("kernel", 0.05, sigma=2.0),
]


@pytest.mark.parametrize("localization", LOCALIZATIONS, ids=lambda loc: f"{loc.method}-{loc.window}")
def test_shapes_and_float32_for_bfloat16_scores_and_under_autocast(localization: Localization) -> None:
    scores = random_maps(2, 3, 5, 7)
    reference = localize(scores, localization)
    assert reference.shape == (2, 3, 2) and reference.dtype == torch.float32
    assert localize(scores[:, :0], localization).shape == (2, 0, 2)
    from_bfloat16 = localize(scores.bfloat16(), localization)
    assert from_bfloat16.dtype == torch.float32 and from_bfloat16.shape == (2, 3, 2)
    # Same as float32 on the bfloat16-rounded scores: nothing else is rounded.
    torch.testing.assert_close(from_bfloat16, localize(scores.bfloat16().float(), localization))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = localize(scores, localization)
        autocast_bf16 = localize(scores.bfloat16(), localization)
    assert autocast.dtype == torch.float32 and autocast_bf16.dtype == torch.float32
    torch.testing.assert_close(autocast, reference)
    assert localize(scores.double(), localization).dtype == torch.float64


def test_non_positive_sigma_beta_or_window_is_an_error() -> None:
    scores = random_maps(1, 1, 3, 3)
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma must be positive"):
            kernel_soft_argmax(scores, sigma=sigma, beta=0.1)
    for beta in (0.0, -0.02, float("nan")):
        with pytest.raises(ValueError, match="beta must be positive"):
            kernel_soft_argmax(scores, sigma=1.0, beta=beta)
        with pytest.raises(ValueError, match="beta must be positive"):
            dense_soft_argmax(scores, beta=beta)
        with pytest.raises(ValueError, match="beta must be positive"):
            window_soft_argmax(scores, window=3, beta=beta)
        with pytest.raises(ValueError, match="beta must be positive"):
            localize(scores, Localization("window", beta, None))
    with pytest.raises(ValueError, match="window must be a positive"):
        window_soft_argmax(scores, window=0, beta=0.1)
