"""Training augmentation on the device: the official SimpleMatch recipe on batched tensors.

Geometry (official ``RandomCrop`` then ``RandomRotation``) and appearance (official ``NormalAug``,
albumentations 1.4.2 defaults), applied per sample with independent parameters to images that the
loader workers already decoded and resized to the square network input.

Coordinates
-----------
Keypoints and bboxes are ``(x, y)`` pixels of the network input, pixel ``(0, 0)`` centred at
``(0.0, 0.0)``: an ``H x W`` image covers ``[-0.5, W - 0.5] x [-0.5, H - 0.5]`` (the project
convention, see :mod:`sm_model.pixels`). Every geometric step is one ``3 x 3`` matrix in this
frame, source pixels to output pixels. This is also kornia's pixel frame (integer = pixel centre),
so :func:`kornia.geometry.transform.warp_affine` applies exactly the same matrix to the image: no
``align_corners`` or half-pixel correction is needed on top, and the keypoints are moved by that
matrix, never by kornia's keypoint code (kornia #2684, #1398, #4412).

Geometry
--------
* Crop (``crop_p``): a window whose left edge is uniform in ``[-0.5, x1 - 0.5]``, top edge in
  ``[-0.5, y1 - 0.5]``, right edge in ``[x2 + 0.5, W - 0.5]`` and bottom edge in
  ``[y2 + 0.5, H - 0.5]``, i.e. the official ``left in [0, x1]``, ..., ``right in [x2, W]`` in
  continuous pixel edges, so the whole pixels ``x1..x2``, ``y1..y2`` of the object box are always
  kept. The window is resized back to ``H x W`` anisotropically (as the official code). Non-finite
  bboxes count as the whole image, so such a sample is never cropped.
* Rotation (``rotation_p``): by ``U(-rotation_degrees, rotation_degrees)`` degrees (for the
  categories in ``wide_rotation_categories``, official ``bottle``: ``U(-wide_rotation_degrees,
  wide_rotation_degrees)``, official 180) about the image centre, counter-clockwise on screen for a positive angle (OpenCV's and kornia's sign). With
  ``rotation_expand`` (official) the canvas grows to hold the whole rotated image
  (``W|cos| + H|sin|`` by ``W|sin| + H|cos|``, black fill) and is resized back to ``H x W``, i.e. a
  rotation plus a zoom-out by ``1 / (|cos| + |sin|)`` on a square image: nothing leaves the frame.
  Without it the canvas is kept and the corners are cut off.
* Crop first, then rotation (the official order); both compose into one matrix per sample, and the
  image is resampled once (bilinear, zero fill), batched over the samples that move.

Differences from the official code: parameters are continuous rather than whole pixels; the
crop works on the already resized ``S x S`` image rather than the original; keypoints that leave the
frame are masked (``in_frame``) instead of clipped to ``[0, S - 1]``.

Pairs
-----
:meth:`PairAugmentation.pair` augments both sides of a batch of pairs. How the two sides draw their
geometry is ``pair_draws``:

* ``independent``: each side draws its own crop and rotation (:meth:`~PairAugmentation.draw_geometry`);
  exactly one call for the sources, then one for the targets.
* ``official`` (the official ``RandomCrop`` / ``RandomRotation`` on a pair,
  :meth:`~PairAugmentation.draw_pair_geometry`): with ``crop_p`` both sides are cropped, else
  neither (each side keeps its own window, drawn around its own box); with ``rotation_p`` the pair
  is rotated, and then the source only, the target only, or both by the same angle, a third each.

Appearance is drawn per image in both modes. :meth:`PairAugmentation.exchange` swaps the source
and target of each pair with ``exchange_p`` (the official ``Exchange``, PF-PASCAL only: 0.5),
before the two sides are augmented.

Appearance
----------
In the official order, each with its own probability: grayscale (BT.601 luma), posterize (keep the
``posterize_bits`` high bits of the 8-bit level), equalize (kornia, PIL semantics), sharpen
(albumentations' ``Sharpen``: kernel ``(1 - a) * identity + a * [[-1,-1,-1], [-1, 8 + l, -1],
[-1,-1,-1]]`` with ``a ~ U(sharpen_alpha)``, ``l ~ U(sharpen_lightness)``, reflect-101 border),
brightness/contrast (albumentations' ``RandomBrightnessContrast``: ``x * (1 + c) + b`` with
``c ~ U(+-contrast_limit)``, ``b ~ U(+-brightness_limit)``), solarize (``x >= threshold`` becomes
``1 - x``) and color jitter (kornia's ``ColorJitter``, torchvision semantics; the order of its four
adjustments is drawn once per call, not per image). Results are clamped to ``[0, 1]``. None of them
moves a pixel, so keypoints pass through.

Random numbers
--------------
Every parameter, kornia's included, is drawn from torch's global CPU generator, whatever the
device: ``torch.manual_seed`` reproduces a call. Which samples a step touches is drawn on the CPU
too, so choosing them needs no device synchronisation, and samples a step does not touch are left
bit for bit as they were (they are never resampled through an identity warp).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from sm_feed.batches import PairBatch
from sm_train.config import AugmentConfig

# --- geometry: pure functions on per-sample 3x3 matrices (source pixels -> output pixels) ---------


def crop_resize_matrix(windows: Tensor, size: tuple[int, int]) -> Tensor:
    """Matrices ``[B, 3, 3]`` that resize crop ``windows`` ``[B, 4]`` onto the whole ``size`` image.

    ``windows`` are the crop's outer edges ``(left, top, right, bottom)`` in input pixels (the whole
    ``H x W`` image is ``(-0.5, -0.5, W - 0.5, H - 0.5)``); ``size`` is the output ``(H, W)``. The
    window's edges land on the output's edges, so ``x' = (x - left) * W / (right - left) - 0.5``.
    """
    height, width = size
    left, top, right, bottom = windows.unbind(-1)
    scale_x, scale_y = width / (right - left), height / (bottom - top)
    matrices = _eye(windows.shape[0], windows)
    matrices[:, 0, 0], matrices[:, 0, 2] = scale_x, -left * scale_x - 0.5
    matrices[:, 1, 1], matrices[:, 1, 2] = scale_y, -top * scale_y - 0.5
    return matrices


def rotation_matrix(degrees: Tensor, size: tuple[int, int], expand: bool) -> Tensor:
    """Matrices ``[B, 3, 3]`` rotating an ``(H, W)`` image by ``degrees`` ``[B]`` about its centre.

    Positive angles turn counter-clockwise on screen (``y`` points down). With ``expand``, the
    rotated image's bounding canvas (``W|cos| + H|sin|`` by ``W|sin| + H|cos|``) is resized back to
    ``H x W``, so the whole rotated image stays in the frame; otherwise the canvas is kept.
    """
    height, width = size
    radians = torch.deg2rad(degrees)
    cos, sin = torch.cos(radians), torch.sin(radians)
    if expand:
        scale_x = width / (width * cos.abs() + height * sin.abs())
        scale_y = height / (width * sin.abs() + height * cos.abs())
    else:
        scale_x = scale_y = torch.ones_like(cos)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    matrices = _eye(degrees.shape[0], degrees)
    # x' = c + S R (x - c), R = [[cos, sin], [-sin, cos]] (OpenCV's getRotationMatrix2D).
    matrices[:, 0, 0], matrices[:, 0, 1] = scale_x * cos, scale_x * sin
    matrices[:, 1, 0], matrices[:, 1, 1] = -scale_y * sin, scale_y * cos
    matrices[:, 0, 2] = centre_x - matrices[:, 0, 0] * centre_x - matrices[:, 0, 1] * centre_y
    matrices[:, 1, 2] = centre_y - matrices[:, 1, 0] * centre_x - matrices[:, 1, 1] * centre_y
    return matrices


def transform_keypoints(kps: Tensor, matrices: Tensor) -> Tensor:
    """``kps`` ``[B, N, 2]`` moved by the affine ``matrices`` ``[B, 3, 3]``, in ``kps``' dtype.

    Computed in float64 (at least). Non-finite rows (NaN padding) stay non-finite."""
    compute_dtype = torch.promote_types(kps.dtype, torch.float64)
    points, matrices = kps.to(compute_dtype), matrices.to(compute_dtype)
    moved = points @ matrices[:, :2, :2].transpose(1, 2) + matrices[:, None, :2, 2]
    return moved.to(kps.dtype)


def warp_images(images: Tensor, matrices: Tensor) -> Tensor:
    """``images`` ``[B, C, H, W]`` resampled through ``matrices`` ``[B, 3, 3]`` (source -> output
    pixels): bilinear, zero outside the source, same size.

    ``align_corners=True`` is kornia's frame where the integer is the pixel centre, the project's
    frame; kornia's warp normalises the matrix with the same flag, so the pair is consistent."""
    height, width = images.shape[-2:]
    return kornia.geometry.transform.warp_affine(
        images,
        matrices[:, :2, :].to(images.dtype),
        (height, width),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )


def keypoints_in_frame(kps: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, N]`` bool: finite and inside ``[-0.5, W - 0.5] x [-0.5, H - 0.5]`` (edges included)."""
    height, width = size
    x, y = kps[..., 0], kps[..., 1]
    # NaN fails every comparison, so padded rows come out False without a separate isfinite.
    return (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)


def _eye(batch: int, like: Tensor) -> Tensor:
    return torch.eye(3, dtype=like.dtype, device=like.device).repeat(batch, 1, 1)


# --- appearance: pure functions on [k, 3, H, W] images in [0, 1], per-sample parameters [k] ----------


def grayscale(images: Tensor) -> Tensor:
    """BT.601 luma (0.299, 0.587, 0.114), repeated on the three channels."""
    return kornia.color.rgb_to_grayscale(images).expand_as(images)


def posterize(images: Tensor, bits: int) -> Tensor:
    """Keep the ``bits`` high bits of each 8-bit level (``round(x * 255)``); ``bits=8`` only quantises."""
    step = 2 ** (8 - bits)
    levels = torch.round(images.clamp(0, 1) * 255)
    return torch.floor(levels / step) * step / 255


def equalize(images: Tensor) -> Tensor:
    """Per-channel histogram equalisation of the 8-bit levels (kornia, PIL semantics)."""
    # kornia refuses values its 256-bin table cannot index; resampling can overshoot 1 by an ulp.
    return kornia.enhance.equalize(images.clamp(0, 1))


def sharpen(images: Tensor, alpha: Tensor, lightness: Tensor) -> Tensor:
    """albumentations' ``Sharpen`` with per-sample ``alpha`` and ``lightness`` ``[k]``, clamped to [0, 1].

    The kernel sums to ``1 - alpha + alpha * lightness``, so ``lightness < 1`` also darkens (as
    the original). Border: reflect-101, OpenCV's ``filter2D`` default."""
    batch, channels, height, width = images.shape
    effect = -torch.ones(batch, 3, 3, dtype=images.dtype, device=images.device)
    effect[:, 1, 1] = 8 + lightness.to(images)
    identity = torch.zeros_like(effect)
    identity[:, 1, 1] = 1
    alpha = alpha.to(images)[:, None, None]
    kernels = (1 - alpha) * identity + alpha * effect  # [k, 3, 3], symmetric: correlation = convolution
    # One grouped convolution for the batch: each (sample, channel) plane is its own group.
    weight = kernels.repeat_interleave(channels, dim=0).unsqueeze(1)  # [k*C, 1, 3, 3]
    padded = F.pad(images.reshape(1, batch * channels, height, width), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, weight, groups=batch * channels).view_as(images).clamp(0, 1)


