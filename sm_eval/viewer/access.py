"""What the viewer may read, and from whom it takes input: the security rules in one place.

- **Roots.** A local path or ``s3://`` URL typed into the browser (an image, an evaluation folder,
  a shard set) is read only when it lies under one of the viewer's roots (``--root``, repeatable;
  default: the working directory). Local paths are resolved first (``..`` and symbolic links
  followed), so a path that climbs out of every root is refused; an S3 URL is normalised
  lexically and must lie under a root's prefix. :class:`Roots`.
- **Inside an evaluation folder** every file is read through a :class:`~pipelines.storage.Location`
  of that folder, which refuses a path that climbs out of it (an absolute path, ``..``), and
  within a size bound (:data:`MAX_REPORT_BYTES`, :data:`MAX_PREDICTIONS_BYTES`).
- **Images** (uploads, paths, URLs) are decoded by :func:`pipelines.imageio.decode_rgb`: anything
  that is not an image, and any image over :data:`pipelines.imageio.MAX_IMAGE_PIXELS` pixels (a
  decompression bomb) or :data:`pipelines.imageio.MAX_IMAGE_BYTES` bytes, is refused before its
  pixels are decoded, with a message. An upload is also bounded by the server's upload cap
  (``--max-upload-mb``, which Gradio enforces while receiving it) and read only from Gradio's
  upload folder.
- **The network.** The server binds 127.0.0.1 unless ``--host`` says otherwise, and warns when
  that address is not a loopback one (:func:`host_warning`); it never opens a public share link.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.checks import IMAGE_TOO_LARGE
from pipelines.imageio import MAX_IMAGE_BYTES, decode_rgb
from pipelines.schema import RejectError
from pipelines.storage import StorageError, is_s3, split_s3_url
from sm_eval.match import file_location

DEFAULT_MAX_UPLOAD_MB = 32
"""The default upload cap (``--max-upload-mb``): far above any benchmark photo."""
MAX_REPORT_BYTES = 64 * 2**20
"""Bound on an evaluation folder's ``report.json``."""
MAX_PREDICTIONS_BYTES = 1024 * 2**20
"""Bound on an evaluation folder's ``predictions.parquet`` (SPair-71k's test split: about 10 MB)."""


class AccessRefused(ValueError):
    """A path or URL the viewer will not read; the message says why."""


@dataclass(frozen=True)
class Roots:
    """The local directories and ``s3://`` prefixes under which the browser may name files.

    ``local``: resolved absolute directories; ``s3``: ``(bucket, prefix)`` pairs (an empty prefix
    is the whole bucket)."""

    local: tuple[Path, ...]
    s3: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, roots: Sequence[str]) -> Roots:
        """The roots of ``--root`` values (none: the working directory)."""
        local: list[Path] = []
        s3: list[tuple[str, str]] = []
        for root in roots or (".",):
            if is_s3(root):
                bucket, prefix = split_s3_url(root)
                s3.append((bucket, _normal_key(prefix, root)))
            else:
                local.append(Path(root).expanduser().resolve())
        return cls(tuple(local), tuple(s3))

    def describe(self) -> str:
        """The roots in words, for messages."""
        names = [str(path) for path in self.local] + [
            f"s3://{bucket}/{prefix}".rstrip("/") for bucket, prefix in self.s3
        ]
        return ", ".join(names)

    def check(self, url: str, what: str = "path") -> str:
        """``url`` (a local path, relative to the working directory or absolute, or an ``s3://``
        URL) as the viewer reads it: the resolved absolute path or the normalised URL;
        :class:`AccessRefused` naming ``what`` when it lies under no root."""
        text = url.strip()
        if not text:
            raise AccessRefused(f"no {what} given")
        if "\0" in text:
            raise AccessRefused(f"{what} {text!r}: a path cannot hold a NUL byte")
        if is_s3(text):
            try:
                bucket, key = split_s3_url(text)
            except ValueError as error:
                raise AccessRefused(str(error)) from None
            key = _normal_key(key, text)
            for root_bucket, prefix in self.s3:
                if bucket == root_bucket and (not prefix or key == prefix or key.startswith(prefix + "/")):
                    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
            raise AccessRefused(f"{what} {text}: outside the viewer's roots ({self.describe()}; see --root)")
        path = Path(text).expanduser().resolve()
        if any(path == root or path.is_relative_to(root) for root in self.local):
            return str(path)
        raise AccessRefused(f"{what} {text}: outside the viewer's roots ({self.describe()}; see --root)")


