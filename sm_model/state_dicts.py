"""Reading state dicts from files and loading them strictly, with errors that name every key
that does not fit. Every ``torch.load`` uses ``weights_only=True``: no pickled code runs."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]


def read_state_dict(path: str | Path | bytes) -> dict[str, torch.Tensor]:
    """The tensors saved in ``path`` (or in these bytes): a bare state dict or one under "teacher",
    "state_dict" or "model"."""
    if isinstance(path, bytes):
        path = io.BytesIO(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict):
        for container in ("teacher", "state_dict", "model"):
            if isinstance(checkpoint.get(container), dict):
                checkpoint = checkpoint[container]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        where = "the checkpoint bytes" if isinstance(path, io.BytesIO) else path
        raise ValueError(f"{where} holds no state dict (names -> tensors)")
    return checkpoint


def check_state(expected: StateDict, found: StateDict, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and every missing, unexpected and wrongly shaped key
    when ``found`` does not hold exactly the keys and shapes of ``expected``."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshapen = [
        f"{key} {tuple(found[key].shape)} != {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & found.keys())
        if found[key].shape != expected[key].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {listed(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", misshapen))
        if keys
    ]
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def load_state_dict_strictly(module: nn.Module, state_dict: StateDict, source: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` after :func:`check_state`."""
    check_state(module.state_dict(), state_dict, source)
    module.load_state_dict(state_dict, strict=True)


def listed(keys: list[str], shown: int = 20) -> str:
    """``keys`` for an error message: all of them, or the first ``shown`` and how many more."""
    if len(keys) <= shown:
        return str(keys)
    return f"{keys[:shown]} and {len(keys) - shown} more"
