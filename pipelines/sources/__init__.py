"""One reader per benchmark, each turning a dataset's real on-disk layout into pair records.

Every reader module exposes ``SPLITS`` (the split names it accepts, the first being the default)
and ``read_pairs(root, split)``, a generator of :class:`~pipelines.schema.PairRecord` and
:class:`~pipelines.schema.Reject` items: one item per input pair, so that input pairs =
written + rejected always holds downstream. ``SOURCES`` is the registry the CLI dispatches on.
Readers only read; a layout that has to be made first is made by :mod:`pipelines.builders`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

from pipelines.schema import PairRecord, Reject
from pipelines.storage import Location

ReadPairs = Callable[[Location, str], Iterator[PairRecord | Reject]]


@dataclass(frozen=True)
class SourceSpec:
    name: str
    splits: tuple[str, ...]
    read_pairs: ReadPairs
    summary: str


def _spec(name: str, module: ModuleType) -> SourceSpec:
    return SourceSpec(name, tuple(module.SPLITS), module.read_pairs, (module.__doc__ or "").strip().splitlines()[0])


def get_source(name: str) -> SourceSpec:
    """The reader registered as ``name`` (imported on first use)."""
    import importlib

    if name not in SOURCE_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCE_NAMES)}")
    return _spec(name, importlib.import_module(f"pipelines.sources.{name}"))


SOURCE_NAMES = ("spair", "pfpascal", "pfwillow", "ap10k", "demo")
