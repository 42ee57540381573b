r"""Scored and ranked preference data -> preference pairs.

Many public preference sets do not hold one pair a row: they score or rank several completions, or give a pair
with scores to filter on. `detect_scored` names the shape of a row, `scored_pairs` turns it into `PreferencePair`s
(each built by `formats.normalise`, so every rule for ordinary pairs applies) or says why it gives none.

Shapes (field names as the datasets publish them):

- scored:   `prompt` (or UltraFeedback's `instruction`), a string or a list of {role, content} messages, and
            `completions`: strings, or objects with `text`, `response` or `content`. The scores are a parallel
            `ratings` (or `scores`) list; without one each completion object is scored as openbmb/UltraFeedback
            does: its `overall_score`, else its `fine-grained_score`, else the mean of the numeric
            `annotations.<aspect>.Rating` values ("N/A" ratings are ignored).
- ranked:   berkeley-nest/Nectar: `prompt`, an Anthropic HH transcript ("\n\nHuman: ...\n\nAssistant:", the
            trailing empty Assistant turn dropped) or a string or message list, and `answers`: objects with
            `answer` and `rank` (1 is best). The score is -rank, so score gaps are rank differences.
- labelled: stanfordnlp/SHP: `history` (or `prompt`), the answers `human_ref_A`, `human_ref_B`, `labels`
            (1: A preferred, 0: B preferred) and the vote counts `score_A`, `score_B`, optionally `score_ratio`.
            Without `labels` the higher score wins.
- rated:    an ordinary pair (any format `formats` reads) carrying `chosen_rating`/`rejected_rating` (argilla;
            also `chosen-rating`/`rejected-rating`, `rating_chosen`/`rating_rejected`) or
            `score_chosen`/`score_rejected` (HuggingFaceH4/ultrafeedback_binarized). It is kept when chosen is
            rated above rejected.

A row holding both `chosen` and `rejected` is an ordinary pair ("rated" when it carries ratings), whatever other
columns it has; otherwise the shapes are tried in the order labelled, ranked, scored.

Pairing the completions of a scored or ranked row (`ScoreOptions.pairs`), in score order, tied scores in list order:

- best-worst (default): the best vs the worst. Of tied best (or tied worst) completions the first in the list is taken.
- best-vs-each:          the best vs each other completion, the next best first.
- adjacent:              each completion vs each completion at the next lower score (without ties: consecutive
                         completions in score order).
- all:                   every pair (higher, lower).

Filters, in every shape: a pair needs a score gap above 0 (a tie never gives a pair) and at least `min_score_gap`;
a labelled row also needs its `score_ratio` (else max/min of its two scores, infinite when only the lower is 0) to be
at least `min_score_ratio`. In a scored or ranked row a completion without a score (null, or none given) is left
out, a pair whose two sides are the same text is skipped, and a pair repeated is kept once. A score that is not a
number is an error naming its field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from infopo_cli.config import PAIRINGS  # one list, for --help and here
from infopo_cli.data.formats import HH_TURN, Fields, PreferencePair, _hh_messages, _kind, _messages, detect, normalise
from infopo_cli.errors import ConfigError, DataError

__all__ = ["PAIRINGS", "SCORED_FORMATS", "ScoreOptions", "detect_scored", "scored_pairs"]

SCORED_FORMATS = ("scored", "ranked", "labelled", "rated")

RATING_FIELDS = (("chosen_rating", "rejected_rating"), ("chosen-rating", "rejected-rating"),
                 ("rating_chosen", "rating_rejected"), ("score_chosen", "score_rejected"))
TEXT_KEYS = ("text", "response", "content")
NOT_RATED = "N/A"  # UltraFeedback's annotation rating for an aspect that does not apply

# Why a row gives no pair (short, stable: the loader counts dropped rows by these).
FEW = "fewer than two scored completions"
ALL_TIE = "all completions tie"
SAME_TEXT = "completions that differ in score have the same text"
TIE = "tie"
GAP = "score gap below --min-score-gap"
RATIO = "score ratio below --min-score-ratio"
NO_SCORES_GAP = "no score_A/score_B to check --min-score-gap"
NO_SCORES_RATIO = "no score_A/score_B to check --min-score-ratio"
UNRATED = "chosen or rejected has no rating"
INVERTED = "rejected is rated above chosen"


@dataclass(frozen=True)
class ScoreOptions:
    """How scored or ranked rows become pairs (--pairs, --min-score-gap, --min-score-ratio), checked on creation."""

    pairs: str = "best-worst"        # how a list of scored/ranked completions becomes pairs (one of PAIRINGS)
    min_score_gap: float = 0.0       # drop pairs whose score gap is below this (a gap of 0, a tie, is always dropped)
    min_score_ratio: float = 1.0     # labelled two-answer rows (SHP): drop when max(score)/min(score) < this

    def __post_init__(self) -> None:
        if self.pairs not in PAIRINGS:
            raise ConfigError(f"unknown pairing '{self.pairs}'; use one of {', '.join(PAIRINGS)}")
        for flag, value in (("--min-score-gap", self.min_score_gap), ("--min-score-ratio", self.min_score_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{flag} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class _Item:
    """One scored answer: its text, its score, and the field (and list item) it came from, for errors."""
    text: str
    score: float
    field: str          # the row's field holding it
    label: str = ""     # "item 3" within a list field, "" for a field of its own


def detect_scored(row: dict, fields: Fields = Fields()) -> str | None:
    """One of SCORED_FORMATS when the row has that shape, else None (an ordinary pair row). A pair is found by the
    user's field names (--chosen-field ...); its ratings and the other shapes by the names the datasets publish."""
    if not isinstance(row, dict):
        return None
    if fields.chosen in row and fields.rejected in row:
        return "rated" if any(name in row for names in RATING_FIELDS for name in names) else None
    if "human_ref_A" in row and "human_ref_B" in row:
        return "labelled"
    answers = row.get("answers")
    if (isinstance(answers, list) and answers and all(isinstance(a, dict) for a in answers)
            and any("rank" in a for a in answers)):
        return "ranked"
    if isinstance(row.get("completions"), list):
        return "scored"
    return None


