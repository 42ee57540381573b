"""The same data twice: a source given more than once (under any spelling of its path), and held-out pairs that are
also trained on. Both are warnings: the run is valid, but it is not the run the user most likely meant."""

from __future__ import annotations

from collections.abc import Sequence

from infopo_cli.data.formats import PreferencePair
from infopo_cli.data.sources import resolve
from infopo_cli.errors import InfopoError


def identity(spec: str) -> tuple:
    """What a source is, whatever the spelling: a local file or folder is its device and inode (so 'a.jsonl',
    './a.jsonl' and a link to it are one), anything else (a hub id) its name."""
    try:
        found = resolve(spec).stat()
    except (OSError, InfopoError):
        return ("name", spec)
    return ("file", found.st_dev, found.st_ino)


def repeated_sources(specs: Sequence[str]) -> list[list[int]]:
    """Positions of the sources named more than once, a group for each source."""
    groups: dict[tuple, list[int]] = {}
    for position, spec in enumerate(specs):
        groups.setdefault(identity(spec), []).append(position)
    return [group for group in groups.values() if len(group) > 1]


def repeated_source_notes(specs: Sequence[str], sizes: Sequence[int], counts: Sequence[int]) -> list[str]:
    """A warning for each source the mix takes more than once: `sizes` are the pairs each source has, `counts` the
    pairs the mix takes from each (mixing.mix_counts). The repeats counted are those the counts force: exact when
    every share takes all its source's pairs (no weights), a lower bound when weighted samples could overlap."""
    notes = []
    for group in repeated_sources(specs):
        names = list(dict.fromkeys(specs[i] for i in group))
        taken, size = sum(counts[i] for i in group), sizes[group[0]]
        spelled = f" (as {', '.join(names)})" if len(names) > 1 else ""
        notes.append(f"{names[0]} is given {len(group)} times{spelled}: {taken - min(taken, size)} of the {taken} "
                     f"pairs the mix takes from it are repeats (give it once, or weight it: --data FILE:0.5)")
    return notes


def shared_pair_notes(sources: Sequence[tuple[str, Sequence[PreferencePair]]]) -> list[str]:
    """A warning for each (different) source of a mix whose pairs are also in an earlier one: the same prompt, chosen
    and rejected, so the mix may train on them twice."""
    notes: list[str] = []
    first: dict[PreferencePair, str] = {}  # a pair -> the source it was first seen in
    for spec, pairs in sources:
        shared: dict[str, int] = {}
        for pair in set(pairs):
            if (other := first.get(pair)) is not None:
                shared[other] = shared.get(other, 0) + 1
        notes += [f"{count} pair{'s' * (count > 1)} of {spec} {'are' if count > 1 else 'is'} also in {other} (the same "
                  "prompt, chosen and rejected): the mix may train on them twice; keep them in one file"
                  for other, count in shared.items()]
        for pair in pairs:
            first.setdefault(pair, spec)
    return notes


def eval_overlap_note(train: Sequence[PreferencePair], held_out: Sequence[PreferencePair]) -> str | None:
    """A warning when held-out pairs are also training pairs (the same prompt, chosen and rejected): their eval
    measures what the model memorised, not how it generalises."""
    trained = set(train)
    shared = sum(pair in trained for pair in held_out)
    if not shared:
        return None
    if shared == len(held_out) and set(held_out) == trained:
        return (f"the held-out pairs are the training pairs (all {len(held_out)}): eval measures what the model "
                "memorised, not how it generalises")
    return (f"{shared} of the {len(held_out)} held-out pairs are also training pairs (same prompt, chosen and "
            "rejected): their eval measures what the model memorised, not how it generalises")
