"""The contract every model kind keeps (:data:`sm_model.registry.MODEL_KINDS`), so that training,
evaluation, sweeps and benchmarks work with any of them unchanged.

A :class:`MatchModel` is an ``nn.Module`` built from one :class:`~sm_model.config.ModelConfig`:

- ``forward(src, trg, src_kps, valid) -> list[Matches]``: one :class:`~sm_model.matching.Matches`
  (points in input pixels and the score maps) per predicted scale, coarse to fine, in the
  network-input frame (``S x S``);
- ``loss(outputs, target, valid) -> Tensor``: the training loss of ``forward``'s outputs against
  the target keypoints in input pixels (a ``RuntimeError`` for a kind that trains nothing);
- :meth:`MatchModel.predict` and :meth:`MatchModel.predict_matches`: from and to original-image
  pixels, in eval mode, shared by every kind.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from sm_model.config import ModelConfig
from sm_model.localizers import Localization
from sm_model.matching import Matches
from sm_model.pixels import input_to_original_pixels, original_to_input_pixels


class Prediction(NamedTuple):
    """Target points ``[B, N, 2]`` float32 in original target pixels, and ``score`` ``[B, N]``: the
    highest cosine similarity of each source keypoint's feature on the finest target map (the
    score of the matched cell)."""

    points: Tensor
    score: Tensor


class MatchModel(nn.Module):
    """Base of every model kind; subclasses implement ``forward`` and ``loss`` (see the module)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def localization(self, window: int | None = None) -> Localization:
        """The config's localizer (``config.localizer_method``), with ``window`` cells for the
        ``window`` method, ``config.beta`` and ``config.kernel_sigma``."""
        config = self.config
        return Localization(config.localizer_method, config.beta, window, config.kernel_sigma)

    def forward(self, src: Tensor, trg: Tensor, src_kps: Tensor, valid: Tensor) -> list[Matches]:
        raise NotImplementedError

    def loss(self, outputs: list[Matches], target: Tensor, valid: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(
        self, src: Tensor, trg: Tensor, src_kps: Tensor, valid: Tensor, src_sizes: Tensor, trg_sizes: Tensor
    ) -> Tensor:
        """Target keypoints ``[B, N, 2]`` float32 in original target pixels:
        :meth:`predict_matches`'s points."""
        return self.predict_matches(src, trg, src_kps, valid, src_sizes, trg_sizes).points

    @torch.no_grad()
    def predict_matches(
        self, src: Tensor, trg: Tensor, src_kps: Tensor, valid: Tensor, src_sizes: Tensor, trg_sizes: Tensor
    ) -> Prediction:
        """Where each source keypoint lies in the target, from the finest scale, in eval mode.

        ``src``, ``trg``: ``[B, 3, S, S]`` (the original images resized to S x S, normalised);
        ``src_kps``: ``[B, N, 2]`` original source pixels; ``valid``: ``[B, N]`` bool;
        ``src_sizes``, ``trg_sizes``: ``[B, 2]`` original ``(W, H)``. Returns a :class:`Prediction`.
        Points move between the frames in ``config.pixel_convention``. The model's training mode
        is restored afterwards."""
        input_size, convention = src.shape[-1], self.config.pixel_convention
        input_kps = original_to_input_pixels(src_kps, src_sizes, input_size, convention)
        was_training = self.training
        self.eval()
        try:
            finest = self(src, trg, input_kps, valid)[-1]
        finally:
            self.train(was_training)
        points = input_to_original_pixels(finest.points, trg_sizes, input_size, convention)
        return Prediction(points, finest.scores.flatten(2).amax(dim=2))


def checked_keypoints(src: Tensor, trg: Tensor, src_kps: Tensor, valid: Tensor) -> Tensor:
    """``src_kps`` with every invalid keypoint moved to pixel ``(0, 0)``, so that its features and
    prediction are finite (and meaningless; the loss masks them by ``valid``). A ValueError unless
    ``src`` and ``trg`` are ``[B, 3, S, S]``, ``src_kps`` ``[B, N, 2]`` and ``valid`` a bool ``[B, N]``."""
    if src.ndim != 4 or src.shape != trg.shape or src.shape[-1] != src.shape[-2]:
        raise ValueError(f"src and trg must both be [B, 3, S, S], got {tuple(src.shape)} and {tuple(trg.shape)}")
    batch = src.shape[0]
    if src_kps.ndim != 3 or src_kps.shape[0] != batch or src_kps.shape[-1] != 2:
        raise ValueError(f"src_kps must be [B={batch}, N, 2], got {tuple(src_kps.shape)}")
    if valid.shape != src_kps.shape[:-1] or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool [B, N] = {tuple(src_kps.shape[:-1])}, got {valid.dtype} {tuple(valid.shape)}"
        )
    return torch.where(valid.unsqueeze(-1), src_kps, torch.zeros_like(src_kps))
