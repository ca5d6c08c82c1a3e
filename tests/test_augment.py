"""sm_train.augment: keypoints follow the image exactly under the pixel-centre convention, the crop
keeps the object box, out-of-frame and padded keypoints are masked, probabilities and seeds are
respected, the disabled augmentation is the identity, wide-rotation categories, the pair
exchange, and the pair-level draws (independent, or the official frequencies)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sm_feed.batches import PairBatch
from sm_train.augment import (
    PairAugmentation,
    brightness_contrast,
    crop_resize_matrix,
    keypoints_in_frame,
    posterize,
    rotation_limits,
    rotation_matrix,
    sharpen,
    solarize,
    transform_keypoints,
    warp_images,
)
from sm_train.config import AugmentConfig

S = 64
# Probabilities of the per-image steps (the pair-level exchange_p is tested on its own).
PROBABILITIES = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p") and f.name != "exchange_p"]
APPEARANCE = [name for name in PROBABILITIES if name not in ("crop_p", "rotation_p")]


def only(**fields: object) -> AugmentConfig:
    """A config with every probability 0 except those given."""
    return dataclasses.replace(AugmentConfig(**{name: 0.0 for name in PROBABILITIES}), **fields)


def blob_images(kps: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """``[B, 3, S, S]``: keypoint ``c`` of ``kps`` ``[B, 3, 2]`` as a unit gaussian blob in channel ``c``."""
    coords = torch.arange(S, dtype=torch.float64)
    dx = coords[None, None, None, :] - kps[..., 0, None, None].double()
    dy = coords[None, None, :, None] - kps[..., 1, None, None].double()
    return torch.exp(-(dx**2 + dy**2) / (2 * sigma**2)).float()


def centroids(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 2]`` intensity-weighted ``(x, y)`` centroid of each channel, in pixels."""
    coords = torch.arange(S, dtype=torch.float64)
    weights = images.double()
    mass = weights.sum(dim=(-2, -1))
    x = (weights.sum(dim=-2) * coords).sum(-1) / mass
    y = (weights.sum(dim=-1) * coords).sum(-1) / mass
    return torch.stack((x, y), dim=-1)


def brightest(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 2]`` ``(x, y)`` of each channel's brightest pixel."""
    flat = images.flatten(2).argmax(-1)
    return torch.stack((flat % S, flat // S), dim=-1).double()


# --- the pixel-centre convention of the matrices and the warp ------------------------------------------


def test_rotation_by_quarter_turns_is_rot90_exactly() -> None:
    # Pixel centres map onto pixel centres only if the rotation centre is (S - 1) / 2 in the
    # pixel-centre frame and the warp agrees with it: any half-pixel slip would blur the result.
    images = torch.rand(2, 3, S, S)
    matrices = rotation_matrix(torch.tensor([90.0, -90.0]), (S, S), expand=False)
    out = warp_images(images, matrices)
    torch.testing.assert_close(out[0], torch.rot90(images[0], 1, (1, 2)), atol=1e-4, rtol=0)  # counter-clockwise
    torch.testing.assert_close(out[1], torch.rot90(images[1], -1, (1, 2)), atol=1e-4, rtol=0)
    corner = transform_keypoints(torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]]), matrices)
    torch.testing.assert_close(corner, torch.tensor([[[0.0, S - 1.0]], [[S - 1.0, 0.0]]]))


