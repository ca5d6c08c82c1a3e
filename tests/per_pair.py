"""The per-pair path the data path of :mod:`sm_feed.batches` replaced: every pair's two images
resized on their own, pairs stacked into a batch. Tests keep it as the reference that
:func:`sm_feed.batches.assemble_batch` must equal byte for byte, and to build small batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipelines.schema import PairSample
from sm_feed.batches import PairBatch, PairMeta
from sm_model.config import ImageResize
from sm_model.pixels import resize_image


@dataclass
class PreparedPair:
    """One pair after CPU preprocessing: ``src_image``/``trg_image`` ``[3, S, S]`` uint8; the
    rest in original pixels as float32 tensors (``kps`` ``[N, 2]``, ``bbox`` ``[4]``) and
    ``size`` ``[2]`` int64 ``(W, H)``."""

    src_image: Tensor
    trg_image: Tensor
    src_kps: Tensor
    trg_kps: Tensor
    src_bbox: Tensor
    trg_bbox: Tensor
    src_size: Tensor
    trg_size: Tensor
    meta: PairMeta



def prepare_pair(sample: PairSample, image_size: int, image_resize: ImageResize = "antialiased") -> PreparedPair:
    """CPU preprocessing of one pair: both images resized (``image_resize``, the model's
    ``ModelConfig.image_resize``), the rest converted as :class:`PreparedPair` says."""
    meta = PairMeta(
        key=sample.key,
        dataset=sample.dataset,
        category=sample.category,
        threshold=sample.threshold,
        kps_ids=sample.kps_ids,
        trg_kps=sample.trg_kps,
        trg_bbox=sample.trg_bbox,
        trg_size=sample.trg_size,
        extras=sample.extras,
    )
    return PreparedPair(
        src_image=resize_image(sample.src_image, image_size, image_resize),
        trg_image=resize_image(sample.trg_image, image_size, image_resize),
        src_kps=torch.from_numpy(sample.src_kps).float(),
        trg_kps=torch.from_numpy(sample.trg_kps).float(),
        src_bbox=torch.from_numpy(sample.src_bbox).float(),
        trg_bbox=torch.from_numpy(sample.trg_bbox).float(),
        src_size=torch.tensor(sample.src_size, dtype=torch.int64),
        trg_size=torch.tensor(sample.trg_size, dtype=torch.int64),
        meta=meta,
    )


def collate_pairs(pairs: Sequence[PreparedPair]) -> PairBatch:
    """Stack prepared pairs, padding keypoints with NaN to the batch's largest count."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    most = max(len(pair.src_kps) for pair in pairs)
    src_kps = torch.full((len(pairs), most, 2), float("nan"))
    trg_kps = torch.full((len(pairs), most, 2), float("nan"))
    valid = torch.zeros(len(pairs), most, dtype=torch.bool)
    for row, pair in enumerate(pairs):
        count = len(pair.src_kps)
        src_kps[row, :count], trg_kps[row, :count], valid[row, :count] = pair.src_kps, pair.trg_kps, True
    return PairBatch(
        src_image=torch.stack([pair.src_image for pair in pairs]),
        trg_image=torch.stack([pair.trg_image for pair in pairs]),
        src_kps=src_kps,
        trg_kps=trg_kps,
        valid=valid,
        src_bbox=torch.stack([pair.src_bbox for pair in pairs]),
        trg_bbox=torch.stack([pair.trg_bbox for pair in pairs]),
        src_size=torch.stack([pair.src_size for pair in pairs]),
        trg_size=torch.stack([pair.trg_size for pair in pairs]),
        meta=[pair.meta for pair in pairs],
    )