def brightness_contrast(images: Tensor, contrast: Tensor, brightness: Tensor) -> Tensor:
    """albumentations' ``RandomBrightnessContrast`` (brightness by max): ``x * (1 + contrast) + brightness``
    with per-sample ``contrast``, ``brightness`` ``[k]``, clamped to [0, 1]."""
    factor = (1 + contrast.to(images))[:, None, None, None]
    return (images * factor + brightness.to(images)[:, None, None, None]).clamp(0, 1)


def solarize(images: Tensor, threshold: float) -> Tensor:
    """Invert (``1 - x``) every value at or above ``threshold``."""
    return torch.where(images >= threshold, 1 - images, images)


def _uniform(count: int, low: float, high: float) -> Tensor:
    """``count`` draws of ``U(low, high)`` from torch's global CPU generator."""
    return low + (high - low) * torch.rand(count, dtype=torch.float64)


# --- the module ------------------------------------------------------------------------------------

ROTATE_SOURCE, ROTATE_TARGET, ROTATE_BOTH = 0, 1, 2
"""Which side of a rotated pair turns under ``pair_draws="official"`` (drawn uniformly)."""

Side = tuple[Tensor, Tensor, Tensor]
"""One side of a batch of pairs: ``(images, kps, bboxes)`` as :meth:`PairAugmentation.forward` takes them."""
AugmentedSide = tuple[Tensor, Tensor, Tensor]
"""One augmented side: ``(images, kps, in_frame)`` as :meth:`PairAugmentation.forward` returns them."""


