"""Answer accuracy during training (`--eval-generate-every N`): users judge a run by its answers.

At the start, every N steps and at the end, the policy answers the held-out prompts that carry a reference
answer (an `answer` field, or the chosen reply's closing "The answer is N.", as `infopo eval` reads them)
greedily, in batches; `metrics.jsonl` gets `eval/answers/accuracy` (exact match, `inference/answers.py`),
`eval/answers/stopped` (share of replies that ended before the budget) and `eval/answers/new_tokens`, and
`answers/step-N.jsonl` gets every problem's reply and whether it was right, so two runs (or two steps) can be
compared problem by problem (McNemar's test) rather than by their accuracies alone.

The step-0 replies are the base model's (or the init adapter's): the same for every run on that base and those
held-out prompts, so they are kept in `$INFOPO_HOME/cache/answers/` and a later run (another loss, β or seed)
reads them instead of generating them again. The key is everything the replies depend on: the base's files, the
numerics (4-bit, dtype, attention kernel, init adapter weights and config, backend), the device and library
versions, the budget, the batch size (padding moves the last bits) and every prompt's token ids; whether a reply is
right is scored again on reading.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from infopo_cli import files
from infopo_cli.data.formats import PreferencePair
from infopo_cli.inference.answers import matches
from infopo_cli.inference.generation import ContextFull, Reply, Sampling, generate, prompt_ids, stop_ids
from infopo_cli.inference.prompts import PromptRow, answers_by_row, rows_from_pairs
from infopo_cli.model.stack import dequantised
from infopo_cli.train.checkpoint import capture_rng, restore_rng


KEYS = ("eval/answers/accuracy", "eval/answers/stopped", "eval/answers/new_tokens")
VERSION = 1  # bump when the way replies are generated changes, so old entries are not reused


def answer_rows(pairs: Sequence[PreferencePair], sources: str | Sequence[str], split: str) -> list[PromptRow]:
    """The held-out prompts that carry a reference answer."""
    return [row for row in rows_from_pairs(pairs, answers_by_row(sources, split)) if row.answer is not None]


def check_room(tokenizer, rows: Sequence[PromptRow], context: int | None) -> None:
    """Every prompt leaves room for a reply in the model's context. Checked on every row once the model is loaded,
    before the first evaluation, so every process of a data-parallel run refuses together, rather than one in the
    middle of its share while the others wait for it."""
    if context is None:
        return
    for row in rows:
        if (length := len(prompt_ids(tokenizer, row.messages))) >= context:
            raise ContextFull(f"{row.where}: the prompt has {length} tokens: it fills the model's context of {context} "
                              "tokens, no room for a reply to score (leave it out of the held-out data, or score no "
                              "answers: --eval-generate-every 0)")


@torch.no_grad()
def answer_records(model: torch.nn.Module, tokenizer, rows: list[PromptRow], max_new_tokens: int,
                   batch_size: int, should_stop: Callable[[], bool] = lambda: False,
                   any_going: Callable[[bool], bool] = bool, cache_key: str | None = None) -> list[dict[str, Any]] | None:
    """Greedy replies of the policy to `rows`, each scored (one record per row, in order); None when `should_stop()`
    turns true between generation batches. `any_going`: whether a batch goes on, given whether this process's rows
    do (a sharded run's processes decode until every one is done). `cache_key`: the replies are the cached ones
    under it where there are any, else kept there (the base model's, at step 0). The model's mode and the RNG are
    left as they were."""
    replies = cached_replies(cache_key, len(rows)) if cache_key else None
    if replies is None:
        was_training, rng = model.training, capture_rng()
        model.eval()
        try:
            with dequantised(model):  # a CPU's 4-bit layers would de-quantise at every generated token
                replies = generate(model, tokenizer, [row.messages for row in rows], Sampling(max_new_tokens),
                                   batch_size, should_stop, any_going)
        finally:
            restore_rng(rng)
            model.train(was_training)
        if replies is None:
            return None
        if cache_key:
            _store(cache_key, replies)
    return [{"where": row.where, "prompt": row.question, "answer": row.answer, "reply": reply.text,
             "right": matches(reply.text, row.answer), "stopped": reply.stopped, "new_tokens": reply.new_tokens}
            for row, reply in zip(rows, replies)]


def cache_key(identity: Sequence[str], settings: dict, tokenizer, rows: Sequence[PromptRow], max_new_tokens: int,
              batch_size: int, device: str) -> str:
    """The key of the replies to `rows` of a model whose files are `identity` run with `settings` (its numerics) on
    `device`. Greedy decoding carries a last-bit difference into other tokens, so the device and the versions of
    the libraries that compute the replies are part of it."""
    versions = {name: _version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")}
    digest = hashlib.sha256(json.dumps([VERSION, list(identity), settings, max_new_tokens, batch_size, device, versions,
                                        sorted(stop_ids(tokenizer)), tokenizer.pad_token_id], sort_keys=True,
                                       default=str).encode())
    for row in rows:
        digest.update(repr(prompt_ids(tokenizer, row.messages)).encode())
    return digest.hexdigest()[:32]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cache_path(key: str) -> Path:
    """Where the replies keyed `key` are kept."""
    return files.infopo_home() / "cache" / "answers" / f"{key}.json"


def cached_replies(key: str, n: int) -> list[Reply] | None:
    """The `n` replies kept under `key`; None where there is no entry, or a damaged or mismatched one."""
    try:
        entry = json.loads(cache_path(key).read_text(encoding="utf-8"))
        replies = [Reply(str(r["text"]), int(r["new_tokens"]), bool(r["stopped"])) for r in entry["replies"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return replies if len(replies) == n else None


def _store(key: str, replies: Sequence[Reply]) -> None:
    """Keep `replies` under `key`, atomically; a cache that cannot be written only costs time next run."""
    try:
        files.write_text(cache_path(key), json.dumps({"replies": [
            {"text": r.text, "new_tokens": r.new_tokens, "stopped": r.stopped} for r in replies]}, ensure_ascii=False))
    except Exception:  # noqa: BLE001
        pass


def answer_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The metrics.jsonl means of scored records (none without records)."""
    if not records:
        return {}
    return {"eval/answers/accuracy": sum(r["right"] for r in records) / len(records),
            "eval/answers/stopped": sum(r["stopped"] for r in records) / len(records),
            "eval/answers/new_tokens": sum(r["new_tokens"] for r in records) / len(records)}


def answers_file(run_dir: Path, step: int) -> Path:
    """Where the replies scored at `step` go."""
    return run_dir / "answers" / f"step-{step}.jsonl"
