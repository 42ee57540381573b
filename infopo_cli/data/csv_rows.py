"""CSV and TSV: a header, then a row per record (which may span lines), strictly quoted and numbered by the line it
starts on. A cell holding a JSON list of messages is parsed; any other cell stays a string."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infopo_cli.data import row_checks, streams
from infopo_cli.data.json_rows import JsonParser
from infopo_cli.errors import DataError


def read_csv(path: Path) -> Iterator[streams.Row]:
    """The rows of a CSV (or .tsv) file as (FILE:LINE, dict) keyed by its header; a record of the wrong width is a
    DataError in the row's place, broken quoting stops the file."""
    if csv.field_size_limit() < streams.MAX_ROW_BYTES:  # csv's default (128 KiB per field) would refuse long replies
        csv.field_size_limit(streams.MAX_ROW_BYTES)
    lines = _CsvLines(path)
    reader = csv.reader(lines, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)
    header: list[str] | None = None
    parser = JsonParser()
    while True:
        lines.start_row()
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise lines.error(err) from None
        where = f"{path}:{lines.row_start}"
        if not record:  # a blank line
            continue
        if header is None:
            if len(record) == 1 and "\t" in record[0] and path.suffix.lower() != ".tsv":
                raise DataError(where, None, "the columns are separated by tabs: name the file .tsv")
            header = _header(record, where)
        elif len(record) != len(header):
            yield where, DataError(where, None, lines.count_problem(len(record), len(header)))
        elif record == header:  # two files joined with `cat`: the second header must not be trained as a pair
            yield where, DataError(where, None, "the header again (files joined together?); remove this line")
        else:
            yield where, parser.checked(where, {name: _maybe_json(value, parser) for name, value in zip(header, record)})


class _CsvLines:
    """The file's lines for csv.reader, numbered by this side (csv's own line_num is off for rows that span lines)
    and bounding the size of the row being read."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines = path, streams.decoded_lines(path)
        self.number, self.row_start, self.row_size = 0, 1, 0

    def start_row(self) -> None:
        self.row_start, self.row_size = self.number + 1, 0

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        self.number, text = next(self.lines)
        if isinstance(text, DataError):
            raise text
        self.row_size += len(text) + 1
        if self.row_size > streams.MAX_ROW_BYTES:
            raise DataError(f"{self.path}:{self.row_start}", None, streams.too_long())
        return text + "\n"

    def error(self, err: csv.Error) -> DataError:
        if str(err) == "unexpected end of data":
            return DataError(f"{self.path}:{self.row_start}", None, "not valid CSV: a quote opened in this row is not "
                             f"closed: it runs to the end of the file (line {self.number})")
        hint = (f"in a row from line {self.row_start}: a quote not closed there?" if self.number > self.row_start
                else "a value that starts with a quote must be quoted whole, its own quotes doubled"
                if "expected after" in str(err) else "")
        problem = str(err).replace("\t", "\\t") + (f" ({hint})" if hint else "")
        return DataError(f"{self.path}:{self.number}", None, f"not valid CSV: {problem}")

    def count_problem(self, values: int, columns: int) -> str:
        why = (f"it spans lines {self.row_start}-{self.number}: a quote not closed?" if self.number > self.row_start
               else "a delimiter inside an unquoted value?" if values > columns else "values missing?")
        return f"{values} values for the {columns} columns of the header ({why})"


def _header(names: list[str], where: str) -> list[str]:
    seen: set[str] = set()
    for name in names:
        if name and name in seen:  # csv.DictReader would keep the last column of the name
            raise DataError(where, None, f"column '{row_checks.escaped(name)}' given twice")
        seen.add(name)
    return names


def _maybe_json(value: str, parser: JsonParser) -> Any:
    """A CSV cell holding a JSON list of messages (objects with a 'role', or ShareGPT's 'from': checked as messages
    later, so a wrong shape is refused as in JSON Lines) becomes that list;
    any other cell stays a string, a reply that is itself JSON (`[{"name": "Alice"}]`) too."""
    if value and value.lstrip().startswith("[{"):
        try:
            parsed = parser.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(parsed, list) and any(isinstance(m, dict) and ("role" in m or "from" in m) for m in parsed):
            return parsed
    return value
