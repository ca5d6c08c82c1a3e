"""Matching on a backbone's own features: the ``zero-shot`` and ``baseline`` kinds.

Both take the backbone's last feature map (a ViT's patch tokens, optionally after its final
LayerNorm, ``config.final_norm``; a ResNet's last stage), with no decoder, match every source
keypoint against the whole target map by cosine similarity and localize with the config's
localizer (:mod:`sm_model.localizers`; ``argmax`` for ``zero-shot``, the kernel soft-argmax for
``baseline`` unless told otherwise).

- ``zero-shot``: the backbone frozen, nothing trained (``loss`` raises); evaluable without a checkpoint.
- ``baseline``: the survey's strong baseline ("Semantic Correspondence: Unified Benchmarking and a
  Strong Baseline", Zhang, Li, Lu, Han) as its code trains it: DINOv2-B/14, the last 2 blocks
  fine-tuned (``finetune: last_blocks``, ``finetune_blocks: 2``), final LayerNorm, and the
  Gaussian-smoothed cross-entropy (:func:`sm_model.loss.gaussian_cross_entropy`). Ground-truth
  points become cells in ``config.pixel_convention`` (:func:`sm_model.pixels.pixels_to_cells`),
  the same mapping that reads the source features and turns predicted cells back into pixels
  (that code scales with ``align_corners``, ``x (w - 1) / (W - 1)``, instead).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sm_model.backbones import build_backbone
from sm_model.config import ModelConfig
from sm_model.loss import gaussian_cross_entropy
from sm_model.matcher import Encoded, MatchModel, ScaleMaps, check_images, checked_keypoints
from sm_model.matching import Matches, match_keypoints
from sm_model.pixels import pixels_to_cells


class FeatureMatcher(MatchModel):
    """``backbone`` -> its last feature map ``[2B, C, h, w]`` -> :func:`~sm_model.matching.match_keypoints`
    at the map's stride. One scale."""

    def __init__(self, config: ModelConfig) -> None:
        if config.kind not in ("zero-shot", "baseline"):
            raise ValueError(f"FeatureMatcher builds the zero-shot and baseline kinds, not {config.kind!r}")
        super().__init__(config)
        self.backbone = build_backbone(config)

    def encode(self, src: Tensor, trg: Tensor) -> Encoded:
        """The backbone's last feature map of both images (one scale). ``src``, ``trg``:
        ``[B, 3, S, S]`` ImageNet-normalised, run as one batch of ``2B``."""
        check_images(src, trg)
        features = self.backbone(torch.cat([src, trg]))[-1]  # [2B, C, h, w]
        return Encoded((ScaleMaps(*features.chunk(2), src.shape[-1] / features.shape[-1]),), src.shape[-1])

    def match(self, encoded: Encoded, src_kps: Tensor, valid: Tensor) -> list[Matches]:
        """``src_kps``: ``[B, N, 2]`` input pixels; ``valid``: ``[B, N]`` bool (invalid keypoints
        are read at pixel ``(0, 0)``). Returns ``[Matches]``: points ``[B, N, 2]`` in input pixels
        and scores ``[B, N, h, w]``."""
        src_kps = checked_keypoints(src_kps, valid, encoded.batch_size)
        (scale,) = encoded.scales
        sampling, convention = self.config.keypoint_sampling, self.config.pixel_convention
        localization = self.localization(self.config.window_size)
        return [match_keypoints(scale.src, scale.trg, src_kps, scale.stride, localization, sampling, convention)]

    def loss(self, outputs: list[Matches], target: Tensor, valid: Tensor) -> Tensor:
        """The Gaussian-smoothed cross-entropy of the score maps at ``config.options.loss_temperature``
        against ``target`` ``[B, N, 2]`` (input pixels) in a ``config.options.target_window`` square;
        ``valid``: ``[B, N]`` bool."""
        if self.config.kind == "zero-shot":
            raise RuntimeError("a zero-shot model has no loss: nothing in it trains (use kind 'baseline' to fine-tune)")
        (matches,) = outputs
        cells = pixels_to_cells(target, matches.stride, self.config.pixel_convention)
        return gaussian_cross_entropy(matches.scores, cells, valid, self.config.options.loss_temperature, self.config.options.target_window)
