"""Answer accuracy during training (`--eval-generate-every N`): users judge a run by its answers.

At the start, every N steps and at the end, the policy answers the held-out prompts that carry a reference
answer (an `answer` field, or the chosen reply's closing "The answer is N.", as `infopo eval` reads them)
greedily, in batches; `metrics.jsonl` gets `eval/answers/accuracy` (exact match, `inference/answers.py`),
`eval/answers/stopped` (share of replies that ended before the budget) and `eval/answers/new_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence

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
def answer_metrics(model: torch.nn.Module, tokenizer, rows: list[PromptRow], max_new_tokens: int,
                   batch_size: int) -> dict[str, float]:
    """Greedy replies of the policy to `rows`, scored; the model's mode and the RNG are left as they were."""
    was_training, rng = model.training, capture_rng()
    model.eval()
    try:
        with dequantised(model):  # a CPU's 4-bit layers would de-quantise at every generated token
            replies = generate(model, tokenizer, [row.messages for row in rows], Sampling(max_new_tokens), batch_size)
    finally:
        restore_rng(rng)
        model.train(was_training)
    return {"eval/answers/accuracy": sum(matches(r.text, row.answer) for r, row in zip(replies, rows)) / len(rows),
            "eval/answers/stopped": sum(r.stopped for r in replies) / len(replies),
            "eval/answers/new_tokens": sum(r.new_tokens for r in replies) / len(replies)}
