"""Tokenised pairs cached on disk, so a second run on the same data and tokenizer starts at once.

The key covers the normalised pairs themselves (so any source or format, but not where they were read
from; an unpaired row's label too), the tokenizer's identity (name, vocabulary size, special tokens, chat template) and the
truncation lengths.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from infopo_cli.data.formats import PreferencePair
from infopo_cli.data.tokenization import TokenizedPair, encode_pairs, place_of
from infopo_cli.errors import DataError, OutputError
from infopo_cli.files import infopo_home, write_text

VERSION = 2  # bump when tokenisation changes, so old entries are not reused


@dataclass
class TokenizedSet:
    """Tokenised pairs, the pairs dropped on the way, and whether they came from the cache."""

    pairs: list[TokenizedPair]                          # the pairs that could be tokenised, in order
    skipped: list[str] = field(default_factory=list)    # one line per pair dropped (only with skip_invalid)
    cached: bool = False                                # whether they came from the cache


def cache_key(pairs: list[PreferencePair], tokenizer, max_length: int, max_prompt_length: int) -> str:
    """The cache file's key: the pairs' texts, the tokenizer's identity (incl. its chat template) and the length limits.
    """
    digest = hashlib.sha256()
    identity = [VERSION, type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
                getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token,
                max_length, max_prompt_length]
    digest.update(json.dumps(identity, default=str).encode())
    for pair in pairs:  # a pair's key leaves out its label (None), so entries written before labels existed still match
        texts = (pair.prompt, pair.chosen, pair.rejected)
        digest.update(repr(texts + ((pair.label,) if pair.unpaired else ())).encode())
    return digest.hexdigest()[:32]


def tokenize_cached(pairs: list[PreferencePair], tokenizer, max_length: int, max_prompt_length: int,
                    skip_invalid: bool = False) -> TokenizedSet:
    """Every pair encoded with `encode_pair`. A pair that cannot be tokenised raises its DataError, or with
    skip_invalid is dropped and reported in `skipped`."""
    path = infopo_home() / "cache" / "tokens" / f"{cache_key(pairs, tokenizer, max_length, max_prompt_length)}.json"
    if path.is_file():
        try:
            entry = json.loads(path.read_text())
            tokenized = [TokenizedPair(*row) for row in entry["pairs"]]
            failed = {i: DataError(place_of(pairs[i]), name, problem) for i, name, problem in entry["failed"]}
        except (ValueError, TypeError, KeyError, IndexError):
            pass  # a damaged entry is rebuilt below
        else:
            if skip_invalid or not failed:  # otherwise encode again below, to raise the first failure as it is
                return TokenizedSet(tokenized, _reasons(failed), cached=True)
    tokenized, failed = encode_pairs(tokenizer, pairs, max_length, max_prompt_length, skip_invalid)
    # Failures are stored by index and rebuilt with the pairs' current `where`: the key does not cover it.
    try:  # a cache that cannot be written (read-only or full $INFOPO_HOME) only costs the next run time
        write_text(path, json.dumps({"pairs": [[t.prompt_ids, t.chosen_ids, t.rejected_ids, t.truncated, t.label]
                                               for t in tokenized],
                                     "failed": [[i, err.field, err.problem] for i, err in failed.items()]}))
    except OutputError:
        pass
    return TokenizedSet(tokenized, _reasons(failed), cached=False)


def _reasons(failed: dict[int, DataError]) -> list[str]:
    return [str(err) for _, err in sorted(failed.items())]
