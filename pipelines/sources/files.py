"""Reading a dataset's files the one safe way every reader shares.

A dataset's *list* file (a Layout list, a pair CSV) decides what the inputs are: when it cannot be
read at all the run stops with an error naming it (:func:`read_list_file`), but a row or line that
cannot be decoded is a reject of that input only (:func:`csv_rows` here, the SPair-71k reader for
its Layout lines). An *annotation* file belongs to one input, so anything wrong with it is that
input's reject (:func:`read_annotation`, :func:`load_annotation_json`): a path leaving the
dataset root, a directory, FIFO or other non-file where the file should be, a file over
:data:`MAX_ANNOTATION_BYTES`, JSON outside the bounds of :mod:`pipelines.jsonio`. A missing
annotation file is left to each reader (:class:`FileNotFoundError`), which names its own context.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines import jsonio
from pipelines.checks import MALFORMED_ANNOTATION, PATH_OUTSIDE_ROOT, UNREADABLE_ANNOTATION
from pipelines.schema import RejectError, is_utf8
from pipelines.storage import Location, PathOutsideRoot

MAX_ANNOTATION_BYTES = 16 * 2**20
"""Bound on one per-pair or per-image annotation file (real ones hold a few kilobytes)."""
MAX_RELEASE_BYTES = 1 << 30
"""Bound on one whole-release annotation file (AP-10K's COCO files hold tens of megabytes)."""


def read_list_file(root: Location, rel: str) -> bytes:
    """The bytes of the list file ``rel``. :class:`FileNotFoundError` when missing (for the caller
    to word); :class:`ValueError` naming the file when it exists but cannot be read (a directory,
    a FIFO, no permission)."""
    try:
        return root.read_bytes(rel)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"{root.full(rel)}: cannot be read ({error.strerror or error})") from None


def read_annotation(root: Location, rel: str, max_bytes: int = MAX_ANNOTATION_BYTES) -> bytes:
    """The bytes of the annotation file ``rel`` (a path the dataset gave, possibly hostile).
    :class:`FileNotFoundError` when missing; :class:`RejectError` with ``file`` ``rel`` when ``rel``
    leaves the root (``path-outside-root``) or is not a readable file of at most ``max_bytes``
    (``unreadable-annotation``)."""
    try:
        return root.read_bytes(rel, max_bytes)
    except FileNotFoundError:
        raise
    except PathOutsideRoot as error:
        raise RejectError(PATH_OUTSIDE_ROOT, str(error), rel) from None
    except OSError as error:
        raise RejectError(UNREADABLE_ANNOTATION, f"{root.full(rel)}: {error.strerror or error}", rel) from None


def parse_json(data: bytes, max_bytes: int = MAX_ANNOTATION_BYTES) -> Any:
    """The JSON value of an annotation file's bytes; :class:`RejectError` (``malformed-annotation``,
    the message from :mod:`pipelines.jsonio`) when it is not bounded, valid, UTF-8 JSON."""
    try:
        return jsonio.loads(data, max_bytes=max_bytes)
    except jsonio.JSONError as error:
        raise RejectError(MALFORMED_ANNOTATION, str(error)) from None


def load_annotation_json(root: Location, rel: str) -> Any:
    """:func:`read_annotation` then :func:`parse_json`."""
    return parse_json(read_annotation(root, rel))


@dataclass(frozen=True)
class CsvRow:
    """One non-blank CSV record: ``line`` (1-based, the record's last physical line, the header
    being line 1) and its ``fields``, or ``problem`` saying why the record cannot be read (then
    ``fields`` is empty)."""

    line: int
    fields: list[str]
    problem: str | None = None


def csv_rows(data: bytes, name: str) -> tuple[list[str], Iterator[CsvRow]]:
    """The stripped header of the CSV file ``name`` (its bytes ``data``) and its later non-blank
    records, lazily. The file is UTF-8 (a byte-order mark allowed); a record holding other bytes,
    or a field over the :mod:`csv` module's field size limit, comes as a :class:`CsvRow` with a
    ``problem``, and reading goes on with the next record. A header that cannot be parsed is a
    :class:`ValueError` naming the file."""
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig", errors="surrogateescape")))
    try:
        header = [column.strip() for column in next(reader, [])]
    except csv.Error as error:
        raise ValueError(f"{name}: the header line cannot be parsed as CSV ({error})") from None

    def rows() -> Iterator[CsvRow]:
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield CsvRow(reader.line_num, [], f"cannot be parsed as CSV ({error})")
                continue
            if not fields:
                continue
            bad = next((index for index, field in enumerate(fields) if not is_utf8(field)), None)
            if bad is not None:
                yield CsvRow(reader.line_num, [], f"field {bad + 1} is not UTF-8 text: {fields[bad]!r}")
            else:
                yield CsvRow(reader.line_num, fields)

    return header, rows()
