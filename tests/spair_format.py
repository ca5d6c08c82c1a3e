"""Write SPair-71k fixtures in the real on-disk format (keys and types of ``datasets.md`` 1.2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PAIR_NAME = "000009-2008_001546-2009_000327:aeroplane"


def pair_document(**overrides: Any) -> dict[str, Any]:
    """A PairAnnotation document for :data:`PAIR_NAME` with every real key, as SPair-71k
    types them (ints throughout); ``overrides`` replace or add keys."""
    doc = {
        "pair_id": 9,
        "src_imname": "2008_001546.jpg",
        "trg_imname": "2009_000327.jpg",
        "src_imsize": [500, 375, 3],
        "trg_imsize": [500, 333, 3],
        "src_bndbox": [12, 97, 487, 290],
        "trg_bndbox": [44, 51, 460, 262],
        "src_pose": "Left",
        "trg_pose": "Frontal",
        "src_kps": [[100, 150], [230, 120], [410, 200]],
        "trg_kps": [[90, 140], [250, 130], [400, 210]],
        "kps_ids": [0, 7, 11],
        "category": "aeroplane",
        "viewpoint_variation": 1,
        "scale_variation": 0,
        "truncation": 2,
        "occlusion": 0,
        "mirror": 0,
    }
    doc.update(overrides)
    return doc


def write_layout(root: Path, split: str, text: str) -> None:
    """``Layout/large/<split>.txt`` with exactly ``text`` (newlines as given)."""
    path = root / "Layout" / "large" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def write_pair(root: Path, split: str, name: str, doc: dict[str, Any] | str) -> None:
    """``PairAnnotation/<split>/<name>.json``: ``doc`` as JSON, or a string written verbatim."""
    path = root / "PairAnnotation" / split / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
