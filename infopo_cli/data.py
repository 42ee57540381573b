"""Read preference pairs from JSONL and check every row before any model is loaded.

A row is a JSON object with string fields `prompt`, `chosen` and `rejected`. The first bad row stops
the run with one line `FILE:LINE: field 'X': what is wrong`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from infopo_cli.errors import DataError, InfopoError

FIELDS = ("prompt", "chosen", "rejected")
BUNDLED_DIR = Path(__file__).parent / "bundled"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


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


def read_pairs(spec: str) -> list[PreferencePair]:
    path = resolve(spec)
    if not path.is_file():
        raise InfopoError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        raw = raw[3:]
    pairs = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(str(path), number, None, f"not valid UTF-8 (byte {err.start + 1})") from None
        if text.strip():
            pairs.append(_parse_row(text, str(path), number))
    if not pairs:
        raise InfopoError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def _parse_row(text: str, path: str, line: int) -> PreferencePair:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, line, None, f"not valid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(row, dict):
        raise DataError(path, line, None, f"expected a JSON object with {', '.join(FIELDS)}, got {type(row).__name__}")
    for name in FIELDS:
        if name not in row:
            raise DataError(path, line, name, "missing")
        value = row[name]
        if not isinstance(value, str):
            raise DataError(path, line, name, f"expected a string, got {_json_type(value)}")
        if not value.strip():
            raise DataError(path, line, name, "empty")
    if row["chosen"] == row["rejected"]:
        raise DataError(path, line, "rejected", "identical to 'chosen' (the pair expresses no preference)")
    return PreferencePair(row["prompt"], row["chosen"], row["rejected"])


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)