@dataclass(frozen=True)
class GeometryDraws:
    """The geometric draws of one side of a batch of ``B`` pairs, all on the CPU: ``cropped`` and
    ``rotated`` ``[B]`` bool; ``crop_uniform`` ``[B, 4]`` float64 in ``[0, 1)`` (left, top, right,
    bottom of the window, see :func:`_crop_windows`) and ``angles`` ``[B]`` float64 degrees, each
    ``None`` when its probability is 0 (no draw at all)."""

    cropped: Tensor
    crop_uniform: Tensor | None
    rotated: Tensor
    angles: Tensor | None


class PairAugmentation(torch.nn.Module):
    """Augments a batch of pairs: :meth:`pair` for both sides, or a call for one side.

    Works on cpu and cuda; images of any floating dtype are processed in (at least) float32 with
    autocast off and returned in their own dtype. Has no learnable state.
    """

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        self.config = config
        self.color_jitter = kornia.augmentation.ColorJitter(
            brightness=config.jitter_brightness,
            contrast=config.jitter_contrast,
            saturation=config.jitter_saturation,
            hue=config.jitter_hue,
            p=1.0,  # which images are jittered is drawn here, like every other step
        )

    def exchange(self, batch: PairBatch) -> PairBatch:
        """``batch`` with the source and target of each pair swapped with probability
        ``exchange_p`` (images, keypoints, bboxes, sizes); ``meta`` still describes the stored
        pairs. The batch itself is returned when nothing is swapped."""
        swapped = _bernoulli(len(batch), self.config.exchange_p if self.config.enabled else 0.0)
        if not swapped.any():
            return batch
        mask = swapped.to(batch.src_image.device)
        sides = {}
        for name in ("image", "kps", "bbox", "size"):
            src, trg = getattr(batch, f"src_{name}"), getattr(batch, f"trg_{name}")
            if src.shape != trg.shape:
                raise ValueError(f"cannot exchange src_{name} {tuple(src.shape)} and trg_{name} {tuple(trg.shape)}")
            row_mask = mask.view(-1, *[1] * (src.ndim - 1))
            sides[f"src_{name}"], sides[f"trg_{name}"] = torch.where(row_mask, trg, src), torch.where(row_mask, src, trg)
        return dataclasses.replace(batch, **sides)

    def pair(
        self, src: Side, trg: Side, categories: Sequence[str] | None = None
    ) -> tuple[AugmentedSide, AugmentedSide]:
        """Augment both sides of a batch of pairs; ``src`` and ``trg`` are ``(images, kps, bboxes)``
        and come back as ``(images, kps, in_frame)`` (see :meth:`forward`). ``pair_draws``
        ``independent`` is exactly a call for the sources, then one for the targets; ``official``
        draws the geometry once per pair (:meth:`draw_pair_geometry`), then augments each side with
        its share of it (and its own appearance draws)."""
        src_draws = trg_draws = None
        if self.config.enabled and self.config.pair_draws == "official":
            src_draws, trg_draws = self.draw_pair_geometry(src[0].shape[0], categories)
        return self(*src, categories, draws=src_draws), self(*trg, categories, draws=trg_draws)

    def draw_geometry(self, batch: int, categories: Sequence[str] | None = None) -> GeometryDraws:
        """Independent geometric draws for one side of ``batch`` pairs (a fixed number of draws per
        call; each is used only where its step applies)."""
        config = self.config
        cropped = _bernoulli(batch, config.crop_p)
        crop_uniform = torch.rand(batch, 4, dtype=torch.float64) if config.crop_p > 0 else None
        rotated = _bernoulli(batch, config.rotation_p)
        return GeometryDraws(cropped, crop_uniform, rotated, _draw_angles(config, categories, batch))

    def draw_pair_geometry(
        self, batch: int, categories: Sequence[str] | None = None
    ) -> tuple[GeometryDraws, GeometryDraws]:
        """The official pair-level geometric draws for ``batch`` pairs, ``(source, target)``: one
        crop decision per pair for both sides (each side its own window), one rotation decision per
        pair, which side turns (:data:`ROTATE_SOURCE`, :data:`ROTATE_TARGET`, :data:`ROTATE_BOTH`,
        uniformly) and one angle, shared when both turn."""
        config = self.config
        cropped = _bernoulli(batch, config.crop_p)
        windows = torch.rand(2, batch, 4, dtype=torch.float64) if config.crop_p > 0 else None
        rotated = _bernoulli(batch, config.rotation_p)
        turns = torch.randint(3, (batch,)) if config.rotation_p > 0 else torch.full((batch,), ROTATE_BOTH)
        angles = _draw_angles(config, categories, batch)
        src_window, trg_window = (None, None) if windows is None else windows.unbind(0)
        return (
            GeometryDraws(cropped, src_window, rotated & (turns != ROTATE_TARGET), angles),
            GeometryDraws(cropped, trg_window, rotated & (turns != ROTATE_SOURCE), angles),
        )

    def forward(
        self,
        images: Tensor,
        kps: Tensor,
        bboxes: Tensor,
        categories: Sequence[str] | None = None,
        draws: GeometryDraws | None = None,
    ) -> AugmentedSide:
        """Augment ``images`` and move ``kps`` with them.

        ``images``: ``[B, 3, S, S]`` float in [0, 1]; ``kps``: ``[B, N, 2]`` input pixels, padded rows
        NaN; ``bboxes``: ``[B, 4]`` ``(x1, y1, x2, y2)`` input pixels (the object box kept by the crop);
        ``categories``: one per sample, for ``wide_rotation_categories`` (``None``: none is wide);
        ``draws``: the geometry to apply (``None``: drawn here, :meth:`draw_geometry`).
        Returns ``(images [B, 3, S, S], kps [B, N, 2], in_frame [B, N] bool)``: keypoints that left the
        frame keep their (unclamped) coordinates and are ``False`` in ``in_frame``, as are NaN rows.
        With augmentation disabled (or every probability 0) the input tensors themselves are returned.
        """
        _check_inputs(images, kps, bboxes)
        size = (images.shape[-2], images.shape[-1])
        if not self.config.enabled or images.shape[0] == 0:
            return images, kps, keypoints_in_frame(kps, size)
        if draws is None:
            draws = self.draw_geometry(images.shape[0], categories)
        elif draws.cropped.shape[0] != images.shape[0]:
            raise ValueError(f"geometry drawn for {draws.cropped.shape[0]} samples, applied to {images.shape[0]}")
        with torch.autocast(images.device.type, enabled=False):
            work = images.to(torch.promote_types(images.dtype, torch.float32))
            work, kps = self._geometry(work, kps, bboxes, draws)
            work = self._appearance(work)
        return work.to(images.dtype), kps, keypoints_in_frame(kps, size)

    def _geometry(self, images: Tensor, kps: Tensor, bboxes: Tensor, draws: GeometryDraws) -> tuple[Tensor, Tensor]:
        """Crop and rotation as one matrix per sample; only the samples that move are resampled."""
        batch, size, device = images.shape[0], (images.shape[-2], images.shape[-1]), images.device
        cropped, crop_uniform, rotated, angles = draws.cropped, draws.crop_uniform, draws.rotated, draws.angles
        moved = (cropped | rotated).nonzero().squeeze(1)
        if moved.numel() == 0:
            return images, kps
        identity = _eye(batch, torch.empty(0, dtype=torch.float64, device=device))
        matrices = identity
        if crop_uniform is not None:
            crop = crop_resize_matrix(_crop_windows(bboxes, crop_uniform.to(device), size), size)
            matrices = torch.where(cropped.to(device)[:, None, None], crop, identity)
        if angles is not None:
            rotation = rotation_matrix(angles.to(device), size, self.config.rotation_expand)
            # Crop first, then rotate (the official order): the rotation acts on the cropped frame.
            matrices = torch.where(rotated.to(device)[:, None, None], rotation, identity) @ matrices
        index = moved.to(device)
        matrices = matrices[index]
        images = images.index_copy(0, index, warp_images(images[index], matrices))
        kps = kps.index_copy(0, index, transform_keypoints(kps[index], matrices))
        return images, kps

    def _appearance(self, images: Tensor) -> Tensor:
        """The official ``NormalAug`` steps in order, each on the samples its own draw selects."""
        config = self.config
        steps = (
            (config.grayscale_p, grayscale),
            (config.posterize_p, lambda x: posterize(x, config.posterize_bits)),
            (config.equalize_p, equalize),
            (config.sharpen_p, self._sharpen),
            (config.brightness_contrast_p, self._brightness_contrast),
            (config.solarize_p, lambda x: solarize(x, config.solarize_threshold)),
            (config.color_jitter_p, self.color_jitter),
        )
        for probability, step in steps:
            selected = _bernoulli(images.shape[0], probability).nonzero().squeeze(1)
            if selected.numel() == 0:
                continue
            index = selected.to(images.device)
            images = images.index_copy(0, index, step(images[index]).to(images.dtype))
        return images

    def _sharpen(self, images: Tensor) -> Tensor:
        alpha = _uniform(images.shape[0], *self.config.sharpen_alpha)
        lightness = _uniform(images.shape[0], *self.config.sharpen_lightness)
        return sharpen(images, alpha, lightness)

    def _brightness_contrast(self, images: Tensor) -> Tensor:
        contrast_limit, brightness_limit = self.config.contrast_limit, self.config.brightness_limit
        contrast = _uniform(images.shape[0], -contrast_limit, contrast_limit)
        brightness = _uniform(images.shape[0], -brightness_limit, brightness_limit)
        return brightness_contrast(images, contrast, brightness)


