"""Load preference pairs from any source and format, checking every row before any model is loaded.

By default the first bad row stops the run with one line `FILE:LINE: field 'X': what is wrong`;
with `skip_invalid` bad rows are dropped and counted instead.

A source holds preference pairs or unpaired feedback rows (a completion and a label), not both: its first row
fixes the kind. `unpair` splits pairs into such rows; `data_kind` names the kind of a list (of several sources).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError, DataError, InfopoError
from infopo_cli.data.formats import (FORMATS, Fields, PreferencePair, detect, is_empty, is_multi_turn, normalise,
                                     row_system, unpaired_row, with_own_system, with_system)
from infopo_cli.data.scored import SCORED_FORMATS, ScoreOptions, detect_scored, scored_pairs
from infopo_cli.data.sources import folder_info, open_source, resolve

__all__ = ["DataOptions", "Loaded", "PreferencePair", "data_kind", "load_pairs", "no_pairs", "read_pairs", "resolve",
           "unpair"]

UNBALANCED = 4.0  # a note when desirable and undesirable rows differ in number by more than this factor


@dataclass(frozen=True)
class DataOptions:
    """How rows are read: their format and field names, the split, the system prompt, bad rows, scored rows."""

    format: str = "auto"
    fields: Fields = field(default_factory=Fields)
    split: str = "train"
    system: str | None = None
    skip_invalid: bool = False
    scores: ScoreOptions = field(default_factory=ScoreOptions)  # scored/ranked rows -> pairs (data/scored.py)

    @classmethod
    def from_config(cls, cfg: TrainConfig, split: str | None = None) -> DataOptions:
        """A run's data settings; `split` replaces cfg.split (held-out data passes cfg.eval_split)."""
        return cls(cfg.data_format, Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field, cfg.completion_field,
                                           cfg.label_field, cfg.system_field),
                   split or cfg.split, cfg.system_prompt, cfg.skip_invalid,
                   ScoreOptions(cfg.pairs, cfg.min_score_gap, cfg.min_score_ratio))


@dataclass
class Loaded:
    """What loading a source gave: the pairs, the detected format and what was dropped or noted on the way."""

    pairs: list[PreferencePair]
    format: str                                        # the detected format ("mixed (...)" if rows differ)
    rows: int                                          # rows read, valid or not
    skipped: list[str] = field(default_factory=list)   # one line per dropped row
    notes: list[str] = field(default_factory=list)     # warnings about the data's shape, for `data check` and `train`
    mix: str = ""                                      # several sources: what each gave (data/mixing.py)
    info: list[str] = field(default_factory=list)      # how scored/ranked rows became pairs


ALL_FORMATS = FORMATS + SCORED_FORMATS
LISTED = {"scored": "completions", "ranked": "answers", "labelled": "human_ref_A, human_ref_B"}  # answers not in a pair


def load_pairs(spec: str, options: DataOptions = DataOptions()) -> Loaded:
    """Every row of `spec` checked and normalised into pairs; the first bad row raises unless `skip_invalid`."""
    if options.format not in ALL_FORMATS:
        raise ConfigError(f"unknown data format '{options.format}'; use one of {', '.join(ALL_FORMATS)}")
    if options.format in LISTED and (renamed := [f"--{role}-field" for role in ("chosen", "rejected", "completion", "label")
                                                 if getattr(options.fields, role) != getattr(Fields, role)]):
        raise ConfigError(f"{', '.join(renamed)}: --format {options.format} reads its answers from the fields the "
                          f"datasets publish ({LISTED[options.format]}); only --prompt-field renames its prompt")
    if spec.startswith("bundled:"):  # our own files: their columns are named as they are, whatever the user's are
        options = replace(options, format="auto", fields=Fields())
    opened = open_source(spec, options.split)
    collected, per_file = _Collected(options), []
    for _, rows in opened.files:
        before = collected.rows
        for where, row in rows:
            collected.add(where, row)
        per_file.append(collected.rows - before)
    pairs, skipped, seen, dropped = collected.pairs, collected.skipped, collected.seen, collected.dropped
    if not pairs:
        raise no_pairs(spec, skipped + [f"{n} rows gave no pair: {reason}" for reason, n in dropped.items() if n])
    fmt = next(iter(seen)) if len(seen) == 1 else "mixed (" + ", ".join(f"{n} {f}" for f, n in seen.most_common()) + ")"
    notes = shape_notes(pairs) + feedback_notes(pairs) + dropped_notes(dropped)
    if options.system and (own := sum(p.prompt[0] != ("system", options.system) for p in pairs)):
        notes.append(f"{own} rows have a system message of their own: kept, --system is added only to rows without one")
    if collected.both_shapes:
        notes.append(f"{collected.both_shapes} rows have chosen/rejected and also {options.fields.completion}/"
                     f"{options.fields.label}: read as pairs (--format unpaired reads them as feedback rows)")
    name = options.fields.system
    system_info = [f"{collected.own_system} rows have a system message in their '{name}' column: the first message "
                   "of their prompt (--system-field '' reads none)"] if collected.own_system else []
    if collected.no_system:
        notes.append(f"{collected.no_system} rows have a '{name}' column that is no system message (a number, a list, "
                     "one token such as a model's name): not read; --system-field '' reads the column of no row")
    return Loaded(pairs, fmt, collected.rows, skipped, notes,
                  info=folder_info(opened, per_file) + given_info(collected.given, options) + system_info)