def scored_pairs(row: dict, where: str, fmt: str, options: ScoreOptions, fields: Fields = Fields()
                 ) -> tuple[list[PreferencePair], str | None]:
    """The pairs a scored/ranked row gives, and when it gives none, why (a short reason such as
    'score gap below --min-score-gap', 'all completions tie', 'score ratio below --min-score-ratio'),
    used for counting dropped rows. Malformed rows raise DataError naming the field. `fields`: a rated pair's
    columns; a renamed prompt (--prompt-field) is every shape's prompt."""
    if fmt not in SCORED_FORMATS:
        raise ConfigError(f"unknown scored format '{fmt}'; use one of {', '.join(SCORED_FORMATS)}")
    if not isinstance(row, dict):
        raise DataError(where, None, f"expected an object, got {_kind(row)}")
    renamed = (fields.prompt,) if fields.prompt != Fields.prompt else None
    if fmt == "rated":
        return _rated(row, where, options, fields)
    if fmt == "labelled":
        return _labelled(row, where, options, renamed or ("prompt", "history"))
    if fmt == "ranked":
        prompt_field, prompt = _ranked_prompt(row, where, renamed or ("prompt",))
        items = _ranked_items(row, where)
    else:
        prompt_field, prompt = _prompt(row, where, renamed or ("prompt", "instruction"))
        items = _scored_items(row, where)
    return _from_list(prompt_field, prompt, items, where, options)


# --- scored and ranked lists -------------------------------------------------------------------------------------

