"""Pairs as the network takes them: one pair prepared on the CPU (images resized to the square
network input, keypoints and boxes kept in *original* pixels, see :mod:`sm_model.pixels`), batches
padded with a validity mask, and the DataLoader that produces them. Training and evaluation both
read their pairs through here.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from pipelines.schema import ExtraValue, PairSample, ThresholdKind
from sm_model.pixels import resize_image


@dataclass(frozen=True)
class PairMeta:
    """What evaluation needs of a pair besides the network inputs, exactly as stored (float64).
    Shapes: ``kps_ids`` ``(N,)``, ``trg_kps`` ``(N, 2)``, ``trg_bbox`` ``(4,)``; ``trg_size`` ``(W, H)``."""

    key: str
    dataset: str
    category: str
    threshold: ThresholdKind
    kps_ids: np.ndarray
    trg_kps: np.ndarray
    trg_bbox: np.ndarray
    trg_size: tuple[int, int]
    extras: dict[str, ExtraValue]


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


@dataclass
class PairBatch:
    """A batch of ``B`` pairs padded to the largest keypoint count ``N`` of the batch.

    ``src_image``/``trg_image`` ``[B, 3, S, S]`` uint8 (the original images resized to S x S);
    ``src_kps``/``trg_kps`` ``[B, N, 2]`` float32 in *original* pixels, NaN in padded rows;
    ``valid`` ``[B, N]`` bool; ``src_bbox``/``trg_bbox`` ``[B, 4]`` float32 original pixels;
    ``src_size``/``trg_size`` ``[B, 2]`` int64 original ``(W, H)``; ``meta`` one per pair (stays on CPU).
    """

    src_image: Tensor
    trg_image: Tensor
    src_kps: Tensor
    trg_kps: Tensor
    valid: Tensor
    src_bbox: Tensor
    trg_bbox: Tensor
    src_size: Tensor
    trg_size: Tensor
    meta: list[PairMeta]

    def __len__(self) -> int:
        return len(self.meta)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """The batch with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return PairBatch(**moved, meta=self.meta)


def prepare_pair(sample: PairSample, image_size: int) -> PreparedPair:
    """CPU preprocessing of one pair (runs in DataLoader workers)."""
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
        src_image=resize_image(sample.src_image, image_size),
        trg_image=resize_image(sample.trg_image, image_size),
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


def loader_context() -> multiprocessing.context.BaseContext:
    """The start method for DataLoader processes: forkserver (forking inside Ray workers can
    deadlock), with this module preloaded in the server, so loader processes fork from a server
    that has already imported torch and the reader instead of importing them each (seconds per
    process). Has no effect once this process's forkserver is running."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__, "pipelines.reader"])
    return context


def stream_loader(dataset: torch.utils.data.IterableDataset, loader_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader that passes ``dataset``'s items through unbatched, produced by
    ``loader_workers`` processes started by :func:`loader_context` (none: in this process). A
    loader process with no shard (more processes than shards) simply yields nothing."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=loader_workers,
        multiprocessing_context=loader_context() if loader_workers else None,
        persistent_workers=False,
    )
