"""Several datasets at once: `--data a.jsonl --data b.parquet:0.3 --data org/name`.

Each source is read, validated and reported on its own (its errors name it, as every data error names its
file and line). A weight after the last colon is that source's share of the mix; sources without one share
what is left in proportion to their sizes (no weights at all: every pair of every source, as if the
files were one). The mix never repeats a pair: it is as large as the scarcest source allows for its share,
and each source gives its share as a seeded random sample, so the same seed and data give the same mix
(and `--resume` finds the same pairs). A source given twice (under any spelling of its path) is read once, and the
mix warns about the pairs it repeats.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infopo_cli.data.loading import DataOptions, Loaded, load_pairs, resolve
from infopo_cli.data.overlap import identity, repeated_source_notes, shared_pair_notes
from infopo_cli.config import source_weight
from infopo_cli.errors import ConfigError


@dataclass(frozen=True)
class Source:
    """One --data value: what to read and its weight in the mix."""

    spec: str              # what load_pairs reads: a file, a folder, a hub id, bundled:NAME
    weight: float | None   # share of the mix, or None: by size


def parse_source(text: str) -> Source:
    """'b.parquet:0.3' -> (b.parquet, 0.3). Only a number after the last colon is a weight, so 'bundled:arith_train'
    and 'C:\\data.jsonl' stay names."""
    spec, tail = source_weight(text)
    if tail is None:
        return Source(text, None)
    weight = float(tail)
    if not (0 < weight <= 1) or math.isnan(weight):
        raise ConfigError(f"--data {text}: the weight after the colon must be in (0, 1], the source's share of the mix")
    return Source(spec, weight)


def absolute(value: str | Sequence[str]) -> str | list[str]:
    """Sources (one, or a list) with each one found here as its resolved absolute path, its weight kept ('d/a.jsonl:0.3'
    -> '/home/me/d/a.jsonl:0.3'); bundled names, hub ids and what is not here stay as given. `--resume` compares a
    run's data so: the same files under another spelling are the same data."""
    if isinstance(value, str):
        return _absolute(value)
    return [_absolute(v) for v in value]


def _absolute(text: str) -> str:
    source = parse_source(text)
    if not source.spec or source.spec.startswith("bundled:") or not Path(source.spec).expanduser().exists():
        return text
    spec = str(Path(source.spec).expanduser().resolve())
    return spec if source.weight is None else f"{spec}:{text.rpartition(':')[2]}"


def as_list(value: str | Sequence[str]) -> list[str]:
    """A config's data setting (one source, or a list) as a list."""
    return [value] if isinstance(value, str) else list(value)


def check_weights(weights: list[float | None]) -> float:
    """Their sum, which must not exceed 1 (checked before any source is read)."""
    given = sum(w for w in weights if w is not None)
    if given > 1 + 1e-9:
        raise ConfigError(f"--data weights add up to {given:g}; they are shares of the mix and must add up to at most 1")
    return given


def shares(sizes: list[int], weights: list[float | None]) -> list[float]:
    """Each source's share of the mix: its weight, or for those without one the rest split by size."""
    given = check_weights(weights)
    if all(w is not None for w in weights):
        return [w / given for w in weights]  # weights for every source: their proportions
    unweighted = sum(n for n, w in zip(sizes, weights) if w is None)
    return [w if w is not None else (1 - given) * n / unweighted for n, w in zip(sizes, weights)]


def mix_counts(sizes: list[int], weights: list[float | None]) -> list[int]:
    """How many pairs each source gives: the largest mix where none needs more pairs than it has."""
    portions = shares(sizes, weights)
    total = min(n / p for n, p in zip(sizes, portions) if p > 0)
    return [min(n, round(p * total)) for n, p in zip(sizes, portions)]


def split_note(specs: Sequence[str], split: str) -> str | None:
    """A warning where a split other than the default was asked of sources that are all single files (bundled ones
    too): they have no splits, so every row of them is read."""
    if split == "train" or not all(resolve(spec).is_file() for spec in specs):
        return None
    return f"split '{split}' applies to none of {', '.join(specs)}: a single file has no splits, every row is read"


def load_mix(specs: str | Sequence[str], options: DataOptions = DataOptions(), seed: int = 0) -> Loaded:
    """One source: `load_pairs` as it is. Several: each loaded, then mixed by their shares."""
    sources = [parse_source(text) for text in as_list(specs)]
    unsplit = split_note([source.spec for source in sources], options.split)
    if len(sources) == 1 and sources[0].weight is None:
        loaded = load_pairs(sources[0].spec, options)
        loaded.notes[:0] = [unsplit] if unsplit else []
        return loaded
    check_weights([source.weight for source in sources])
    specs = [source.spec for source in sources]
    keys = [identity(spec) for spec in specs]
    by_identity: dict[tuple, Loaded] = {}  # a source given twice is read once
    for key, spec in zip(keys, specs):
        if key not in by_identity:
            by_identity[key] = load_pairs(spec, options)
    loaded = [by_identity[key] for key in keys]
    counts = mix_counts([len(one.pairs) for one in loaded], [source.weight for source in sources])
    rng, pairs, notes, info, skipped, parts = random.Random(seed), [], [], [], [], []
    for position, (source, one, count) in enumerate(zip(sources, loaded, counts)):
        pairs += rng.sample(one.pairs, count) if count < len(one.pairs) else one.pairs
        parts.append(f"{source.spec} {count} of {len(one.pairs)} pairs")
        if any(other is one for other in loaded[:position]):
            continue  # its rows were reported once
        notes += [f"{source.spec}: {note}" for note in one.notes]
        info += [f"{source.spec}: {line}" for line in one.info]
        skipped += one.skipped
    notes += ([unsplit] if unsplit else []) + repeated_source_notes(specs, [len(one.pairs) for one in loaded], counts)
    notes += shared_pair_notes([(spec, by_identity[key].pairs) for key, spec in dict(zip(keys, specs)).items()])
    rng.shuffle(pairs)
    total = len(pairs)
    mix = "; ".join(f"{part} ({count / total:.0%})" for part, count in zip(parts, counts))
    kinds = list(dict.fromkeys(one.format for one in loaded))
    formats = kinds[0] if len(kinds) == 1 else "mixed (" + ", ".join(kinds) + ")"
    return Loaded(pairs, formats, sum(one.rows for one in by_identity.values()), skipped, notes, mix, info)
