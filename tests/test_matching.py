"""Sparse matching and localization on small hand-computed maps (sm_model.matching)."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

from sm_model.localizers import Localization, dense_soft_argmax, localize, window_soft_argmax
from sm_model.matching import cosine_similarity, match_keypoints, sample_keypoint_features
from sm_model.pixels import cells_to_pixels, pixels_to_cells

LOW = -1.0  # the lowest cosine: exp((LOW - 1) / 0.02) underflows to 0 in float32
SHARP = 0.02  # the official temperature
FLAT = 1e6  # a temperature so high that the window's softmax is uniform


def peaked_map(height: int, width: int, peaks: list[tuple[int, int]]) -> torch.Tensor:
    """A ``[1, 1, h, w]`` score map at ``LOW`` with 1.0 at each ``(x, y)`` of ``peaks``."""
    scores = torch.full((1, 1, height, width), LOW)
    for x, y in peaks:
        scores[0, 0, y, x] = 1.0
    return scores


def gradient_support(scores: torch.Tensor, window: int, beta: float) -> torch.Tensor:
    """Where ``window_soft_argmax`` sends gradient: a bool map shaped like ``scores``."""
    scores = scores.clone().requires_grad_(True)
    coordinates = window_soft_argmax(scores, window, beta)
    weights = torch.randn(coordinates.shape, generator=torch.Generator().manual_seed(1))
    (coordinates * weights).sum().backward()
    return scores.grad != 0


def box(height: int, width: int, top: int, left: int, box_height: int, box_width: int) -> torch.Tensor:
    """A ``[1, 1, h, w]`` bool map, True on the given box."""
    mask = torch.zeros(1, 1, height, width, dtype=torch.bool)
    mask[..., top : top + box_height, left : left + box_width] = True
    return mask


def reference_window_soft_argmax(scores: torch.Tensor, window: int, beta: float) -> torch.Tensor:
    """The window soft-argmax written out with Python loops over pairs and keypoints."""
    batch, keypoints, height, width = scores.shape
    result = torch.zeros(batch, keypoints, 2, dtype=torch.float64)
    for b in range(batch):
        for n in range(keypoints):
            peak = int(scores[b, n].argmax())
            row, column = divmod(peak, width)
            k_y, k_x = min(window, height), min(window, width)
            top = min(max(row - k_y // 2, 0), height - k_y)
            left = min(max(column - k_x // 2, 0), width - k_x)
            cut = scores[b, n, top : top + k_y, left : left + k_x].double()
            weights = torch.softmax(cut.flatten() / beta, dim=0).view(k_y, k_x)
            result[b, n, 0] = left + (weights.sum(0) * torch.arange(k_x)).sum()
            result[b, n, 1] = top + (weights.sum(1) * torch.arange(k_y)).sum()
    return result


def random_peaked_scores(batch: int, keypoints: int, side: int, seed: int) -> torch.Tensor:
    """Cosine-like ``[B, N, side, side]`` scores: a Gaussian bump (sigma 3 cells) at a random place plus noise."""
    generator = torch.Generator().manual_seed(seed)
    rows, columns = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    centres = torch.rand(batch, keypoints, 2, generator=generator) * (side - 1)
    squared = (columns - centres[..., 0, None, None]) ** 2 + (rows - centres[..., 1, None, None]) ** 2
    noise = torch.rand(batch, keypoints, side, side, generator=generator)
    return 0.9 * torch.exp(-squared / 18) + 0.05 * noise


# --- pixels <-> cells ---------------------------------------------------------------------------


def test_cell_centres_and_edges_in_pixels() -> None:
    cells = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-0.5, 62.5]])
    assert torch.equal(cells_to_pixels(cells, 4), torch.tensor([[1.5, 1.5], [5.5, 9.5], [-0.5, 251.5]]))
    assert torch.equal(pixels_to_cells(torch.tensor([6.5, 20.5]), 14), torch.tensor([0.0, 1.0]))


def test_pixels_to_cells_round_trip() -> None:
    points = torch.rand(3, 7, 2, generator=torch.Generator().manual_seed(0)) * 252 - 0.5
    for stride in (4, 7, 8, 14, 16, 4.5):
        assert torch.allclose(cells_to_pixels(pixels_to_cells(points, stride), stride), points, atol=1e-5)


# --- keypoint features --------------------------------------------------------------------------


def test_bilinear_at_cell_centres_is_the_cell() -> None:
    features = torch.randn(2, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    cells = torch.tensor([[[0, 0], [5, 3], [2, 1]], [[3, 2], [0, 3], [5, 0]]])
    sampled = sample_keypoint_features(features, cells_to_pixels(cells.float(), 4), stride=4)
    expected = torch.stack([features[b, :, cells[b, :, 1], cells[b, :, 0]].T for b in range(2)])
    assert sampled.shape == (2, 3, 5)
    assert torch.allclose(sampled, expected, atol=1e-6)


def test_bilinear_between_cells_is_the_average() -> None:
    features = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # Halfway between cells (x=1, y=2) and (x=2, y=2): pixel x = 4 * 1.5 + 1.5; then the centre of a 2x2 block.
    keypoints = torch.tensor([[[7.5, 9.5], [7.5, 7.5]]])
    sampled = sample_keypoint_features(features, keypoints, stride=4)
    assert torch.allclose(sampled[0, 0], (features[0, :, 2, 1] + features[0, :, 2, 2]) / 2, atol=1e-6)
    assert torch.allclose(sampled[0, 1], features[0, :, 1:3, 1:3].mean(dim=(1, 2)), atol=1e-6)


def test_bilinear_reads_zeros_beyond_the_map() -> None:
    features = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # Pixel (0, 1.5) is cell (-0.375, 0): 0.625 of cell (0, 0) and 0.375 of zeros; pixel -9 is 2.6 cells out.
    keypoints = torch.tensor([[[0.0, 1.5], [-9.0, 1.5]]])
    sampled = sample_keypoint_features(features, keypoints, stride=4)
    assert torch.allclose(sampled[0, 0], 0.625 * features[0, :, 0, 0], atol=1e-6)
    assert torch.equal(sampled[0, 1], torch.zeros(3))


def test_nearest_is_the_official_floor_indexing_clamped_to_the_map() -> None:
    features = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    keypoints = torch.rand(2, 9, 2, generator=torch.Generator().manual_seed(1)) * torch.tensor([24.0, 20.0])
    keypoints[0, 0] = torch.tensor([-1.0, -1.0])  # padding: clamped to cell (0, 0)
    keypoints[1, 0] = torch.tensor([24.0, 19.9])  # past the right edge: clamped to column 5
    keypoints[1, 1] = torch.tensor([3.9, 4.0])  # floor(x / 4) = 0, floor(y / 4) = 1
    sampled = sample_keypoint_features(features, keypoints, stride=4, mode="nearest")
    for b in range(2):
        for n in range(9):
            column = min(max(math.floor(keypoints[b, n, 0] / 4), 0), 5)
            row = min(max(math.floor(keypoints[b, n, 1] / 4), 0), 4)
            assert torch.equal(sampled[b, n], features[b, :, row, column])
    assert torch.equal(sampled[1, 0], features[1, :, 4, 5])
    assert torch.equal(sampled[1, 1], features[1, :, 1, 0])


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_any_number_of_keypoints_and_padding_stays_finite(mode: str) -> None:
    features = torch.randn(2, 3, 4, 4)
    assert sample_keypoint_features(features, torch.zeros(2, 0, 2), 4, mode).shape == (2, 0, 3)
    padded = torch.tensor([[[float("nan"), 1.0], [-1.0, -1.0]], [[1e30, -1e30], [float("inf"), 5.0]]])
    sampled = sample_keypoint_features(features, padded, 4, mode)
    assert sampled.shape == (2, 2, 3) and torch.isfinite(sampled).all()


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="sampling mode"):
        sample_keypoint_features(torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 2), 4, "bicubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keypoints must be"):
        sample_keypoint_features(torch.zeros(2, 2, 3, 3), torch.zeros(1, 1, 2), 4)
    with pytest.raises(ValueError, match="src_features must be"):
        cosine_similarity(torch.zeros(1, 1, 3), torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="window"):
        window_soft_argmax(torch.zeros(1, 1, 3, 3), 0, SHARP)
    with pytest.raises(ValueError, match="beta"):
        dense_soft_argmax(torch.zeros(1, 1, 3, 3), 0.0)


# --- cosine similarity --------------------------------------------------------------------------


def test_cosine_similarity_equals_a_brute_force_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    trg = torch.randn(2, 5, 4, 3, generator=generator, dtype=torch.float64)
    src[1, 2] = 0.0  # a zero (padded) feature scores 0, not NaN
    scores = cosine_similarity(src, trg)
    assert scores.shape == (2, 3, 4, 3)
    for b in range(2):
        for n in range(3):
            for y in range(4):
                for x in range(3):
                    u, v = src[b, n], trg[b, :, y, x]
                    expected = float(u @ v) / max(float(u.norm() * v.norm()), 1e-300)
                    assert math.isclose(float(scores[b, n, y, x]), expected, abs_tol=1e-12)
    assert torch.equal(scores[1, 2], torch.zeros(4, 3, dtype=torch.float64))


# --- window soft-argmax -------------------------------------------------------------------------


def test_sharp_peak_in_the_middle_is_found() -> None:
    scores = peaked_map(11, 13, [(6, 4)])
    assert torch.allclose(window_soft_argmax(scores, 5, SHARP), torch.tensor([[[6.0, 4.0]]]), atol=1e-6)
    assert torch.equal(gradient_support(torch.rand(1, 1, 11, 13) * 0.1 + scores, 5, 1.0), box(11, 13, 2, 4, 5, 5))


def test_peak_at_a_border_shifts_the_window_inward() -> None:
    scores = peaked_map(10, 12, [(0, 5)])
    assert torch.allclose(window_soft_argmax(scores, 5, SHARP), torch.tensor([[[0.0, 5.0]]]), atol=1e-6)
    # The window spans columns 0..4 (not -2..2) and rows 3..7: a flat softmax gives its centre.
    assert torch.allclose(window_soft_argmax(scores, 5, FLAT), torch.tensor([[[2.0, 5.0]]]), atol=1e-4)
    assert torch.equal(gradient_support(torch.rand(1, 1, 10, 12) * 0.1 + scores, 5, 1.0), box(10, 12, 3, 0, 5, 5))


def test_peak_at_a_corner_with_an_even_window() -> None:
    scores = peaked_map(10, 12, [(11, 9)])
    assert torch.allclose(window_soft_argmax(scores, 4, SHARP), torch.tensor([[[11.0, 9.0]]]), atol=1e-6)
    # An even window puts an interior peak at offset k/2 = 2; at the corner the top-left is (8, 6).
    assert torch.allclose(window_soft_argmax(scores, 4, FLAT), torch.tensor([[[9.5, 7.5]]]), atol=1e-4)
    assert torch.equal(gradient_support(torch.rand(1, 1, 10, 12) * 0.1 + scores, 4, 1.0), box(10, 12, 6, 8, 4, 4))
    interior = peaked_map(10, 12, [(5, 5)])
    assert torch.equal(gradient_support(torch.rand(1, 1, 10, 12) * 0.1 + interior, 4, 1.0), box(10, 12, 3, 3, 4, 4))


def test_window_larger_than_a_side_shrinks_to_it() -> None:
    scores = peaked_map(6, 9, [(8, 0)])
    # k = 7: all 6 rows; columns clamp(8 - 3, 0, 9 - 7) = 2 .. 8.
    assert torch.allclose(window_soft_argmax(scores, 7, FLAT), torch.tensor([[[5.0, 2.5]]]), atol=1e-4)
    assert torch.equal(gradient_support(torch.rand(1, 1, 6, 9) * 0.1 + scores, 7, 1.0), box(6, 9, 0, 2, 6, 7))


def test_two_equal_peaks_give_their_midpoint() -> None:
    scores = peaked_map(9, 9, [(3, 6), (4, 6)])
    assert torch.allclose(window_soft_argmax(scores, 5, SHARP), torch.tensor([[[3.5, 6.0]]]), atol=1e-6)
    diagonal = peaked_map(9, 9, [(3, 3), (4, 4)])
    assert torch.allclose(window_soft_argmax(diagonal, 3, SHARP), torch.tensor([[[3.5, 3.5]]]), atol=1e-6)


def test_hand_computed_expectation_and_temperature() -> None:
    # One row of weights 1 : 3 : 4 under softmax(scores / beta): x = (0*1 + 1*3 + 2*4) / 8 = 11/8.
    for beta in (1.0, 0.5, SHARP):
        scores = beta * torch.log(torch.tensor([1.0, 3.0, 4.0])).view(1, 1, 1, 3)
        assert torch.allclose(window_soft_argmax(scores, 3, beta), torch.tensor([[[11 / 8, 0.0]]]), atol=1e-6)
        assert torch.allclose(dense_soft_argmax(scores, beta), torch.tensor([[[11 / 8, 0.0]]]), atol=1e-6)


def test_high_temperature_tends_to_the_window_centre() -> None:
    scores = random_peaked_scores(1, 1, 20, seed=3)
    peak_row, peak_column = divmod(int(scores.argmax()), 20)
    top, left = min(max(peak_row - 3, 0), 13), min(max(peak_column - 3, 0), 13)
    centre = torch.tensor([[[left + 3.0, top + 3.0]]])
    distances = [float((window_soft_argmax(scores, 7, beta) - centre).norm()) for beta in (0.02, 1.0, 100.0)]
    assert distances[0] > distances[1] > distances[2] and distances[2] < 1e-2


def test_matches_a_loop_over_keypoints_on_random_maps() -> None:
    scores = torch.rand(3, 4, 9, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for window, beta in ((3, 0.1), (4, 0.05), (9, 0.02), (11, 1.0)):
        expected = reference_window_soft_argmax(scores, window, beta)
        assert torch.allclose(window_soft_argmax(scores, window, beta), expected)


def test_dense_equals_a_window_covering_the_map() -> None:
    scores = torch.rand(2, 3, 7, 10, generator=torch.Generator().manual_seed(0))
    for beta in (0.05, 1.0):
        dense = dense_soft_argmax(scores, beta)
        assert torch.allclose(window_soft_argmax(scores, 10, beta), dense, atol=1e-5)
        assert torch.allclose(window_soft_argmax(scores, 45, beta), dense, atol=1e-5)
        assert torch.equal(localize(scores, Localization("window", beta, None)), dense)
        assert torch.equal(localize(scores, Localization("window", beta, 3)), window_soft_argmax(scores, 3, beta))


def test_gradient_only_inside_each_window() -> None:
    scores = torch.rand(2, 3, 12, 14, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros_like(scores, dtype=torch.bool)
    for b in range(2):
        for n in range(3):
            row, column = divmod(int(scores[b, n].argmax()), 14)
            top, left = min(max(row - 2, 0), 7), min(max(column - 2, 0), 9)
            expected[b, n, top : top + 5, left : left + 5] = True
    assert torch.equal(gradient_support(scores, 5, 0.5), expected)


def test_saves_nothing_larger_than_the_window_for_backward() -> None:
    scores = torch.rand(2, 5, 40, 40, requires_grad=True)
    saved: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        window_soft_argmax(scores, 5, SHARP)
    scores_storage = scores.untyped_storage().data_ptr()
    new_tensors = [tensor for tensor in saved if tensor.untyped_storage().data_ptr() != scores_storage]
    assert new_tensors and max(tensor.numel() for tensor in new_tensors) <= 2 * 5 * 5 * 5


def test_bfloat16_agrees_with_float32() -> None:
    scores = random_peaked_scores(2, 6, 63, seed=0)
    in_float32 = window_soft_argmax(scores, 45, SHARP)
    in_bfloat16 = window_soft_argmax(scores.bfloat16(), 45, SHARP)
    assert in_bfloat16.dtype == torch.float32  # coordinates are returned in float32 (see the docstring)
    # Rounding the scores to bfloat16 (8 bits of mantissa) moves the estimate by ~0.03 cell here.
    assert (in_bfloat16 - in_float32).abs().max() < 0.1
    # The computation itself runs in float32: the same rounded scores in float32 give the same result.
    assert torch.allclose(in_bfloat16, window_soft_argmax(scores.bfloat16().float(), 45, SHARP), atol=1e-5)
    assert (dense_soft_argmax(scores.bfloat16(), SHARP) - dense_soft_argmax(scores, SHARP)).abs().max() < 0.1
    bf16_scores = scores.bfloat16().requires_grad_(True)
    window_soft_argmax(bf16_scores, 45, SHARP).sum().backward()
    assert bf16_scores.grad is not None and bf16_scores.grad.dtype == torch.bfloat16


def test_localization_stays_float32_under_bfloat16_autocast() -> None:
    """Coordinates near 200 cells would be rounded to whole cells in bfloat16."""
    scores = torch.zeros(1, 1, 1, 256)
    scores[0, 0, 0, 200] = 1.0
    scores[0, 0, 0, 201] = 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for window in (5, None):
            cells = localize(scores, Localization("window", 0.02, window))
            assert cells.dtype == torch.float32
            assert cells[0, 0].tolist() == [200.5, 0.0]


@pytest.mark.parametrize("state", ["meta device", "cpu float32 autocast", "cpu bfloat16 autocast"])
def test_matching_runs_in_float32_in_every_autocast_state(state: str) -> None:
    """The float32 island must not ask a device without autocast to disable it (the meta device,
    where benchmarks/bench_model.py counts FLOPs, raised "unsupported scalarType")."""
    device = "meta" if state == "meta device" else "cpu"
    maps = torch.randn(1, 8, 5, 5, device=device)
    kps = torch.tensor([[[3.0, 4.0], [10.0, 2.0]]], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU autocast warns that it does not take float32
        context = (
            torch.autocast("cpu", dtype=torch.bfloat16 if "bfloat16" in state else torch.float32)
            if "autocast" in state
            else contextlib.nullcontext()
        )
    with context:
        matches = match_keypoints(maps.bfloat16(), maps.bfloat16(), kps, 4, Localization("window", 0.02, 3, 7.0))
    assert matches.points.dtype == matches.scores.dtype == torch.float32
    assert matches.points.device.type == device
