"""Pairs as the network takes them, from shards to batches on the device. Training
(:func:`sm_train.data.pair_batches`) and evaluation (:func:`sm_eval.predict.eval_batches`) both
read their pairs through here.

A batch holds its images resized to the square network input by the model's input spec
(:meth:`sm_model.inputs.InputSpec.resize`; the device turns them into the network's input with
:meth:`~sm_model.inputs.InputSpec.to_network`) and keypoints and boxes in *original* pixels (:mod:`sm_model.pixels`),
padded with a validity mask (:class:`PairBatch`). The data path:

1. The caller's entries (whole shards, or :class:`~pipelines.reader.ShardSlice` runs of their
   pairs) are laid end to end in reading order and cut into *pieces* (:func:`plan_pieces`): runs of
   one shard holding at most :data:`PIECE_BYTES` of resized images, and, with ``P`` loader
   processes, the last pieces cut in ``P`` so that no process is left idle at the end.
2. Piece ``i`` is read by loader process ``i mod P`` (:class:`PieceReader`; none: in this
   process) with :func:`pipelines.reader.read_entry`, which checks every pair it takes and decodes
   each image once; each image is resized once per piece, when decoded. The process ships the piece
   in *chunks* of :data:`CHUNK_PAIRS` pairs (:class:`PairChunk`): the piece's images the chunk is
   the first to use and the chunk's pairs, all as numpy arrays pickled through the queue's pipe.
   No tensor crosses it (a shared-memory tensor costs a file-descriptor handshake with the loader
   process, which waits for that process's interpreter lock), no pair crosses it on its own, and an
   image crosses it once per piece.
3. This process puts the chunks back into piece order (:func:`pair_refs`), so the pairs come in
   exactly the order the entries hold them, whatever the number of loader processes; callers
   shuffle or cut them (:func:`pipelines.reader.shuffle_pairs`, as the reader itself would), and
   :func:`assemble_batch` copies the images of a batch's pairs from the piece tables into the
   batch (into pinned memory for a GPU).
4. :func:`to_device` moves each batch to the GPU on a side stream while the previous one is in use.

So a batch is the same, byte for byte, with any number of loader processes, and the same as
the per-pair path it replaced (each pair resized and batched on its own; ``tests/per_pair.py``
keeps it as the reference the tests compare with).
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipelines.reader import ShardSlice, entry_name, entry_urls, index_rows, read_entry
from pipelines.schema import ExtraValue, PairSample, ThresholdKind
from pipelines.storage import Location
from sm_model.inputs import InputSpec

CHUNK_PAIRS = 64
"""Pairs per :class:`PairChunk`, the unit a loader process ships."""
PIECE_BYTES = 128 * 2**20
"""The most resized-image bytes one piece may hold (:func:`plan_pieces`): what a loader process
keeps per piece, and roughly what this process keeps per piece it has received and not used up."""


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


# ---- pieces: what each loader process reads -----------------------------------------------------


def plan_pieces(
    shards: Location,
    entries: Sequence[str | ShardSlice],
    index: Mapping[str, Mapping[str, Mapping[str, Any]]],
    loader_workers: int,
    image_size: int,
    piece_bytes: int | None = None,
) -> list[str | ShardSlice]:
    """``entries`` cut into pieces, in the same order: each :class:`~pipelines.reader.ShardSlice`
    into runs whose distinct images (by the ``src_image``/``trg_image`` columns of ``index``,
    :func:`~pipelines.reader.index_rows`) fill at most ``piece_bytes`` once resized to
    ``image_size`` (default :data:`PIECE_BYTES`); then, with two or more loader processes, each of the last ``len % P`` pieces
    into ``P`` runs, so that piece ``i`` going to process ``i mod P`` leaves none idle at the end.
    A whole-shard entry (a name) is never cut: it is read to its end, whatever its index says.
    Every cut costs one more pass over the shard's tar headers and decodes the images both runs use
    twice, which is why pieces are not cut finer."""
    most_images = max(1, (piece_bytes or PIECE_BYTES) // (3 * image_size * image_size))
    pieces: list[str | ShardSlice] = []
    for entry in entries:
        rows = list(index.get(shards.full(entry_name(entry)), {}).values())
        pieces += _runs_by_images(entry, rows, most_images) if isinstance(entry, ShardSlice) else [entry]
    tail = len(pieces) % loader_workers if loader_workers > 1 else 0
    if tail:
        pieces[-tail:] = [part for piece in pieces[-tail:] for part in _even_runs(piece, loader_workers)]
    return pieces


def _runs_by_images(entry: ShardSlice, rows: list[Mapping[str, Any]], most_images: int) -> list[ShardSlice]:
    if len(rows) < entry.stop or not all("src_image" in row and "trg_image" in row for row in rows[:1]):
        return [entry]  # the reader says what is wrong with such a slice
    runs, start, seen = [], entry.start, set()
    for at in range(entry.start, entry.stop):
        images = {rows[at]["src_image"], rows[at]["trg_image"]}
        if seen and len(seen | images) > most_images:
            runs.append(ShardSlice(entry.name, start, at))
            start, seen = at, set()
        seen |= images
    return [*runs, ShardSlice(entry.name, start, entry.stop)]


def _even_runs(piece: str | ShardSlice, parts: int) -> list[str | ShardSlice]:
    if not isinstance(piece, ShardSlice) or piece.stop - piece.start < 2:
        return [piece]
    parts = min(parts, piece.stop - piece.start)
    cuts = [piece.start + (piece.stop - piece.start) * part // parts for part in range(parts + 1)]
    return [ShardSlice(piece.name, lo, hi) for lo, hi in itertools.pairwise(cuts)]


# ---- loader processes: pieces -> chunks --------------------------------------------------------


@dataclass
class PairChunk:
    """Up to :data:`CHUNK_PAIRS` consecutive pairs of piece ``piece`` (its ``seq``-th chunk;
    ``last`` for its final one, which may hold no pair), as a loader process ships them.

    ``images`` ``(M, 3, S, S)`` uint8: the piece's resized images that this chunk is the first to
    use; the piece's image ``j`` is row ``j`` of its chunks' ``images`` laid end to end.
    Per pair (``n``): ``src_image``/``trg_image`` (that ``j``), ``counts`` (keypoints),
    ``src_bbox``/``trg_bbox`` ``(n, 4)`` float64, ``src_size``/``trg_size`` ``(n, 2)`` int64 ``(W, H)``
    and the lists ``keys``, ``datasets``, ``categories``, ``thresholds``, ``extras``; per keypoint,
    the pairs' rows end to end: ``src_kps``/``trg_kps`` ``(K, 2)`` float64, ``kps_ids`` ``(K,)``.
    Every number is the reader's, unconverted."""

    piece: int
    seq: int
    last: bool
    images: np.ndarray
    src_image: np.ndarray
    trg_image: np.ndarray
    counts: np.ndarray
    src_kps: np.ndarray
    trg_kps: np.ndarray
    kps_ids: np.ndarray
    src_bbox: np.ndarray
    trg_bbox: np.ndarray
    src_size: np.ndarray
    trg_size: np.ndarray
    keys: list[str]
    datasets: list[str]
    categories: list[str]
    thresholds: list[ThresholdKind]
    extras: list[dict[str, ExtraValue]]


