"""--eval-generate-every: the policy's answers to held-out prompts scored during training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_cfg, write_pairs

from infopo_cli.inference.generation import Reply
from infopo_cli.train import answer_eval, recipe


def with_answers(path, n: int):
    """Held-out pairs of the bundled kind, each row also carrying its `answer`."""
    rows = []
    for line in write_pairs(path, n).read_text().splitlines():
        row = json.loads(line)
        a, b = (int(x) for x in row["prompt"].removeprefix("What is ").removesuffix("?").split(" + "))
        rows.append({**row, "answer": a + b})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.run
def test_answers_are_scored_at_the_start_every_n_steps_and_at_the_end(tiny_model, tmp_path):
    held_out = with_answers(tmp_path / "held-out.jsonl", 6)
    cfg = tiny_cfg(tiny_model, write_pairs(tmp_path / "pairs.jsonl", 16), tmp_path / "out", eval_data=str(held_out),
                   max_steps=3, eval_generate_every=2, eval_max_new_tokens=6)
    recipe.train(cfg)
    evals = [r for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3] and all("eval/answers/accuracy" in r for r in evals)
    # the last figures are the trained adapter's own greedy answers, as `infopo eval --generate` gives them
    from infopo_cli.workflows.evaluation import EvalRequest, evaluate
    from infopo_cli.inference.generation import Sampling

    result = evaluate(EvalRequest(str(tmp_path / "out"), generate=True, sampling=Sampling(max_new_tokens=6)), log=print)
    tuned = result.generation["tuned"]
    assert evals[-1]["eval/answers/accuracy"] == tuned["accuracy"]
    assert evals[-1]["eval/answers/stopped"] == tuned["stopped"]
    assert evals[-1]["eval/answers/new_tokens"] == tuned["mean_new_tokens"]


def test_the_scores_are_exact_match_stopped_share_and_reply_length(monkeypatch):
    from infopo_cli.inference.prompts import PromptRow

    rows = [PromptRow("f:1", [{"role": "user", "content": "q"}], 42, "answer"),
            PromptRow("f:2", [{"role": "user", "content": "q"}], 7, "answer"),
            PromptRow("f:3", [{"role": "user", "content": "q"}], "Paris", "answer")]
    replies = [Reply("So the answer is 42.", 6, True), Reply("It is 8", 3, False), Reply("paris.", 2, True)]
    monkeypatch.setattr(answer_eval, "generate", lambda *a, **k: replies)
    got = answer_eval.answer_metrics(torch.nn.Linear(1, 1), None, rows, 8, 2)
    assert got == {"eval/answers/accuracy": 2 / 3, "eval/answers/stopped": 2 / 3, "eval/answers/new_tokens": 11 / 3}
