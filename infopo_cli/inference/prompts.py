"""Rows to generate from: prompt-only rows (`{"prompt": ..., "answer": 42}`) or the prompts of preference pairs.

A prompt-only file is any source `data/sources.read_rows` reads (JSONL, JSON, CSV, Parquet, ...) whose rows
have a prompt and no chosen/rejected reply; the preference loader refuses such rows, so they are read here,
every bad row one line naming FILE:LINE and the field. A reference answer is the row's `answer`; a pair
without one whose chosen reply ends "The answer is N." (the bundled arithmetic data) takes N; of unpaired feedback
rows only a desirable completion may give it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from infopo_cli.data.formats import Fields, PreferencePair, row_system
from infopo_cli.data.formats import _kind  # a value's kind in the words every data error uses
from infopo_cli.data.mixing import as_list, parse_source
from infopo_cli.data.sources import read_rows
from infopo_cli.errors import DataError, InfopoError
from infopo_cli.inference.answers import stated_answer
from infopo_cli.inference.generation import Messages, as_messages

ANSWER = "answer"


@dataclass(frozen=True)
class PromptRow:
    """One row to generate from: the messages the model reads and the reference answer, if any."""

    where: str                  # FILE:LINE of the row
    messages: Messages          # what the model reads
    answer: Any = None          # the reference answer, None when there is none
    answer_from: str = ""       # "answer" (the row's field), "chosen" (its chosen reply's "The answer is N."), ""

    @property
    def question(self) -> str:
        """The last user turn, for tables."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def is_prompt_only(spec: str, split: str = "train", fields: Fields = Fields()) -> bool:
    """Whether no row of `spec` carries a chosen or rejected reply or an unpaired completion (then it is a prompt-only
    file). A row that cannot be read is not evidence either way, so the first one is raised: its FILE:LINE message is
    the one to show."""
    first_error = None
    for _, row in read_rows(spec, split):
        if isinstance(row, dict) and any(name in row for name in (fields.chosen, fields.rejected, fields.completion)):
            return False
        first_error = first_error or (row if isinstance(row, Exception) else None)
    if first_error is not None:
        raise first_error
    return True


def check_answer(value: Any, where: str) -> Any:
    """A reference answer is a number or a string. None for none: null, and what files write for a missing value (an
    empty CSV cell, a blank string, pandas' NaN), which no reply can match: it would be scored wrong, not left out."""
    if isinstance(value, float) and math.isnan(value) or isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, float) and math.isinf(value):
        raise DataError(where, ANSWER, "not a finite number")
    if value is None or (isinstance(value, (int, float, str)) and not isinstance(value, bool)):
        return value
    raise DataError(where, ANSWER, f"expected a number or a string, got {_kind(value)}")


def read_prompt_rows(spec: str, split: str = "train", fields: Fields = Fields(), system: str | None = None) -> list[PromptRow]:
    """Every row of a prompt-only source; the first bad row raises its one-line DataError."""
    rows = []
    for where, row in read_rows(spec, split):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(where, None, f"expected an object with a {fields.prompt!r} field, got {_kind(row)}")
        if fields.prompt not in row or row[fields.prompt] is None:
            raise DataError(where, fields.prompt, "missing")
        prompt = row[fields.prompt]
        if not isinstance(prompt, str):
            raise DataError(where, fields.prompt, f"expected a string, got {_kind(prompt)}")
        if not prompt.strip():
            raise DataError(where, fields.prompt, "empty")
        answer = check_answer(row.get(ANSWER), where)
        own = row_system(row, fields)  # the row's own system message first, as training reads it
        rows.append(PromptRow(where, as_messages(prompt, own or system), answer, ANSWER if answer is not None else ""))
    if not rows:
        raise InfopoError(f"{spec}: no rows")
    return rows


def answers_by_row(specs: str | Sequence[str], split: str = "train") -> dict[str, Any]:
    """{FILE:LINE: answer} for the rows of preference sources that carry an `answer` field."""
    found = {}
    for text in as_list(specs):
        for where, row in read_rows(parse_source(text).spec, split):
            if isinstance(row, dict) and (answer := check_answer(row.get(ANSWER), where)) is not None:
                found[where] = answer
    return found


def rows_from_pairs(pairs: Sequence[PreferencePair], answers: dict[str, Any]) -> list[PromptRow]:
    """One row per distinct prompt (several pairs of one scored row share it; unpaired rows of one prompt, wherever
    they are, too), with its reference answer. An undesirable completion never gives one."""
    rows, index = [], {}
    for pair in pairs:
        key = pair.prompt if pair.unpaired else (pair.where, pair.prompt)
        answer, source = answers.get(pair.where), ANSWER if pair.where in answers else ""
        if answer is None and pair.label is not False:
            chosen = pair.chosen if isinstance(pair.chosen, str) else next(
                (content for role, content in reversed(pair.chosen) if role == "assistant"), "")
            answer = stated_answer(chosen)
            source = "chosen" if answer is not None else ""
        if key not in index:
            index[key] = len(rows)
            rows.append(PromptRow(pair.where, as_messages(pair.prompt), answer, source))
        elif pair.unpaired and rows[index[key]].answer is None and answer is not None:  # a later desirable row's
            rows[index[key]] = replace(rows[index[key]], answer=answer, answer_from=source)
    return rows
