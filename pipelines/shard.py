"""Shard a benchmark into image-once WebDataset tar files, with an index and a rejects list.

    python -m pipelines.shard spair --root /data/SPair-71k --out s3://bucket/spair --workers 8

For each split the pairs a reader yields are validated, grouped by their ``group`` (category,
species or family), and chunked so a shard stays under ``--max-shard-bytes``. A shard is complete
in itself: it holds every image its pairs use, each stored once with its original bytes, first
(``<image_key>.jpg|png`` + ``<image_key>.json``), then the pairs (``<pair_key>.pair.json``).

Output, under ``--out``:
    <split>-000000.tar ...   the shards
    index.parquet            one row per written pair (key, split, shard, image keys, flags, ...,
                             and the sha256 of its document and images, which the reader verifies)
    rejects.jsonl            one row per input that could not be taken, with file and reason
    summary.json             counts per split; input pairs = written + rejected, always
    _manifests/              per-shard records that make a re-run resume where a run stopped

Shards appear under their final names only when complete, and the index is written last. A
re-run skips every shard whose manifest matches the current plan, so an interrupted job finishes
without duplicating or losing pairs; the output does not depend on ``--workers``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

from pipelines import checks
from pipelines.imageio import MAX_IMAGE_BYTES, probe_image
from pipelines.schema import (
    DIGEST_FIELDS,
    EXTRA_FIELDS,
    ImageInfo,
    PairRecord,
    Reject,
    RejectError,
    image_digest,
    pair_digest,
    pair_to_json,
)
from pipelines.sources import SOURCE_NAMES, get_source
from pipelines.storage import Location, StorageError

log = logging.getLogger("pipelines.shard")

DEFAULT_MAX_SHARD_BYTES = 128 * 2**20
MANIFEST_DIR = "_manifests"
TAR_BLOCK = 512
SHARD_FORMAT_VERSION = 2
"""Enters every shard's fingerprint, so a re-run rewrites the shards (and manifests) an earlier
format wrote. 2: the manifests' index rows record digests (:data:`pipelines.schema.DIGEST_FIELDS`)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _tar_entry_bytes(payload: int) -> int:
    """Bytes a tar entry of ``payload`` bytes takes: one header block plus padded data."""
    return TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK


@dataclass
class ShardPlan:
    """One shard to write: its pairs (sorted) and a fingerprint of everything that decides its bytes."""

    split: str
    name: str
    pairs: list[PairRecord]
    fingerprint: str = ""


@dataclass
class PlannedSplit:
    """One split read, checked and planned: its input pair count, the shards to write and the
    rejects found before any image is opened."""

    split: str
    input_pairs: int
    shards: list[ShardPlan]
    rejects: list[Reject] = field(default_factory=list)


def read_split(source_name: str, root: Location, split: str) -> tuple[list[PairRecord], list[Reject], int]:
    """All items a reader yields for ``split``, with duplicates and image-free checks applied.
    Returns ``(valid pairs, rejects, input pair count)``."""
    source = get_source(source_name)
    pairs, rejects = [], []
    first_seen: dict[str, str] = {}
    input_pairs = 0
    for item in tqdm(source.read_pairs(root, split), desc=f"{split}: annotations", unit=" pairs", leave=False):
        if isinstance(item, Reject):
            input_pairs += item.kind == "pair"
            rejects.append(item)
            continue
        input_pairs += 1
        if item.key in first_seen:
            rejects.append(Reject(item.key, item.origin, checks.DUPLICATE_PAIR, f"same pair as {first_seen[item.key]}"))
            continue
        first_seen[item.key] = item.origin
        problems = checks.check_pair(item)
        if problems:
            rejects.extend(problems[:1])
            continue
        pairs.append(checks.normalised(item))
    return pairs, rejects, input_pairs