def piece_chunks(samples: Iterable[PairSample], piece: int, image_size: int, chunk_pairs: int) -> Iterator[PairChunk]:
    """The chunks of one piece from its pairs, whose images are already resized ``[3, S, S]``
    tensors, the same object for the same image (:func:`~pipelines.reader.read_entry` with a
    resizing ``image_map``). Always ends with a chunk marked ``last``."""
    shipped: dict[str, int] = {}  # image key -> its row among the piece's images
    pending: list[PairSample] = []
    seq = 0
    for sample in samples:
        if len(pending) == chunk_pairs:
            yield _chunk(pending, piece, seq, False, shipped, image_size)
            pending, seq = [], seq + 1
        pending.append(sample)
    yield _chunk(pending, piece, seq, True, shipped, image_size)


def _chunk(
    samples: list[PairSample], piece: int, seq: int, last: bool, shipped: dict[str, int], image_size: int
) -> PairChunk:
    new: list[Tensor] = []

    def image_row(key: str, image: Tensor) -> int:
        if key not in shipped:
            shipped[key] = len(shipped)
            new.append(image)
        return shipped[key]

    def rows(values: list[np.ndarray], dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(values).astype(dtype, copy=False) if values else np.zeros(shape, dtype)

    src_rows = [image_row(s.src_image_key, s.src_image) for s in samples]
    trg_rows = [image_row(s.trg_image_key, s.trg_image) for s in samples]
    return PairChunk(
        piece=piece,
        seq=seq,
        last=last,
        images=np.stack([image.numpy() for image in new])
        if new
        else np.zeros((0, 3, image_size, image_size), np.uint8),
        src_image=np.array(src_rows, dtype=np.int64),
        trg_image=np.array(trg_rows, dtype=np.int64),
        counts=np.array([len(s.kps_ids) for s in samples], dtype=np.int64),
        src_kps=rows([s.src_kps for s in samples], np.float64, (0, 2)),
        trg_kps=rows([s.trg_kps for s in samples], np.float64, (0, 2)),
        kps_ids=rows([s.kps_ids for s in samples], np.int64, (0,)),
        src_bbox=rows([s.src_bbox[None] for s in samples], np.float64, (0, 4)),
        trg_bbox=rows([s.trg_bbox[None] for s in samples], np.float64, (0, 4)),
        src_size=np.array([s.src_size for s in samples], dtype=np.int64).reshape(-1, 2),
        trg_size=np.array([s.trg_size for s in samples], dtype=np.int64).reshape(-1, 2),
        keys=[s.key for s in samples],
        datasets=[s.dataset for s in samples],
        categories=[s.category for s in samples],
        thresholds=[s.threshold for s in samples],
        extras=[s.extras for s in samples],
    )


class PieceReader(torch.utils.data.IterableDataset):
    """The chunks of ``pieces`` (:func:`plan_pieces`): in a DataLoader process ``w`` of ``P``,
    those of pieces ``w, w + P, ...``; in this process, all of them. Each piece is read with
    :func:`~pipelines.reader.read_entry` (``index``: its :func:`~pipelines.reader.index_rows`),
    each image resized once, when decoded."""

    def __init__(
        self,
        shards: Location,
        pieces: Sequence[str | ShardSlice],
        index: Mapping[str, Mapping[str, Mapping[str, Any]]],
        spec: InputSpec,
        chunk_pairs: int | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.pieces, self.index = shards, list(pieces), index
        self.spec, self.chunk_pairs = spec, chunk_pairs or CHUNK_PAIRS

    def __iter__(self) -> Iterator[PairChunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for piece in range(worker, len(self.pieces), workers):
            samples = read_entry(self.shards, self.pieces[piece], self.index, image_map=self.spec.resize)
            yield from piece_chunks(samples, piece, self.spec.size, self.chunk_pairs)


# ---- this process: chunks -> pairs -> batches -> device -----------------------------------------


class _ChunkRows:
    """A received chunk, the images of its piece (views, growing as the piece's chunks come), each
    pair's keypoint rows ``starts[i]:starts[i + 1]``, and its numbers as a batch takes them,
    converted once, as the per-pair path converts them: keypoints ``[2, K, 2]`` and boxes
    ``[2, n, 4]`` float32 (source, target), sizes ``[2, n, 2]`` int64."""

    __slots__ = ("boxes", "chunk", "images", "kps", "sizes", "starts")

    def __init__(self, chunk: PairChunk, images: list[np.ndarray]) -> None:
        self.chunk, self.images = chunk, images
        self.starts = np.concatenate([[0], np.cumsum(chunk.counts)])
        self.kps = torch.from_numpy(np.stack([chunk.src_kps, chunk.trg_kps])).float()
        self.boxes = torch.from_numpy(np.stack([chunk.src_bbox, chunk.trg_bbox])).float()
        self.sizes = torch.from_numpy(np.stack([chunk.src_size, chunk.trg_size]))


class PairRef(NamedTuple):
    """One pair as :func:`pair_refs` yields it: row ``row`` of a received chunk."""

    rows: _ChunkRows
    row: int

    @property
    def key(self) -> str:
        return self.rows.chunk.keys[self.row]

    @property
    def piece(self) -> int:
        return self.rows.chunk.piece


def pair_refs(
    shards: Location,
    entries: Sequence[str | ShardSlice],
    *,
    spec: InputSpec,
    loader_workers: int = 0,
    chunk_pairs: int | None = None,
) -> Iterator[PairRef]:
    """Every pair of ``entries`` (whole shards or :class:`~pipelines.reader.ShardSlice` runs, read
    in the given order, as :func:`pipelines.reader.pair_dataset` would read them in one process),
    decoded, checked and resized by ``loader_workers`` processes (:func:`stream_loader`; none: in
    this process) and yielded here in that order, as references into the received chunks; an
    entry's images are kept as long as a reference to one of its pairs is. ``ValueError`` when a
    shard is listed twice; the reader's errors (:class:`~pipelines.reader.CorruptShardError`)
    as it raised them."""
    entries = list(entries)
    index = index_rows(shards, dict(zip(map(entry_name, entries), entry_urls(shards, entries))))
    pieces = plan_pieces(shards, entries, index, loader_workers, spec.size)
    reader = PieceReader(shards, pieces, index, spec, chunk_pairs)
    images_of: dict[int, list[np.ndarray]] = {}
    for chunk in _in_piece_order(iter(stream_loader(reader, loader_workers)), len(pieces)):
        images = images_of.setdefault(chunk.piece, [])
        images.extend(chunk.images)
        if chunk.last:
            del images_of[chunk.piece]
        rows = _ChunkRows(chunk, images)
        for row in range(len(chunk.keys)):
            yield PairRef(rows, row)


def _in_piece_order(chunks: Iterator[PairChunk], pieces: int) -> Iterator[PairChunk]:
    """Chunks in piece order, however the loader processes' chunks interleave (each process
    ships its own in order): one that comes early waits here."""
    early: dict[int, deque[PairChunk]] = defaultdict(deque)
    for piece in range(pieces):
        while True:
            while not early[piece]:
                chunk = next(chunks, None)
                if chunk is None:
                    raise RuntimeError(f"the loader processes stopped before the end of piece {piece} of {pieces}")
                early[chunk.piece].append(chunk)
            chunk = early[piece].popleft()
            yield chunk
            if chunk.last:
                del early[piece]
                break


def assemble_batch(refs: Sequence[PairRef], pin_memory: bool = False) -> PairBatch:
    """The batch of the pairs ``refs``: their images copied out of the piece tables (into pinned
    memory with ``pin_memory``, for an asynchronous copy to a GPU), the rest gathered from their
    chunks, with the values the per-pair path gives (the same bytes; ``tests/per_pair.py``)."""
    if not refs:
        raise ValueError("assemble_batch needs at least one pair")
    held: dict[_ChunkRows, int] = {}  # the chunks the batch takes pairs from -> their first pair, end to end
    for ref in refs:
        if ref.rows not in held:
            held[ref.rows] = sum(len(rows.chunk.keys) for rows in held)
    chunks = list(held)
    at = torch.tensor([held[ref.rows] + ref.row for ref in refs])  # each pair among the chunks' pairs
    first = np.concatenate([rows.starts[:-1] + offset for rows, offset in zip(chunks, _kps_offsets(chunks))])
    counts = np.concatenate([rows.chunk.counts for rows in chunks])[at.numpy()]
    most = int(counts.max())
    valid = np.arange(most) < counts[:, None]
    kps = _cat([rows.kps for rows in chunks])[:, torch.from_numpy((first[at.numpy(), None] + np.arange(most))[valid])]
    boxes, sizes = _cat([rows.boxes for rows in chunks])[:, at], _cat([rows.sizes for rows in chunks])[:, at]
    images = {}
    for side in ("src", "trg"):
        views = [ref.rows.images[getattr(ref.rows.chunk, f"{side}_image")[ref.row]] for ref in refs]
        images[side] = torch.empty((len(views), *views[0].shape), dtype=torch.uint8, pin_memory=pin_memory)
        # numpy's copy: one thread, where torch's would wake (and leave spinning) its intra-op pool
        np.stack(views, out=images[side].numpy())
    padded = torch.full((2, *valid.shape, 2), float("nan"))
    mask = torch.from_numpy(valid)
    padded[0][mask], padded[1][mask] = kps[0], kps[1]
    return PairBatch(
        src_image=images["src"],
        trg_image=images["trg"],
        src_kps=padded[0].clone(),
        trg_kps=padded[1].clone(),
        valid=mask,
        src_bbox=boxes[0].clone(),
        trg_bbox=boxes[1].clone(),
        src_size=sizes[0].clone(),
        trg_size=sizes[1].clone(),
        meta=[_meta(ref.rows, ref.row) for ref in refs],
    )


def _kps_offsets(chunks: list[_ChunkRows]) -> list[int]:
    offsets = np.cumsum([0] + [int(rows.starts[-1]) for rows in chunks])
    return offsets[:-1].tolist()


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def _meta(rows: _ChunkRows, row: int) -> PairMeta:
    chunk, lo, hi = rows.chunk, rows.starts[row], rows.starts[row + 1]
    return PairMeta(
        key=chunk.keys[row],
        dataset=chunk.datasets[row],
        category=chunk.categories[row],
        threshold=chunk.thresholds[row],
        kps_ids=chunk.kps_ids[lo:hi],
        trg_kps=chunk.trg_kps[lo:hi],
        trg_bbox=chunk.trg_bbox[row],
        trg_size=(int(chunk.trg_size[row, 0]), int(chunk.trg_size[row, 1])),
        extras=chunk.extras[row],
    )


def pins_memory(device: torch.device | str | None) -> bool:
    """Whether batches bound for ``device`` are best assembled in pinned memory (a CUDA device)."""
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def to_device(batches: Iterable[PairBatch], device: torch.device | str | None) -> Iterator[PairBatch]:
    """``batches`` on ``device`` (``None``: as they are). On a CUDA device each batch is copied on
    a side stream, issued as soon as the batch is assembled, before the previous batch is handed
    over, so the copy overlaps whatever the caller runs on that one; the caller's stream waits for
    the copy before using it (assemble batches with ``pin_memory`` for the copy to be asynchronous)."""
    if device is None or torch.device(device).type != "cuda":
        for batch in batches:
            yield batch if device is None else batch.to(device)
        return
    device = torch.device(device)
    stream = torch.cuda.Stream(device)
    pending: tuple[PairBatch, torch.cuda.Event] | None = None
    for batch in batches:
        with torch.cuda.stream(stream):
            moved = batch.to(device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        if pending is not None:
            yield _arrived(*pending, device)
        pending = (moved, copied)
    if pending is not None:
        yield _arrived(*pending, device)


def _arrived(batch: PairBatch, copied: torch.cuda.Event, device: torch.device) -> PairBatch:
    """``batch`` for use on the current stream: it waits for the copy, and the caching allocator
    learns that the batch's memory (allocated on the side stream) is in use on this stream too."""
    current = torch.cuda.current_stream(device)
    current.wait_event(copied)
    for field in fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, Tensor):
            value.record_stream(current)
    return batch


# ---- DataLoader processes -----------------------------------------------------------------------


def loader_context() -> multiprocessing.context.BaseContext:
    """The start method for DataLoader processes: forkserver (forking inside Ray workers can
    deadlock), with this module preloaded in the server, so loader processes fork from a server
    that has already imported torch and the reader instead of importing them each (seconds per
    process). Has no effect once this process's forkserver is running."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__, "pipelines.reader"])
    return context


def stream_loader(
    dataset: torch.utils.data.IterableDataset, loader_workers: int, prefetch: int = 4
) -> torch.utils.data.DataLoader:
    """A DataLoader that passes ``dataset``'s items through unbatched, produced by
    ``loader_workers`` processes started by :func:`loader_context` (none: in this process), each
    up to ``prefetch`` items ahead. A loader process with nothing to read simply yields nothing.

    Items come as they are ready (``in_order=False``): each process's own items in its order, but
    one process's slow item does not hold back the others' (a piece's first chunk carries the
    checks of all its pairs); :func:`pair_refs` puts them back into piece order."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=loader_workers,
        multiprocessing_context=loader_context() if loader_workers else None,
        prefetch_factor=prefetch if loader_workers else None,
        persistent_workers=False,
        in_order=False,
    )
