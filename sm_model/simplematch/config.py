"""SimpleMatch's options, registered with its kind (no torch here: configs load without it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sm_model.config import MAX_CHANNELS, MAX_WINDOW, NON_NEGATIVE, Bound, between, register_kind, require


@register_kind("simplematch", model="sm_model.simplematch.model:SimpleMatch", localizer="window")
@dataclass(frozen=True)
class SimpleMatchOptions:
    """``model.simplematch:``. ``decoder_channels`` and ``decoder_dropout`` shape the upsampling
    decoder. ``multiscale`` predicts and supervises at 1/16, 1/8 and 1/4 with ``scale_weights``
    (coarse to fine; single-scale uses the last), the coarse maps localized with windows of
    ``coarse_window_sizes`` cells (``None``: dense); the finest uses the shared ``window_size``."""

    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("decoder_channels", "multiscale")
    """The options that decide the parameters: a checkpoint loads only into a model that agrees."""

    decoder_channels: int = 768
    decoder_dropout: float = 0.3
    multiscale: bool = False
    scale_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    coarse_window_sizes: tuple[int | None, int | None] = (None, 15)

    def __post_init__(self) -> None:
        require(self, "decoder_channels", between(1, MAX_CHANNELS))
        require(self, "coarse_window_sizes", between(1, MAX_WINDOW))
        require(self, "scale_weights", NON_NEGATIVE)
        require(self, "decoder_dropout", Bound("in [0, 1)", lambda value: 0 <= value < 1))
