"""The options of the ``zero-shot`` and ``baseline`` kinds, registered with them (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from sm_model.config import MAX_WINDOW, POSITIVE, Bound, between, register_kind, require

if TYPE_CHECKING:
    from sm_model.config import ModelConfig

MODEL = "sm_model.feature_matcher.model:FeatureMatcher"


@register_kind("zero-shot", model=MODEL, localizer="argmax", trains=False)
@dataclass(frozen=True)
class ZeroShotOptions:
    """``model.zero-shot:`` (no options): a frozen backbone's last-layer features, nothing trained."""

    ARCHITECTURE: ClassVar[tuple[str, ...]] = ()

    def check(self, config: ModelConfig) -> None:
        """A zero-shot model trains nothing: ``finetune`` must be ``frozen``."""
        if config.finetune != "frozen":
            raise ValueError(f"a zero-shot model trains nothing: finetune must be 'frozen', got {config.finetune!r}")


@register_kind("baseline", model=MODEL, localizer="kernel")
@dataclass(frozen=True)
class BaselineOptions:
    """``model.baseline:``: the survey's strong baseline trains with a softmax at
    ``loss_temperature`` against a Gaussian-smoothed ``target_window`` x ``target_window`` target
    (:func:`sm_model.loss.gaussian_cross_entropy`)."""

    ARCHITECTURE: ClassVar[tuple[str, ...]] = ()

    loss_temperature: float = 0.03
    target_window: int = 7

    def __post_init__(self) -> None:
        require(self, "loss_temperature", POSITIVE)
        require(self, "target_window", between(1, MAX_WINDOW))
        require(self, "target_window", Bound("an odd number of cells", lambda value: value % 2 == 1))
