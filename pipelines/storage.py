"""Local directories and ``s3://bucket/prefix`` URLs behind one small interface.

A :class:`Location` is a root; every method takes a path relative to it with ``/`` separators.
Writes are atomic: a local file appears under its final name only when complete (write to a
temporary name, then rename), and an S3 object only when its (multipart) upload completes.
S3 goes through boto3; the endpoint comes from ``endpoint_url`` or the ``AWS_ENDPOINT_URL``
environment variable (:func:`resolve_endpoint`), so S3-compatible stores (MinIO, Ceph, moto) work as
well as AWS. This module is the one place that turns an S3 URL and endpoint into a client
(:func:`s3_client`) or a pyarrow filesystem (:func:`arrow_filesystem`, for Ray's storage).
"""

from __future__ import annotations

import functools
import os
import tempfile
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


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client for ``endpoint_url`` (see :func:`resolve_endpoint`), one per process and endpoint."""
    return _s3_client(resolve_endpoint(endpoint_url))


def arrow_filesystem(url: str, endpoint_url: str | None = None) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(path, filesystem)`` for pyarrow and Ray storage arguments. A local path or an ``s3://``
    URL on AWS needs no filesystem (``None``: Ray infers it from the URL); an S3-compatible endpoint
    needs an explicit pyarrow filesystem, and then the path loses its ``s3://``."""
    endpoint_url = resolve_endpoint(endpoint_url)
    if not is_s3(url) or endpoint_url is None:
        return url, None
    import pyarrow.fs

    endpoint = urlparse(endpoint_url)
    # Explicit keys travel with the pickled filesystem to Ray's controller and workers.
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint.netloc or endpoint.path,
        scheme=endpoint.scheme or "https",
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
    )
    return url.removeprefix("s3://"), filesystem


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None):
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
        retries={"max_attempts": 5, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def _client_error() -> type[Exception]:
    from botocore.exceptions import ClientError

    return ClientError


@dataclass(frozen=True)
class Location:
    """A root directory: a local path or ``s3://bucket/prefix``."""

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
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    def _s3_key(self, rel: str) -> tuple[str, str]:
        bucket, prefix = split_s3_url(self.url)
        return bucket, f"{prefix}/{rel}" if prefix else rel

    def _local(self, rel: str) -> Path:
        return Path(self.url) / rel

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of ``rel``; :class:`FileNotFoundError` naming the full path if missing."""
        if not self.remote:
            return self._local(rel).read_bytes()
        bucket, key = self._s3_key(rel)
        try:
            return s3_client(self.endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()
        except _client_error() as error:
            if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.full(rel)}: no such object") from error
            raise

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return self._local(rel).exists()
        bucket, key = self._s3_key(rel)
        client = s3_client(self.endpoint_url)
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except _client_error() as error:
            if error.response["Error"]["Code"] not in ("NoSuchKey", "404", "NotFound"):
                raise
        # A "directory" exists on S3 when some object lies under it.
        listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        return listing.get("KeyCount", 0) > 0

    def list_files(self, rel_dir: str = "") -> dict[str, int]:
        """Every file below ``rel_dir`` (recursively) as ``{relative path: size in bytes}``,
        sorted by path. Missing directories give an empty listing."""
        if not self.remote:
            base = self._local(rel_dir)
            if not base.is_dir():
                return {}
            root = Path(self.url)
            found = {}
            for dirpath, _, filenames in os.walk(base):
                for name in filenames:
                    path = Path(dirpath) / name
                    found[path.relative_to(root).as_posix()] = path.stat().st_size
            return dict(sorted(found.items()))
        bucket, key = self._s3_key(rel_dir)
        _, root_prefix = split_s3_url(self.url)
        prefix = key.rstrip("/") + "/" if key else ""
        strip = len(root_prefix) + 1 if root_prefix else 0
        found = {}
        paginator = s3_client(self.endpoint_url).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[obj["Key"][strip:]] = obj["Size"]
        return dict(sorted(found.items()))

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically."""
        if self.remote:
            bucket, key = self._s3_key(rel)
            s3_client(self.endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
            return
        target = self._local(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, target)

    def put_file(self, rel: str, local_path: str | Path) -> None:
        """Move the finished local file ``local_path`` to ``rel`` atomically (a rename locally,
        a multipart upload on S3, visible only once complete); ``local_path`` is consumed."""
        if self.remote:
            bucket, key = self._s3_key(rel)
            s3_client(self.endpoint_url).upload_file(str(local_path), bucket, key)
            os.remove(local_path)
            return
        target = self._local(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path, target)

    def scratch_dir(self) -> str:
        """A directory for files being written before :meth:`put_file` moves them: beside the
        target locally (so the rename stays on one filesystem), the system temp dir for S3."""
        if self.remote:
            return tempfile.gettempdir()
        Path(self.url).mkdir(parents=True, exist_ok=True)
        return self.url

    def remove(self, rel: str) -> None:
        if self.remote:
            bucket, key = self._s3_key(rel)
            s3_client(self.endpoint_url).delete_object(Bucket=bucket, Key=key)
        else:
            self._local(rel).unlink(missing_ok=True)



def open_url(url: str, endpoint_url: str | None = None):
    """A readable binary stream of a local path or an ``s3://`` URL."""
    if not is_s3(url):
        return open(url, "rb")
    bucket, key = split_s3_url(url)
    return s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
