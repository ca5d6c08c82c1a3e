"""Demo: random perspective views of scikit-image's bundled photos, written in the SPair-71k layout.

A small, freely redistributable stand-in for SPair-71k that trains on a CPU in minutes, made by
:mod:`pipelines.builders.demo` (``python -m pipelines.builders.demo --out DIR``; its docstring
says how the views and their ground truth are generated). The dataset is the exact SPair-71k
layout and is read by :func:`pipelines.sources.spair.read_spair_layout`, its records labelled
``demo``. This reader only reads: a root without the dataset is an error that says how to make one.

Coordinates
-----------
The generator works directly in the schema frame (the pixel in column ``c`` and row ``r`` is
centred at ``(c, r)``), so keypoints and boxes are taken as stored, like SPair-71k's own, with no
conversion; unlike SPair-71k's integers they are floats rounded to 0.01 pixel. A keypoint whose
projection leaves an image's pixel centres is ``null`` in that image and so not part of its pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipelines.schema import PairRecord, Reject
from pipelines.sources.spair import layout_path, read_spair_layout
from pipelines.storage import Location

SPLITS = ("trn", "val", "test")
DATASET = "demo"


def read_pairs(root: Location, split: str) -> Iterator[PairRecord | Reject]:
    """The demo pairs of ``split`` under ``root``. :class:`FileNotFoundError` naming ``root`` when
    it holds no demo dataset (no Layout list for ``split``): nothing is generated or written here."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    try:
        return read_spair_layout(root, split, DATASET)
    except FileNotFoundError as error:
        out = "DIR (a local directory, then copy it there)" if root.remote else root.url
        raise FileNotFoundError(
            f"{root.url}: no demo dataset ({layout_path(split)} is missing); "
            f"generate one first with: python -m pipelines.builders.demo --out {out}"
        ) from error