def test_crop_resize_matches_half_pixel_interpolation() -> None:
    # Cropping whole pixels 5..24 x 3..34 and resizing is F.interpolate(align_corners=False) of the slice,
    # except on the border ring, where the warp reads the real neighbours outside the window.
    images = torch.rand(1, 3, S, S)
    left, top, right, bottom = 5, 3, 24, 34
    window = torch.tensor([[left - 0.5, top - 0.5, right + 0.5, bottom + 0.5]], dtype=torch.float64)
    out = warp_images(images, crop_resize_matrix(window, (S, S)))
    reference = F.interpolate(
        images[..., top : bottom + 1, left : right + 1], size=(S, S), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(out[..., 2:-2, 2:-2], reference[..., 2:-2, 2:-2], atol=1e-5, rtol=0)
    # Pixel (left, top) covers [left - 0.5, left + 0.5]: it maps onto the output's first (S / 20) x (S / 32) pixels.
    first = transform_keypoints(torch.tensor([[[left, top]]], dtype=torch.float32), crop_resize_matrix(window, (S, S)))
    torch.testing.assert_close(first, torch.tensor([[[S / 20 / 2 - 0.5, S / 32 / 2 - 0.5]]]))


def test_expanded_rotation_keeps_the_whole_image() -> None:
    corners = torch.tensor([[[-0.5, -0.5], [S - 0.5, -0.5], [-0.5, S - 0.5], [S - 0.5, S - 0.5]]], dtype=torch.float64)
    for degrees in (-170.0, -30.0, 17.0, 45.0, 90.0):
        angle = torch.tensor([degrees], dtype=torch.float64)
        moved = transform_keypoints(corners, rotation_matrix(angle, (S, S), expand=True))
        assert moved.min() >= -0.5 - 1e-9 and moved.max() <= S - 0.5 + 1e-9
        # The rotated image touches the frame: its bounding box is the frame.
        assert moved.min() == pytest.approx(-0.5) and moved.max() == pytest.approx(S - 0.5)


# --- keypoints follow the image ----------------------------------------------------------------------


GEOMETRIES = {
    "crop": only(crop_p=1.0),
    "rotation": only(rotation_p=1.0),
    "crop+rotation": only(crop_p=1.0, rotation_p=1.0),
    "crop+rotation, canvas kept": only(crop_p=1.0, rotation_p=1.0, rotation_expand=False),
    "crop+wide rotation": only(crop_p=1.0, rotation_p=1.0, rotation_degrees=180.0),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keypoints_follow_the_image(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    batch = 6
    # Three sub-pixel keypoints inside the object box, one blob per channel; the same image in every row,
    # so that differing outputs also show per-sample parameters.
    kps = torch.tensor([[22.3, 24.0], [41.0, 30.6], [30.5, 41.8]]).expand(batch, 3, 2).clone()
    bboxes = torch.tensor([16.0, 16.0, 47.0, 47.0]).expand(batch, 4)
    images = blob_images(kps)
    out, moved, in_frame = PairAugmentation(GEOMETRIES[name])(images, kps, bboxes)
    assert in_frame.all()
    error = (centroids(out) - moved.double()).norm(dim=-1)
    assert error.max() < 0.1, f"{name}: blob centroids off by up to {error.max():.3f} px"
    assert (brightest(out) - moved.double()).abs().max() <= 1.0
    # Every sample got its own parameters.
    assert len({tuple(row.flatten().tolist()) for row in moved.round(decimals=3)}) == batch


def test_single_bright_pixel_lands_on_its_keypoint() -> None:
    torch.manual_seed(3)
    batch = 8
    kps = torch.tensor([[20.0, 25.0], [40.0, 33.0], [29.0, 44.0]]).expand(batch, 3, 2).clone()
    images = torch.zeros(batch, 3, S, S)
    for channel in range(3):
        x, y = kps[0, channel].long().tolist()
        images[:, channel, y, x] = 1.0
    bboxes = torch.tensor([[16.0, 16.0, 47.0, 47.0]] * batch)
    out, moved, _ = PairAugmentation(only(crop_p=1.0, rotation_p=1.0))(images, kps, bboxes)
    assert (brightest(out) - moved.double()).abs().max() <= 1.0


# --- the crop keeps the box; out-of-frame and padded keypoints ------------------------------------------


def test_crop_keeps_the_object_box() -> None:
    torch.manual_seed(0)
    boxes = torch.tensor(
        [
            [16.0, 16.0, 47.0, 47.0],
            [0.0, 0.0, 63.0, 63.0],  # the whole image: only the identity crop is possible
            [30.0, 31.0, 30.0, 31.0],  # a single pixel
            [2.7, 40.2, 60.9, 62.4],  # fractional, touching the bottom
            [-3.0, 10.0, 70.0, 20.0],  # sticking out of the image
        ]
    ).repeat(8, 1)
    batch = boxes.shape[0]
    corners = torch.stack((boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]), dim=1)
    inside = corners.clamp(0, S - 1)  # the part of the box on the image
    images = torch.rand(batch, 3, S, S)
    out, moved, in_frame = PairAugmentation(only(crop_p=1.0))(images, inside, boxes)
    assert in_frame.all()
    assert moved.min() >= -0.5 and moved.max() <= S - 0.5
    # The crop of the whole-image box is the identity; every other box is really cropped around.
    whole = boxes[:, 2] - boxes[:, 0] == 63
    torch.testing.assert_close(moved[whole], inside[whole], atol=1e-4, rtol=0)
    assert not torch.equal(out[~whole], images[~whole])
    # Anisotropic: x and y are stretched independently.
    stretch = (moved[:, 3] - moved[:, 0]) / (inside[:, 3] - inside[:, 0])
    assert ((stretch[:, 0] - stretch[:, 1]).abs() > 0.05).any()


def test_non_finite_box_is_not_cropped() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, S, S)
    kps = torch.tensor([[[1.0, 2.0]], [[5.0, 6.0]]])
    bboxes = torch.tensor([[math.nan] * 4, [10.0, 10.0, math.inf, 30.0]])
    out, moved, _ = PairAugmentation(only(crop_p=1.0))(images, kps, bboxes)
    # The sample still goes through the (identity) warp: equal up to float32 resampling error.
    torch.testing.assert_close(moved, kps, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, images, atol=1e-4, rtol=0)


def test_keypoints_leaving_the_frame_are_masked_not_clamped() -> None:
    # A 45 degree turn on a kept canvas takes the corner (0, 0) to (c - c * sqrt(2), c), c = (S - 1) / 2.
    corner = torch.zeros(1, 1, 2, dtype=torch.float64)
    turned = transform_keypoints(corner, rotation_matrix(torch.tensor([45.0], dtype=torch.float64), (S, S), False))
    centre = (S - 1) / 2
    torch.testing.assert_close(turned, torch.tensor([[[centre - centre * math.sqrt(2), centre]]], dtype=torch.float64))
    assert not keypoints_in_frame(turned, (S, S)).any()

    torch.manual_seed(0)
    batch = 16
    corners = torch.tensor([[0.0, 0.0], [S - 1.0, 0.0], [0.0, S - 1.0], [S - 1.0, S - 1.0], [31.5, 31.5]])
    kps = corners.expand(batch, -1, -1).clone()
    images = torch.zeros(batch, 3, S, S)
    images[:, :, 0, 0] = 1.0  # a marker on the first corner
    out, moved, in_frame = PairAugmentation(only(rotation_p=1.0, rotation_expand=False))(
        images, kps, torch.tensor([[16.0, 16.0, 47.0, 47.0]] * batch)
    )
    outside = (moved < -0.5).any(-1) | (moved > S - 0.5).any(-1)
    assert torch.equal(in_frame, ~outside)
    assert in_frame[:, 4].all()  # the centre stays
    assert (~in_frame[:, :4]).any(dim=1).all()  # every sample turned some corner out of the frame
    assert moved.min() < -3 and moved.max() > S + 2  # the coordinates are kept, not clamped
    # Where the first corner went well out of the frame, its marker pixel left the image too.
    gone = (moved[:, 0] < -2).any(-1) | (moved[:, 0] > S + 1).any(-1)
    assert gone.sum() >= 4 and out[gone].max() == 0

    # A crop can also push a keypoint lying outside the object box out of the frame.
    torch.manual_seed(1)
    kps = torch.tensor([[[0.0, 0.0], [30.0, 30.0]]]).expand(batch, -1, -1)
    bboxes = torch.tensor([[20.0, 20.0, 40.0, 40.0]] * batch)
    _, moved, in_frame = PairAugmentation(only(crop_p=1.0))(images, kps, bboxes)
    assert not in_frame[:, 0].any() and in_frame[:, 1].all()
    assert (moved[:, 0] < -0.5).all()


def test_nan_padding_stays_nan_and_masked() -> None:
    torch.manual_seed(0)
    batch = 6
    kps = torch.full((batch, 5, 2), math.nan)
    kps[:, :2] = torch.tensor([[20.0, 20.0], [40.0, 44.0]])
    augment = PairAugmentation(dataclasses.replace(AugmentConfig(), crop_p=1.0, rotation_p=1.0))
    _, moved, in_frame = augment(torch.rand(batch, 3, S, S), kps, torch.tensor([[16.0, 16.0, 47.0, 47.0]] * batch))
    assert moved[:, 2:].isnan().all()
    assert not in_frame[:, 2:].any()
    assert in_frame[:, :2].all() and moved[:, :2].isfinite().all()


# --- identity, probabilities, seeds ------------------------------------------------------------------------


def _inputs(batch: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)  # inputs independent of the global stream
    images = torch.rand(batch, 3, S, S, generator=generator)
    kps = torch.rand(batch, 4, 2, generator=generator) * 30 + 17
    kps[:, -1] = math.nan
    return images, kps, torch.tensor([[16.0, 16.0, 47.0, 47.0]] * batch)


def test_disabled_is_the_identity() -> None:
    images, kps, bboxes = _inputs()
    everything = {name: 1.0 for name in PROBABILITIES}
    for config in (AugmentConfig(enabled=False, **everything), only()):
        out, moved, in_frame = PairAugmentation(config)(images, kps, bboxes)
        assert torch.equal(out, images)
        assert torch.equal(moved.nan_to_num(-1), kps.nan_to_num(-1))
        assert torch.equal(in_frame, kps[..., 0].isfinite())


@pytest.mark.parametrize("name", PROBABILITIES)
def test_each_probability_is_respected(name: str) -> None:
    images, kps, bboxes = _inputs(batch=32)
    torch.manual_seed(0)
    out, moved, _ = PairAugmentation(only(**{name: 1.0}))(images, kps, bboxes)
    changed = (out != images).flatten(1).any(1)
    assert changed.all(), f"{name}=1 left {int((~changed).sum())} images unchanged"
    if name in APPEARANCE:  # appearance never moves a keypoint
        assert torch.equal(moved.nan_to_num(-1), kps.nan_to_num(-1))
    else:
        assert (moved[:, :-1] != kps[:, :-1]).any(-1).any(-1).all()

    torch.manual_seed(0)
    out, moved, _ = PairAugmentation(only(**{name: 0.5}))(images, kps, bboxes)
    changed = (out != images).flatten(1).any(1)
    assert 4 <= int(changed.sum()) <= 28
    # The untouched samples are bit for bit the input (never resampled through an identity warp).
    assert torch.equal(out[~changed], images[~changed])
    assert torch.equal(moved[~changed].nan_to_num(-1), kps[~changed].nan_to_num(-1))


def test_all_appearance_steps_keep_keypoints() -> None:
    images, kps, bboxes = _inputs()
    torch.manual_seed(0)
    out, moved, in_frame = PairAugmentation(only(**{name: 1.0 for name in APPEARANCE}))(images, kps, bboxes)
    assert torch.equal(moved.nan_to_num(-1), kps.nan_to_num(-1))
    assert torch.equal(in_frame, keypoints_in_frame(kps, (S, S)))
    assert out.min() >= 0 and out.max() <= 1 and out.dtype == torch.float32


def test_seed_reproduces() -> None:
    images, kps, bboxes = _inputs()
    augment = PairAugmentation(dataclasses.replace(AugmentConfig(), **{name: 0.7 for name in PROBABILITIES}))
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(augment(images, kps, bboxes))
    for first, second in zip(runs[0], runs[1], strict=True):
        assert torch.equal(first.nan_to_num(-1), second.nan_to_num(-1))
    assert not torch.equal(runs[0][0], runs[2][0])


# --- wide rotations and the pair exchange -------------------------------------------------------------------


def test_rotation_limits_per_category() -> None:
    config = AugmentConfig(rotation_degrees=30.0, wide_rotation_categories=("bottle",), wide_rotation_degrees=180.0)
    assert rotation_limits(config, ["bottle", "cat", "bottle"], 3).tolist() == [180.0, 30.0, 180.0]
    assert rotation_limits(config, None, 2).tolist() == [30.0, 30.0]
    with pytest.raises(ValueError, match="2 categories for a batch of 3"):
        rotation_limits(config, ["bottle", "cat"], 3)


def test_only_wide_categories_turn_when_the_normal_range_is_zero() -> None:
    images, kps, bboxes = _inputs(batch=2)
    config = only(rotation_p=1.0, rotation_degrees=0.0, wide_rotation_categories=("bottle",))
    angles = []
    for seed in range(20):
        torch.manual_seed(seed)
        out, moved, _ = PairAugmentation(config)(images, kps, bboxes, ["cat", "bottle"])
        torch.testing.assert_close(moved[0], kps[0], equal_nan=True)  # a 0-degree turn moves nothing
        assert (moved[1, :-1] != kps[1, :-1]).any()
        # The angle of the bottle, read back from its first keypoint around the centre.
        centre = (S - 1) / 2
        before, after = kps[1, 0] - centre, moved[1, 0] - centre
        angles.append(math.degrees(math.atan2(-(after[1]), after[0]) - math.atan2(-(before[1]), before[0])))
    wrapped = [(a + 180) % 360 - 180 for a in angles]
    assert max(abs(a) for a in wrapped) > 90  # beyond the normal 30 degrees


def _pair_batch(batch: int) -> PairBatch:
    generator = torch.Generator().manual_seed(3)
    return PairBatch(
        src_image=torch.randint(0, 255, (batch, 3, 8, 8), dtype=torch.uint8, generator=generator),
        trg_image=torch.randint(0, 255, (batch, 3, 8, 8), dtype=torch.uint8, generator=generator),
        src_kps=torch.rand(batch, 2, 2, generator=generator),
        trg_kps=torch.rand(batch, 2, 2, generator=generator),
        valid=torch.ones(batch, 2, dtype=torch.bool),
        src_bbox=torch.rand(batch, 4, generator=generator),
        trg_bbox=torch.rand(batch, 4, generator=generator),
        src_size=torch.randint(10, 99, (batch, 2), generator=generator),
        trg_size=torch.randint(10, 99, (batch, 2), generator=generator),
        meta=[None] * batch,  # type: ignore[list-item]
    )


def test_exchange_swaps_whole_sides_with_its_probability() -> None:
    batch = _pair_batch(64)
    assert PairAugmentation(only(exchange_p=0.0)).exchange(batch) is batch
    assert PairAugmentation(AugmentConfig(enabled=False, exchange_p=1.0)).exchange(batch) is batch
    swapped = PairAugmentation(only(exchange_p=1.0)).exchange(batch)
    for name in ("image", "kps", "bbox", "size"):
        assert torch.equal(getattr(swapped, f"src_{name}"), getattr(batch, f"trg_{name}"))
        assert torch.equal(getattr(swapped, f"trg_{name}"), getattr(batch, f"src_{name}"))
    assert torch.equal(swapped.valid, batch.valid) and swapped.meta is batch.meta

    torch.manual_seed(0)
    half = PairAugmentation(only(exchange_p=0.5)).exchange(batch)
    exchanged = torch.tensor([torch.equal(half.src_image[i], batch.trg_image[i]) for i in range(64)])
    assert 16 <= int(exchanged.sum()) <= 48
    for i in range(64):  # each pair is either exactly as it was or exactly swapped, every field alike
        source = batch.trg_kps[i] if exchanged[i] else batch.src_kps[i]
        size = batch.trg_size[i] if exchanged[i] else batch.src_size[i]
        assert torch.equal(half.src_kps[i], source) and torch.equal(half.src_size[i], size)


# --- pair-level draws: independent (two calls) or official (crop both or neither; rotate src / trg / both) ---

PAIRS = 30_000


def _binomial(count: int, trials: int, p: float, sigmas: float = 5.0) -> bool:
    """``count`` successes in ``trials`` is within ``sigmas`` standard deviations of ``trials * p``."""
    return abs(count - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p))


