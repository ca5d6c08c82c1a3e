"""Local directories and ``s3://bucket/prefix`` URLs behind one small interface.

A :class:`Location` is a root; every method takes a path relative to it with ``/`` separators,
confined to it (:func:`confine`: an absolute path or one climbing out with ``..`` raises
:class:`PathOutsideRoot`), and local reads open regular files only (never a FIFO or device).
Writes are atomic: a local file appears under its final name only when complete (write to a
temporary name, then rename), and an S3 object only when its (multipart) upload completes.
S3 goes through boto3; the endpoint comes from ``endpoint_url`` or the ``AWS_ENDPOINT_URL``
environment variable (:func:`resolve_endpoint`), so S3-compatible stores (MinIO, Ceph, moto) work as
well as AWS. This module is the one place that turns an S3 URL and endpoint into a client
(:func:`s3_client`) or a pyarrow filesystem (:func:`arrow_filesystem`, for Ray's storage), and
the one place that turns what boto3 raises into a one-line error naming the resource
(:func:`s3_errors`: :class:`FileNotFoundError` for a missing object, else :class:`StorageError`).
Both kinds of client wait at most :func:`s3_timeouts` (``SM_S3_CONNECT_TIMEOUT``,
``SM_S3_READ_TIMEOUT``, ``SM_S3_MAX_ATTEMPTS``), so a stalled endpoint is an error within minutes.
Files written locally get the permissions ``open()`` gives a new file (``0o666`` less the umask).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow.fs


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{url}: an S3 URL needs a bucket name (s3://bucket/prefix)")
    return bucket, key.strip("/")


def resolve_endpoint(endpoint_url: str | None) -> str | None:
    """The S3 endpoint to use: ``endpoint_url`` when given, else ``AWS_ENDPOINT_URL``, else AWS (``None``)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


S3_TIMEOUT_SETTINGS = {
    "SM_S3_CONNECT_TIMEOUT": 10.0,
    "SM_S3_READ_TIMEOUT": 60.0,
    "SM_S3_MAX_ATTEMPTS": 3,
}
"""Environment variables bounding every S3 request, with their defaults: seconds to open a
connection, seconds to wait for any bytes of an answer, and attempts per request (the first one
included; botocore's standard retry mode, with backoff). A stalled endpoint is reported after at
most attempts x timeout (3 x 60 s by default)."""


@dataclass(frozen=True)
class S3Timeouts:
    connect: float
    read: float
    attempts: int