def _from_list(prompt_field: str, prompt: str | list, items: list[_Item], where: str,
               options: ScoreOptions) -> tuple[list[PreferencePair], str | None]:
    if len(items) < 2:
        return [], FEW
    if len({item.score for item in items}) == 1:
        return [], ALL_TIE
    pairs: list[PreferencePair] = []
    seen: set[tuple[str, str]] = set()
    gap_too_small = False
    for better, worse in _candidates(items, options.pairs):
        gap = better.score - worse.score
        if gap <= 0 or better.text == worse.text or (better.text, worse.text) in seen:
            continue
        if not _at_least(gap, options.min_score_gap):
            gap_too_small = True
            continue
        seen.add((better.text, worse.text))
        pairs.append(_pair(prompt_field, prompt, better, worse, where))
    if pairs:
        return pairs, None
    return [], GAP if gap_too_small else SAME_TEXT


def _candidates(items: list[_Item], mode: str) -> list[tuple[_Item, _Item]]:
    """(higher, lower) candidates in pairing `mode`; `items` in list order, which breaks ties."""
    order = sorted(items, key=lambda item: -item.score)  # stable: tied completions stay in list order
    if mode == "best-worst":
        worst = min(items, key=lambda item: item.score)  # min/max keep the first of equals
        return [(order[0], worst)]
    if mode == "best-vs-each":
        return [(order[0], other) for other in order[1:]]
    if mode == "adjacent":
        levels: list[list[_Item]] = []
        for item in order:
            if levels and levels[-1][0].score == item.score:
                levels[-1].append(item)
            else:
                levels.append([item])
        return [(a, b) for upper, lower in zip(levels, levels[1:]) for a in upper for b in lower]
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]


def _list_field(row: dict, where: str, name: str) -> list:
    value = row.get(name)
    if value is None:
        raise DataError(where, name, "missing")
    if not isinstance(value, list):
        raise DataError(where, name, f"expected a list, got {_kind(value)}")
    return value


def _scored_items(row: dict, where: str) -> list[_Item]:
    completions = _list_field(row, where, "completions")
    score_field = next((name for name in ("ratings", "scores") if row.get(name) is not None), None)
    scores: list[Any] = []
    if score_field is not None:
        scores = row[score_field]
        if not isinstance(scores, list):
            raise DataError(where, score_field, f"expected a list of numbers, got {_kind(scores)}")
        if len(scores) != len(completions):
            raise DataError(where, score_field, f"has {len(scores)} items but 'completions' has {len(completions)}")
    items = []
    for i, completion in enumerate(completions):
        label = f"item {i + 1}"
        text = _text(completion, where, "completions", label, TEXT_KEYS)
        if score_field is not None:
            score = _number(scores[i], where, score_field, label)
        elif isinstance(completion, dict):
            score = _ultrafeedback_score(completion, where, label)
        else:
            raise DataError(where, "ratings", "missing: string completions need a parallel 'ratings' (or 'scores') list")
        if score is not None:
            items.append(_Item(text, score, "completions", label))
    return items


def _ultrafeedback_score(completion: dict, where: str, label: str) -> float | None:
    """overall_score, else fine-grained_score, else the mean numeric annotation Rating; None when it has none."""
    for key in ("overall_score", "fine-grained_score"):
        if completion.get(key) is not None:
            return _number(completion[key], where, "completions", f"{label}: '{key}'")
    annotations = completion.get("annotations")
    if annotations is None:
        return None
    if not isinstance(annotations, dict):
        raise DataError(where, "completions", f"{label}: 'annotations' expected an object, got {_kind(annotations)}")
    ratings = []
    for aspect, value in annotations.items():
        for entry in value if isinstance(value, list) else [value]:
            rating = entry.get("Rating") if isinstance(entry, dict) else None
            if rating is None or (isinstance(rating, str) and rating.strip().upper() == NOT_RATED):
                continue
            number = _number(rating, where, "completions", f"{label}: annotations '{aspect}' 'Rating'")
            if number is not None:
                ratings.append(number)
    return sum(ratings) / len(ratings) if ratings else None