class _Collected:
    """The pairs of a source's rows as they are read, and what was skipped, detected and dropped on the way."""

    def __init__(self, options: DataOptions) -> None:
        self.options = options
        self.detect_scores = options.format == "auto"
        self.pairs: list[PreferencePair] = []
        self.skipped: list[str] = []
        self.rows = 0
        self.seen: Counter = Counter()
        self.given: Counter = Counter()    # scored/ranked rows: pairs given per row
        self.dropped: Counter = Counter()  # scored/ranked rows: rows dropped per reason
        self.first: tuple[bool, str] | None = None  # (unpaired?, FILE:LINE) of the first valid row: it fixes the kind
        self.own_system = 0   # rows whose system column gave their system message
        self.no_system = 0    # rows whose system column holds no text (a number, a list, one token such as "gpt-4")
        self.both_shapes = 0  # pairs whose rows also carry a completion and a label (read as pairs: a warning says so)

    def add(self, where: str, row: object) -> None:
        options = self.options
        self.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            fmt = (detect_scored(row, options.fields) if self.detect_scores else None) or (
                detect(row, options.fields) if options.format == "auto" else options.format)
            if fmt in SCORED_FORMATS:
                found, reason = scored_pairs(row, where, fmt, options.scores, options.fields)
                self._same_kind(where, False)
                own = row_system(row, options.fields)  # the row's own first: --system adds one only to rows without
                found = [with_own_system(p, own) for p in found]
                self.pairs += [with_system(p, options.system) if options.system else p for p in found]
                made = found[0] if found else None
                self.given[len(found)] += 1
                self.dropped[reason] += reason is not None
            else:
                pair = normalise(row, where, fmt, options.fields, options.system)
                self._same_kind(where, pair.unpaired)
                self.pairs.append(pair)
                made = pair
                self.both_shapes += not pair.unpaired and options.fields.completion in row and options.fields.label in row
            self.count_system(row, made)
            self.seen[f"rated {detect(row, options.fields)}" if fmt == "rated" else fmt] += 1
        except DataError as err:
            if not options.skip_invalid:
                raise
            self.skipped.append(str(err))

    def count_system(self, row: dict, pair: PreferencePair | None) -> None:
        """Counts the row among those whose system column was their system message (of its `pair`, the first if it
        gave several), or held none that was text."""
        own, raw = row_system(row, self.options.fields), row.get(self.options.fields.system)
        self.own_system += bool(own) and pair is not None and pair.prompt[0] == ("system", own)
        self.no_system += own == "" and raw is not None and not (isinstance(raw, str) and not raw.strip())

    def _same_kind(self, where: str, unpaired: bool) -> None:
        """A valid row of the other kind than the first valid row is an error at that row."""
        if self.first is None:
            self.first = (unpaired, where)
        elif unpaired != self.first[0]:
            fields = self.options.fields
            what = (f"an unpaired row ({fields.completion}, {fields.label}) among preference pairs (first pair"
                    if unpaired else
                    f"a preference pair ({fields.chosen}, {fields.rejected}) among unpaired rows (first unpaired row")
            raise DataError(where, None, f"{what} at {self.first[1]}): keep each kind in its own dataset")


def data_kind(pairs: list[PreferencePair]) -> str:
    """The kind of the data: "pairs" or "unpaired" (feedback rows). A list holding both (sources of different kinds
    mixed) is a ConfigError."""
    first_pair = next((p for p in pairs if not p.unpaired), None)
    first_row = next((p for p in pairs if p.unpaired), None)
    if first_pair is not None and first_row is not None:
        raise ConfigError(f"the data mixes preference pairs ({_place(first_pair)}) and unpaired feedback rows "
                          f"({_place(first_row)}): train on one kind (--unpair splits each pair into two unpaired rows)")
    return "unpaired" if first_row is not None else "pairs"


def unit(rows: Sequence[Any]) -> str:
    """What to call the data's items in messages: "pairs", or "rows" for unpaired feedback (pairs or their tokens)."""
    return "pairs" if not rows or rows[0].label is None else "rows"


def _place(pair: PreferencePair) -> str:
    return f"e.g. {pair.where}" if pair.where else "given in code"


