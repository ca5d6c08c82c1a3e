"""JSON from files nobody vetted, parsed with bounded work: one loader for every annotation file.

:func:`loads` is :func:`json.loads` with limits, so a hostile or broken file costs a bounded
amount of time and memory and ends in one exception type, :class:`JSONError`, whose message says
what was wrong: more than ``max_bytes``; not UTF-8 (a UTF-8 byte-order mark is allowed); nested more
than ``max_depth`` levels (checked before parsing, so no :class:`RecursionError`); a number literal
longer than ``max_number_chars`` (no 4,300-digit integer, no slow big-number conversion); a number
that is not finite as a 64-bit float (``1e400``, or the non-standard ``NaN`` and ``Infinity``); an
object naming a key twice (:mod:`json` would silently keep the last value); and invalid JSON.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

MAX_BYTES = 64 * 2**20
"""Default size bound: far above any annotation file of the supported benchmarks."""
MAX_DEPTH = 32
"""Default nesting bound: the supported formats nest at most four levels."""
MAX_NUMBER_CHARS = 100
"""Default length bound of one number literal (sign, digits, point and exponent): every such
integer converts to a finite float, and no real annotation comes close."""

# A JSON string (or an unterminated one, to the end): possessive, so scanning stays linear.
_STRING = re.compile(r'"(?:[^"\\]++|\\.?)*+"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_DEPTH_CHUNK = 1 << 22


class JSONError(ValueError):
    """A document :func:`loads` refused; the message says why, in words a person can act on."""


def loads(
    data: bytes | str,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_number_chars: int = MAX_NUMBER_CHARS,
) -> Any:
    """The JSON value of ``data`` (UTF-8 bytes or text), within the limits the module docstring
    lists; :class:`JSONError` otherwise."""
    if len(data) > max_bytes:
        raise JSONError(f"{len(data)} bytes, more than the {max_bytes} allowed")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise JSONError(f"not UTF-8: byte {data[error.start]:#04x} at offset {error.start}") from None
    outside_strings = _STRING.sub('""', data)
    depth = _nesting_depth(outside_strings)
    if depth > max_depth:
        raise JSONError(f"nested {depth} levels deep, more than the {max_depth} allowed")
    too_long = re.search(rf"[-+0-9.eE]{{{max_number_chars + 1},}}", outside_strings)
    if too_long:
        raise JSONError(f"a number of {len(too_long[0])} characters, more than the {max_number_chars} allowed")
    try:
        return json.loads(data, object_pairs_hook=_unique_keys, parse_float=_finite_float, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise JSONError(f"not valid JSON: {error}") from None
    except RecursionError:  # only if max_depth was set beyond what the interpreter's stack allows
        raise JSONError(f"nested too deeply to parse ({depth} levels)") from None


def _nesting_depth(outside_strings: str) -> int:
    """How deep arrays and objects nest at most in a text whose strings were emptied."""
    brackets = _NOT_BRACKET.sub("", outside_strings).encode("ascii").translate(_BRACKET_STEPS)
    level = deepest = 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        levels = np.cumsum(np.frombuffer(brackets, np.int8, min(_DEPTH_CHUNK, len(brackets) - start), start), dtype=np.int64)
        deepest = max(deepest, level + int(levels.max()))
        level += int(levels[-1])
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        repeated = sorted({key for key, _ in pairs if key in seen or seen.add(key)})
        raise JSONError(f"an object names the key(s) {repeated} more than once")
    return document


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONError(f"the number {text} is beyond the range of a 64-bit float")
    return value


def _refuse_constant(name: str) -> Any:
    raise JSONError(f"{name} is not a JSON number (non-finite values have no place in an annotation)")
