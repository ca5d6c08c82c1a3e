"""Image bytes: probing what a file is (format, size, complete or truncated) and decoding it.

Shards keep each image's original encoded bytes; nothing here re-encodes. Probing reads only the
header plus the file's end marker, which catches truncated files at a fraction of a full decode's
cost; ``full_decode=True`` decodes every pixel as well. An image over :data:`MAX_IMAGE_BYTES` or
:data:`MAX_IMAGE_PIXELS` is refused before any pixel is decoded (a small file can declare a huge
image: a decompression bomb), by this module's own bound rather than PIL's global setting.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines import checks
from pipelines.schema import RejectError

MAX_IMAGE_BYTES = 256 * 2**20
"""Bound on one encoded image file; benchmark images are well under a megabyte."""
MAX_IMAGE_PIXELS = 89_478_485
"""Bound on width x height (PIL's default bomb threshold, about 9459 x 9459); decoding one such
image as RGB takes 256 MiB."""

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}
_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Some encoders pad a finished JPEG with zeros or newlines after its end-of-image marker.
_JPEG_TRAILING_PADDING = b"\x00\r\n "


@dataclass(frozen=True)
class ImageProbe:
    """What an image file is: ``ext`` (``jpg``/``png``) and ``size`` ``(W, H)``."""

    ext: str
    size: tuple[int, int]


def probe_image(data: bytes, full_decode: bool = False) -> ImageProbe:
    """Format and size of an encoded image; :class:`~pipelines.schema.RejectError` when it is
    not a complete JPEG or PNG."""
    image = _open(data)
    if image.format not in _EXTENSIONS:
        raise RejectError(checks.UNREADABLE_IMAGE, f"format {image.format} is neither JPEG nor PNG")
    complete = (
        data.rstrip(_JPEG_TRAILING_PADDING).endswith(_JPEG_EOI) if image.format == "JPEG" else data.endswith(_PNG_IEND)
    )
    if not complete:
        raise RejectError(checks.TRUNCATED_IMAGE, f"{image.format} data ends without its end marker ({len(data)} bytes)")
    if full_decode:
        try:
            image.load()
        except Exception as error:
            raise RejectError(checks.UNREADABLE_IMAGE, f"decoding failed ({error})") from error
    return ImageProbe(_EXTENSIONS[image.format], image.size)


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode an encoded image to ``(H, W, 3)`` uint8 RGB; :class:`~pipelines.schema.RejectError`
    (``image-too-large``) for an image over the bounds, before decoding it."""
    with _open(data) as image:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)


def _open(data: bytes) -> Image.Image:
    """``data`` opened lazily (header only); :class:`~pipelines.schema.RejectError` when it is no
    image PIL can open (``unreadable-image``) or exceeds the bounds (``image-too-large``)."""
    if len(data) > MAX_IMAGE_BYTES:
        raise RejectError(checks.IMAGE_TOO_LARGE, f"{len(data)} bytes, more than the {MAX_IMAGE_BYTES} allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise RejectError(checks.IMAGE_TOO_LARGE, f"{error}") from error
    except Exception as error:  # PIL raises several types for undecodable input
        raise RejectError(checks.UNREADABLE_IMAGE, f"not a decodable image ({error})") from error
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise RejectError(checks.IMAGE_TOO_LARGE, f"{width} x {height} pixels, more than the {MAX_IMAGE_PIXELS} allowed")
    return image