def plan_split(
    split: str, pairs: list[PairRecord], image_bytes: dict[str, int], max_shard_bytes: int
) -> list[ShardPlan]:
    """Group pairs by ``group`` and chunk each group greedily, in a fixed order, so that a shard's
    estimated tar size (distinct images + pair entries) stays under ``max_shard_bytes``. A single
    pair larger than the bound gets a shard of its own."""
    by_group: dict[str, list[PairRecord]] = defaultdict(list)
    for pair in pairs:
        by_group[pair.group].append(pair)
    # The pair document without image sizes: its length sizes the pair's tar entry, its bytes
    # enter the fingerprint.
    documents = {pair.key: json.dumps(pair_to_json(pair, (0, 0), (0, 0))).encode() for pair in pairs}
    shards: list[ShardPlan] = []
    for group in sorted(by_group):
        current: list[PairRecord] = []
        images: set[str] = set()
        size = 0
        for pair in _locality_order(by_group[group]):
            cost = _planned_bytes(pair, len(documents[pair.key]), images, image_bytes)
            if current and size + cost > max_shard_bytes:
                shards.append(ShardPlan(split, shard_name(split, len(shards)), current))
                current, images, size = [], set(), 0
                cost = _planned_bytes(pair, len(documents[pair.key]), images, image_bytes)
            current.append(pair)
            images |= {pair.src.path, pair.trg.path}
            size += cost
        if current:
            shards.append(ShardPlan(split, shard_name(split, len(shards)), current))
    for shard in shards:
        shard.fingerprint = _fingerprint(shard, documents, image_bytes)
    return shards


def _locality_order(pairs: list[PairRecord]) -> list[PairRecord]:
    """Order pairs so the set of images they need grows as slowly as possible: rank images by
    key, then take every pair among images ``0..k`` before any pair that needs image ``k + 1``.
    When a group must be split across shards, each shard then holds few images and many of the
    pairs among them, which keeps images stored more than once to a minimum."""
    rank = {key: i for i, key in enumerate(sorted({p.src.key for p in pairs} | {p.trg.key for p in pairs}))}

    def order(pair: PairRecord) -> tuple:
        ranks = sorted((rank[pair.src.key], rank[pair.trg.key]))
        return ranks[1], ranks[0], pair.key

    return sorted(pairs, key=order)


def _planned_bytes(pair: PairRecord, document_bytes: int, shard_images: set[str], image_bytes: dict[str, int]) -> int:
    """Tar bytes ``pair`` adds to a shard already holding ``shard_images``: its pair entry, plus an
    image entry and an image-info entry for each image the shard does not hold yet."""
    cost = _tar_entry_bytes(document_bytes)
    for path in {pair.src.path, pair.trg.path} - shard_images:
        cost += _tar_entry_bytes(image_bytes[path]) + _tar_entry_bytes(TAR_BLOCK)
    return cost


def _fingerprint(shard: ShardPlan, documents: dict[str, bytes], image_bytes: dict[str, int]) -> str:
    """A digest of everything that decides the shard's bytes: pairs, image paths and sizes."""
    digest = hashlib.sha256(f"v{SHARD_FORMAT_VERSION}:{shard.name}".encode())
    for pair in shard.pairs:
        digest.update(documents[pair.key])
        digest.update(json.dumps([pair.src.path, image_bytes[pair.src.path], pair.trg.path, image_bytes[pair.trg.path]]).encode())
    return digest.hexdigest()


def prepare_split(
    source_name: str, root: Location, split: str, max_shard_bytes: int
) -> PlannedSplit:
    """Read, validate and plan one split. Pairs whose images do not exist are rejected here."""
    pairs, rejects, input_pairs = read_split(source_name, root, split)
    image_bytes: dict[str, int] = {}
    for directory in sorted({os.path.dirname(p.src.path) for p in pairs} | {os.path.dirname(p.trg.path) for p in pairs}):
        image_bytes.update(root.list_files(directory))
    present = []
    for pair in pairs:
        problem = next(filter(None, (_listed_image_problem(root, image_bytes, pair, ref.path) for ref in (pair.src, pair.trg))), None)
        if problem:
            rejects.append(problem)
        else:
            present.append(pair)
    return PlannedSplit(split, input_pairs, plan_split(split, present, image_bytes, max_shard_bytes), rejects)


def _listed_image_problem(root: Location, image_bytes: dict[str, int], pair: PairRecord, path: str) -> Reject | None:
    """Why the image ``path`` cannot be read, judged from the listing ``image_bytes`` (regular
    files only) before any byte is read; None when it can."""
    if path not in image_bytes:
        if root.exists(path):  # a directory, FIFO or device named like the image
            return Reject(pair.key, path, checks.UNREADABLE_IMAGE, f"{root.full(path)} is not a regular file")
        return Reject(pair.key, path, checks.MISSING_IMAGE, f"{root.full(path)} does not exist")
    if image_bytes[path] > MAX_IMAGE_BYTES:
        return Reject(pair.key, path, checks.IMAGE_TOO_LARGE, f"{root.full(path)}: {image_bytes[path]} bytes, more than {MAX_IMAGE_BYTES}")
    return None