def _normal_key(key: str, url: str) -> str:
    """An S3 key as the roots compare it: without a trailing ``/``; one with ``.`` or ``..``
    components is refused (S3 keys are not paths, and no reader here resolves them)."""
    if any(part in (".", "..") for part in key.split("/")):
        raise AccessRefused(f"{url}: an S3 URL with '.' or '..' components is refused")
    return key.strip("/")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> str | None:
    """The warning printed when the viewer binds ``host`` that is not a loopback address."""
    if is_loopback(host):
        return None
    return (
        f"binding {host}: the viewer is reachable from other machines, with no authentication; anyone who "
        "reaches it can run the model and read images and evaluation folders under the --root directories"
    )


def parse_upload_cap(megabytes: float) -> int:
    """``--max-upload-mb`` in bytes (at least one byte, at most :data:`~pipelines.imageio.MAX_IMAGE_BYTES`)."""
    if not (0 < megabytes < float("inf")):
        raise ValueError(f"--max-upload-mb must be a positive number, got {megabytes}")
    return max(1, min(int(megabytes * 2**20), MAX_IMAGE_BYTES))


def read_upload(path: str, upload_dir: str | Path | None, max_bytes: int, what: str) -> np.ndarray:
    """The image uploaded to ``path`` (a file Gradio received) as ``(H, W, 3)`` uint8, decoded within
    :mod:`pipelines.imageio`'s bounds and ``max_bytes``. ``ValueError`` with a message naming ``what``
    for a file outside ``upload_dir`` (Gradio's upload folder, when given), too large, or no image."""
    file = Path(path).resolve()
    if upload_dir is not None and not file.is_relative_to(Path(upload_dir).resolve()):
        raise AccessRefused(f"{what}: {path} is not an upload")
    try:
        size = file.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{what} ({file.name}): {size:,} bytes, more than the {max_bytes:,} allowed")
        with open(file, "rb") as stream:
            data = stream.read(max_bytes + 1)
    except OSError as error:
        raise ValueError(f"{what} ({file.name}): cannot be read ({error.strerror or error})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{what} ({file.name}): more than the {max_bytes:,} bytes allowed")
    return decode_image(data, f"{what} ({file.name})")


def decode_image(data: bytes, what: str) -> np.ndarray:
    """``data`` decoded as ``(H, W, 3)`` uint8 RGB by :func:`pipelines.imageio.decode_rgb` (its
    bounds: not an image, too many pixels or bytes); ``ValueError`` naming ``what`` otherwise."""
    try:
        return decode_rgb(data)
    except RejectError as error:
        if error.reason == IMAGE_TOO_LARGE:
            raise ValueError(
                f"{what}: refused, the image is too large ({error.detail}; a decompression bomb guard)"
            ) from None
        raise ValueError(f"{what}: not an image (no format PIL reads)") from None
    except Exception as error:  # PIL's error on a truncated or damaged file
        raise ValueError(f"{what}: not a readable image ({error})") from None


def read_image_at(url: str, roots: Roots, endpoint_url: str | None, what: str) -> np.ndarray:
    """The image at the local path or ``s3://`` URL ``url``, when it lies under ``roots``
    (:meth:`Roots.check`), read within :data:`~pipelines.imageio.MAX_IMAGE_BYTES` (regular files
    only) and decoded by :func:`decode_image`. Every failure is a ``ValueError`` whose message names
    ``what`` and ``url``."""
    checked = roots.check(url, what)
    try:
        location, name = file_location(checked, endpoint_url)
        data = location.read_bytes(name, max_bytes=MAX_IMAGE_BYTES)
    except FileNotFoundError:
        raise ValueError(f"{what} {url}: no such file") from None
    except (OSError, StorageError) as error:  # a directory, a FIFO, too large; an S3 store that fails
        raise ValueError(f"{what} {url}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    return decode_image(data, f"{what} {url}")