def _ranked_prompt(row: dict, where: str, names: tuple[str, ...]) -> tuple[str, str | list]:
    """Nectar's HH transcript prompt as messages; a prompt without HH turn markers as it is."""
    name, prompt = _prompt(row, where, names)
    if isinstance(prompt, list):
        return name, prompt
    text = prompt.lstrip()
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text  # a transcript starting with its first marker, without the blank line before it
    first = HH_TURN.search(text)
    if first is None:
        return name, prompt
    return name, [{"role": role, "content": content} for role, content in _hh_messages(text, where, name)]


def _ranked_items(row: dict, where: str) -> list[_Item]:
    answers = _list_field(row, where, "answers")
    items = []
    for i, answer in enumerate(answers):
        label = f"item {i + 1}"
        text = _text(answer, where, "answers", label, ("answer",) + TEXT_KEYS)
        rank = _number(answer.get("rank"), where, "answers", f"{label}: 'rank'") if isinstance(answer, dict) else None
        if rank is not None and rank < 1:
            raise DataError(where, "answers", f"{label}: 'rank' must be 1 or more (1 is best), got {_show(answer['rank'])}")
        if rank is not None:
            items.append(_Item(text, -rank, "answers", label))
    return items


# --- two-answer rows ---------------------------------------------------------------------------------------------

def _labelled(row: dict, where: str, options: ScoreOptions, names: tuple[str, ...]
              ) -> tuple[list[PreferencePair], str | None]:
    prompt_field, prompt = _prompt(row, where, names, report=names[-1])
    a = _text(row.get("human_ref_A"), where, "human_ref_A", "", ())
    b = _text(row.get("human_ref_B"), where, "human_ref_B", "", ())
    if a == b:
        raise DataError(where, "human_ref_B", "identical to 'human_ref_A' (the pair expresses no preference)")
    score_a = _number(row.get("score_A"), where, "score_A")
    score_b = _number(row.get("score_B"), where, "score_B")
    scored = score_a is not None and score_b is not None
    if (score_a is None) != (score_b is None):
        missing, present = ("score_A", "score_B") if score_a is None else ("score_B", "score_A")
        raise DataError(where, missing, f"missing (the row has '{present}')")
    label = _number(row.get("labels"), where, "labels")
    if label is not None and label not in (0, 1):
        raise DataError(where, "labels", f"expected 1 (human_ref_A preferred) or 0 (human_ref_B preferred), "
                                         f"got {_show(row['labels'])}")
    if label is None and not scored:
        raise DataError(where, "labels", "missing, and no 'score_A'/'score_B' to compare")
    if scored and score_a == score_b:
        return [], TIE
    a_wins = label == 1 if label is not None else score_a > score_b
    if label is not None and scored and a_wins != (score_a > score_b):  # SHP's label is the higher vote count
        raise DataError(where, "labels", f"{_show(row['labels'])} prefers human_ref_{'A' if a_wins else 'B'}, but its "
                                         f"votes prefer the other (score_A {_show(row['score_A'])}, score_B "
                                         f"{_show(row['score_B'])})")

    ratio = _number(row.get("score_ratio"), where, "score_ratio")
    if ratio is None and scored and options.min_score_ratio > 1:
        low, high = sorted((score_a, score_b))
        if low < 0:
            raise DataError(where, "score_A" if score_a < 0 else "score_B",
                            "negative, and --min-score-ratio needs vote counts of 0 or more")
        ratio = math.inf if low == 0 else high / low
    if ratio is None and options.min_score_ratio > 1:
        return [], NO_SCORES_RATIO
    if ratio is not None and not _at_least(ratio, options.min_score_ratio):
        return [], RATIO
    if not scored and options.min_score_gap > 0:
        return [], NO_SCORES_GAP
    if scored and not _at_least(abs(score_a - score_b), options.min_score_gap):
        return [], GAP

    item_a, item_b = _Item(a, 0.0, "human_ref_A"), _Item(b, 0.0, "human_ref_B")
    better, worse = (item_a, item_b) if a_wins else (item_b, item_a)
    return [_pair(prompt_field, prompt, better, worse, where)], None


def _rated(row: dict, where: str, options: ScoreOptions, fields: Fields) -> tuple[list[PreferencePair], str | None]:
    names = next((names for names in RATING_FIELDS if names[0] in row or names[1] in row), None)
    if names is None:
        raise DataError(where, "chosen_rating", "missing: a rated pair needs 'chosen_rating'/'rejected_rating' "
                                                "or 'score_chosen'/'score_rejected'")
    for name, other in (names, names[::-1]):
        if name not in row:
            raise DataError(where, name, f"missing (the row has '{other}')")
    chosen, rejected = (_number(row[name], where, name) for name in names)
    pair = normalise(row, where, detect(row, fields), fields, system=None)  # a malformed pair raises, rated or not
    if chosen is None or rejected is None:
        return [], UNRATED
    gap = chosen - rejected
    if gap < 0:
        return [], INVERTED
    if gap == 0:
        return [], TIE
    if not _at_least(gap, options.min_score_gap):
        return [], GAP
    return [pair], None


# --- helpers -----------------------------------------------------------------------------------------------------

def _pair(prompt_field: str, prompt: str | list, better: _Item, worse: _Item, where: str) -> PreferencePair:
    """normalise() the pair, its errors naming this row's own fields."""
    fmt = "conversational" if isinstance(prompt, list) else "explicit"
    try:
        return normalise({"prompt": prompt, "chosen": better.text, "rejected": worse.text}, where, fmt, Fields(),
                         system=None)
    except DataError as err:
        item = better if err.field == "chosen" else worse if err.field == "rejected" else None
        if item is None:
            raise DataError(where, prompt_field if err.field == "prompt" else err.field, err.problem) from None
        raise DataError(where, item.field, f"{item.label}: {err.problem}" if item.label else err.problem) from None


def _prompt(row: dict, where: str, names: tuple[str, ...], report: str | None = None) -> tuple[str, str | list]:
    """The first of `names` the row has: a non-empty string or a valid message list (checked here, naming it)."""
    for name in names:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            if not value.strip():
                raise DataError(where, name, "empty")
        elif isinstance(value, list):
            if not value:
                raise DataError(where, name, "empty")
            _messages(value, where, name)
        else:
            raise DataError(where, name, f"expected a string or a list of messages, got {_kind(value)}")
        return name, value
    report = report or names[0]
    others = [f"'{name}'" for name in names if name != report]
    raise DataError(where, report, "missing" + (f" (or {', '.join(others)})" if others else ""))


def _text(value: Any, where: str, field: str, label: str, keys: tuple[str, ...]) -> str:
    """A completion's text: a string, or the first of `keys` in an object."""
    prefix = f"{label}: " if label else ""
    if value is None and not label:
        raise DataError(where, field, "missing")
    if isinstance(value, dict) and keys:
        key = next((k for k in keys if value.get(k) is not None), None)
        if key is None:
            raise DataError(where, field, f"{prefix}expected an object with " + " or ".join(f"'{k}'" for k in keys))
        value, prefix = value[key], f"{prefix}'{key}' "
    if not isinstance(value, str):
        raise DataError(where, field, f"{prefix}expected a string, got {_kind(value)}")
    if not value.strip():
        raise DataError(where, field, f"{prefix}empty")
    return value


def _number(value: Any, where: str, field: str, what: str = "") -> float | None:
    """A score: a number or a numeric string ("5"); None for null; anything else a DataError."""
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    subject = f"{what} is" if what else "is"
    if number is None:
        raise DataError(where, field, f"{subject} not a number (got {_show(value)})")
    if not math.isfinite(number):
        raise DataError(where, field, f"{subject} not a finite number (got {_show(value)})")
    return number


def _show(value: Any, limit: int = 40) -> str:
    """A value for an error message: repr, one line, cut to `limit` characters."""
    text = repr(value) if isinstance(value, str) else _kind(value) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _at_least(value: float, minimum: float) -> bool:
    """value >= minimum, forgiving float rounding (ratings 4.5 and 4.4 are 0.1 apart)."""
    return value >= minimum or math.isclose(value, minimum, rel_tol=1e-9, abs_tol=1e-12)
