"""Released models of any kind, read by one function: :func:`load_released`.

Today's layouts: a released SimpleMatch ``best_model.pth`` (a flat state dict in one of the three
layouts of :mod:`sm_model.official`), which needs the run-time settings of the config it was
trained with; and a released LPMFlow folder (the official ``test.py --pretrained`` folder), holding
:data:`ARGS_FILE`, its pickled training arguments (read by a restricted unpickler that resolves
``argparse.Namespace`` only), and :data:`WEIGHTS_FILE`, its weights under ``"state_dict"``. Every
weights file is read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sm_model.config import ModelConfig
from sm_model.matcher import MatchModel
from sm_model.official import official_layout, official_model
from sm_model.state_dicts import read_state_dict

Released = str | Path | bytes | Mapping[str, Tensor]
"""A released file's path, its bytes, or its state dict already read; or a released folder's path."""

ARGS_FILE = "args.pkl"
"""A released LPMFlow folder's training arguments: a pickled ``argparse.Namespace``."""
WEIGHTS_FILE = "model_best.pth"
"""A released LPMFlow folder's weights: ``torch.save`` of ``{"epoch", "state_dict", "optimizer", ...}``."""
FOLDER_FILES = (ARGS_FILE, WEIGHTS_FILE)
MAX_ARGS_BYTES = 2**20
"""The largest ``args.pkl`` read (a Namespace of a few dozen options is about 1 KiB)."""


def released_state(source: str | Path | bytes, name: str | None = None) -> dict[str, Tensor]:
    """The state dict of the released file ``source``, checked to be of a known layout
    (``ValueError`` naming ``name`` otherwise; ``FileNotFoundError`` for a missing path)."""
    name = name or ("released file bytes" if isinstance(source, bytes) else str(source))
    if not isinstance(source, bytes):
        if Path(source).is_dir():
            raise ValueError(f"{name} is a folder, not a released file (a released LPMFlow folder: load_released)")
        if not Path(source).is_file():
            raise FileNotFoundError(f"no released model file at {name}")
    state = read_state_dict(source)
    official_layout(state)  # a ValueError naming the layouts it knows
    return state


class RefusedGlobal(ValueError):
    """A pickle names code other than ``argparse.Namespace``; nothing was looked up or run."""


class _ArgsUnpickler(pickle.Unpickler):
    """Resolves ``argparse.Namespace`` and nothing else: any other global is refused before it is
    looked up, so no pickled code runs."""

    def __init__(self, file: io.BytesIO, name: str) -> None:
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        raise RefusedGlobal(
            f"{self.name} names {module}.{name}: refused, a pickle naming other code could run it "
            "(an args.pkl holds an argparse.Namespace of plain values)"
        )


def read_released_args(source: str | Path | bytes, name: str | None = None) -> dict[str, Any]:
    """The training arguments pickled in ``source`` (an ``args.pkl`` path or its bytes, at most
    :data:`MAX_ARGS_BYTES`): an ``argparse.Namespace`` (or a dict) of plain values, by name. Any
    global but ``argparse.Namespace`` is a ``ValueError`` naming ``name``, raised before it runs."""
    name = name or ("args bytes" if isinstance(source, bytes) else str(source))
    data = source if isinstance(source, bytes) else _read_bounded(Path(source), MAX_ARGS_BYTES, name)
    if len(data) > MAX_ARGS_BYTES:
        raise ValueError(f"{name} is {len(data)} bytes, more than the {MAX_ARGS_BYTES} an args.pkl may hold")
    try:
        args = _ArgsUnpickler(io.BytesIO(data), name).load()
    except RefusedGlobal:
        raise
    except Exception as error:  # truncated or malformed: pickle raises several types
        raise ValueError(f"{name} is not a readable pickle: {type(error).__name__}: {error}") from None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise ValueError(f"{name} holds a {type(args).__name__}, not the argparse.Namespace of training arguments")
    if not all(isinstance(key, str) for key in args):
        raise ValueError(f"{name} holds arguments whose names are not all strings")
    return dict(args)


def _read_bounded(path: Path, max_bytes: int, name: str) -> bytes:
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{name} is {size} bytes, more than the {max_bytes} an args.pkl may hold")
        return file.read(max_bytes + 1)


