"""Checkpoints to evaluate: found (a file, or a directory holding ``model.pt``, locally or on S3),
read once by the driver, shipped as bytes to every worker, and named for the reports.

A checkpoint is a :mod:`sm_model.checkpoint` file. A Ray Train checkpoint directory
holds one as ``model.pt`` beside the optimizer state. A trainable-only (LoRA) checkpoint rebuilds
its frozen backbone from the ``weights`` saved in its config, which must be readable wherever the
model is loaded (a hub name or a path every worker sees).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.storage import Location, split_s3_url
from sm_model.checkpoint import MODEL_FILE, read_checkpoint

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CheckpointFile:
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


def read_checkpoint_file(source: str, name: str, endpoint_url: str | None = None) -> CheckpointFile:
    """Read ``source`` (see :func:`checkpoint_file`) and check that it is a SimpleMatch checkpoint."""
    directory, file_name = checkpoint_file(source, endpoint_url)
    path = directory.full(file_name)
    try:
        data = directory.read_bytes(file_name)
    except FileNotFoundError:
        raise FileNotFoundError(_not_found(source)) from None
    saved = read_checkpoint(data, path)
    log.info("checkpoint %s: %s (%.1f MiB)", name, path, len(data) / 2**20)
    return CheckpointFile(name=name, source=source, path=path, data=data, config=dict(saved["config"]))


def _not_found(source: str) -> str:
    return f"no checkpoint at {source}: expected a checkpoint file or a directory holding {MODEL_FILE}"


def read_checkpoint_files(sources: Sequence[str], endpoint_url: str | None = None) -> list[CheckpointFile]:
    """Every checkpoint of ``sources``, named by :func:`model_names`."""
    return [read_checkpoint_file(source, name, endpoint_url) for source, name in zip(sources, model_names(sources))]


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
