"""Load preference pairs from any source and format, checking every row before any model is loaded.

By default the first bad row stops the run with one line `FILE:LINE: field 'X': what is wrong`;
with `skip_invalid` bad rows are dropped and counted instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from infopo_cli.errors import ConfigError, DataError, InfopoError
from infopo_cli.data.formats import FORMATS, Fields, PreferencePair, detect, is_empty, is_multi_turn, normalise
from infopo_cli.data.sources import read_rows, resolve

__all__ = ["DataOptions", "Loaded", "PreferencePair", "load_pairs", "no_pairs", "read_pairs", "resolve"]


@dataclass(frozen=True)
class DataOptions:
    format: str = "auto"
    fields: Fields = field(default_factory=Fields)
    split: str = "train"
    system: str | None = None
    skip_invalid: bool = False


@dataclass
class Loaded:
    pairs: list[PreferencePair]
    format: str                                        # the detected format ("mixed (...)" if rows differ)
    rows: int                                          # rows read, valid or not
    skipped: list[str] = field(default_factory=list)   # one line per dropped row
    notes: list[str] = field(default_factory=list)     # warnings about the data's shape, for `data check` and `train`
    mix: str = ""                                      # several sources: what each gave (data/mixing.py)


def load_pairs(spec: str, options: DataOptions = DataOptions()) -> Loaded:
    if options.format not in FORMATS:
        raise ConfigError(f"unknown data format '{options.format}'; use one of {', '.join(FORMATS)}")
    pairs, skipped, rows, seen = [], [], 0, Counter()
    for where, row in read_rows(spec, options.split):
        rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            fmt = detect(row, options.fields) if options.format == "auto" else options.format
            pairs.append(normalise(row, where, fmt, options.fields, options.system))
            seen[fmt] += 1
        except DataError as err:
            if not options.skip_invalid:
                raise
            skipped.append(str(err))
    if not pairs:
        raise no_pairs(spec, skipped)
    fmt = next(iter(seen)) if len(seen) == 1 else "mixed (" + ", ".join(f"{n} {f}" for f, n in seen.most_common()) + ")"
    return Loaded(pairs, fmt, rows, skipped, shape_notes(pairs))


def shape_notes(pairs: list[PreferencePair]) -> list[str]:
    """Warnings (not errors) about pairs that train differently from a plain one-reply pair."""
    notes = []
    empty = {side: sum(is_empty(getattr(p, side)) for p in pairs) for side in ("chosen", "rejected")}
    if any(empty.values()):
        notes.append(f"{empty['chosen']} pairs have an empty chosen reply and {empty['rejected']} an empty rejected "
                     "one: each is trained as the end-of-turn token alone (the answer is to say nothing)")
    if several := sum(is_multi_turn(p.chosen) or is_multi_turn(p.rejected) for p in pairs):
        notes.append(f"{several} pairs differ before their last assistant turn: the prompt is the turns they share, "
                     "and each response holds all the turns after it")
    return notes


def no_pairs(spec: str | list[str], skipped: list[str]) -> InfopoError:
    """The error for a source (or a mix of several) left with no valid pair."""
    detail = f" ({len(skipped)} invalid rows, first: {skipped[0]})" if skipped else " (the source is empty)"
    return InfopoError(f"{resolve(spec) if isinstance(spec, str) else ', '.join(spec)}: no preference pairs{detail}")


def read_pairs(spec: str, options: DataOptions = DataOptions()) -> list[PreferencePair]:
    return load_pairs(spec, options).pairs
