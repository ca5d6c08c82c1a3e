"""Released model files of any kind, read by one function: :func:`load_released`.

Today's layouts: a released SimpleMatch ``best_model.pth`` (a flat state dict in one of the three
layouts of :mod:`sm_model.official`), which needs the run-time settings of the config it was
trained with. Every file is read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from sm_model.config import ModelConfig
from sm_model.matcher import MatchModel
from sm_model.official import official_layout, official_model
from sm_model.state_dicts import read_state_dict

Released = str | Path | bytes | Mapping[str, Tensor]
"""A released file's path, its bytes, or its state dict already read."""


def released_state(source: str | Path | bytes, name: str | None = None) -> dict[str, Tensor]:
    """The state dict of the released file ``source``, checked to be of a known layout
    (``ValueError`` naming ``name`` otherwise; ``FileNotFoundError`` for a missing path)."""
    name = name or ("released file bytes" if isinstance(source, bytes) else str(source))
    if not isinstance(source, bytes):
        if Path(source).is_dir():
            raise ValueError(f"{name} is a folder, and no released model layout is known for folders")
        if not Path(source).is_file():
            raise FileNotFoundError(f"no released model file at {name}")
    state = read_state_dict(source)
    official_layout(state)  # a ValueError naming the layouts it knows
    return state


def load_released(
    path: Released,
    config: ModelConfig | None = None,
    backbone_weights: str | Path | None = None,
    name: str | None = None,
) -> MatchModel:
    """The model of a released file (``path``: a file, its bytes, or its state dict), on the CPU
    in training mode as any new module, loaded strictly.

    A released SimpleMatch ``best_model.pth`` takes ``config``, a model config with the run-time
    settings it was trained with (e.g. a shipped config's ``model:`` section; its architecture is
    read from the file's keys), and for the DINOv2 LoRA layout ``backbone_weights``, the frozen
    backbone's pretrained file (else ``config.weights``); see :func:`sm_model.official.official_model`."""
    name = name or (
        "released file bytes"
        if isinstance(path, bytes)
        else "released state"
        if isinstance(path, Mapping)
        else str(path)
    )
    state = dict(path) if isinstance(path, Mapping) else released_state(path, name)
    if config is None:
        raise ValueError(
            f"{name} is a released SimpleMatch checkpoint ({official_layout(state)} layout): it needs the training config "
            "of its backbone and size (e.g. configs/dinov2_vitb14_448_spair.yaml), and for DINOv2 LoRA the backbone "
            "weights (dinov2_vitb14_pretrain.pth)"
        )
    return official_model(state, config, backbone_weights, name=name)
