"""Stream shards written by :mod:`pipelines.shard` as :class:`~pipelines.schema.PairSample`.

    >>> shards = Location("s3://bucket/spair")
    >>> dataset = pair_dataset(shards, split_shards(shards, "trn"), shuffle_buffer=256, seed=0)
    >>> loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=4,
    ...                                      multiprocessing_context="forkserver")

The result is a WebDataset pipeline (a torch ``IterableDataset``): shard URLs are split across
nodes (``RANK``/``WORLD_SIZE``, which Ray Train sets) and DataLoader workers, each shard is read
whole (its bytes are bounded by ``--max-shard-bytes``), and each of its images is decoded once,
when its first pair needs it, and released after its last pair. Evaluation streams in the fixed
order of the index; training shuffles shards per epoch and pairs within a bounded buffer.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any, NamedTuple

import pyarrow.parquet as pq
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipelines.imageio import decode_rgb
from pipelines.schema import PairSample, sample_from_json
from pipelines.storage import Location, open_url

IMAGE_EXTENSIONS = ("jpg", "png")


def read_index(shards: Location):
    """The shard set's ``index.parquet`` as a pyarrow Table (one row per pair)."""
    if not shards.exists("index.parquet"):
        raise FileNotFoundError(f"{shards.full('index.parquet')} does not exist: is this a complete shard directory?")
    return pq.read_table(io.BytesIO(shards.read_bytes("index.parquet")))


def split_shards(shards: Location, split: str) -> dict[str, int]:
    """``{shard name: pair count}`` of ``split`` in index order; the counts let a trainer size
    exact epochs. Shards whose pairs were all rejected are listed with 0."""
    record_path = f"_manifests/{split}.json"
    if not shards.exists(record_path):
        raise FileNotFoundError(f"{shards.url} has no finished split {split!r} ({shards.full(record_path)} is missing)")
    counts = dict.fromkeys(json.loads(shards.read_text(record_path))["shards"], 0)
    table = read_index(shards)
    if "split" in table.column_names:
        for pair_split, shard in zip(table.column("split").to_pylist(), table.column("shard").to_pylist()):
            if pair_split == split:
                counts[shard] += 1
    return counts


class ShardSlice(NamedTuple):
    """Pairs ``[start, stop)`` of a shard, counted in the shard's pair order (the index order)."""

    name: str
    start: int
    stop: int


def pair_dataset(
    shards: Location,
    names: Iterable[str | ShardSlice],
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = False,
    split_nodes: bool = True,
) -> wds.DataPipeline:
    """A pipeline yielding every pair of the shards ``names`` (relative to ``shards``); a
    :class:`ShardSlice` entry yields only that run of the shard's pairs (images the run does not
    use are never decoded).

    ``shuffle_buffer=0`` keeps the given order (evaluation); otherwise shard order is shuffled
    with ``seed + epoch`` (identically on every rank, before splitting, so ranks stay disjoint)
    and pairs are shuffled within a buffer of that many samples. ``split_nodes=False`` reads all
    of ``names`` on every rank (for a caller that already planned each rank's share); DataLoader
    workers always split them. ``resampled=True`` draws shards with replacement forever (bound it
    with ``.with_epoch(n)``)."""
    entries = list(names)
    urls = [shards.full(entry.name if isinstance(entry, ShardSlice) else entry) for entry in entries]
    if not urls:
        raise ValueError(f"{shards.url}: no shards to read")
    if len(set(urls)) != len(urls):
        raise ValueError(f"{shards.url}: a shard is listed more than once in {entries}")
    ranges = {url: (entry.start, entry.stop) for url, entry in zip(urls, entries) if isinstance(entry, ShardSlice)}
    if resampled:
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed + epoch)]
    else:
        order_seed = seed + epoch if shuffle_buffer else None
        stages = [wds.SimpleShardList(urls, seed=order_seed)]
        stages += [wds.split_by_node, wds.split_by_worker] if split_nodes else [wds.split_by_worker]
    # Stages are module-level functions (bound with partial) so that DataLoader workers started
    # with spawn or forkserver can unpickle the pipeline.
    stages += [
        partial(open_shards, endpoint_url=shards.endpoint_url),
        shard_files,
        group_by_keys,
        partial(assemble_pairs, ranges=ranges),
    ]
    if shuffle_buffer:
        stages.append(partial(shuffle_pairs, buffer_size=shuffle_buffer, seed=seed + epoch))
    return wds.DataPipeline(*stages)


