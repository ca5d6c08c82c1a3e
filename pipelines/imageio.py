"""Image bytes: probing what a file is (format, size, complete or truncated) and decoding it.

Shards keep each image's original encoded bytes; nothing here re-encodes. Probing reads only the
header plus the file's end marker, which catches truncated files at a fraction of a full decode's
cost; ``full_decode=True`` decodes every pixel as well and, for a JPEG, checks that its compressed
data is intact (:func:`jpeg_data_problem`: PIL decodes damaged JPEG data without an error). An
image over :data:`MAX_IMAGE_BYTES` or :data:`MAX_IMAGE_PIXELS` is refused before any pixel is
decoded (a small file can declare a huge image: a decompression bomb), by this module's own bound
rather than PIL's global setting.
"""

from __future__ import annotations

import functools
import io
import re
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
        problem = jpeg_data_problem(data) if image.format == "JPEG" else None
        if problem:
            raise RejectError(checks.CORRUPT_IMAGE, f"corrupt JPEG data: {problem}")
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


# ---------------------------------------------------------------------------------------------
# JPEG compressed data. libjpeg reports damaged entropy-coded data ("Corrupt JPEG data: premature
# end of data segment", "... extraneous bytes before marker") as warnings and decodes on, and
# PIL discards those warnings (its decoder's message hook is a no-op), so a JPEG with bytes
# zeroed or lost mid-stream decodes "successfully" into wrong pixels. This walks every scan's
# Huffman codes as libjpeg does (code lengths and run lengths only, no pixels) and reports what
# libjpeg would warn about, and invalid codes (which libjpeg-turbo's fast path skips silently).

_MARKER = re.compile(rb"\xff+([^\x00\xff])")
"""A marker: 0xFF (any fill 0xFFs), then a byte other than 0 (0xFF 0x00 is a stuffed data byte)."""
_STUFFED = re.compile(rb"\xff+\x00")
_RESTART_MARKERS = range(0xD0, 0xD8)
_CHECKED_FRAMES = {0xC0: False, 0xC1: False, 0xC2: True}
"""Huffman-coded baseline, extended sequential and progressive frames (value: progressive)."""
_BLOCK_BYTES = 260
"""More than one block's codes can take (64 codes of up to 16 bits, each with up to 15 magnitude
bits): the zero padding after a scan's data (libjpeg reads zeros past a marker) holds this much
per block of an MCU, as the position is compared with the data's end after each MCU."""


class _Damaged(Exception):
    """What is wrong with a JPEG's data."""


class _NotChecked(Exception):
    """A JPEG coding this check does not cover (arithmetic, lossless, hierarchical, a height set by
    a DNL marker, scans without their Huffman tables)."""


def jpeg_data_problem(data: bytes) -> str | None:
    """What is wrong with the entropy-coded data of the JPEG ``data``, or ``None``: an invalid
    Huffman code, a scan (or restart interval) whose data ends before its last block ("premature
    end of data segment") or holds whole bytes after it ("extraneous bytes"), restart markers
    missing or out of sequence. Huffman-coded sequential and progressive JPEGs are checked; other
    codings pass. About 10 ms for a 500 x 375 baseline JPEG (a fifth of that to decode it)."""
    try:
        _check_jpeg(data)
    except _Damaged as error:
        return str(error)
    except _NotChecked:
        return None
    except IndexError:
        return "a marker segment runs past the end of the file"
    return None


def _bytes(count: int) -> str:
    return f"{count} byte{'s' * (count != 1)}"


def _u16(data: bytes, pos: int) -> int:
    return data[pos] << 8 | data[pos + 1]


