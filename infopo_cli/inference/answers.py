"""Exact-match scoring of a generated reply against a row's reference `answer`.

The rule (also stated by `infopo eval --help`):

- A numeric answer (an int or float, or a string that reads as a number such as "42", "-3.5" or "1,234")
  matches when the LAST number in the reply equals it. Numbers may carry a minus sign, thousands
  separators (1,234,567) and decimals (2.50 equals 2.5); a minus right after a letter or digit is a
  subtraction, not a sign ("10-3" ends with 3). "The answer is 42." gives 42.
- A text answer matches when the whole reply equals it after both are normalised: case folded,
  surrounding whitespace and trailing punctuation (. , ! ? ; :) removed.

Standard library only: the CLI's help text reads `RULE` before anything heavy is imported.
"""

from __future__ import annotations

import math
import re
from typing import Any

RULE = ("Exact match against a row's 'answer': a numeric answer (a number, or a string that reads as one) matches "
        "the LAST number in the reply (minus signs, thousands commas and decimals understood: 'The answer is 1,234.' "
        "gives 1234); a text answer matches the whole reply, both compared case-insensitively without surrounding "
        "whitespace or trailing punctuation.")

# A number not glued to a preceding letter, digit or dot; thousands groups only in threes (so "1,2" is two numbers).
# U+2212 is the typographic minus sign some models write.
NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
# The bundled arithmetic data ends every chosen reply so; such replies give a reference answer.
STATED_ANSWER = re.compile(r"The answer is\s+(\S+?)\.?\s*$")
TRAILING = ".,!?;:"


def parse_number(text: str) -> float | None:
    """The value of `text` if it is one number and nothing else ("1,234", "-0.5", " 42 "), else None."""
    text = text.strip()
    match = NUMBER.fullmatch(text)
    return _value(match.group()) if match else None


def last_number(reply: str) -> float | None:
    """The last number written in `reply`, or None if it has none."""
    found = NUMBER.findall(reply)
    return _value(found[-1]) if found else None


def _value(token: str) -> float:
    return float(token.replace(",", "").replace("\u2212", "-"))


def reference_number(answer: Any) -> float | None:
    """The number a reference answer stands for, or None for a text answer (booleans are text)."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return float(answer) if math.isfinite(answer) else None
    return parse_number(answer) if isinstance(answer, str) else None


def normalise(text: str) -> str:
    """`text` as answers are compared: stripped, case-folded, trailing punctuation dropped."""
    return text.strip().casefold().rstrip(TRAILING).strip()


def matches(reply: str, answer: Any) -> bool:
    """Whether `reply` gives `answer` under the module's rule."""
    number = reference_number(answer)
    if number is not None:
        got = last_number(reply)
        return got is not None and math.isclose(got, number, rel_tol=1e-9, abs_tol=1e-9)
    return normalise(reply) == normalise(str(answer).lower() if isinstance(answer, bool) else str(answer))


def stated_answer(reply: str) -> str | None:
    """N from a reply ending "The answer is N." when N is a number (how the bundled data's chosen replies end)."""
    match = STATED_ANSWER.search(reply.strip())
    return match.group(1) if match and parse_number(match.group(1)) is not None else None
