"""Checkpoints to evaluate: found (a file, or a directory holding ``model.pt``, locally or on S3),
read once by the driver, shipped as bytes to every worker, and named for the reports.

A checkpoint is a :func:`sm_train.model.save_checkpoint` file. A Ray Train checkpoint directory
holds one as ``model.pt`` beside the optimizer state. A trainable-only (LoRA) checkpoint rebuilds
its frozen backbone from the ``weights`` saved in its config, which must be readable wherever the
model is loaded (a hub name or a path every worker sees).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from pipelines.storage import Location, split_s3_url
from sm_train.model import SimpleMatch, load_checkpoint
from sm_train.model.simplematch import CHECKPOINT_FORMAT, config_from_dict

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
"""The model file inside a (Ray Train) checkpoint directory."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read into memory: ``name`` for reports, ``source`` as the user gave it,
    ``path`` the file read, ``data`` its bytes, ``config`` the saved model config (a dict)."""

    name: str
    source: str
    path: str
    data: bytes = dataclasses.field(repr=False)
    config: dict[str, Any]


def checkpoint_file(source: str, endpoint_url: str | None = None) -> tuple[Location, str]:
    """``(directory, file name)`` of the checkpoint ``source``: ``model.pt`` inside a directory
    that holds one, else ``source`` itself as a file. Raises ``FileNotFoundError`` naming
    ``source`` for a local path that is neither."""
    location = Location(source, endpoint_url)
    if location.exists(MODEL_FILE):
        return location, MODEL_FILE
    parent, _, name = location.url.rstrip("/").rpartition("/")
    if (location.remote and split_s3_url(location.url)[1]) or Path(location.url).is_file():
        return Location(parent, endpoint_url), name
    raise FileNotFoundError(_not_found(source))


def read_checkpoint(source: str, name: str, endpoint_url: str | None = None) -> Checkpoint:
    """Read ``source`` (see :func:`checkpoint_file`) and check that it is a SimpleMatch checkpoint."""
    directory, file_name = checkpoint_file(source, endpoint_url)
    path = directory.full(file_name)
    try:
        data = directory.read_bytes(file_name)
    except FileNotFoundError:
        raise FileNotFoundError(_not_found(source)) from None
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path} is not a readable torch checkpoint: {error}") from error
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (sm_train.model.save_checkpoint writes one; "
            "convert a released best_model.pth with load_official_checkpoint and save_checkpoint first)"
        )
    log.info("checkpoint %s: %s (%.1f MiB)", name, path, len(data) / 2**20)
    return Checkpoint(name=name, source=source, path=path, data=data, config=dict(saved["config"]))


def _not_found(source: str) -> str:
    return f"no checkpoint at {source}: expected a checkpoint file or a directory holding {MODEL_FILE}"


def read_checkpoints(sources: Sequence[str], endpoint_url: str | None = None) -> list[Checkpoint]:
    """Every checkpoint of ``sources``, named by :func:`model_names`."""
    return [read_checkpoint(source, name, endpoint_url) for source, name in zip(sources, model_names(sources))]


def model_names(sources: Sequence[str]) -> list[str]:
    """Short distinct names for checkpoint ``sources``: the last path component (without
    ``.pt``/``.pth``; a trailing ``/model.pt`` is dropped), with as many parent components as it
    takes to tell them apart; identical sources get ``#2``, ``#3``. Characters other than letters,
    digits and ``._-`` become ``_`` (the names go into file names)."""
    parts = [_components(source) for source in sources]
    depth = [1] * len(sources)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = {name for name in names if names.count(name) > 1}
        grow = [i for i, name in enumerate(names) if name in clashes and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return [re.sub(r"[^A-Za-z0-9._#-]", "_", name.replace("/", "-")) for name in unique]


def _components(source: str) -> list[str]:
    path = PurePosixPath(source.removeprefix("s3://").rstrip("/"))
    components = [part for part in path.parts if part not in ("/", ".", "..")]
    if components and components[-1] == MODEL_FILE and len(components) > 1:
        components = components[:-1]
    if components:
        components[-1] = re.sub(r"\.(pt|pth)$", "", components[-1])
    return components or [source]


def load_model(data: bytes, image_size: int | None = None) -> SimpleMatch:
    """The model saved in checkpoint bytes ``data`` (CPU, eval mode); ``image_size`` overrides the
    saved input side.

    A full checkpoint holds every weight, so the model is built on the meta device (no random
    initialisation: seconds for a ViT-B) and filled from the file by the strict
    :func:`~sm_train.model.load_checkpoint`; a trainable-only one goes through
    :meth:`SimpleMatch.from_checkpoint`, which builds its frozen backbone from the saved weights."""
    overrides = {} if image_size is None else {"image_size": image_size}
    with tempfile.NamedTemporaryFile(suffix=".pt") as file:
        file.write(data)
        file.flush()
        header = torch.load(file.name, map_location="cpu", weights_only=True, mmap=True)
        if header["trainable_only"]:
            return SimpleMatch.from_checkpoint(file.name, **overrides).eval()
        config = dataclasses.replace(config_from_dict(header["config"]), weights=None, **overrides)
        with torch.device("meta"):
            model = SimpleMatch(config)
        unsaved = set(dict(model.named_buffers())) - set(model.state_dict())
        if unsaved:  # buffers no checkpoint holds: they need the real initialisation
            log.debug("model has non-persistent buffers %s; building it with initialisation", sorted(unsaved))
            return SimpleMatch.from_checkpoint(file.name, **overrides).eval()
        model.to_empty(device="cpu")
        load_checkpoint(model, file.name)
        return model.eval()