@dataclass
class _Frame:
    width: int
    height: int
    sampling: dict[int, tuple[int, int]]
    """Component id -> (horizontal, vertical) sampling factors."""
    progressive: bool
    nonzero: dict[int, bytearray]
    """Per component of a progressive frame, 64 flags per block: coefficient (zigzag order) not
    zero after the scans so far, which decides how many correction bits a refinement scan holds."""

    @property
    def max_sampling(self) -> tuple[int, int]:
        return max(h for h, _ in self.sampling.values()), max(v for _, v in self.sampling.values())

    def blocks(self, component: int) -> int:
        """The blocks a scan of ``component`` alone codes."""
        (h, v), (hmax, vmax) = self.sampling[component], self.max_sampling
        width, height = _ceil_div(self.width * h, hmax), _ceil_div(self.height * v, vmax)
        return _ceil_div(width, 8) * _ceil_div(height, 8)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_jpeg(data: bytes) -> None:
    if data[:2] != b"\xff\xd8":
        raise _Damaged("no start-of-image marker")
    pos, frame, restart = 2, None, 0
    tables: dict[tuple[int, int], bytes] = {}
    while True:
        if data[pos] != 0xFF:
            found = _MARKER.search(data, pos)
            garbage = (found.start() if found else len(data)) - pos
            raise _Damaged(f"{_bytes(garbage)} of garbage before a marker at byte {pos}")
        while data[pos + 1] == 0xFF:
            pos += 1
        marker = data[pos + 1]
        if marker == 0xD9:
            return
        if marker in _RESTART_MARKERS or marker == 0x01:  # markers without a segment
            pos += 2
            continue
        length = _u16(data, pos + 2)
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            raise _Damaged(f"the marker segment at byte {pos} runs past the end of the file")
        pos += 2 + length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            if marker not in _CHECKED_FRAMES:
                raise _NotChecked
            frame = _frame(body, _CHECKED_FRAMES[marker])
        elif marker == 0xC4:  # Huffman tables
            while body:
                count = sum(body[1:17])
                if len(body) < 17 + count:
                    raise _Damaged("a Huffman table segment is cut short")
                tables[(body[0] >> 4, body[0] & 15)] = bytes(body[1 : 17 + count])
                body = body[17 + count :]
        elif marker == 0xDD:  # restart interval
            restart = _u16(body, 0)
        elif marker == 0xDA:  # a scan
            if frame is None:
                raise _Damaged("a scan before the frame header")
            pos = _check_scan(data, pos, body, frame, tables, restart)


def _frame(body: bytes, progressive: bool) -> _Frame:
    height, width, count = _u16(body, 1), _u16(body, 3), body[5]
    if height == 0:
        raise _NotChecked  # the height comes in a DNL marker after the first scan
    sampling = {body[6 + 3 * i]: (body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count)}
    if not sampling or min(min(hv) for hv in sampling.values()) < 1 or width == 0:
        raise _Damaged("a frame header without a valid size or components")
    return _Frame(width, height, sampling, progressive, {})


def _check_scan(data: bytes, pos: int, header: bytes, frame: _Frame, tables: dict, restart: int) -> int:
    """Check the entropy-coded data of the scan whose header is ``header`` and whose data starts
    at ``pos``; return where the marker after it starts."""
    count = header[0]
    if not 1 <= count <= 4:
        raise _Damaged(f"a scan of {count} components")
    components = [(header[1 + 2 * i], header[2 + 2 * i] >> 4, header[2 + 2 * i] & 15) for i in range(count)]
    ss, se, ah = header[1 + 2 * count], header[2 + 2 * count], header[3 + 2 * count] >> 4
    if any(c not in frame.sampling for c, _, _ in components):
        raise _Damaged("a scan of a component the frame does not have")
    if count == 1:  # one block per MCU, the component's own block grid
        mcus = frame.blocks(components[0][0])
        layout = components
    else:  # MCUs of h x v blocks of each component in turn
        hmax, vmax = frame.max_sampling
        mcus = _ceil_div(frame.width, 8 * hmax) * _ceil_div(frame.height, 8 * vmax)
        layout = [c for c in components for _ in range(frame.sampling[c[0]][0] * frame.sampling[c[0]][1])]
    if not frame.progressive:
        kind = "sequential"
    else:
        kind = ("dc" if ss == 0 else "ac") + ("-refine" if ah else "-first")
    needed = {
        "sequential": [(0, td) for _, td, _ in layout] + [(1, ta) for _, _, ta in layout],
        "dc-first": [(0, td) for _, td, _ in layout],
        "dc-refine": [],
    }.get(kind, [(1, ta) for _, _, ta in layout])
    if not all(key in tables for key in needed):
        raise _NotChecked  # libjpeg-turbo then uses the standard tables (Motion JPEG)
    if kind.startswith("ac") and (count != 1 or not 0 < ss <= se <= 63):
        raise _Damaged(f"a progressive AC scan of {count} components over coefficients {ss}..{se}")

    # The scan's data: segments split by restart markers, up to the first other marker.
    segments: list[tuple[bytes, int | None]] = []
    start = pos
    while True:
        found = _MARKER.search(data, pos)
        if found is None:
            raise _Damaged("a scan runs to the end of the file without a marker")
        marker = found.group(1)[0]
        segments.append((data[start : found.start()], marker if marker in _RESTART_MARKERS else None))
        if marker not in _RESTART_MARKERS:
            break
        start = pos = found.end()
    windows, starts = _bit_windows([segment for segment, _ in segments], _BLOCK_BYTES * len(layout))

    per_interval = restart or mcus
    intervals = _ceil_div(mcus, per_interval)
    for index, (segment, marker) in enumerate(segments):
        p, end = starts[index], starts[index + 1]
        if index >= intervals:  # after the last block: libjpeg ignores empty restart intervals only
            if segment:
                raise _Damaged(f"{_bytes(len(segment))} of extraneous data after the last block of a scan")
            continue
        if index < intervals - 1 and marker != 0xD0 + index % 8:
            found_marker = "no restart marker" if marker is None else f"restart marker {marker - 0xD0}"
            raise _Damaged(
                f"{found_marker} where restart marker {index % 8} belongs (restart interval {index} of {intervals})"
            )
        first = index * per_interval
        todo = min(per_interval, mcus - first)
        if kind == "sequential":
            codes = [(_dc_bits(tables[(0, td)]), _ac_steps(tables[(1, ta)])) for _, td, ta in layout]
            used = _sequential_scan(windows, p, end, todo, codes)
        elif kind == "dc-first":
            used = _dc_first_scan(windows, p, end, todo, [_dc_bits(tables[(0, td)]) for _, td, _ in layout])
        elif kind == "dc-refine":
            used = p + todo * len(layout)
        else:
            component, _, ta = components[0]
            nonzero = frame.nonzero.setdefault(component, bytearray(64 * mcus))
            scan = _ac_first_scan if kind == "ac-first" else _ac_refine_scan
            used = scan(windows, p, end, first, todo, ss, se, _huffman(tables[(1, ta)]), nonzero)
        where = f" (restart interval {index} of {intervals})" if restart else ""
        if used > end:
            raise _Damaged(f"premature end of data segment{where}: the blocks need {used - end} bits more")
        if end - used >= 8:
            raise _Damaged(f"{_bytes((end - used) // 8)} of extraneous data after the last block{where}")
    return found.start()


