"""What a row parsed from JSON is checked for, beyond what json refuses: a key given twice, nesting deeper than
MAX_DEPTH, text that is not valid Unicode (JSON's "\\ud800" escapes parse to lone surrogates, which no tokenizer
can encode)."""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 100  # objects/arrays nested deeper are refused (a preference row needs 4 or 5 levels)


class RepeatedKey(dict):
    """An object that gives a key twice. json keeps the last value; the row is refused instead (see `problem`)."""

    key: str


def problem(row: Any) -> tuple[str | None, str] | None:
    """(field, problem) for the first thing in a parsed row that cannot be taken as it reads."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(row, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, (dict, list)) and len(path) >= MAX_DEPTH:  # the row itself is level 1
            return _place(path[:1], f"nested deeper than {MAX_DEPTH} levels")
        if found := _own_problem(value):
            return _place(path, found)
        if isinstance(value, dict):
            stack += [(v, path + (k,)) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(v, path + (i,)) for i, v in reversed(list(enumerate(value)))]
    return None


def escaped(name: str | int) -> str:
    """A field name as it can be printed on one line (escapes for newlines, quotes and lone surrogates)."""
    return str(name) if str(name).isprintable() else ascii(str(name))[1:-1]


def _own_problem(value: Any) -> str | None:
    """The problem of this string or object itself, not of what it holds."""
    if isinstance(value, str):
        return _bad_text(value)
    if isinstance(value, RepeatedKey):
        return f"key '{escaped(value.key)}' given twice"
    if isinstance(value, dict):
        return next((f"a key: {bad}" for key in value if isinstance(key, str) and (bad := _bad_text(key))), None)
    return None


def _place(path: tuple[str | int, ...], problem: str) -> tuple[str | None, str]:
    """(field, problem) with the place inside the field: ('prompt', (0, 'content')) -> 'prompt', '[0].content: ...'."""
    field = escaped(path[0]) if path and isinstance(path[0], str) else None
    inner = "".join(f"[{p}]" if isinstance(p, int) else f".{escaped(p)}" for p in path[field is not None:])
    return field, f"{inner.lstrip('.')}: {problem}" if inner else problem


def _bad_text(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid Unicode text: a lone surrogate {ascii(text[err.start])} at character {err.start + 1}"
    return None
