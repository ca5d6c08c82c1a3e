"""The contract every model kind keeps (:func:`sm_model.config.model_kinds`), so that training,
evaluation, matching, sweeps and benchmarks work with any of them unchanged.

A :class:`MatchModel` is an ``nn.Module`` built from one :class:`~sm_model.config.ModelConfig`. It
owns its input and encodes a pair once to match any points:

- :attr:`MatchModel.input_spec` and :meth:`MatchModel.prepare`: an image as the network takes it
  (:class:`~sm_model.inputs.InputSpec`: size, normalisation, resize, pixel convention);
- ``encode(src, trg) -> Encoded``: whatever the kind needs of a batch of pairs
  ``[B, 3, S, S]`` x 2 (per-image feature maps here; a pair-level encoding for kinds whose encoder
  sees both images);
- ``match(encoded, src_kps, valid) -> list[Matches]``: one :class:`~sm_model.matching.Matches`
  (points in input pixels and the score maps) per predicted scale, coarse to fine, for any
  keypoints ``[B, N, 2]`` in input pixels; ``forward`` is ``match(encode(src, trg), ...)``;
- ``loss(outputs, target, valid) -> Tensor``: the training loss of the matches against the target
  keypoints in input pixels (a ``RuntimeError`` for a kind that trains nothing);
- :meth:`MatchModel.set_epoch`: the training epoch, for a kind whose loss depends on it;
- :meth:`MatchModel.predict_matches` and :meth:`MatchModel.match_original`: from and to
  original-image pixels, in eval mode, shared by every kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from sm_model.config import ModelConfig
from sm_model.inputs import InputSpec
from sm_model.localizers import Localization
from sm_model.matching import Matches


class Prediction(NamedTuple):
    """Target points ``[B, N, 2]`` float32 in original target pixels, and ``score`` ``[B, N]``: the
    highest cosine similarity of each source keypoint's feature on the finest target map (the
    score of the matched cell)."""

    points: Tensor
    score: Tensor


class ScaleMaps(NamedTuple):
    """One scale of a batch of encoded pairs: ``src`` and ``trg`` ``[B, C, h, w]`` feature maps
    and their ``stride`` in input pixels per cell."""

    src: Tensor
    trg: Tensor
    stride: float


class Encoded(NamedTuple):
    """A batch of pairs encoded by per-image feature maps: ``scales`` coarse to fine, from
    images of side ``size``."""

    scales: tuple[ScaleMaps, ...]
    size: int

    @property
    def batch_size(self) -> int:
        return self.scales[0].src.shape[0]


class MatchModel(nn.Module):
    """Base of every model kind; subclasses implement ``encode``, ``match`` and ``loss`` (see the module)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def input_spec(self) -> InputSpec:
        """What the model takes as input (:class:`~sm_model.inputs.InputSpec`), from its config."""
        return InputSpec.of(self.config)

    def prepare(self, image: np.ndarray) -> Tensor:
        """One uint8 ``(H, W, 3)`` image -> float ``[3, S, S]``, the network's input."""
        return self.input_spec.prepare(image)

    def localization(self, window: int | None = None) -> Localization:
        """The config's localizer (``config.localizer_method``), with ``window`` cells for the
        ``window`` method, ``config.beta`` and ``config.kernel_sigma``."""
        config = self.config
        return Localization(config.localizer_method, config.beta, window, config.kernel_sigma)

    def set_epoch(self, epoch: int) -> None:
        """Told the (0-based) epoch at the start of each training epoch (``sm_train`` calls it on
        every worker); a kind whose training depends on the epoch overrides it."""

    def encode(self, src: Tensor, trg: Tensor) -> Encoded:
        raise NotImplementedError

    def match(self, encoded: Encoded, src_kps: Tensor, valid: Tensor) -> list[Matches]:
        raise NotImplementedError

    def forward(self, src: Tensor, trg: Tensor, src_kps: Tensor, valid: Tensor) -> list[Matches]:
        """``match(encode(src, trg), src_kps, valid)``: ``src``, ``trg`` ``[B, 3, S, S]`` network
        input; ``src_kps`` ``[B, N, 2]`` input pixels; ``valid`` ``[B, N]`` bool."""
        return self.match(self.encode(src, trg), src_kps, valid)

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
        """Where each source keypoint lies in the target, in eval mode: :meth:`match_original` of
        the pair encoded. ``src``, ``trg``: ``[B, 3, S, S]`` network input (:attr:`input_spec`);
        the rest as :meth:`match_original` takes it. The training mode is restored afterwards."""
        with self._eval_mode():
            return self.match_original(self.encode(src, trg), src_kps, valid, src_sizes, trg_sizes)

    @torch.no_grad()
    def match_original(
        self, encoded: Encoded, src_kps: Tensor, valid: Tensor, src_sizes: Tensor, trg_sizes: Tensor
    ) -> Prediction:
        """Where each source keypoint lies in the target, from the finest scale of ``encoded``
        (:meth:`encode` of images prepared by :attr:`input_spec`), in eval mode.

        ``src_kps``: ``[B, N, 2]`` original source pixels; ``valid``: ``[B, N]`` bool;
        ``src_sizes``, ``trg_sizes``: ``[B, 2]`` original ``(W, H)``. Returns a :class:`Prediction`.
        Points move between the frames as :attr:`input_spec` says."""
        spec = self.input_spec
        if encoded.size != spec.size:
            raise ValueError(
                f"the pair was encoded at {encoded.size} px but the model's input is {spec.size} px: "
                "prepare images with model.input_spec"
            )
        with self._eval_mode():
            finest = self.match(encoded, spec.to_input_pixels(src_kps, src_sizes), valid)[-1]
        return Prediction(spec.to_original_pixels(finest.points, trg_sizes), finest.scores.flatten(2).amax(dim=2))

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)


def check_images(src: Tensor, trg: Tensor) -> None:
    """A ValueError unless ``src`` and ``trg`` are both ``[B, 3, S, S]``."""
    if src.ndim != 4 or src.shape != trg.shape or src.shape[-1] != src.shape[-2]:
        raise ValueError(f"src and trg must both be [B, 3, S, S], got {tuple(src.shape)} and {tuple(trg.shape)}")


def checked_keypoints(src_kps: Tensor, valid: Tensor, batch: int) -> Tensor:
    """``src_kps`` with every invalid keypoint moved to pixel ``(0, 0)``, so that its features and
    prediction are finite (and meaningless; the loss masks them by ``valid``). A ValueError unless
    ``src_kps`` is ``[batch, N, 2]`` and ``valid`` a bool ``[batch, N]``."""
    if src_kps.ndim != 3 or src_kps.shape[0] != batch or src_kps.shape[-1] != 2:
        raise ValueError(f"src_kps must be [B={batch}, N, 2], got {tuple(src_kps.shape)}")
    if valid.shape != src_kps.shape[:-1] or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool [B, N] = {tuple(src_kps.shape[:-1])}, got {valid.dtype} {tuple(valid.shape)}"
        )
    return torch.where(valid.unsqueeze(-1), src_kps, torch.zeros_like(src_kps))