def _bit_windows(segments: list[bytes], padding: int) -> tuple[list[int], list[int]]:
    """The segments' bytes, stuffing removed, one after the other as the 24-bit window starting
    at each byte (``padding`` zero bytes after the end), and the bit where each segment starts
    (plus the end). The 16 bits from bit ``p`` are then ``windows[p >> 3] >> (8 - (p & 7)) & 0xFFFF``."""
    parts = [_STUFFED.sub(b"\xff", segment) if b"\xff" in segment else segment for segment in segments]
    starts = [0]
    for part in parts:
        starts.append(starts[-1] + 8 * len(part))
    octets = np.frombuffer(b"".join(parts) + bytes(padding + 8), dtype=np.uint8).astype(np.int64)
    return ((octets[:-2] << 16) | (octets[1:-1] << 8) | octets[2:]).tolist(), starts


def _bits(windows: list[int], p: int, n: int) -> int:
    """The ``n`` (up to 16) bits from bit ``p`` as a number."""
    return ((windows[p >> 3] << 24 | windows[(p >> 3) + 3]) >> (48 - (p & 7) - n)) & ((1 << n) - 1)


@functools.lru_cache(maxsize=64)
def _huffman(table: bytes) -> tuple[list[int], list[int]]:
    """For a Huffman table (16 code counts, then the symbols), per 16-bit window: the length of
    the code it starts with (0: no code does) and that code's symbol."""
    counts, symbols = table[:16], table[16:]
    lengths, values = [0] * 65536, [0] * 65536
    code = index = 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            if code >= 1 << length:
                raise _Damaged("a Huffman table with more codes than fit")
            low, high = code << (16 - length), (code + 1) << (16 - length)
            lengths[low:high] = [length] * (high - low)
            values[low:high] = [symbols[index]] * (high - low)
            code, index = code + 1, index + 1
        code <<= 1
    return lengths, values


@functools.lru_cache(maxsize=64)
def _dc_bits(table: bytes) -> list[int]:
    """For a DC table, per 16-bit window: the bits its code and the magnitude bits after it take (0: no code)."""
    lengths, values = _huffman(table)
    return [length + value if length else 0 for length, value in zip(lengths, values)]


@functools.lru_cache(maxsize=64)
def _ac_steps(table: bytes) -> list[int]:
    """For a sequential AC table, per 16-bit window: the bits its code and the magnitude bits
    after it take (low 6 bits; 0: no code) plus 64 x the coefficients it covers (0: end of block)."""
    lengths, values = _huffman(table)
    steps = []
    for length, value in zip(lengths, values):
        run, size = value >> 4, value & 15
        covers = run + 1 if size else (16 if run == 15 else 0)
        steps.append(length + size + 64 * covers if length else 0)
    return steps