def _identical(first: torch.Tensor, second: torch.Tensor) -> bool:
    if first.is_floating_point():
        return torch.equal(first.nan_to_num(-1), second.nan_to_num(-1))
    return torch.equal(first, second)


def test_independent_pair_draws_are_the_two_calls_of_before_bit_for_bit() -> None:
    images, kps, bboxes = _inputs()
    target = (images.flip(0), kps.flip(0), bboxes + 1)
    categories = ["bottle", "cat"] * 4
    config = dataclasses.replace(
        AugmentConfig(wide_rotation_categories=("bottle",)), **dict.fromkeys(PROBABILITIES, 0.6)
    )
    augment = PairAugmentation(config)
    assert config.pair_draws == "independent"  # the default
    torch.manual_seed(7)
    expected = (augment(images, kps, bboxes, categories), augment(*target, categories))
    torch.manual_seed(7)
    got = augment.pair((images, kps, bboxes), target, categories)
    for side_expected, side_got in zip(expected, got, strict=True):
        assert all(_identical(a, b) for a, b in zip(side_expected, side_got, strict=True))


def test_official_pair_draws_have_the_official_frequencies() -> None:
    augment = PairAugmentation(AugmentConfig(pair_draws="official"))  # crop_p = rotation_p = 0.5
    torch.manual_seed(0)
    src, trg = augment.draw_pair_geometry(PAIRS)
    # The crop is all-or-nothing for the pair, half of the pairs; each side has its own window.
    assert torch.equal(src.cropped, trg.cropped) and _binomial(int(src.cropped.sum()), PAIRS, 0.5)
    assert (src.crop_uniform != trg.crop_uniform).all()
    # Rotation: none for half of the pairs, else the source only, the target only or both, a sixth each.
    turned = {
        "none": ~src.rotated & ~trg.rotated,
        "source only": src.rotated & ~trg.rotated,
        "target only": ~src.rotated & trg.rotated,
        "both": src.rotated & trg.rotated,
    }
    counts = {name: int(mask.sum()) for name, mask in turned.items()}
    assert sum(counts.values()) == PAIRS
    assert _binomial(counts["none"], PAIRS, 1 / 2), counts
    assert all(_binomial(counts[name], PAIRS, 1 / 6) for name in ("source only", "target only", "both")), counts
    assert torch.equal(src.angles, trg.angles)  # one angle per pair: equal whenever both turn
    assert src.angles.abs().max() <= 30.0
    # Crop and rotation are drawn independently of each other.
    assert _binomial(int((src.cropped & (src.rotated | trg.rotated)).sum()), PAIRS, 1 / 4)

    # Independent draws, for contrast, crop one side only in half of the pairs.
    independent = PairAugmentation(AugmentConfig())
    torch.manual_seed(0)
    first, second = independent.draw_geometry(PAIRS), independent.draw_geometry(PAIRS)
    assert _binomial(int((first.cropped != second.cropped).sum()), PAIRS, 0.5)