def s3_timeouts() -> S3Timeouts:
    """The S3 timeouts and attempts from the environment (:data:`S3_TIMEOUT_SETTINGS`);
    :class:`ValueError` naming the variable when one is not a positive number."""
    values = {}
    for name, default in S3_TIMEOUT_SETTINGS.items():
        text = os.environ.get(name, "").strip()
        if not text:
            values[name] = default
            continue
        try:
            value = int(text) if isinstance(default, int) else float(text)
        except ValueError:
            value = None
        if value is None or not (0 < value < float("inf")):
            kind = "a whole number of attempts, at least 1" if isinstance(default, int) else "a number of seconds > 0"
            raise ValueError(f"{name}={text!r} is not {kind} (default {default})")
        values[name] = value
    return S3Timeouts(values["SM_S3_CONNECT_TIMEOUT"], values["SM_S3_READ_TIMEOUT"], values["SM_S3_MAX_ATTEMPTS"])


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client for ``endpoint_url`` (see :func:`resolve_endpoint`), one per process,
    endpoint and :func:`s3_timeouts` setting."""
    return _s3_client(resolve_endpoint(endpoint_url), s3_timeouts())


def arrow_filesystem(url: str, endpoint_url: str | None = None) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(path, filesystem)`` for pyarrow and Ray storage arguments. A local path or an ``s3://``
    URL on AWS needs no filesystem (``None``: Ray infers it from the URL); an S3-compatible endpoint
    needs an explicit pyarrow filesystem, and then the path loses its ``s3://``. The filesystem
    uses the :func:`s3_timeouts` (on Linux the read timeout bounds a stall: less than a byte a
    second for that long). A pickled filesystem (as Ray ships it) keeps the timeouts but falls
    back to pyarrow's default of 3 attempts."""
    endpoint_url = resolve_endpoint(endpoint_url)
    if not is_s3(url) or endpoint_url is None:
        return url, None
    import pyarrow.fs

    endpoint = urlparse(endpoint_url)
    timeouts = s3_timeouts()
    # Explicit keys travel with the pickled filesystem to Ray's controller and workers.
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint.netloc or endpoint.path,
        scheme=endpoint.scheme or "https",
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        connect_timeout=timeouts.connect,
        request_timeout=timeouts.read,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=timeouts.attempts),
    )
    return url.removeprefix("s3://"), filesystem


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None, timeouts: S3Timeouts):
    """Processes started by spawn or forkserver build their own client. Checksums only when required, since many S3-compatible
    stores reject the CRC headers boto3 sends by default."""
    # Imported here: boto3 costs a fifth of a second to import, paid by every spawned worker
    # process, while most runs never touch S3.
    import boto3
    import botocore.config

    config = botocore.config.Config(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=timeouts.connect,
        read_timeout=timeouts.read,
        retries={"total_max_attempts": timeouts.attempts, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def _client_error() -> type[Exception]:
    from botocore.exceptions import ClientError

    return ClientError


class StorageError(Exception):
    """An S3 request that failed for another reason than a missing object (that is a
    :class:`FileNotFoundError`): no such bucket, credentials missing or refused, an endpoint that
    cannot be reached or does not answer in time; or a local output directory that cannot be
    written (:meth:`Location.ensure_output_dir`). The message is one line naming the resource
    (and the endpoint). Not an :class:`OSError` on purpose: an ``OSError`` while reading one input
    makes that input a reject, while a store that cannot be used must stop the run (a re-run then
    resumes)."""


_NOT_FOUND_CODES = ("NoSuchKey", "404", "NotFound")
_REFUSED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403")


@contextlib.contextmanager
def s3_errors(url: str, endpoint_url: str | None) -> Iterator[None]:
    """Around S3 requests for ``url``: what boto3 raises becomes :class:`FileNotFoundError` (no
    such object) or :class:`StorageError`, naming ``url``, its bucket or the endpoint."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, S3UploadFailedError) as error:
        raise _storage_error(error, url, resolve_endpoint(endpoint_url) or "AWS") from error


def _storage_error(error: Exception, url: str, endpoint: str) -> Exception:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        ConnectTimeoutError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if not isinstance(error, ClientError) and isinstance(error.__context__, ClientError):
        error = error.__context__  # upload_file wraps the request's error in S3UploadFailedError
    elif isinstance(error, S3UploadFailedError) and isinstance(error.__context__, BotoCoreError):
        error = error.__context__
    if isinstance(error, (ConnectTimeoutError, ReadTimeoutError)):
        timeouts = s3_timeouts()
        connect = isinstance(error, ConnectTimeoutError)
        what, seconds, name = (
            ("connecting to", timeouts.connect, "SM_S3_CONNECT_TIMEOUT")
            if connect
            else ("waiting for an answer from", timeouts.read, "SM_S3_READ_TIMEOUT")
        )
        return StorageError(
            f"{url}: {what} the S3 endpoint {endpoint} timed out after {seconds:g} s ({name}),"
            f" {timeouts.attempts} attempt{'s' * (timeouts.attempts != 1)} (SM_S3_MAX_ATTEMPTS)"
        )
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        code, message = details.get("Code", ""), details.get("Message", "")
        if code in _NOT_FOUND_CODES:
            return FileNotFoundError(f"{url}: no such object")
        if code == "NoSuchBucket":
            return StorageError(f"{url}: bucket {split_s3_url(url)[0]!r} does not exist at {endpoint}")
        if code in _REFUSED_CODES:
            return StorageError(
                f"{url}: {endpoint} refused the request ({code}: {message}); check the credentials"
                " (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket's permissions"
            )
        return StorageError(f"{url}: {error.operation_name} failed at {endpoint} ({code}: {message})")
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"{url}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    if isinstance(error, ConnectionError):
        return StorageError(f"{url}: cannot reach the S3 endpoint {endpoint} ({error})")
    return StorageError(f"{url}: S3 request to {endpoint} failed ({error})")


SCRATCH_PREFIX = "pipelines-scratch-"
"""Scratch directories for S3 uploads are ``<temp dir>/pipelines-scratch-<pid>-<random>``."""


def _remove_dead_scratch(temp_dir: str) -> None:
    """Remove this user's scratch directories whose process no longer exists (a killed run)."""
    for entry in os.scandir(temp_dir):
        match = re.fullmatch(rf"{SCRATCH_PREFIX}(\d+)-\w+", entry.name)
        if not (match and entry.is_dir(follow_symlinks=False)):
            continue
        if entry.stat(follow_symlinks=False).st_uid == os.getuid() and not _process_exists(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


class PathOutsideRoot(ValueError):
    """A path given relative to a :class:`Location` that does not name something inside it: an
    absolute path, one whose ``..`` components climb above the root once normalised, or one holding
    a NUL byte. Raised before anything is read, written, listed or removed."""

    def __init__(self, root: str, path: str, why: str) -> None:
        super().__init__(f"{path!r} is outside {root}: {why}")
        self.root, self.path = root, path


class NotARegularFile(OSError):
    """A path that exists but is not a regular file (a FIFO, socket or device): never opened for
    reading, since reading a FIFO can block forever."""


class FileTooLarge(OSError):
    """A file larger than the ``max_bytes`` its reader allows."""


def confine(rel: str, root: str = "the root") -> str:
    """``rel`` normalised (``a/./b/../c`` -> ``a/c``; ``""`` and ``.`` -> ``""``, the root itself),
    or :class:`PathOutsideRoot` naming ``root`` when ``rel`` is absolute, climbs above the root
    with ``..`` or holds a NUL byte. Purely lexical: the same check for local paths and S3 keys, so
    it can also vet a path before any :class:`Location` is at hand."""
    if "\0" in rel:
        raise PathOutsideRoot(root, rel, "a path cannot hold a NUL byte")
    if rel.startswith("/"):
        raise PathOutsideRoot(root, rel, "the path is absolute, not relative to the root")
    normal = posixpath.normpath(rel) if rel else "."
    if normal == ".." or normal.startswith("../"):
        raise PathOutsideRoot(root, rel, "its '..' components climb above the root")
    return "" if normal == "." else normal


@dataclass(frozen=True)
class Location:
    """A root directory: a local path or ``s3://bucket/prefix``.

    Every path a method takes is confined to the root by :func:`confine`: an absolute path or one
    climbing above the root raises :class:`PathOutsideRoot`, so nothing outside the root is ever
    read, written, listed or removed through a Location (symbolic links a user placed inside a
    local root are followed, as that user's choice)."""

    url: str
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if is_s3(self.url):
            split_s3_url(self.url)
        else:
            object.__setattr__(self, "url", str(Path(self.url).expanduser().resolve()))

    @property
    def remote(self) -> bool:
        return is_s3(self.url)

    def full(self, rel: str) -> str:
        """The full path or URL of ``rel``."""
        rel = confine(rel, self.url)
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    def _s3_key(self, rel: str) -> tuple[str, str]:
        rel = confine(rel, self.url)
        bucket, prefix = split_s3_url(self.url)
        return bucket, f"{prefix}/{rel}" if prefix else rel

    def _local(self, rel: str) -> Path:
        return Path(self.url) / confine(rel, self.url)

    def _s3_errors(self, rel: str) -> contextlib.AbstractContextManager:
        return s3_errors(self.full(rel), self.endpoint_url)

    def read_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The bytes of ``rel``; :class:`FileNotFoundError` naming the full path if missing,
        :class:`FileTooLarge` (read no further) when it holds more than ``max_bytes``. A local
        ``rel`` must be a regular file (a symbolic link to one is followed): a directory raises
        :class:`IsADirectoryError`, anything else :class:`NotARegularFile`, unread."""
        if not self.remote:
            return _read_regular_file(self._local(rel), max_bytes)
        bucket, key = self._s3_key(rel)
        with self._s3_errors(rel):
            response = s3_client(self.endpoint_url).get_object(Bucket=bucket, Key=key)
            if max_bytes is not None and response["ContentLength"] > max_bytes:
                response["Body"].close()
                raise FileTooLarge(errno.EFBIG, f"{response['ContentLength']} bytes, more than the {max_bytes} allowed", self.full(rel))
            return response["Body"].read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return self._local(rel).exists()
        bucket, key = self._s3_key(rel)
        client = s3_client(self.endpoint_url)
        with self._s3_errors(rel):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except _client_error() as error:
                if error.response["Error"]["Code"] not in _NOT_FOUND_CODES:
                    raise
            # A "directory" exists on S3 when some object lies under it.
            listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        return listing.get("KeyCount", 0) > 0

    def list_files(self, rel_dir: str = "") -> dict[str, int]:
        """Every file below ``rel_dir`` (recursively) as ``{relative path: size in bytes}``,
        sorted by path. Missing directories give an empty listing. Locally only regular files
        count: dangling or looping symbolic links, FIFOs and devices are left out."""
        if not self.remote:
            base = self._local(rel_dir)
            if not base.is_dir():
                return {}
            root = Path(self.url)
            found = {}
            for dirpath, _, filenames in os.walk(base):
                for name in filenames:
                    path = Path(dirpath) / name
                    try:
                        info = path.stat()
                    except OSError:  # a dangling or looping symbolic link: no file to list
                        continue
                    if stat.S_ISREG(info.st_mode):  # FIFOs, sockets and devices are no files
                        found[path.relative_to(root).as_posix()] = info.st_size
            return dict(sorted(found.items()))
        bucket, key = self._s3_key(rel_dir)
        _, root_prefix = split_s3_url(self.url)
        prefix = key.rstrip("/") + "/" if key else ""
        strip = len(root_prefix) + 1 if root_prefix else 0
        found = {}
        paginator = s3_client(self.endpoint_url).get_paginator("list_objects_v2")
        with self._s3_errors(rel_dir):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    found[obj["Key"][strip:]] = obj["Size"]
        return dict(sorted(found.items()))

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically; a local file gets the mode ``open()`` would give
        it (``0o666`` less the umask)."""
        if self.remote:
            bucket, key = self._s3_key(rel)
            with self._s3_errors(rel):
                s3_client(self.endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
            return
        target = self._local(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False) as tmp:
            try:
                tmp.write(data)
                tmp.flush()
                os.fchmod(tmp.fileno(), new_file_mode())
            except BaseException:
                os.remove(tmp.name)
                raise
        try:
            os.replace(tmp.name, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp.name)
            raise

    def put_file(self, rel: str, local_path: str | Path) -> None:
        """Move the finished local file ``local_path`` to ``rel`` atomically (a rename locally,
        a multipart upload on S3, visible only once complete); ``local_path`` is consumed (when
        the move fails, it is left to the caller). Locally the file gets the mode ``open()``
        would give a new file (``0o666`` less the umask), whatever mode ``local_path`` had (a
        scratch file from :func:`tempfile.mkstemp` is ``0o600``)."""
        if self.remote:
            bucket, key = self._s3_key(rel)
            with self._s3_errors(rel):
                s3_client(self.endpoint_url).upload_file(str(local_path), bucket, key)
            os.remove(local_path)
            return
        target = self._local(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(local_path, new_file_mode())
        os.replace(local_path, target)

    def ensure_output_dir(self) -> None:
        """Make sure files can be written under a local root: create it (with its parents) if
        missing, and check that a file can be created in it. :class:`StorageError`, one line
        naming the root and the problem, when the root is an existing file, lies under a file,
        or sits on a read-only filesystem or in a directory without write permission; nothing
        is written then. On S3 nothing is checked here (a store's refusal shows on the first
        request)."""
        if self.remote:
            return
        root = Path(self.url)
        if root.exists() and not root.is_dir():
            raise StorageError(
                f"{root}: cannot write output there: it is an existing {_path_kind(root)}, not a directory"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            blocker = next((p for p in root.parents if p.exists() and not p.is_dir()), None)
            why = f"{blocker} is a {_path_kind(blocker)}, not a directory" if blocker else _os_reason(error)
            raise StorageError(f"{root}: cannot create the output directory: {why}") from error
        try:
            with tempfile.TemporaryFile(dir=root, prefix=".pipelines-write-check-"):
                pass
        except OSError as error:
            raise StorageError(f"{root}: cannot write in the output directory: {_os_reason(error)}") from error

    @contextlib.contextmanager
    def scratch_dir(self) -> Iterator[str]:
        """For one run, a directory for files being written before :meth:`put_file` moves them.
        Locally the root itself, so the rename stays on one filesystem (a writer names its files
        so that a re-run can remove what a killed run left); it is created and checked by
        :meth:`ensure_output_dir` first. On S3 a fresh directory of this process in the system
        temp dir, removed with all it holds when the run ends; such directories of processes
        that no longer exist (killed runs) are removed first."""
        if not self.remote:
            self.ensure_output_dir()
            yield self.url
            return
        _remove_dead_scratch(tempfile.gettempdir())
        path = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def remove(self, rel: str) -> None:
        if self.remote:
            bucket, key = self._s3_key(rel)
            with self._s3_errors(rel):
                s3_client(self.endpoint_url).delete_object(Bucket=bucket, Key=key)
        else:
            self._local(rel).unlink(missing_ok=True)



def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it
    (``/proc/self/status``); elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits ``open()`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def _path_kind(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError:
        return "file"
    return "file" if stat.S_ISREG(mode) else _file_kind(mode)


def _os_reason(error: OSError) -> str:
    """What an :class:`OSError` says, without its errno and path: ``Read-only file system``."""
    return error.strerror or str(error)


def _read_regular_file(path: Path, max_bytes: int | None) -> bytes:
    """The bytes of the regular file at ``path``. It is opened non-blocking (so opening a FIFO
    returns at once instead of waiting for a writer) and checked with ``fstat`` on the open
    descriptor, so what is checked is what is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as stream:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(errno.EINVAL, f"not a regular file (a {_file_kind(info.st_mode)})", str(path))
        if max_bytes is not None and info.st_size > max_bytes:
            raise FileTooLarge(errno.EFBIG, f"{info.st_size} bytes, more than the {max_bytes} allowed", str(path))
        data = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # it grew while being read
        raise FileTooLarge(errno.EFBIG, f"more than the {max_bytes} bytes allowed", str(path))
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), "special file")


def open_url(url: str, endpoint_url: str | None = None):
    """A readable binary stream of a local path or an ``s3://`` URL."""
    if not is_s3(url):
        return open(url, "rb")
    bucket, key = split_s3_url(url)
    with s3_errors(url, endpoint_url):
        return s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