def _bad_code(p: int) -> _Damaged:
    return _Damaged(f"an invalid Huffman code at bit {p} of the scan")


def _sequential_scan(windows: list[int], p: int, end: int, mcus: int, layout: list[tuple[list[int], list[int]]]) -> int:
    """The bit after ``mcus`` MCUs of a sequential scan from bit ``p`` (or the first MCU's end past ``end``)."""
    for _ in range(mcus):
        for dc, ac in layout:
            n = dc[(windows[p >> 3] >> (8 - (p & 7))) & 0xFFFF]
            if not n:
                raise _bad_code(p)
            p += n
            k = 1
            while k < 64:
                step = ac[(windows[p >> 3] >> (8 - (p & 7))) & 0xFFFF]
                if step < 64:  # end of block
                    if not step:
                        raise _bad_code(p)
                    p += step
                    break
                p += step & 63
                k += step >> 6
        if p > end:
            break
    return p


def _dc_first_scan(windows: list[int], p: int, end: int, mcus: int, layout: list[list[int]]) -> int:
    for _ in range(mcus):
        for dc in layout:
            n = dc[(windows[p >> 3] >> (8 - (p & 7))) & 0xFFFF]
            if not n:
                raise _bad_code(p)
            p += n
        if p > end:
            break
    return p


def _ac_first_scan(windows, p, end, first, blocks, ss, se, huffman, nonzero) -> int:
    """A progressive scan's first pass over coefficients ``ss..se`` (libjpeg's decode_mcu_AC_first)."""
    lengths, values = huffman
    eobrun = 0
    block, stop = first, first + blocks
    while block < stop:
        if eobrun:  # a run of blocks with nothing in this band
            skip = min(eobrun, stop - block)
            eobrun, block = eobrun - skip, block + skip
            continue
        base, k = 64 * block, ss
        block += 1
        while k <= se:
            w = (windows[p >> 3] >> (8 - (p & 7))) & 0xFFFF
            if not lengths[w]:
                raise _bad_code(p)
            p += lengths[w]
            run, size = values[w] >> 4, values[w] & 15
            if size:
                k += run
                p += size
                nonzero[base + (k if k < 64 else 63)] = 1
                k += 1
            elif run == 15:
                k += 16
            else:
                eobrun = (1 << run) + (_bits(windows, p, run) if run else 0) - 1
                p += run
                break
        if p > end:
            break
    return p


def _ac_refine_scan(windows, p, end, first, blocks, ss, se, huffman, nonzero) -> int:
    """A progressive scan refining coefficients ``ss..se`` by one bit (libjpeg's
    decode_mcu_AC_refine): each coefficient already nonzero takes a correction bit."""
    lengths, values = huffman
    eobrun = 0
    block, stop = first, first + blocks
    while block < stop:
        if eobrun:  # blocks with nothing new in this band: a correction bit per nonzero coefficient
            skip = min(eobrun, stop - block)
            if skip > 8:
                band = np.frombuffer(nonzero, dtype=np.uint8).reshape(-1, 64)[block : block + skip, ss : se + 1]
                p += int(band.sum())
            else:
                p += sum(nonzero.count(1, 64 * b + ss, 64 * b + se + 1) for b in range(block, block + skip))
            eobrun, block = eobrun - skip, block + skip
            if p > end:
                break
            continue
        base, k = 64 * block, ss
        block += 1
        while k <= se:
            w = (windows[p >> 3] >> (8 - (p & 7))) & 0xFFFF
            if not lengths[w]:
                raise _bad_code(p)
            p += lengths[w]
            run, size = values[w] >> 4, values[w] & 15
            if size:
                if size != 1:
                    raise _Damaged(f"a refinement of {size} bits at bit {p - lengths[w]} of the scan")
                p += 1
            elif run != 15:
                eobrun = (1 << run) + (_bits(windows, p, run) if run else 0)
                p += run
                break
            # Over coefficients already nonzero (a correction bit each) to the (run + 1)th zero one.
            low, high = base + k, base + se + 1
            z, zeros = low - 1, 0
            while zeros <= run:
                z = nonzero.find(0, z + 1, high)
                if z < 0:
                    break
                zeros += 1
            if z < 0:
                p += high - low - zeros
                k = se + 1
            else:
                p += z - low - run
                k = z - base
            if size:
                nonzero[base + (k if k < 64 else 63)] = 1
            k += 1
        if eobrun:  # the rest of this block's band
            if k <= se:
                p += nonzero.count(1, base + k, base + se + 1)
            eobrun -= 1
        if p > end:
            break
    return p