def unpair(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """Each pair as two unpaired rows, its chosen reply desirable and its rejected one undesirable (same prompt and
    FILE:LINE); unpaired rows are kept as they are."""
    out = []
    for pair in pairs:
        if pair.unpaired:
            out.append(pair)
        else:
            out += [unpaired_row(pair.prompt, pair.chosen, True, pair.where),
                    unpaired_row(pair.prompt, pair.rejected, False, pair.where)]
    return out


def feedback_counts(pairs: list[PreferencePair]) -> tuple[int, int]:
    """(desirable, undesirable) unpaired rows among `pairs`."""
    labels = Counter(p.label for p in pairs if p.unpaired)
    return labels[True], labels[False]


def balance(desirable: int, undesirable: int) -> str:
    """'412 desirable, 188 undesirable (2.19 : 1)': the counts and their ratio, the smaller side as 1."""
    if not desirable or not undesirable:
        ratio = "no undesirable rows" if desirable else "no desirable rows"
    else:
        ratio = (f"{desirable / undesirable:.2f} : 1" if desirable >= undesirable
                 else f"1 : {undesirable / desirable:.2f}")
    return f"{desirable} desirable, {undesirable} undesirable ({ratio})"


def feedback_notes(pairs: list[PreferencePair]) -> list[str]:
    """Warnings about unpaired rows: desirable and undesirable far from balanced, and the same completion of one
    prompt labelled both ways."""
    desirable, undesirable = feedback_counts(pairs)
    if not desirable + undesirable:
        return []
    notes = []
    if max(desirable, undesirable) > UNBALANCED * min(desirable, undesirable):
        notes.append(f"unbalanced feedback: {balance(desirable, undesirable)}, beyond 1 : {UNBALANCED:g} either way")
    labels: dict[tuple, set[bool]] = {}
    for pair in pairs:
        if pair.unpaired:
            labels.setdefault((pair.prompt, pair.chosen), set()).add(pair.label)
    if both := sum(len(seen) == 2 for seen in labels.values()):
        notes.append(f"{both} prompt+completion pairs appear with both labels (contradictory feedback)")
    return notes


def given_info(given: Counter, options: DataOptions) -> list[str]:
    """How many pairs the scored/ranked rows gave, per row."""
    if not given:
        return []
    spread = ", ".join(f"{rows} gave {n}" for n, rows in sorted(given.items()))
    return [f"scored/ranked rows -> pairs by --pairs {options.scores.pairs} (gap >= {options.scores.min_score_gap:g}, "
            f"ratio >= {options.scores.min_score_ratio:g}): {sum(n * r for n, r in given.items())} pairs from "
            f"{sum(given.values())} rows ({spread})"]


def dropped_notes(dropped: Counter) -> list[str]:
    """One line per reason rows gave no pair, most frequent first."""
    return [f"{n} rows gave no pair: {reason}" for reason, n in dropped.most_common() if n]


def shape_notes(pairs: list[PreferencePair]) -> list[str]:
    """Warnings (not errors) about pairs (and unpaired rows) that train differently from a plain one-reply pair."""
    notes = []
    # an unpaired row's empty rejected is no reply: its rows are counted apart
    rows, paired = [p for p in pairs if p.unpaired], [p for p in pairs if not p.unpaired]
    empty = {side: sum(is_empty(getattr(p, side)) for p in paired) for side in ("chosen", "rejected")}
    if any(empty.values()):
        notes.append(f"{empty['chosen']} pairs have an empty chosen reply and {empty['rejected']} an empty rejected "
                     "one: each is trained as the end-of-turn token alone (the answer is to say nothing)")
    if several := sum(is_multi_turn(p.chosen) or is_multi_turn(p.rejected) for p in paired):
        notes.append(f"{several} pairs differ before their last assistant turn: the prompt is the turns they share, "
                     "and each response holds all the turns after it")
    if empty_rows := sum(is_empty(p.chosen) for p in rows):
        notes.append(f"{empty_rows} unpaired rows have an empty completion: each is trained as the end-of-turn token "
                     "alone (the answer is to say nothing)")
    if several := sum(is_multi_turn(p.chosen) for p in rows):
        notes.append(f"{several} unpaired rows have a completion of several turns: it holds all of them")
    return notes


def no_pairs(spec: str | list[str], skipped: list[str]) -> InfopoError:
    """The error for a source (or a mix of several) left with no valid pair."""
    detail = f" ({len(skipped)} invalid rows, first: {skipped[0]})" if skipped else " (the source is empty)"
    return InfopoError(f"{resolve(spec) if isinstance(spec, str) else ', '.join(spec)}: no preference pairs{detail}")


def read_pairs(spec: str, options: DataOptions = DataOptions()) -> list[PreferencePair]:
    """The pairs of `spec`, without the report of how they were read."""
    return load_pairs(spec, options).pairs