@dataclass(frozen=True)
class ShardJob:
    root: Location
    out: Location
    plan: ShardPlan
    full_decode: bool
    scratch: str
    """Where the shard is written before it is moved to ``out`` (:meth:`Location.scratch_dir`)."""


def write_shard(job: ShardJob) -> dict:
    """Write one shard and then its manifest; return the manifest. Images that cannot be used
    reject the pairs that need them; a shard whose pairs were all rejected is still written
    (empty) so shard numbering has no gaps."""
    plan, root, out = job.plan, job.root, job.out
    image_data: dict[str, bytes] = {}
    image_meta: dict[str, dict] = {}
    image_errors: dict[str, RejectError] = {}
    for pair in plan.pairs:
        for ref in (pair.src, pair.trg):
            if ref.path in image_data or ref.path in image_errors:
                continue
            try:
                data = root.read_bytes(ref.path)
                probe = probe_image(data, job.full_decode)
            except RejectError as error:
                image_errors[ref.path] = error
                continue
            except OSError as error:
                image_errors[ref.path] = RejectError(checks.UNREADABLE_IMAGE, f"cannot read ({error})")
                continue
            image_data[ref.path] = data
            image_meta[ref.path] = {"key": ref.key, "ext": probe.ext, "size": probe.size}
    _check_unique_keys(plan, image_meta)

    rows, rejects, written = [], [], []
    for pair in plan.pairs:
        bad = next((ref for ref in (pair.src, pair.trg) if ref.path in image_errors), None)
        if bad is not None:
            error = image_errors[bad.path]
            rejects.append(Reject(pair.key, bad.path, error.reason, f"{root.full(bad.path)}: {error}"))
            continue
        src_size, trg_size = image_meta[pair.src.path]["size"], image_meta[pair.trg.path]["size"]
        problems = checks.check_against_images(pair, src_size, trg_size)
        if problems:
            rejects.append(problems[0])
            continue
        written.append((pair, json.dumps(pair_to_json(pair, src_size, trg_size)).encode()))

    used_images: dict[str, None] = {}
    for pair, _ in written:
        used_images.setdefault(pair.src.path)
        used_images.setdefault(pair.trg.path)
    stored = selfcontained = 0
    digests: dict[str, str] = {}  # image path -> image_digest of its two members
    handle, partial = tempfile.mkstemp(dir=job.scratch, prefix=f".{plan.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as tmp, tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in used_images:
                meta = image_meta[path]
                info = ImageInfo(meta["key"], *meta["size"], meta["ext"], path)
                info_bytes = json.dumps(info.to_json()).encode()
                _add_entry(tar, f"{meta['key']}.{meta['ext']}", image_data[path])
                _add_entry(tar, f"{meta['key']}.json", info_bytes)
                stored += len(image_data[path]) + len(info_bytes)
                digests[path] = image_digest(image_data[path], info_bytes)
            for pair, doc_bytes in written:
                _add_entry(tar, f"{pair.key}.pair.json", doc_bytes)
                stored += len(doc_bytes)
                selfcontained += len(image_data[pair.src.path]) + len(image_data[pair.trg.path]) + len(doc_bytes)
                member_digests = (pair_digest(doc_bytes, pair.key), digests[pair.src.path], digests[pair.trg.path])
                rows.append(_index_row(pair, plan.name, member_digests))
        tar_bytes = os.path.getsize(partial)
        out.put_file(plan.name, partial)
    finally:
        with contextlib.suppress(FileNotFoundError):  # put_file consumed it, unless something failed
            os.remove(partial)
    manifest = {
        "fingerprint": plan.fingerprint,
        "shard": plan.name,
        "split": plan.split,
        "rows": rows,
        "rejects": [r.to_json() for r in rejects],
        "images": len(used_images),
        "payload_bytes": stored,
        "selfcontained_bytes": selfcontained,
        "tar_bytes": tar_bytes,
    }
    out.put_bytes(_manifest_path(plan), json.dumps(manifest).encode())
    return manifest


def _add_entry(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with fixed metadata, so equal inputs give byte-identical shards."""
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o444
    member.uname = member.gname = "bigdata"
    tar.addfile(member, io.BytesIO(data))


def _check_unique_keys(plan: ShardPlan, image_meta: dict[str, dict]) -> None:
    """Entries sharing a key would merge into one WebDataset sample: a reader bug, never data."""
    owners: dict[str, str] = {}
    for path, meta in image_meta.items():
        if owners.setdefault(meta["key"], path) != path:
            raise ValueError(f"{plan.name}: image key {meta['key']!r} names both {owners[meta['key']]} and {path}")
    for pair in plan.pairs:
        if pair.key in owners:
            raise ValueError(f"{plan.name}: pair key {pair.key!r} is also an image key")


def _index_row(pair: PairRecord, shard: str, digests: tuple[str, str, str]) -> dict:
    """The pair's ``index.parquet`` row; ``digests``: its document's and its two images' sha256
    (:data:`pipelines.schema.DIGEST_FIELDS`, in that order)."""
    row = {
        "key": pair.key,
        "split": pair.split,
        "shard": shard,
        "dataset": pair.dataset,
        "category": pair.category,
        "group": pair.group,
        "threshold": pair.threshold,
        "src_image": pair.src.key,
        "trg_image": pair.trg.key,
        "num_keypoints": len(pair.kps_ids),
        "origin": pair.origin,
        **dict(zip(DIGEST_FIELDS, digests)),
    }
    clash = row.keys() & pair.extras.keys()
    if clash:
        raise ValueError(f"{pair.origin}: extra fields {sorted(clash)} clash with index columns")
    row.update(pair.extras)
    return row


INDEX_COLUMNS: dict[str, type] = {
    "key": str, "split": str, "shard": str, "dataset": str, "category": str, "group": str, "threshold": str,
    "src_image": str, "trg_image": str, "num_keypoints": int, "origin": str,
    "pair_sha256": str, "src_image_sha256": str, "trg_image_sha256": str,
}  # fmt: skip
"""The index columns every pair has (:func:`_index_row`), before its dataset's extras."""


def index_table(rows: list[dict]):
    """The ``index.parquet`` table of ``rows``, its column types fixed by declaration, never
    inferred from the data: :data:`INDEX_COLUMNS`, then each extra field of
    :data:`pipelines.schema.EXTRA_FIELDS` some row holds (a row lacking it gets null).
    :class:`RuntimeError` when a row does not fit (only manifests written by an earlier version of
    this module can hold such rows)."""
    import pyarrow as pa  # here, not at the top: spawned shard writers never need it

    arrow_types = {int: pa.int64(), float: pa.float64(), str: pa.string()}
    if not rows:
        return pa.table({"key": pa.array([], pa.string())})
    present = {name for row in rows for name in row}
    columns = dict(INDEX_COLUMNS)
    for dataset in sorted({row["dataset"] for row in rows}):
        columns.update({name: spec.kind for name, spec in EXTRA_FIELDS.get(dataset, {}).items() if name in present})
    try:
        if present - columns.keys():
            raise ValueError(f"undeclared columns {sorted(present - columns.keys())}")
        return pa.Table.from_pylist(rows, schema=pa.schema([(name, arrow_types[kind]) for name, kind in columns.items()]))
    except (ValueError, TypeError, OverflowError) as error:  # pyarrow's errors derive from these
        raise RuntimeError(
            f"index rows do not fit their declared types ({error}); the manifests under {MANIFEST_DIR}/ were "
            f"written by an earlier version: remove {MANIFEST_DIR}/ and shard again"
        ) from error


def _manifest_path(plan: ShardPlan) -> str:
    return f"{MANIFEST_DIR}/{plan.split}/{plan.name}.json"


def _finished_shards(out: Location, split_plan: PlannedSplit, existing: dict[str, int]) -> set[str]:
    """Shards of the plan already written completely by an earlier run with the same plan;
    ``existing`` is the listing of ``out``."""
    finished = set()
    for shard in split_plan.shards:
        manifest_path = _manifest_path(shard)
        written = shard.name in existing and manifest_path in existing
        if written and json.loads(out.read_text(manifest_path)).get("fingerprint") == shard.fingerprint:
            finished.add(shard.name)
    return finished


def _clean_stale(out: Location, split_plan: PlannedSplit, existing: dict[str, int]) -> None:
    """Remove partial files of an interrupted local run, and shards of this split that an
    earlier, different plan numbered beyond the current one; ``existing`` is the listing of ``out``."""
    planned = {shard.name for shard in split_plan.shards}
    pattern = re.compile(rf"^{re.escape(split_plan.split)}-\d{{6}}\.tar$")
    for path in existing:
        name = path.rsplit("/", 1)[-1]
        # Only this split's leftovers: other splits' shards may be being written right now.
        partial = name.startswith((f".{split_plan.split}-", f".{split_plan.split}.json.")) and name.endswith((".partial", ".tmp"))
        if not out.remote and partial:
            out.remove(path)
        elif "/" not in path and pattern.match(name) and name not in planned:
            log.warning("removing %s: not part of the current plan for split %s", out.full(path), split_plan.split)
            out.remove(path)
            out.remove(f"{MANIFEST_DIR}/{split_plan.split}/{name}.json")


class ShardError(RuntimeError):
    """A shard that could not be written; the message names it and the cause. The run stops at
    the first one (fail fast) and keeps the shards already complete, so a re-run resumes."""


StartedJob = tuple[ShardJob, "concurrent.futures.Future[dict] | None"]
"""A shard job and its future in the pool; ``None``: it waits to be written in this process."""


def start_jobs(jobs: list[ShardJob], pool: concurrent.futures.Executor | None) -> list[StartedJob]:
    """Start shard jobs in ``pool``; without one, each is written by :func:`finished_jobs`."""
    return [(job, pool.submit(write_shard, job) if pool else None) for job in jobs]


def finished_jobs(started: list[StartedJob]) -> Iterator[tuple[ShardJob, dict]]:
    """``(job, manifest)`` for each started job as it finishes: those without a future written
    here one by one, those in the pool in completion order. The first job that fails raises
    :class:`ShardError` naming its shard; leaving :func:`worker_pool` then cancels every job not
    yet running."""
    in_pool = {future: job for job, future in started if future is not None}
    for job, future in started:
        if future is None:
            yield job, _shard_outcome(job, functools.partial(write_shard, job))
    for future in concurrent.futures.as_completed(in_pool):
        yield in_pool[future], _shard_outcome(in_pool[future], future.result)


def _shard_outcome(job: ShardJob, result: Callable[[], dict]) -> dict:
    try:
        return result()
    except Exception as error:  # whatever stopped one shard stops the run, named
        raise ShardError(
            f"shard {job.plan.name} not written: {error} (the shards complete so far are kept: run again to resume)"
        ) from error


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[concurrent.futures.Executor | None]:
    """``workers`` processes for the whole job (none for 1). They are spawned: forking a process
    that holds boto3 clients or threads is unsafe, and a forkserver would keep the environment
    (credentials, endpoints) of its first use. Each ends when this process dies, even by SIGKILL
    (:func:`_end_with_parent`). Leaving the block, after a failure too, cancels the jobs not yet
    running and waits for those running."""
    if workers <= 1:
        yield None
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_end_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _end_with_parent(parent: int) -> None:
    """Pool worker initializer: the worker is killed when ``parent`` (the process that started
    it) dies, instead of waiting forever for work; on Linux by the kernel (``PR_SET_PDEATHSIG``,
    which fires when the thread that started the worker ends: the one that submitted jobs, which
    outlives the pool), elsewhere by a thread polling the parent's pid."""
    if not (sys.platform.startswith("linux") and _kill_on_parent_death()):
        threading.Thread(target=_poll_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before this worker could ask
        os._exit(1)


def _kill_on_parent_death() -> bool:
    import ctypes

    pr_set_pdeathsig = 1
    return ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) == 0


def _poll_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


@dataclass
class StartedSplit:
    plan: PlannedSplit
    jobs: list[StartedJob]


def start_split(
    source_name: str,
    root: Location,
    out: Location,
    split: str,
    max_shard_bytes: int,
    pool: concurrent.futures.Executor | None,
    full_decode: bool,
    scratch: str,
) -> StartedSplit:
    """Read and plan one split, and start writing (in ``scratch`` first) the shards an earlier
    run did not finish."""
    split_plan = prepare_split(source_name, root, split, max_shard_bytes)
    # One listing serves both: cleaning removes only files that are not planned shards.
    existing = out.list_files("")
    _clean_stale(out, split_plan, existing)
    finished = _finished_shards(out, split_plan, existing)
    if finished:
        log.info("%s: %d of %d shards already complete, resuming", split, len(finished), len(split_plan.shards))
    jobs = [ShardJob(root, out, plan, full_decode, scratch) for plan in split_plan.shards if plan.name not in finished]
    return StartedSplit(split_plan, start_jobs(jobs, pool))


def record_split(out: Location, source_name: str, split_plan: PlannedSplit) -> None:
    """Mark a split complete (all its shards written) in ``_manifests/<split>.json``."""
    record = {
        "split": split_plan.split,
        "dataset": source_name,
        "input_pairs": split_plan.input_pairs,
        "shards": [shard.name for shard in split_plan.shards],
        "rejects": [{"split": split_plan.split, **r.to_json()} for r in split_plan.rejects],
    }
    out.put_bytes(f"{MANIFEST_DIR}/{split_plan.split}.json", json.dumps(record).encode())


def finalize(out: Location) -> dict:
    """Build ``index.parquet``, ``rejects.jsonl`` and ``summary.json`` from the manifests of every
    completed split in ``out`` (so splits sharded by separate runs share one index). Written last."""
    import pyarrow.parquet as pq  # here, not at the top: spawned shard writers never need it

    listing = out.list_files(MANIFEST_DIR)
    split_records = [json.loads(out.read_text(p)) for p in listing if p.count("/") == 1 and p.endswith(".json")]
    rows, reject_rows, summary = [], [], {}
    listed_images: set[tuple[str, str]] = set()
    for record in sorted(split_records, key=lambda r: r["split"]):
        split = record["split"]
        manifests = [json.loads(out.read_text(f"{MANIFEST_DIR}/{split}/{name}.json")) for name in record["shards"]]
        split_rows = [row for m in manifests for row in m["rows"]]
        shard_rejects = [{"split": split, **r} for m in manifests for r in m["rejects"]]
        # An image a benchmark protocol leaves out is reported once, under the first split listing it.
        split_rejects = [r for r in record["rejects"] + shard_rejects if _first_listing(r, listed_images)]
        pair_rejects = [r for r in split_rejects if r["kind"] == "pair"]
        if record["input_pairs"] != len(split_rows) + len(pair_rejects):
            raise RuntimeError(
                f"{split}: {record['input_pairs']} input pairs but {len(split_rows)} written + {len(pair_rejects)} rejected"
            )
        stored = sum(m["payload_bytes"] for m in manifests)
        selfcontained = sum(m["selfcontained_bytes"] for m in manifests)
        summary[split] = {
            "dataset": record["dataset"],
            "input_pairs": record["input_pairs"],
            "written_pairs": len(split_rows),
            "rejected_pairs": len(pair_rejects),
            "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in pair_rejects).items())),
            "images_left_out_by_reason": dict(
                sorted(Counter(r["reason"] for r in split_rejects if r["kind"] == "image").items())
            ),
            "shards": len(manifests),
            "images_stored": sum(m["images"] for m in manifests),
            "tar_bytes": sum(m["tar_bytes"] for m in manifests),
            "payload_bytes_stored": stored,
            "payload_bytes_selfcontained": selfcontained,
            "stored_over_selfcontained": round(stored / selfcontained, 4) if selfcontained else None,
        }
        rows.extend(split_rows)
        reject_rows.extend(split_rejects)
    sink = io.BytesIO()
    pq.write_table(index_table(rows), sink)
    out.put_bytes("rejects.jsonl", "".join(json.dumps(r) + "\n" for r in reject_rows).encode())
    out.put_bytes("summary.json", json.dumps(summary, indent=2).encode())
    out.put_bytes("index.parquet", sink.getvalue())
    return summary


def _first_listing(reject: dict, listed_images: set[tuple[str, str]]) -> bool:
    if reject["kind"] != "image":
        return True
    key = (reject["item"], reject["reason"])
    if key in listed_images:
        return False
    listed_images.add(key)
    return True


def shard_dataset(
    source_name: str,
    root: Location,
    out: Location,
    splits: list[str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    workers: int = 1,
    full_decode: bool = False,
) -> dict:
    """Shard ``splits`` (default: all of the source's) of ``root`` into ``out``; return the summary.
    The first shard that cannot be written stops the run with :class:`ShardError`; no scratch file
    is left behind on any exit."""
    source = get_source(source_name)
    splits = splits or list(source.splits)
    unknown = [split for split in splits if split not in source.splits]
    if unknown:
        raise ValueError(f"{source_name} has no split {unknown[0]!r}; choose from {', '.join(source.splits)}")
    # The pool ends (its workers idle) before the scratch directory is removed.
    with out.scratch_dir() as scratch, worker_pool(workers) as pool:
        # Each split's shards are written while the next split's annotations are read.
        started = [
            start_split(source_name, root, out, split, max_shard_bytes, pool, full_decode, scratch) for split in splits
        ]
        jobs = [job for split in started for job in split.jobs]
        with tqdm(total=sum(len(job.plan.pairs) for job, _ in jobs), desc="shards", unit=" pairs") as progress:
            for _, manifest in finished_jobs(jobs):
                progress.update(len(manifest["rows"]) + len(manifest["rejects"]))
    for split in started:
        record_split(out, source_name, split.plan)
    return finalize(out)


_BYTE_UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_bytes(text: str) -> int:
    """``"268435456"``, ``"256MiB"``, ``"200MB"`` -> bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?b)?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 268435456, 256MiB or 200MB")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2) or ""])


def _parse_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.shard",
        description=__doc__.split("\n\n")[0],
        epilog="Datasets: "
        + "; ".join(f"{name}: {get_source(name).summary.rstrip('.').replace('``', '')}" for name in SOURCE_NAMES)
        + ". See pipelines/README.md for each dataset's expected layout.",
    )
    parser.add_argument("dataset", choices=SOURCE_NAMES, help="which benchmark layout --root holds")
    parser.add_argument("--root", required=True, help="dataset root: a local directory or s3://bucket/prefix")
    parser.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    parser.add_argument(
        "--split", action="append", help="split to shard (repeatable; default: every split of the dataset)"
    )
    parser.add_argument(
        "--max-shard-bytes",
        type=_parse_bytes,
        default=DEFAULT_MAX_SHARD_BYTES,
        help=f"size bound per shard, e.g. 256MiB (default {DEFAULT_MAX_SHARD_BYTES // 2**20}MiB)",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel shard-writing processes (default 1)")
    parser.add_argument(
        "--s3-endpoint-url",
        default=os.environ.get("AWS_ENDPOINT_URL"),
        help="endpoint of an S3-compatible store (default: $AWS_ENDPOINT_URL, else AWS)",
    )
    parser.add_argument(
        "--s3-connect-timeout",
        type=_parse_seconds,
        metavar="SECONDS",
        help="seconds to wait for an S3 connection (default: $SM_S3_CONNECT_TIMEOUT, else 10)",
    )
    parser.add_argument(
        "--s3-read-timeout",
        type=_parse_seconds,
        metavar="SECONDS",
        help="seconds to wait for an S3 answer (default: $SM_S3_READ_TIMEOUT, else 60)",
    )
    parser.add_argument(
        "--full-decode", action="store_true", help="decode every image fully while validating (default: header and end marker)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def format_summary(summary: dict) -> str:
    lines = []
    for split, s in summary.items():
        ratio = s["stored_over_selfcontained"]
        lines.append(
            f"{split}: {s['input_pairs']} input pairs = {s['written_pairs']} written + {s['rejected_pairs']} rejected"
            f" | {s['shards']} shards, {s['images_stored']} images, {s['tar_bytes'] / 1e6:.1f} MB"
            f" | stored/self-contained bytes = {ratio}"
        )
        for reason, count in s["rejects_by_reason"].items():
            lines.append(f"    {reason}: {count}")
        for reason, count in s["images_left_out_by_reason"].items():
            lines.append(f"    images left out before pairing, {reason}: {count}")
    return "\n".join(lines)


def _one_line(error: Exception) -> str:
    """An error as one line naming its path: ``/data/out: Read-only file system``, not
    ``[Errno 30] Read-only file system: '/data/out'``."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        return f"{paths}: {error.strerror}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Through the environment, so spawned shard writers use the same S3 timeouts.
    timeouts = {"SM_S3_CONNECT_TIMEOUT": args.s3_connect_timeout, "SM_S3_READ_TIMEOUT": args.s3_read_timeout}
    for name, value in timeouts.items():
        if value is not None:
            os.environ[name] = repr(value)
    try:
        root = Location(args.root, args.s3_endpoint_url)
        out = Location(args.out, args.s3_endpoint_url)
        summary = shard_dataset(args.dataset, root, out, args.split, args.max_shard_bytes, args.workers, args.full_decode)
    except (OSError, ValueError, StorageError, ShardError) as error:
        log.error("%s", _one_line(error))
        return 2
    print(format_summary(summary))
    print(f"index: {out.full('index.parquet')}  rejects: {out.full('rejects.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