def open_shards(sources: Iterable[dict], endpoint_url: str | None = None) -> Iterator[dict]:
    """``{"url"}`` items -> ``{"url", "stream"}`` for local paths and ``s3://`` URLs."""
    for source in sources:
        url = source["url"]
        try:
            stream = open_url(url, endpoint_url)
        except OSError as error:
            raise FileNotFoundError(f"cannot open shard {url}: {error}") from error
        yield {**source, "stream": stream}


def shard_files(sources: Iterable[dict]) -> Iterator[dict]:
    """Tar members of each shard as ``{"fname", "data", "__url__"}``; a corrupt or truncated shard
    raises an error naming it."""
    for source in sources:
        try:
            yield from tar_file_expander([source], handler=wds.reraise_exception, eof_value=None)
        except Exception as error:  # tarfile and webdataset raise many types for bad input
            raise ValueError(f"corrupt shard {source['url']}: {error.args[0] if error.args else error}") from error
        finally:
            source["stream"].close()


def assemble_pairs(samples: Iterable[dict], ranges: dict[str, tuple[int, int]] | None = None) -> Iterator[PairSample]:
    """Grouped tar samples -> complete pairs, one shard at a time. Each image is decoded once,
    when first needed, and dropped from the cache after the last pair that uses it. ``ranges``
    keeps only pairs ``[start, stop)`` of the shards it names (by URL)."""
    ranges = ranges or {}
    current_url, images, pairs = None, {}, []
    for sample in samples:
        if sample["__url__"] != current_url:
            if current_url in ranges:
                pairs = _slice_pairs(current_url, pairs, *ranges[current_url])
            yield from _shard_pairs(current_url, images, pairs)
            current_url, images, pairs = sample["__url__"], {}, []
        if "pair.json" in sample:
            pairs.append(json.loads(sample["pair.json"]))
            continue
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "json" not in sample:
            raise ValueError(f"corrupt shard {current_url}: entry {sample['__key__']!r} has {sorted(sample)}")
        images[sample["__key__"]] = (sample[ext], json.loads(sample["json"]))
    if current_url in ranges:
        pairs = _slice_pairs(current_url, pairs, *ranges[current_url])
    yield from _shard_pairs(current_url, images, pairs)


def _slice_pairs(url: str, pairs: list[dict], start: int, stop: int) -> list[dict]:
    if not 0 <= start <= stop <= len(pairs):
        raise ValueError(f"shard {url} has {len(pairs)} pairs; cannot take pairs [{start}, {stop})")
    return pairs[start:stop]


def _shard_pairs(url: str | None, images: dict[str, tuple[bytes, dict]], pairs: list[dict]) -> Iterator[PairSample]:
    last_use = {}
    for index, doc in enumerate(pairs):
        for side in ("src", "trg"):
            key = doc[side]["image"]
            if key not in images:
                raise ValueError(f"corrupt shard {url}: pair {doc['key']!r} needs image {key!r}, which the shard lacks")
            last_use[key] = index
    decoded = {}
    for index, doc in enumerate(pairs):
        arrays = []
        for side in ("src", "trg"):
            key = doc[side]["image"]
            if key not in decoded:
                data, info = images[key]
                decoded[key] = decode_rgb(data)
                width, height = info["size"]
                if decoded[key].shape[:2] != (height, width):
                    raise ValueError(f"corrupt shard {url}: image {key!r} decodes to {decoded[key].shape}, index says {width}x{height}")
            arrays.append(decoded[key])
        yield sample_from_json(doc, arrays[0], arrays[1])
        for side in ("src", "trg"):
            key = doc[side]["image"]
            if last_use.get(key) == index:
                del decoded[key]
                del last_use[key]


def shuffle_pairs(samples: Iterable[PairSample], buffer_size: int, seed: int) -> Iterator[PairSample]:
    """Shuffle within a buffer of ``buffer_size`` samples, with a different stream per rank and
    DataLoader worker (seeded from ``seed`` and their ids, so runs are reproducible)."""
    rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
    rng = random.Random(f"{seed}-{rank}-{worker}")
    buffer: list[PairSample] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer
