"""Tokenised pairs cached on disk, so a second run on the same data and tokenizer starts at once.

The key covers the normalised pairs themselves (so any source or format), the tokenizer's identity
(name, vocabulary size, special tokens, chat template) and the truncation lengths.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from infopo_cli.files import write_text
from infopo_cli.files import infopo_home
from infopo_cli.data.formats import PreferencePair
from infopo_cli.data.tokenization import TokenizedPair

VERSION = 1  # bump when tokenisation changes, so old entries are not reused


def cache_key(pairs: list[PreferencePair], tokenizer, max_length: int, max_prompt_length: int) -> str:
    digest = hashlib.sha256()
    identity = [VERSION, type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer),
                getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token,
                max_length, max_prompt_length]
    digest.update(json.dumps(identity, default=str).encode())
    for pair in pairs:
        digest.update(repr((pair.prompt, pair.chosen, pair.rejected)).encode())
    return digest.hexdigest()[:32]


def tokenize_cached(pairs: list[PreferencePair], tokenizer, max_length: int, max_prompt_length: int,
                    encode: Callable[[PreferencePair], TokenizedPair]) -> tuple[list[TokenizedPair], bool]:
    """(tokenised pairs, whether they came from the cache)."""
    path = infopo_home() / "cache" / "tokens" / f"{cache_key(pairs, tokenizer, max_length, max_prompt_length)}.json"
    if path.is_file():
        try:
            rows = json.loads(path.read_text())
            return [TokenizedPair(*row) for row in rows], True
        except (ValueError, TypeError):
            pass  # a damaged entry is rebuilt below
    tokenized = [encode(p) for p in pairs]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps([[t.prompt_ids, t.chosen_ids, t.rejected_ids, t.truncated] for t in tokenized]))
    return tokenized, False