def rotation_limits(config: AugmentConfig, categories: Sequence[str] | None, batch: int) -> Tensor:
    """The largest rotation (degrees) of each of ``batch`` samples, ``[B]`` float64:
    ``wide_rotation_degrees`` for ``categories`` listed in ``wide_rotation_categories``,
    ``rotation_degrees`` otherwise (and for every sample when ``categories`` is ``None``)."""
    if categories is not None and len(categories) != batch:
        raise ValueError(f"{len(categories)} categories for a batch of {batch}")
    if categories is None:
        return torch.full((batch,), config.rotation_degrees, dtype=torch.float64)
    wide = set(config.wide_rotation_categories)
    limits = [config.wide_rotation_degrees if category in wide else config.rotation_degrees for category in categories]
    return torch.tensor(limits, dtype=torch.float64)


def _draw_angles(config: AugmentConfig, categories: Sequence[str] | None, batch: int) -> Tensor | None:
    """``[B]`` float64 angles ``U(-limit, limit)`` (:func:`rotation_limits`), one draw each;
    ``None`` (no draw) when ``rotation_p`` is 0."""
    limits = rotation_limits(config, categories, batch)
    return -limits + 2 * limits * torch.rand(batch, dtype=torch.float64) if config.rotation_p > 0 else None


def _crop_windows(bboxes: Tensor, uniform: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop windows ``[B, 4]`` (outer edges, input pixels) keeping ``bboxes`` ``[B, 4]``, from
    ``uniform`` ``[B, 4]`` draws in [0, 1) (left, top, right, bottom)."""
    height, width = size
    boxes = bboxes.to(uniform.dtype)
    whole = boxes.new_tensor([0.0, 0.0, width - 1.0, height - 1.0])
    # A box without finite coordinates keeps the whole image: that sample is not cropped.
    boxes = torch.where(torch.isfinite(boxes).all(-1, keepdim=True), boxes, whole)
    low = torch.minimum(torch.maximum(boxes[:, :2], whole[:2]), whole[2:])  # x1, y1 in [0, side - 1]
    high = torch.minimum(torch.maximum(boxes[:, 2:], low), whole[2:])  # x2, y2 in [x1, side - 1]
    start = -0.5 + uniform[:, :2] * low
    end = high + 0.5 + uniform[:, 2:] * (whole[2:] - high)
    return torch.cat((start, end), dim=1)


def _bernoulli(count: int, probability: float) -> Tensor:
    """``[count]`` bool on the CPU, each True with ``probability``; no draw at all when it is 0."""
    if probability <= 0:
        return torch.zeros(count, dtype=torch.bool)
    return torch.rand(count) < probability


def _check_inputs(images: Tensor, kps: Tensor, bboxes: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be a float [B, 3, S, S] tensor, got {images.dtype} {tuple(images.shape)}")
    batch = images.shape[0]
    if kps.ndim != 3 or kps.shape[0] != batch or kps.shape[-1] != 2 or not kps.is_floating_point():
        raise ValueError(f"kps must be a float [B={batch}, N, 2] tensor, got {kps.dtype} {tuple(kps.shape)}")
    if tuple(bboxes.shape) != (batch, 4):
        raise ValueError(f"bboxes must be [B={batch}, 4], got {tuple(bboxes.shape)}")
    if min(images.shape[-2:]) < 2:  # the sharpen border reflects one pixel
        raise ValueError(f"images must be at least 2 x 2 pixels, got {tuple(images.shape[-2:])}")