def read_released_weights(source: str | Path | bytes, name: str | None = None) -> dict[str, Tensor]:
    """The ``"state_dict"`` of the released ``model_best.pth`` ``source`` (a path or its bytes),
    read with ``weights_only=True``; a leading ``module.`` (``nn.DataParallel``'s) is dropped when
    every key has it. ``ValueError`` naming ``name`` for anything else."""
    name = name or ("weights bytes" if isinstance(source, bytes) else str(source))
    file = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises several types; a refused global among them
        reason = _reason(error)
        raise ValueError(f"{name} is not a readable torch checkpoint (read with weights_only=True): {reason}") from None
    state = saved.get("state_dict") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        what = "no 'state_dict' entry" if state is None else f"a {type(state).__name__} as 'state_dict', not a mapping"
        raise ValueError(f"{name} holds {what} (a released LPMFlow model_best.pth holds its weights there)")
    wrong = next((key for key, value in state.items() if not (isinstance(key, str) and isinstance(value, Tensor))), None)
    if wrong is not None or not state:
        problem = "is empty" if not state else f"entry {str(wrong)[:80]!r} is not a tensor under a name"
        raise ValueError(f"{name}: its 'state_dict' {problem}")
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _reason(error: Exception) -> str:
    """The line of torch's load error that says what went wrong (a refused global's own line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0])


def missing_folder_file(folder: str, file: str) -> FileNotFoundError:
    """The error for a released folder that lacks ``file``, saying what such a folder holds."""
    return FileNotFoundError(
        f"{folder} holds no {file}: a released LPMFlow folder holds {ARGS_FILE} (its training arguments) "
        f"and {WEIGHTS_FILE} (its weights under 'state_dict')"
    )


def read_released_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The training arguments (:func:`read_released_args`) and the state dict
    (:func:`read_released_weights`) of the released LPMFlow ``folder``; ``FileNotFoundError``
    naming the folder and a missing file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no released model folder at {folder}")
    for file in FOLDER_FILES:
        if not (folder / file).is_file():
            raise missing_folder_file(str(folder), file)
    return read_released_args(folder / ARGS_FILE), read_released_weights(folder / WEIGHTS_FILE)


def released_folder_model(
    args: Mapping[str, Any],
    state: Mapping[str, Tensor],
    name: str,
    config: ModelConfig | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> MatchModel:
    """The LPMFlow model of a released folder already read (:func:`read_released_folder`);
    ``config``: run-time settings (the architecture comes from ``args`` and ``state``);
    ``overrides``: fields replaced in ``config`` or in the released model's own config."""
    from sm_model.lpmflow.released import lpmflow_from_released  # the kind's torch modules, on demand

    return lpmflow_from_released(args, state, name=name, config=config, overrides=overrides)


def load_released(
    path: Released,
    config: ModelConfig | None = None,
    backbone_weights: str | Path | None = None,
    name: str | None = None,
) -> MatchModel:
    """The model of a released file (``path``: a file, its bytes, or its state dict) or folder, on
    the CPU in training mode as any new module, loaded strictly.

    A released SimpleMatch ``best_model.pth`` takes ``config``, a model config with the run-time
    settings it was trained with (e.g. a shipped config's ``model:`` section; its architecture is
    read from the file's keys), and for the DINOv2 LoRA layout ``backbone_weights``, the frozen
    backbone's pretrained file (else ``config.weights``); see :func:`sm_model.official.official_model`.
    A released LPMFlow folder needs neither: its architecture comes from its ``args.pkl`` and
    weights, and ``config``, if given, replaces run-time settings."""
    name = name or (
        "released file bytes"
        if isinstance(path, bytes)
        else "released state"
        if isinstance(path, Mapping)
        else str(path)
    )
    if isinstance(path, str | Path) and Path(path).is_dir():
        args, state = read_released_folder(path)
        return released_folder_model(args, state, name, config)
    state = dict(path) if isinstance(path, Mapping) else released_state(path, name)
    if config is None:
        raise ValueError(
            f"{name} is a released SimpleMatch checkpoint ({official_layout(state)} layout): it needs the training config "
            "of its backbone and size (e.g. configs/dinov2_vitb14_448_spair.yaml), and for DINOv2 LoRA the backbone "
            "weights (dinov2_vitb14_pretrain.pth)"
        )
    return official_model(state, config, backbone_weights, name=name)
