"""Answer accuracy during training (`--eval-generate-every N`): users judge a run by its answers.

At the start, every N steps and at the end, the policy answers the held-out prompts that carry a reference
answer (an `answer` field, or the chosen reply's closing "The answer is N.", as `infopo eval` reads them)
greedily, in batches; `metrics.jsonl` gets `eval/answers/accuracy` (exact match, `inference/answers.py`),
`eval/answers/stopped` (share of replies that ended before the budget) and `eval/answers/new_tokens`, and
`answers/step-N.jsonl` gets every problem's reply and whether it was right, so two runs (or two steps) can be
compared problem by problem (McNemar's test) rather than by their accuracies alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from infopo_cli.data.formats import PreferencePair
from infopo_cli.inference.answers import matches
from infopo_cli.inference.generation import Sampling, generate
from infopo_cli.inference.prompts import PromptRow, answers_by_row, rows_from_pairs
from infopo_cli.model.stack import dequantised
from infopo_cli.train.checkpoint import capture_rng, restore_rng


KEYS = ("eval/answers/accuracy", "eval/answers/stopped", "eval/answers/new_tokens")


def answer_rows(pairs: Sequence[PreferencePair], sources: str | Sequence[str], split: str) -> list[PromptRow]:
    """The held-out prompts that carry a reference answer."""
    return [row for row in rows_from_pairs(pairs, answers_by_row(sources, split)) if row.answer is not None]


@torch.no_grad()
def answer_records(model: torch.nn.Module, tokenizer, rows: list[PromptRow], max_new_tokens: int,
                   batch_size: int, should_stop: Callable[[], bool] = lambda: False,
                   any_going: Callable[[bool], bool] = bool) -> list[dict[str, Any]] | None:
    """Greedy replies of the policy to `rows`, each scored (one record per row, in order); None when `should_stop()`
    turns true between generation batches. `any_going`: whether a batch goes on, given whether this process's rows
    do (a sharded run's processes decode until every one is done). The model's mode and the RNG are left as they
    were."""
    was_training, rng = model.training, capture_rng()
    model.eval()
    try:
        with dequantised(model):  # a CPU's 4-bit layers would de-quantise at every generated token
            replies = generate(model, tokenizer, [row.messages for row in rows], Sampling(max_new_tokens), batch_size,
                               should_stop, any_going)
    finally:
        restore_rng(rng)
        model.train(was_training)
    if replies is None:
        return None
    return [{"where": row.where, "prompt": row.question, "answer": row.answer, "reply": reply.text,
             "right": matches(reply.text, row.answer), "stopped": reply.stopped, "new_tokens": reply.new_tokens}
            for row, reply in zip(rows, replies)]


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
