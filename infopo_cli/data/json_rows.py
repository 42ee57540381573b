"""JSON Lines, and JSON arrays read element by element (a chunk at a time, never the whole file). Each row is
parsed by `JsonParser`, which also catches what json takes but a row must not have (see row_checks)."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any, BinaryIO

from infopo_cli.data import row_checks, streams
from infopo_cli.errors import DataError

EXPECTED_ARRAY = "expected a JSON array of rows (or JSON Lines in a .jsonl file)"
ROW_KEYS = ("prompt", "chosen", "rejected", "completion", "messages", "conversations")  # a row's fields, not a wrapper's


class JsonParser:
    """json.JSONDecoder, and what it takes without complaint but a row must not have: a key given twice, nesting
    deeper than MAX_DEPTH, lone surrogates ("\\ud800" is valid JSON, but no tokenizer can encode it). The parsed
    value is walked only where its text hints at one of them, so plain rows cost no more than json's own parse."""

    def __init__(self) -> None:
        self.suspect = False  # the text parsed since the last `checked` may hold a problem
        self.decoder = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        self.suspect, seen, repeated = True, set(), row_checks.RepeatedKey(obj)
        repeated.key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        return repeated

    def loads(self, text: str) -> Any:
        """Parse a whole JSON text, noting whether `checked` must walk it (repeated keys, deep nesting, surrogates)."""
        value = self.decoder.decode(text)
        self._hint(text, 0, len(text))
        return value

    def raw(self, text: str, start: int) -> tuple[Any, int]:
        """Parse one JSON value starting at `start`, noted like `loads`; returns it and the index after it."""
        value, end = self.decoder.raw_decode(text, start)
        self._hint(text, start, end)
        return value, end

    def _hint(self, text: str, start: int, end: int) -> None:
        self.suspect = self.suspect or (text.find("\\ud", start, end) >= 0 or text.find("\\uD", start, end) >= 0
                                        or text.count("[", start, end) + text.count("{", start, end)
                                        > row_checks.MAX_DEPTH)

    def checked(self, where: str, value: Any) -> Any:
        """The value, or the DataError for the first problem in it; then ready for the next row."""
        problem = row_checks.problem(value) if self.suspect else None
        self.suspect = False
        return DataError(where, *problem) if problem else value


def read_jsonl(path: Path) -> Iterator[streams.Row]:
    """The rows of a JSON Lines file as (FILE:LINE, value); a line that does not parse is a DataError in its place."""
    parser = JsonParser()
    for number, text in streams.decoded_lines(path):
        where = f"{path}:{number}"
        if isinstance(text, DataError):
            yield where, text
        elif text.strip():
            try:
                yield where, parser.checked(where, parser.loads(text))
            except (ValueError, RecursionError) as err:
                column = f" (column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
                yield where, DataError(where, None, _json_problem(err) + column)


def read_json_array(path: Path) -> Iterator[streams.Row]:
    """A JSON array of rows, or an object whose one key holds it ({"data": [...]}), element by element."""
    with streams.open_file(path) as fh:
        doc = _JsonText(path, fh)
        wrapped = doc.peek() == "{"
        if wrapped:
            _enter_wrapper(doc)
        elif doc.peek() != "[":
            raise (doc.error(doc.pos, EXPECTED_ARRAY, column=False) if doc.peek()
                   else doc.error(doc.pos, "not valid JSON: Expecting value"))
        doc.pos += 1
        if doc.peek() != "]":
            for index in count(1):
                where = f"{path}:row {index}"
                yield where, doc.parser.checked(where, doc.value())
                if doc.peek() == "]":
                    break
                doc.take_comma()
        doc.pos += 1  # past the "]"
        if wrapped and doc.peek() != "}":
            raise DataError(f"{path}:1", None, EXPECTED_ARRAY)  # another key: which one holds the rows?
        doc.pos += wrapped
        if doc.peek():
            raise doc.error(doc.pos, "not valid JSON: Extra data")


def _enter_wrapper(doc: _JsonText) -> None:
    """Past `{"data":`, at the `[` of the rows: anything else is not a wrapped array."""
    doc.pos += 1
    if doc.peek() != '"' or not isinstance(key := doc.value(), str) or doc.peek() != ":":
        raise DataError(f"{doc.path}:1", None, EXPECTED_ARRAY)
    if key in ROW_KEYS:  # one row of messages, not a wrapper holding rows
        raise DataError(f"{doc.path}:1", None, f"{EXPECTED_ARRAY}: this file holds one row (its '{key}' is not a list of "
                                               "rows); wrap it in [ ]")
    doc.pos += 1
    if doc.peek() != "[":
        raise DataError(f"{doc.path}:1", None, EXPECTED_ARRAY)


