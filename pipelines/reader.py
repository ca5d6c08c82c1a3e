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
:func:`entry_order` and :func:`read_entry` give the same stream to a caller that spreads the
shards (or runs of their pairs) over its own processes (:mod:`sm_feed.batches`).

A shard is untrusted input, checked as the sharder checked the raw data (one validation, two
sides): it must be a plain tar ending in its end-of-archive marker; every pair it holds must be
listed for it in ``index.parquet``; every pair a read takes (all of them, or the run a
:class:`ShardSlice` names) must be a document shaped as :func:`~pipelines.schema.pair_to_json`
writes it, agree with its ``index.parquet`` row and pass :func:`pipelines.checks.check_pair` and
:func:`~pipelines.checks.check_against_images` before any of its images is decoded (a pair outside
the run is parsed and checked by the read that takes it); a pair key appears once per shard; documents are parsed within :data:`MAX_DOCUMENT_BYTES` and
the bounds of :func:`pipelines.jsonio.loads`, images within those of :mod:`pipelines.imageio` (a
decompression bomb is refused before decoding); every pair the index lists in a shard must be in
it. Anything else raises :class:`CorruptShardError` naming the shard and the member: a reader
never drops, repairs or re-scores a pair silently.

Integrity: ``index.parquet`` records, for each pair, the sha256 of its document and of each of its
images as the sharder wrote them (:data:`pipelines.schema.DIGEST_FIELDS`). Every member a pair
taken uses is hashed (each image once per read) and compared before the pair is yielded, after
every other check of that member (so a member another check refuses gets that check's message);
bytes changed since sharding, a flipped bit as much as a moved keypoint, raise
:class:`CorruptShardError` naming the shard and the member. Shards whose index records no digests
(written before the sharder recorded them) are refused with :class:`UnverifiableShardError`,
whose message says to run the sharding command again (it rewrites them). ``verify=False`` reads
any shard unverified; nothing in the project passes it but the benchmarks that measure its cost.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from pipelines import checks, jsonio
from pipelines.imageio import decode_rgb
from pipelines.schema import (
    DIGEST_FIELDS,
    SCHEMA_VERSION,
    THRESHOLD_KINDS,
    ImageInfo,
    ImageRef,
    PairRecord,
    PairSample,
    RejectError,
    image_digest,
    pair_digest,
    sample_from_json,
)
from pipelines.storage import Location, open_url

IMAGE_EXTENSIONS = ("jpg", "png")
MAX_DOCUMENT_BYTES = 2**20
"""The largest ``.json`` member (a pair document or an image's info) a shard may hold. The sharder
writes a few KiB; a larger member is refused unread, which bounds what one document can cost."""
INDEX_FIELDS = ("split", "dataset", "category", "threshold", "origin", "src_image", "trg_image", "num_keypoints")
"""The ``index.parquet`` columns every pair document must agree with (those the index has)."""
_END = "__end__"
"""Marks the end of one read of a shard in the stream between the pipeline's stages, so a shard
without a single member is still checked against its index rows."""
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


class CorruptShardError(ValueError):
    """A shard that is not as :mod:`pipelines.shard` writes it (unreadable, cut short, compressed,
    inconsistent with its index, a member whose digest differs from the one ``index.parquet``
    records, a pair the index lists missing) or that holds a pair the sharder would have rejected.
    The message names the shard and, where one is at fault, the member."""


class UnverifiableShardError(CorruptShardError):
    """Shards whose ``index.parquet`` records no digests (:data:`pipelines.schema.DIGEST_FIELDS`):
    written before :mod:`pipelines.shard` recorded them. They are refused unless read with
    ``verify=False``; running the sharding command again rewrites them with digests."""


def _corrupt(url: str, problem: object, member: str | None = None) -> CorruptShardError:
    return CorruptShardError(f"corrupt shard {url}: " + (f"member {member}: " if member else "") + str(problem))


def read_index(shards: Location):
    """The shard set's ``index.parquet`` as a pyarrow Table (one row per pair)."""
    if not shards.exists("index.parquet"):
        raise FileNotFoundError(f"{shards.full('index.parquet')} does not exist: is this a complete shard directory?")
    return pq.read_table(io.BytesIO(shards.read_bytes("index.parquet")))


def index_rows(shards: Location, urls: Mapping[str, str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{url: {pair key: {field: value}}}`` of the shards ``urls`` (``{shard name: url}``) from
    ``index.parquet``, with the :data:`INDEX_FIELDS` the index has (what each pair document of
    those shards must agree with) and the pair's digests (:data:`pipelines.schema.DIGEST_FIELDS`,
    what its members must hash to)."""
    table = read_index(shards)
    rows: dict[str, dict[str, dict[str, Any]]] = {url: {} for url in urls.values()}
    if not {"key", "shard"} <= set(table.column_names):
        return rows  # an index without pairs: no pair of any shard is listed
    table = table.filter(pc.is_in(table["shard"], value_set=pa.array(list(urls), pa.string())))
    columns = ["key", "shard", *(name for name in (*INDEX_FIELDS, *DIGEST_FIELDS) if name in table.column_names)]
    shared: dict[str, str] = {}  # one object per distinct digest: an image's is in many rows
    for row in table.select(columns).to_pylist():
        for name in DIGEST_FIELDS:
            if isinstance(row.get(name), str):
                row[name] = shared.setdefault(row[name], row[name])
        rows[urls[row.pop("shard")]][row.pop("key")] = row
    return rows


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
                if shard not in counts:
                    raise ValueError(
                        f"{shards.url}: index.parquet puts pairs of split {split!r} in shard {shard!r}, "
                        f"which {record_path} does not list"
                    )
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
    verify: bool = True,
) -> wds.DataPipeline:
    """A pipeline yielding every pair of the shards ``names`` (relative to ``shards``); a
    :class:`ShardSlice` entry yields only that run of the shard's pairs (images the run does not
    use are never decoded).

    ``shuffle_buffer=0`` keeps the given order (evaluation); otherwise shard order is shuffled
    with ``seed + epoch`` (identically on every rank, before splitting, so ranks stay disjoint)
    and pairs are shuffled within a buffer of that many samples. ``split_nodes=False`` reads all
    of ``names`` on every rank (for a caller that already planned each rank's share); DataLoader
    workers always split them. ``resampled=True`` draws shards with replacement forever (bound it
    with ``.with_epoch(n)``). Every pair is checked against the shard set's ``index.parquet`` and
    the sharder's checks (see the module docstring); with ``verify`` (the default), every member a
    pair uses must hash to the digest its index row records, and shards whose index records none
    are refused (:class:`UnverifiableShardError`) before anything is read."""
    entries = list(names)
    urls = entry_urls(shards, entries)
    ranges = {url: (entry.start, entry.stop) for url, entry in zip(urls, entries) if isinstance(entry, ShardSlice)}
    index = index_rows(shards, dict(zip(map(entry_name, entries), urls)))
    if verify:
        for url, rows in index.items():
            for key, row in rows.items():
                _recorded_digests(url, key, row)
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
        group_members,
        partial(assemble_pairs, ranges=ranges, index=index, verify=verify),
    ]
    if shuffle_buffer:
        stages.append(partial(shuffle_pairs, buffer_size=shuffle_buffer, seed=seed + epoch))
    return wds.DataPipeline(*stages)


def entry_name(entry: str | ShardSlice) -> str:
    """The shard name of a :func:`pair_dataset` entry."""
    return entry.name if isinstance(entry, ShardSlice) else entry


def entry_urls(shards: Location, entries: list[str | ShardSlice]) -> list[str]:
    """The URL of each entry; ``ValueError`` when there is none or a shard is listed twice."""
    urls = [shards.full(entry_name(entry)) for entry in entries]
    if not urls:
        raise ValueError(f"{shards.url}: no shards to read")
    if len(set(urls)) != len(urls):
        raise ValueError(f"{shards.url}: a shard is listed more than once in {entries}")
    return urls


def entry_order(
    shards: Location,
    names: Iterable[str | ShardSlice],
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    split_nodes: bool = True,
) -> list[str | ShardSlice]:
    """The entries of ``names`` that this rank reads, in the order :func:`pair_dataset` reads
    them in one process (``shuffle`` as a ``shuffle_buffer`` above 0 does: shard order shuffled
    with ``seed + epoch``; ``split_nodes`` as there). With :func:`read_entry` on each and
    :func:`shuffle_pairs` over the result, a caller reproduces :func:`pair_dataset`'s stream
    pair for pair, however it spreads the entries over processes."""
    entries = list(names)
    by_url = dict(zip(entry_urls(shards, entries), entries))
    sources: Iterable[dict] = wds.SimpleShardList(list(by_url), seed=seed + epoch if shuffle else None)
    if split_nodes:
        sources = wds.split_by_node(iter(sources))
    return [by_url[source["url"]] for source in sources]


def read_entry(
    shards: Location,
    entry: str | ShardSlice,
    index: Mapping[str, Mapping[str, Mapping[str, Any]]],
    image_map: Callable[[np.ndarray], Any] | None = None,
    *,
    verify: bool = True,
) -> Iterator[PairSample]:
    """The pairs of one :func:`pair_dataset` entry (a whole shard, or a :class:`ShardSlice` of
    one), in shard order, read in this process and checked exactly as :func:`pair_dataset` checks
    them (``verify`` as there); ``index`` is :func:`index_rows` of at least that shard.
    ``image_map`` is applied to each image once, when it is decoded (a resize, say), and the pairs
    carry what it returns instead of the ``(H, W, 3)`` array."""
    url = shards.full(entry_name(entry))
    ranges = {url: (entry.start, entry.stop)} if isinstance(entry, ShardSlice) else None
    files = shard_files(open_shards([{"url": url}], shards.endpoint_url))
    yield from assemble_pairs(group_members(files), ranges, index, image_map, verify=verify)


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
    """Tar members of each shard as ``{"fname", "data", "__url__"}``, each shard's followed by
    ``{"__url__", "__end__": True}``. A shard must be a plain
    (uncompressed) tar that ends in its end-of-archive marker; a compressed one (refused before
    anything is decompressed), a corrupt one or one cut short, even exactly at a member boundary,
    raises :class:`CorruptShardError` naming it, as does a ``.json`` member larger than
    :data:`MAX_DOCUMENT_BYTES` (refused unread)."""
    for source in sources:
        url = source["url"]
        try:
            yield from _tar_members(url, source["stream"])
        except CorruptShardError:
            raise
        except Exception as error:  # tarfile and the stream raise many types for bad input
            raise _corrupt(url, error.args[0] if error.args else error) from error
        finally:
            source["stream"].close()
        yield {"__url__": url, _END: True}


def _tar_members(url: str, stream) -> Iterator[dict]:
    head = b""
    while len(head) < tarfile.BLOCKSIZE and (chunk := stream.read(tarfile.BLOCKSIZE - len(head))):
        head += chunk
    for magic, name in _COMPRESSED:
        if head.startswith(magic):
            raise _corrupt(url, f"{name}-compressed; shards are plain tar files (refused without decompressing)")
    with tarfile.open(fileobj=_Replayed(head, stream), mode="r|", tarinfo=_EndMarkedTarInfo) as tar:
        for member in tar:
            if not member.isreg():
                continue
            if member.name.endswith(".json") and member.size > MAX_DOCUMENT_BYTES:
                raise _corrupt(url, f"{member.size} bytes; a document may have {MAX_DOCUMENT_BYTES}", member.name)
            yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
            tar.members = []  # a stream needs no member list
        if not getattr(tar, "end_marker", False):
            raise _corrupt(url, f"no end-of-archive marker after byte {tar.offset}: the shard is cut short or damaged")


class _EndMarkedTarInfo(tarfile.TarInfo):
    """Notes on its archive (``end_marker``) that reading stopped at the end-of-archive marker:
    tarfile also stops quietly at a header that is missing, cut short or damaged, which would make
    a truncated shard look complete."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.end_marker = True  # type: ignore[attr-defined]
            raise


class _Replayed:
    """A binary stream with ``head``, bytes already read from it, put back in front."""

    def __init__(self, head: bytes, stream) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
        else:
            data, self.head = self.head[:size], self.head[size:]
        return data


def group_members(files: Iterable[dict]) -> Iterator[dict]:
    """Consecutive members of a shard sharing a key (the name up to its first dot) -> one sample
    ``{"__key__", "__url__", <extension>: data}``; a member repeated within a sample raises
    :class:`CorruptShardError` naming it. The end of a shard's members is passed on as it came."""
    current: dict | None = None
    for file in files:
        if file.get(_END):
            if current is not None:
                yield current
            current = None
            yield file
            continue
        key, ext = base_plus_ext(file["fname"])
        if key is None:
            raise _corrupt(
                file["__url__"], "a name without an extension: not a member pipelines.shard writes", file["fname"]
            )
        if current is None or (key, file["__url__"]) != (current["__key__"], current["__url__"]):
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": file["__url__"]}
        if ext.lower() in current:
            raise _corrupt(file["__url__"], "a second member of that name", file["fname"])
        current[ext.lower()] = file["data"]
    if current is not None:
        yield current


def assemble_pairs(
    samples: Iterable[dict],
    ranges: dict[str, tuple[int, int]] | None = None,
    index: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    image_map: Callable[[np.ndarray], Any] | None = None,
    *,
    verify: bool = True,
) -> Iterator[PairSample]:
    """Grouped tar samples -> complete pairs, one shard at a time. Each image is decoded once,
    when first needed (then passed through ``image_map``, if given), and dropped from the cache
    after the last pair that uses it. ``ranges`` keeps only pairs ``[start, stop)`` of the shards
    it names (by URL). With ``index`` (:func:`index_rows`) every pair of a shard must be listed in
    its rows and every pair taken must agree with its row; every pair taken must be a document as
    :func:`~pipelines.schema.pair_to_json` writes it and pass the sharder's checks (a pair outside
    the range is parsed and checked by the read that takes it), and every pair the index lists in
    a shard must be in it. With ``verify`` (which needs ``index``), every member a pair taken uses
    must hash to the digest its index row records (:data:`pipelines.schema.DIGEST_FIELDS`),
    checked after every other check of that member and before the pair is yielded. A shard
    failing a check raises :class:`CorruptShardError`."""
    if verify and index is None:
        raise ValueError("verifying digests needs the index rows (index_rows) of the shards read")
    ranges = ranges or {}
    shard: _ShardContents | None = None
    for sample in samples:
        if sample.get(_END):  # one read of a shard is complete, even one without members
            if shard is None or sample["__url__"] != shard.url:
                if shard is not None:
                    yield from shard.pairs(ranges.get(shard.url), index, image_map, verify)
                shard = _ShardContents(sample["__url__"])
            yield from shard.pairs(ranges.get(shard.url), index, image_map, verify)
            shard = None
            continue
        if shard is None or sample["__url__"] != shard.url:
            if shard is not None:
                yield from shard.pairs(ranges.get(shard.url), index, image_map, verify)
            shard = _ShardContents(sample["__url__"])
        shard.add(sample)
    if shard is not None:
        yield from shard.pairs(ranges.get(shard.url), index, image_map, verify)


def _slice_pairs(url: str, pairs: list, start: int, stop: int) -> list:
    if not 0 <= start <= stop <= len(pairs):
        raise ValueError(f"shard {url} has {len(pairs)} pairs; cannot take pairs [{start}, {stop})")
    return pairs[start:stop]


class _ShardContents:
    """The members of one shard: images (encoded bytes and member name; info, and its bytes) by
    key, and the pair documents (their bytes, parsed when the pair is taken) in shard order."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.images: dict[str, tuple[bytes, str]] = {}
        self.infos: dict[str, ImageInfo] = {}
        self.info_bytes: dict[str, bytes] = {}
        self.docs: dict[str, bytes] = {}
        self.digests: dict[str, str] = {}  # image key -> image_digest of its members, once computed

    def add(self, sample: dict) -> None:
        key = sample["__key__"]
        entries = sorted(name for name in sample if not name.startswith("__"))
        if entries == ["pair.json"]:
            if key in self.docs:
                raise _corrupt(self.url, "the shard holds this pair twice", f"{key}.pair.json")
            self.docs[key] = sample["pair.json"]
            return
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or entries != sorted([ext, "json"]):
            raise _corrupt(self.url, f"entry {key!r} has {entries}")
        if key in self.images:
            raise _corrupt(self.url, "the shard holds this image twice", f"{key}.{ext}")
        info_doc = _document(self.url, f"{key}.json", sample["json"])
        try:
            info = ImageInfo.from_json(info_doc)
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise _corrupt(self.url, f"not an image info document ({error!r})", f"{key}.json") from None
        if info.key != key or not isinstance(info.path, str) or info.width < 1 or info.height < 1:
            raise _corrupt(self.url, f"not the info of this image: {info}", f"{key}.json")
        self.images[key] = (sample[ext], f"{key}.{ext}")
        self.infos[key] = info
        self.info_bytes[key] = sample["json"]

    def pairs(
        self,
        span: tuple[int, int] | None,
        index: Mapping[str, Mapping[str, Mapping[str, Any]]] | None,
        image_map: Callable[[np.ndarray], Any] | None = None,
        verify: bool = True,
    ) -> Iterator[PairSample]:
        keys = list(self.docs)
        rows = index.get(self.url, {}) if index is not None else None
        if rows is not None:
            for key in keys:  # the member names alone: nothing is parsed for a pair not taken
                if key not in rows:
                    raise _corrupt(self.url, "index.parquet does not list this pair in this shard", f"{key}.pair.json")
            missing = [key for key in rows if key not in self.docs]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CorruptShardError(
                    f"corrupt shard {self.url} yielded {len(keys)} of the {len(rows)} pairs index.parquet lists "
                    f"in it: member {missing[0]}.pair.json is missing{more}"
                )
        if span is not None:
            keys = _slice_pairs(self.url, keys, *span)
        named = rows is not None and all("src_image" in rows[key] and "trg_image" in rows[key] for key in keys)
        # A pair is checked before any of its images is decoded. When the index names each pair's
        # images, when each image is last used is known without parsing, and each pair is checked
        # just before its images are decoded (its document must then name the same images);
        # otherwise every pair taken is checked first.
        docs = None if named else [self._checked(key, rows) for key in keys]
        if docs is None:
            uses = [(rows[key]["src_image"], rows[key]["trg_image"]) for key in keys]
        else:
            uses = [(doc["src"]["image"], doc["trg"]["image"]) for doc in docs]
        last_use = {image: position for position, images in enumerate(uses) for image in images}
        decoded: dict[str, Any] = {}
        for position, key in enumerate(keys):
            doc = self._checked(key, rows) if docs is None else docs[position]
            if verify:  # verify needs rows (assemble_pairs)
                digests = _recorded_digests(self.url, key, rows[key])  # type: ignore[index]
            arrays = []
            for side, image in enumerate(uses[position]):
                if image not in decoded:
                    decoded[image] = self._decode(image) if image_map is None else image_map(self._decode(image))
                if verify:
                    self._verify_image(key, image, digests[1 + side])
                arrays.append(decoded[image])
            if verify:  # last: a member broken in a way another check names gets that check's message
                self._verify_document(key, digests[0])
            yield sample_from_json(doc, arrays[0], arrays[1])
            for image in uses[position]:
                if last_use.get(image) == position:
                    del decoded[image]
                    del last_use[image]

    def _checked(self, key: str, rows: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
        """The document of pair ``key``, parsed and checked against its index row (if ``rows``)
        and by the sharder's checks."""
        doc = self._parse(key)
        if rows is not None:
            _check_index_row(self.url, doc, rows.get(key))
        self._check(doc)
        return doc

    def _parse(self, key: str) -> dict[str, Any]:
        member = f"{key}.pair.json"
        doc = _document(self.url, member, self.docs[key])
        if doc.get("key") != key:
            raise _corrupt(self.url, f"the document's key is {doc.get('key')!r}", member)
        return doc

    def _check(self, doc: dict[str, Any]) -> None:
        """The sharder's checks on the pair ``doc`` describes, against its images' stored sizes
        (which :meth:`_decode` holds the pixels to)."""
        member = f"{doc['key']}.pair.json"
        try:
            record = pair_record(doc, self.infos)
        except (KeyError, TypeError, ValueError) as error:
            raise _corrupt(self.url, f"not a pair document as pipelines.shard writes it ({error!r})", member) from None
        src, trg = self.infos[record.src.key], self.infos[record.trg.key]
        problems = checks.check_pair(record) or checks.check_against_images(
            record, (src.width, src.height), (trg.width, trg.height)
        )
        if problems:
            raise _corrupt(
                self.url, f"{problems[0].reason}: {problems[0].detail} (the sharder rejects such a pair)", member
            )

    def _verify_image(self, pair: str, key: str, expected: str) -> None:
        """The image ``key`` (its encoded bytes and its info document) hashes to ``expected``,
        the digest the row of ``pair`` records for it; each image is hashed once per read."""
        if key not in self.digests:
            self.digests[key] = image_digest(self.images[key][0], self.info_bytes[key])
        if self.digests[key] != expected:
            member = self.images[key][1]
            raise _corrupt(
                self.url,
                f"sha256 {self.digests[key]} of it and {key}.json, but index.parquet records {expected} for "
                f"pair {pair!r}: the bytes differ from what pipelines.shard wrote",
                member,
            )

    def _verify_document(self, key: str, expected: str) -> None:
        """The document of pair ``key`` hashes to ``expected`` (:func:`~pipelines.schema.pair_digest`)."""
        found = pair_digest(self.docs[key], key)
        if found != expected:
            raise _corrupt(
                self.url,
                f"sha256 {found}, but index.parquet records {expected}: "
                "the document differs from what pipelines.shard wrote",
                f"{key}.pair.json",
            )

    def _decode(self, key: str) -> np.ndarray:
        (data, member), info = self.images[key], self.infos[key]
        try:
            image = decode_rgb(data)  # refuses an image over pipelines.imageio's bounds before decoding
        except RejectError as error:
            raise _corrupt(self.url, f"{error.reason}: {error}", member) from error
        except Exception as error:  # PIL raises many types for undecodable data
            raise _corrupt(self.url, f"cannot be decoded ({type(error).__name__}: {error})", member) from error
        if image.shape[:2] != (info.height, info.width):
            raise _corrupt(
                self.url, f"decodes to {image.shape}, its {key}.json says {info.width}x{info.height}", member
            )
        return image


def _document(url: str, member: str, data: bytes) -> dict[str, Any]:
    """A JSON object member, parsed with the sharder's bounds (:func:`pipelines.jsonio.loads`:
    size, nesting, number length, finite numbers, no key named twice)."""
    try:
        doc = jsonio.loads(data, max_bytes=MAX_DOCUMENT_BYTES)
    except jsonio.JSONError as error:
        raise _corrupt(url, error, member) from None
    if not isinstance(doc, dict):
        raise _corrupt(url, f"a JSON {type(doc).__name__}, not an object", member)
    return doc


def _check_index_row(url: str, doc: dict[str, Any], row: Mapping[str, Any] | None) -> None:
    """The pair ``doc`` agrees with its ``index.parquet`` row; compared before any array is
    built, so a document carrying more keypoints than its row costs nothing more."""
    member = f"{doc['key']}.pair.json"
    if row is None:
        raise _corrupt(url, "index.parquet does not list this pair in this shard", member)
    sides = {side: doc.get(side) if isinstance(doc.get(side), dict) else {} for side in ("src", "trg")}
    ids = doc.get("kps_ids")
    found = {
        **{name: doc.get(name) for name in ("split", "dataset", "category", "threshold", "origin")},
        "src_image": sides["src"].get("image"),
        "trg_image": sides["trg"].get("image"),
        "num_keypoints": len(ids) if isinstance(ids, list) else None,
    }
    differ = [
        f"{name} {found[name]!r}, index.parquet says {row[name]!r}"
        for name in INDEX_FIELDS
        if name in row and found[name] != row[name]
    ]
    if differ:
        raise _corrupt(url, "; ".join(differ), member)


def _recorded_digests(url: str, key: str, row: Mapping[str, Any]) -> tuple[str, str, str]:
    """The digests (:data:`~pipelines.schema.DIGEST_FIELDS`: document, source image, target
    image) the index row of pair ``key`` records; :class:`UnverifiableShardError` when it lacks one."""
    digests = (row.get("pair_sha256"), row.get("src_image_sha256"), row.get("trg_image_sha256"))
    if isinstance(digests[0], str) and isinstance(digests[1], str) and isinstance(digests[2], str):
        return digests  # type: ignore[return-value]
    absent = [name for name, digest in zip(DIGEST_FIELDS, digests) if not isinstance(digest, str)]
    raise UnverifiableShardError(
        f"shard {url}: index.parquet records no {', '.join(absent)} for pair {key!r}: the shards were "
        "written before pipelines.shard recorded a digest of every member, so they cannot be verified; "
        "run the pipelines.shard command that wrote them again (it rewrites them with digests), "
        "or read them unverified with verify=False"
    )


def pair_record(doc: Mapping[str, Any], images: Mapping[str, ImageInfo]) -> PairRecord:
    """The :class:`~pipelines.schema.PairRecord` a pair document (as
    :func:`~pipelines.schema.pair_to_json` writes it) describes, its images' paths taken from
    ``images`` (image key -> info), so the sharder's checks (:mod:`pipelines.checks`) apply to a
    shard as they did to the raw data. Raises ``ValueError``, ``KeyError`` or ``TypeError`` for a
    document of another shape; the values themselves are left to the checks."""
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema_version {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    text = {
        name: _typed(doc[name], str, name) for name in ("key", "dataset", "split", "category", "threshold", "origin")
    }
    if text["threshold"] not in THRESHOLD_KINDS:
        raise ValueError(f"threshold {text['threshold']!r} is none of {THRESHOLD_KINDS}")
    refs, kps, boxes = [], [], []
    for side in ("src", "trg"):
        part = _typed(doc[side], dict, side)
        image = _typed(part["image"], str, f"{side}.image")
        if image not in images:
            raise ValueError(f"needs image {image!r}, which the shard lacks")
        size = _numbers(part["size"], f"{side}.size", "i")
        if size.shape != (2,):
            raise ValueError(f"{side}.size {part['size']} is not [width, height]")
        points = _numbers(part["kps"], f"{side}.kps", "if")
        if points.size and (points.ndim != 2 or points.shape[1] != 2):
            raise ValueError(f"{side}.kps has shape {points.shape}, not (N, 2)")
        refs.append(ImageRef(image, images[image].path, (int(size[0]), int(size[1]))))
        kps.append(points.reshape(-1, 2))
        boxes.append(_numbers(part["bbox"], f"{side}.bbox", "if"))
    extras = _typed(doc["extras"], dict, "extras")  # their types are check_pair's to judge
    return PairRecord(
        key=text["key"], dataset=text["dataset"], split=text["split"], category=text["category"],
        group=text["category"], threshold=text["threshold"], src=refs[0], trg=refs[1],  # type: ignore[arg-type]
        src_kps=kps[0], trg_kps=kps[1], kps_ids=_numbers(doc["kps_ids"], "kps_ids", "i"),
        src_bbox=boxes[0], trg_bbox=boxes[1], origin=text["origin"], extras=dict(extras),
    )  # fmt: skip


def _typed(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"{name} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _numbers(value: Any, name: str, kinds: str) -> np.ndarray:
    """A JSON list of numbers as float64 (``kinds`` holding ``f``) or int64; numpy kinds ``i``
    (int64-sized integers) and ``f`` (floats); booleans, strings and nested lists of uneven length
    are refused."""
    array = np.asarray(_typed(value, list, name))
    if array.size and array.dtype.kind not in kinds:
        raise TypeError(f"{name} holds {array.dtype} values, not {'numbers' if 'f' in kinds else 'integers'}")
    return array.astype(np.float64 if "f" in kinds else np.int64)


def shuffle_pairs(samples: Iterable[PairSample], buffer_size: int, seed: int) -> Iterator[PairSample]:
    """Shuffle within a buffer of ``buffer_size`` samples, with a different stream per rank and
    DataLoader worker (seeded from ``seed`` and their ids, so runs are reproducible)."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
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