def test_official_pair_draws_move_the_images_as_drawn() -> None:
    # The same inputs on both sides: a pair turned on both sides by one angle comes out twice the same.
    pairs, side = 3000, 8
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(pairs, 3, side, side, generator=generator)
    kps = torch.rand(pairs, 2, 2, generator=generator) * 4 + 2
    bboxes = torch.tensor([[2.0, 2.0, 5.0, 5.0]] * pairs)
    for name, config in (("rotation", only(rotation_p=0.5)), ("crop", only(crop_p=0.5))):
        augment = PairAugmentation(dataclasses.replace(config, pair_draws="official"))
        torch.manual_seed(1)
        (src, src_kps, _), (trg, trg_kps, _) = augment.pair((images, kps, bboxes), (images, kps, bboxes))
        src_moved, trg_moved = (src_kps != kps).any(-1).any(-1), (trg_kps != kps).any(-1).any(-1)
        both, neither = src_moved & trg_moved, ~src_moved & ~trg_moved
        assert torch.equal(src[both], trg[both]) == (name == "rotation")  # crops draw a window per side
        assert torch.equal(src[~src_moved], images[~src_moved]) and torch.equal(trg[~trg_moved], images[~trg_moved])
        assert _binomial(int(neither.sum()), pairs, 0.5), name
        one_side = int((src_moved & ~trg_moved).sum()), int((~src_moved & trg_moved).sum())
        if name == "crop":
            assert one_side == (0, 0)
        else:
            assert torch.equal(src_kps[both], trg_kps[both])
            assert all(_binomial(count, pairs, 1 / 6) for count in (*one_side, int(both.sum()))), one_side
    with pytest.raises(ValueError, match="geometry drawn for 3 samples, applied to 8"):
        augment(*_inputs(), draws=augment.draw_pair_geometry(3)[0])


# --- appearance functions ----------------------------------------------------------------------------------


def test_appearance_functions() -> None:
    levels = torch.tensor([0, 15, 16, 100, 255], dtype=torch.float32) / 255
    assert (posterize(levels, 4) * 255).round().tolist() == [0, 0, 16, 96, 240]
    torch.testing.assert_close(solarize(torch.tensor([0.2, 0.5, 0.9]), 0.5), torch.tensor([0.2, 0.5, 0.1]))
    flat = torch.full((2, 3, 8, 8), 0.5)
    # A flat image only sees the kernel's sum 1 - a + a * l (reflect-101 border included).
    out = sharpen(flat, torch.tensor([0.2, 0.5]), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out, torch.stack((flat[0], flat[1] * 0.75)))
    spike = torch.zeros(1, 3, 5, 5)
    spike[..., 2, 2] = 0.5
    out = sharpen(spike, torch.tensor([0.4]), torch.tensor([1.0]))
    assert out[0, 0, 2, 2].item() == pytest.approx(0.5 * (0.6 + 0.4 * 9)) or out[0, 0, 2, 2].item() == 1.0
    assert out[0, 0, 1, 1].item() == 0.0  # -0.4 * 0.5, clamped
    torch.testing.assert_close(
        brightness_contrast(flat, torch.tensor([0.2, -0.2]), torch.tensor([0.1, 0.0])),
        torch.stack((torch.full((3, 8, 8), 0.7), torch.full((3, 8, 8), 0.4))),
    )


# --- config, dtypes, devices ----------------------------------------------------------------------------


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(rotation_p=1.5)
    with pytest.raises(ValueError, match="posterize_bits"):
        AugmentConfig(posterize_bits=9)


def test_float64_and_autocast() -> None:
    images, kps, bboxes = _inputs()
    # The continuous steps only: posterize and equalize bin 8-bit levels, where an ulp can flip a level.
    augment = PairAugmentation(only(crop_p=1.0, rotation_p=1.0, sharpen_p=0.5, brightness_contrast_p=0.5))
    torch.manual_seed(0)
    out, moved, _ = augment(images.double(), kps.double(), bboxes)
    assert out.dtype == torch.float64 and moved.dtype == torch.float64
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32, moved32, _ = augment(images, kps, bboxes)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, out.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(moved32, moved.float(), equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    images, kps, bboxes = _inputs()
    augment = PairAugmentation(dataclasses.replace(AugmentConfig(), **{name: 0.6 for name in PROBABILITIES}))
    torch.manual_seed(0)
    cpu = augment(images, kps, bboxes)
    torch.manual_seed(0)
    cuda = augment(images.cuda(), kps.cuda(), bboxes.cuda())
    assert all(tensor.is_cuda for tensor in cuda)
    torch.testing.assert_close(cuda[1].cpu(), cpu[1], equal_nan=True, atol=1e-4, rtol=0)
    assert torch.equal(cuda[2].cpu(), cpu[2])
    # Equalize and posterize bin by 8-bit level, so a ulp of difference can move a pixel by a level.
    assert (cuda[0].cpu() - cpu[0]).abs().mean() < 1e-3
