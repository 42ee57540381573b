"""What the file readers share: the limits that bound memory, opening a file, and reading it as numbered lines.

Files are read as streams, a row at a time: memory is bounded by the largest row (MAX_ROW_BYTES), not the file.
The readers look the limits up here each time they read (`streams.MAX_ROW_BYTES`), so they can be changed here.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from infopo_cli.errors import DataError, InfopoError

Row = tuple[str, Any]  # (where, row): `FILE:LINE` or `FILE:row N`, and the parsed row or a DataError in its place

MAX_ROW_BYTES = 64 * 2**20   # one row (a JSONL line, a CSV record, a JSON array element) at most: bounds memory
CHUNK_BYTES = 2**20          # how much of a JSON array is read at a time


def cannot_read(name: str | Path, err: OSError) -> InfopoError:
    """The one-line error for a file the OS refused to read."""
    return InfopoError(f"{name}: cannot read ({err.strerror or err})")


def open_file(path: Path) -> BinaryIO:
    """`path` opened for binary reading; an OS error becomes a one-line InfopoError."""
    try:
        return path.open("rb")
    except OSError as err:
        raise cannot_read(path, err) from None


def too_long() -> str:
    """The reason given for a row over MAX_ROW_BYTES."""
    return f"row longer than {_size(MAX_ROW_BYTES)}"


def _size(limit: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if limit >= scale and limit % scale == 0:
            return f"{limit // scale} {unit}"
    return f"{limit} bytes"


def decoded_lines(path: Path) -> Iterator[tuple[int, str | DataError]]:
    """Numbered lines of a UTF-8 file without their line ending; a DataError for a line too long or not UTF-8."""
    with open_file(path) as fh:
        for number, line in _byte_lines(fh):
            if line is None:
                yield number, DataError(f"{path}:{number}", None, too_long())
                continue
            try:
                yield number, line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, DataError(f"{path}:{number}", None, f"not valid UTF-8 (byte {err.start + 1})")


def _byte_lines(fh: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """Numbered lines without their line ending; None for a line longer than MAX_ROW_BYTES (read past, not kept)."""
    number, limit = 0, MAX_ROW_BYTES + 2  # room for "\r\n"
    while line := fh.readline(limit):
        number += 1
        if number == 1 and line.startswith(codecs.BOM_UTF8):  # a UTF-8 byte-order mark, as some editors write
            line = line[len(codecs.BOM_UTF8):]
        content = line.rstrip(b"\n").rstrip(b"\r")
        if len(content) > MAX_ROW_BYTES or (len(line) == limit and not line.endswith(b"\n")):
            while not line.endswith(b"\n") and (line := fh.readline(CHUNK_BYTES)):
                pass
            yield number, None
        else:
            yield number, content
