"""Where preference rows come from: JSONL, JSON, CSV, Parquet, a `save_to_disk` folder, or the hub.

Each source yields `(where, row)`: `where` names the place of the row for error messages (`FILE:LINE`
for line-based files, `FILE:row N` for columnar ones) and `row` is the parsed value. A line that cannot
be parsed is yielded as a `DataError` in place of the row, so the caller decides whether to stop or
skip it; nothing here knows what a preference pair is.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infopo_cli.errors import DataError, InfopoError

BUNDLED_DIR = Path(__file__).parent.parent / "bundled"
Row = tuple[str, Any]


def resolve(spec: str) -> Path:
    """'bundled:NAME' is a file shipped in the package; anything else is a path."""
    if spec.startswith("bundled:"):
        name = spec.split(":", 1)[1]
        path = BUNDLED_DIR / f"{name}.jsonl"
        if not path.is_file():
            known = ", ".join(f"bundled:{p.stem}" for p in sorted(BUNDLED_DIR.glob("*.jsonl")))
            raise InfopoError(f"unknown bundled data '{spec}'; available: {known}")
        return path
    return Path(spec).expanduser()


def read_rows(spec: str, split: str = "train") -> Iterator[Row]:
    path = resolve(spec)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _saved_dataset(path, split)
        return _hub(str(path), split)
    if not path.exists():
        if _looks_like_hub_id(spec):
            return _hub(spec, split)
        raise InfopoError(f"{path}: no such file")
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl, ".ndjson": _jsonl, ".json": _json, ".csv": _csv, ".tsv": _csv, ".parquet": _parquet}
    if suffix not in readers:
        raise InfopoError(f"{path}: unknown file type '{suffix}' (use .jsonl, .json, .csv, .tsv or .parquet)")
    return readers[suffix](path)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | DataError]]:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        raw = raw[3:]
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, DataError(f"{path}:{number}", None, f"not valid UTF-8 (byte {err.start + 1})")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """For whole-file formats (JSON, CSV) an undecodable line spoils the file: stop there."""
    for number, text in _decoded_lines(path):
        if isinstance(text, DataError):
            raise text
        yield number, text


def _jsonl(path: Path) -> Iterator[Row]:
    for number, text in _decoded_lines(path):
        if isinstance(text, DataError):
            yield text.where, text
        elif text.strip():
            try:
                yield f"{path}:{number}", json.loads(text)
            except json.JSONDecodeError as err:
                yield f"{path}:{number}", DataError(f"{path}:{number}", None, f"not valid JSON: {err.msg} (column {err.colno})")


def _json(path: Path) -> Iterator[Row]:
    text = "\n".join(line for _, line in _text_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}", None, f"not valid JSON: {err.msg} (column {err.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}:{1}", None, "expected a JSON array of rows (or JSON Lines in a .jsonl file)")
    for index, row in enumerate(data, start=1):
        yield f"{path}:row {index}", row


def _csv(path: Path) -> Iterator[Row]:
    text = "\n".join(line.rstrip("\r") for _, line in _text_lines(path))
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: _maybe_json(v) for k, v in row.items() if k is not None}
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}", None, f"not valid CSV: {err}") from None


def _maybe_json(value: str | None) -> Any:
    """A CSV cell holding a JSON list of messages becomes that list; any other cell stays a string."""
    if value and value.lstrip().startswith("[{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise InfopoError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {index}", row


def _pick_split(dataset: Any, split: str, name: str) -> Any:
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise InfopoError(f"{name}: no split '{split}'; available: {', '.join(dataset)} (use --split)")
        return dataset[split]
    return dataset


def _saved_dataset(path: Path, split: str) -> Iterator[Row]:
    from datasets import load_from_disk

    dataset = _pick_split(load_from_disk(str(path)), split, str(path))
    for index, row in enumerate(dataset, start=1):
        yield f"{path}:row {index}", row


def _hub(name: str, split: str) -> Iterator[Row]:
    """A hub dataset (or a local folder of data files) through `datasets.load_dataset`."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as err:  # connection, missing repo, gated, missing split: all one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InfopoError(f"cannot load dataset '{name}' split '{split}' (offline or not found?): {first}") from None
    for index, row in enumerate(dataset, start=1):
        yield f"{name}[{split}]:row {index}", row
