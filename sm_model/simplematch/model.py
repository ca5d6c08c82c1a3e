"""SimpleMatch: backbone -> upsampling decoder -> sparse matching -> window localization.

Points follow :mod:`sm_model.pixels`: :meth:`SimpleMatch.forward` works in pixels of the S x S network
input, :meth:`SimpleMatch.predict` maps from and to the original images.

Differences from the released code, on purpose:

- Source and target go through the backbone and the decoder as one batch of ``2B`` images (one
  forward each). BatchNorm in the decoder therefore normalises with statistics over both images
  in training, where the official ViT code ran source and target as two separate batches.
- By default (``pixel_convention="center"``) cell centres, not corners, are mapped to pixels, and
  points move between the original image and the input with pixel centres aligned;
  ``pixel_convention="official"`` (released checkpoints, :func:`sm_model.official.official_model`)
  does what the released code does (see :mod:`sm_model.pixels`).
- Cosine scores and the soft-argmax run in float32 under autocast (:func:`sm_model.matching.match_keypoints`).
- Any number of keypoints; padded ones are masked by ``valid`` instead of a fixed 30.

Checkpoints: :mod:`sm_model.checkpoint`; the released ``best_model.pth`` layout: :mod:`sm_model.official`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sm_model.backbones import build_backbone
from sm_model.config import ModelConfig
from sm_model.loss import multiscale_loss
from sm_model.matcher import Encoded, MatchModel, ScaleMaps, check_images, checked_keypoints
from sm_model.matching import Matches, match_keypoints
from sm_model.simplematch.decoder import build_decoder


class SimpleMatch(MatchModel):
    """The SimpleMatch model (kind ``simplematch``), built from a :class:`ModelConfig` with
    :class:`~sm_model.simplematch.config.SimpleMatchOptions`.

    ``backbone`` (:func:`sm_model.backbones.build_backbone`, fine-tuning mode applied),
    ``decoder`` (:func:`sm_model.simplematch.decoder.build_decoder`), then per decoder scale: source
    keypoint features -> cosine similarity with the whole target map -> the config's localizer
    (window soft-argmax unless told otherwise; :meth:`MatchModel.localization`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.backbone = build_backbone(config)
        self.decoder = build_decoder(config, tuple(self.backbone.channels))

    @property
    def window_sizes(self) -> tuple[int | None, ...]:
        """Soft-argmax window (cells) of each predicted scale, coarse to fine; ``None`` is dense.
        Multi-scale: ``config.options.coarse_window_sizes`` for the two coarse maps (1/16 and 1/8 for
        ResNet; the token map and the first upsampled map, 1/14 and 1/7, for DINOv2), then
        ``config.window_size`` at 1/4."""
        if self.config.options.multiscale:
            return (*self.config.options.coarse_window_sizes, self.config.window_size)
        return (self.config.window_size,)

    @property
    def scale_weights(self) -> tuple[float, ...]:
        """Loss weight of each predicted scale, coarse to fine. Single-scale uses the last (1/4)
        weight of ``config.options.scale_weights`` only."""
        if self.config.options.multiscale:
            return tuple(self.config.options.scale_weights)
        return (self.config.options.scale_weights[-1],)

    def encode(self, src: Tensor, trg: Tensor) -> Encoded:
        """The decoder's maps of both images, per scale, coarse to fine (only the 1/4 one unless
        ``config.options.multiscale``). ``src``, ``trg``: ``[B, 3, S, S]`` ImageNet-normalised (any
        S the backbone accepts: strides come from the actual maps, not ``config.image_size``).
        Source and target go through the backbone and the decoder as one batch of ``2B``."""
        check_images(src, trg)
        features = self.backbone(torch.cat([src, trg]))
        scales = self.decoder(features, src.shape[-1])
        return Encoded(tuple(ScaleMaps(*scale.features.chunk(2), scale.stride) for scale in scales), src.shape[-1])

    def match(self, encoded: Encoded, src_kps: Tensor, valid: Tensor) -> list[Matches]:
        """Where each source keypoint lies in the target: per scale of ``encoded``, source keypoint
        features, cosine similarity with the whole target map, the config's localizer.

        ``src_kps``: ``[B, N, 2]`` input pixels; ``valid``: ``[B, N]`` bool. Returns one
        :class:`~sm_model.matching.Matches` per scale, coarse to fine: ``points`` ``[B, N, 2]``
        float32 (under autocast too) in input pixels, and the score maps. Invalid keypoints are
        read at pixel ``(0, 0)``, so their predictions are finite (and meaningless); ``valid`` is
        for the loss to mask them."""
        src_kps = checked_keypoints(src_kps, valid, encoded.batch_size)
        sampling, convention = self.config.keypoint_sampling, self.config.pixel_convention
        return [
            match_keypoints(scale.src, scale.trg, src_kps, scale.stride, self.localization(window), sampling, convention)
            for scale, window in zip(encoded.scales, self.window_sizes, strict=True)
        ]

    def loss(self, outputs: list[Matches], target: Tensor, valid: Tensor) -> Tensor:
        """Weighted sum over scales of the mean Euclidean distance in input pixels over valid
        keypoints. ``outputs``: :meth:`forward`'s list; ``target``: ``[B, N, 2]`` input pixels;
        ``valid``: ``[B, N]`` bool. Weights: :attr:`scale_weights`."""
        return multiscale_loss([matches.points for matches in outputs], target, valid, self.scale_weights)