def _json_problem(err: ValueError | RecursionError) -> str:
    if isinstance(err, RecursionError):
        return f"nested deeper than {row_checks.MAX_DEPTH} levels"
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON: {err.msg}"
    return f"not valid JSON: {str(err).split(';')[0]}"  # e.g. a number longer than Python's int digit limit


class _JsonText:
    """A JSON document read a chunk at a time: `text` holds what is not parsed yet, from `pos` (what is before it is
    dropped when more is read); `line` and `column` are those of text[0], for errors."""

    NOT_SPACE = re.compile(r"[^ \t\n\r]")

    def __init__(self, path: Path, fh: BinaryIO) -> None:
        self.path, self.fh = path, fh
        self.text, self.pos, self.line, self.column, self.eof = "", 0, 1, 1, False
        self.parser = JsonParser()
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.bytes_line, self.bytes_column, self.started = 1, 1, False  # where the next byte read is, for UTF-8 errors

    def more(self, size: int | None = None) -> bool:
        """Reads on (CHUNK_BYTES unless told); False at the end of the file."""
        self._drop_parsed()
        raw = self.fh.read(size or streams.CHUNK_BYTES)
        if not self.started and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        self.started = True
        try:
            self.text += self.utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as err:
            raise self._utf8_error(err, raw) from None
        self._count_bytes(raw)
        self.eof = not raw
        return bool(raw)

    def _count_bytes(self, raw: bytes) -> None:
        if (newlines := raw.count(b"\n")):
            self.bytes_line, self.bytes_column = self.bytes_line + newlines, len(raw) - raw.rfind(b"\n")
        else:
            self.bytes_column += len(raw)

    def _utf8_error(self, err: UnicodeDecodeError, raw: bytes) -> DataError:
        at = err.start - (len(err.object) - len(raw))  # in raw: err.object is the bytes held back from before + raw
        before = raw[:max(0, at)]
        line = self.bytes_line + before.count(b"\n")
        column = len(before) - before.rfind(b"\n") if b"\n" in before else self.bytes_column + at
        return DataError(f"{self.path}:{line}", None, f"not valid UTF-8 (byte {column})")

    def _drop_parsed(self) -> None:
        """Drops the text before `pos`, keeping `line` and `column` right."""
        done = self.text[:self.pos]
        if (newlines := done.count("\n")):
            self.line, self.column = self.line + newlines, len(done) - done.rfind("\n")
        else:
            self.column += len(done)
        self.text, self.pos = self.text[self.pos:], 0

    def peek(self) -> str:
        """The next character that is not white space ('' at the end), `pos` at it."""
        while not (found := self.NOT_SPACE.search(self.text, self.pos)):
            self.pos = len(self.text)
            if not self.more():
                return ""
        self.pos = found.start()
        return self.text[self.pos]

    def take_comma(self) -> None:
        if self.peek() != ",":
            raise self.error(self.pos, "not valid JSON: Expecting ',' delimiter")  # json's words, for the same error
        self.pos += 1

    def value(self) -> Any:
        """The JSON value at the next non-space character, reading on until it is whole (up to MAX_ROW_BYTES)."""
        self.peek()
        while True:
            start = self.pos  # reading more moves the text, so the value's start too
            try:
                value, end = self.parser.raw(self.text, start)
                if end - start > streams.MAX_ROW_BYTES:
                    raise self.error(start, streams.too_long(), column=False)
                if end < len(self.text) or self.eof:  # at the very end a number may go on in the next chunk
                    self.pos = end
                    return value
            except RecursionError as err:
                raise self.error(start, _json_problem(err), column=False) from None
            except ValueError as err:
                if not self._cut_short(err):
                    raise self.error(getattr(err, "pos", start), _json_problem(err)) from None
            if len(self.text) - start > streams.MAX_ROW_BYTES:
                raise self.error(start, streams.too_long(), column=False)
            self.more(max(streams.CHUNK_BYTES, len(self.text) - start))  # doubling: a long row is parsed O(log n) times

    def _cut_short(self, err: ValueError) -> bool:
        """Whether the error may just be the chunk ending inside the value (then more text is read and it is retried)."""
        if self.eof or not isinstance(err, json.JSONDecodeError):
            return False
        return err.pos >= len(self.text) - 16 or err.msg.startswith("Unterminated string")

    def error(self, pos: int, problem: str, column: bool = True) -> DataError:
        """The problem at text[pos], on its line (and column, for a syntax error)."""
        before = self.text[:pos]
        line = self.line + before.count("\n")
        at = len(before) - before.rfind("\n") if "\n" in before else self.column + pos
        return DataError(f"{self.path}:{line}", None, f"{problem} (column {at})" if column else problem)
