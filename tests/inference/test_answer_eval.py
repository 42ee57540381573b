"""--eval-generate-every: the policy's answers to held-out prompts scored during training."""

from __future__ import annotations

import json
import re

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
    # every problem's reply at every evaluation, in the held-out file's order, agreeing with the logged accuracy
    for record in evals:
        scored = [json.loads(line) for line in answer_eval.answers_file(tmp_path / "out", record["step"]).read_text().splitlines()]
        assert [r["where"] for r in scored] == [f"{held_out}:{i}" for i in range(1, 7)]
        assert sum(r["right"] for r in scored) / 6 == record["eval/answers/accuracy"]
    # the last figures are the trained adapter's own greedy answers, as `infopo eval --generate` gives them
    from infopo_cli.workflows.evaluation import EvalRequest, evaluate
    from infopo_cli.inference.generation import Sampling

    result = evaluate(EvalRequest(str(tmp_path / "out"), generate=True, sampling=Sampling(max_new_tokens=6)), log=print)
    tuned = result.generation["tuned"]
    assert evals[-1]["eval/answers/accuracy"] == tuned["accuracy"]
    assert evals[-1]["eval/answers/stopped"] == tuned["stopped"]
    assert evals[-1]["eval/answers/new_tokens"] == tuned["mean_new_tokens"]


@pytest.mark.run
def test_a_held_out_prompt_that_fills_the_context_is_refused_before_the_first_evaluation(tiny_model, tmp_path,
                                                                                         monkeypatch):
    """Found on one process in the middle of its share, it stopped that process while the others of a data-parallel
    run waited for it: every process checks every row before the run starts, so all refuse together."""
    from infopo_cli.inference.generation import ContextFull

    held_out = with_answers(tmp_path / "held-out.jsonl", 4)
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    rows[2]["prompt"] = "What is 1 + 2? " + "Think it over. " * 80  # past the tiny model's 1024 positions
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg(tiny_model, write_pairs(tmp_path / "pairs.jsonl", 16), tmp_path / "out", eval_data=str(held_out),
                   max_steps=2, eval_generate_every=1, eval_max_new_tokens=6)
    evaluated, references = [], []
    monkeypatch.setattr(recipe.Run, "evaluate", lambda self, step: evaluated.append(step))
    monkeypatch.setattr(recipe, "_reference", lambda *a, **k: references.append(1))
    with pytest.raises(ContextFull, match="^" + re.escape(f"{held_out}:3: the prompt has ") + r"\d+" + re.escape(
            " tokens: it fills the model's context of 1024 tokens, no room for a reply to score")):
        recipe.train(cfg)
    assert evaluated == [] and references == []  # refused before the reference pass and the step-0 evaluation
    monkeypatch.undo()
    recipe.train(tiny_cfg(tiny_model, write_pairs(tmp_path / "pairs.jsonl", 16), tmp_path / "out2",
                          eval_data=str(held_out), max_steps=1))  # without answers to score, the row is only a pair


def test_the_scores_are_exact_match_stopped_share_and_reply_length(monkeypatch):
    from infopo_cli.inference.prompts import PromptRow

    rows = [PromptRow("f:1", [{"role": "user", "content": "q"}], 42, "answer"),
            PromptRow("f:2", [{"role": "user", "content": "q"}], 7, "answer"),
            PromptRow("f:3", [{"role": "user", "content": "q"}], "Paris", "answer")]
    replies = [Reply("So the answer is 42.", 6, True), Reply("It is 8", 3, False), Reply("paris.", 2, True)]
    monkeypatch.setattr(answer_eval, "generate", lambda *a, **k: replies)
    records = answer_eval.answer_records(torch.nn.Linear(1, 1), None, rows, 8, 2)
    assert [(r["where"], r["answer"], r["right"], r["stopped"]) for r in records] == [
        ("f:1", 42, True, True), ("f:2", 7, False, False), ("f:3", "Paris", True, True)]
    assert records[1]["reply"] == "It is 8" and records[0]["prompt"] == "q"
    got = answer_eval.answer_metrics(records)
    assert got == {"eval/answers/accuracy": 2 / 3, "eval/answers/stopped": 2 / 3, "eval/answers/new_tokens": 11 / 3}
    assert answer_eval.answer_metrics([]) == {}


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_the_ranks_shares_of_scored_answers_are_written_back_in_the_held_out_order(tmp_path, ranks):
    from types import SimpleNamespace

    from infopo_cli.train.distributed import World

    records = [{"where": f"f:{i}", "right": i % 2 == 0} for i in range(1, 8)]
    shares = [World(rank=r, size=ranks).shard(records) for r in range(ranks)]
    world = SimpleNamespace(gather=lambda mine: shares, is_main=True)
    recipe.Run._write_answers(SimpleNamespace(world=world, run_dir=tmp_path), 5, shares[0])
    written = [json.loads(line) for line in answer_eval.answers_file(tmp_path, 5).read_text().splitlines()]
    assert written == records
    world.is_main = False  # only rank 0 writes
    recipe.Run._write_answers(SimpleNamespace(world=world, run_dir=tmp_path), 6, shares[0])
    assert not answer_eval.answers_file(tmp_path, 6).exists()


@pytest.mark.run
def test_a_stop_during_the_replies_ends_the_run_at_once_and_the_resume_scores_that_step(tiny_model, tmp_path, monkeypatch):
    import os
    import signal

    from infopo_cli.inference import generation

    held_out = with_answers(tmp_path / "held-out.jsonl", 6)
    cfg = tiny_cfg(tiny_model, write_pairs(tmp_path / "pairs.jsonl", 16), tmp_path / "out", eval_data=str(held_out),
                   max_steps=3, eval_generate_every=2, eval_max_new_tokens=6, eval_batch_size=2)
    calls, batches = [], []

    def generate(model, tokenizer, prompts, sampling, batch_size, should_stop=lambda: False, *more):
        calls.append(len(prompts))
        if len(calls) == 2:  # step 2's replies: Ctrl-C arrives after the first batch
            def stop_after_one() -> bool:
                batches.append(1)
                if len(batches) == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                return should_stop()
            return generation.generate(model, tokenizer, prompts, sampling, batch_size, stop_after_one, *more)
        return generation.generate(model, tokenizer, prompts, sampling, batch_size, should_stop, *more)

    monkeypatch.setattr(answer_eval, "generate", generate)
    summary = recipe.train(cfg)
    assert summary.status != "completed" and summary.steps == 2 and len(batches) == 2  # not the other 2 batches
    evals = [r["step"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert evals == [0] and not answer_eval.answers_file(tmp_path / "out", 2).exists()
    recipe.train(cfg, resume=tmp_path / "out")
    evals = [r["step"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert evals == [0, 2, 3] and answer_eval.answers_file(tmp_path / "out", 2).exists()


@pytest.mark.run
def test_a_stop_during_the_base_models_replies_keeps_the_run_folder_for_the_resume(tiny_model, tmp_path, monkeypatch):
    import os
    import signal

    from infopo_cli.inference import generation

    held_out = with_answers(tmp_path / "held-out.jsonl", 6)
    cfg = tiny_cfg(tiny_model, write_pairs(tmp_path / "pairs.jsonl", 16), tmp_path / "out", eval_data=str(held_out),
                   max_steps=3, eval_generate_every=2, eval_max_new_tokens=6, eval_batch_size=2)
    real = answer_eval.generate

    def stopped_at_once(model, tokenizer, prompts, sampling, batch_size, should_stop=lambda: False, *more):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the base model starts its replies
        return generation.generate(model, tokenizer, prompts, sampling, batch_size, should_stop, *more)

    monkeypatch.setattr(answer_eval, "generate", stopped_at_once)
    summary = recipe.train(cfg)
    assert summary.status == "stopped" and summary.steps == 0 and summary.exit_code == 130
    assert (tmp_path / "out" / "config.toml").is_file()  # kept, not removed as a run that never started
    import typer

    from infopo_cli import cli
    with pytest.raises(typer.Exit) as stop:  # what `infopo train` prints and exits with
        cli._finish(summary)
    assert stop.value.exit_code == 130 and "--resume" in summary.message
    monkeypatch.setattr(answer_eval, "generate", real)
    recipe.train(cfg, resume=tmp_path / "out")
    evals = [r["step"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert evals == [0, 2, 3]


@pytest.mark.run
def test_the_base_models_answers_are_generated_once_and_read_by_later_runs(tiny_model, tmp_path, monkeypatch, capsys):
    held_out = with_answers(tmp_path / "held-out.jsonl", 6)
    pairs = write_pairs(tmp_path / "pairs.jsonl", 16)
    real, asked = answer_eval.generate, []

    def generate(model, tokenizer, prompts, *more):
        asked.append(len(prompts))
        return real(model, tokenizer, prompts, *more)

    monkeypatch.setattr(answer_eval, "generate", generate)

    def run(name: str, **kw) -> list[int]:
        asked.clear()
        settings = {"eval_data": str(held_out), "eval_max_new_tokens": 6, **kw}
        recipe.train(tiny_cfg(tiny_model, pairs, tmp_path / name, max_steps=1, eval_generate_every=1, **settings))
        return list(asked)

    assert run("first") == [6, 6]  # the base model's replies (step 0), then the trained adapter's (step 1)
    assert "read from the cache" not in capsys.readouterr().out
    # another loss and seed on the same base and prompts: step 0 comes from the cache, the same replies
    assert run("second", loss="ipo", seed=7) == [6]
    assert "the base model's answers (step 0) read from the cache" in capsys.readouterr().out
    step0 = [answer_eval.answers_file(tmp_path / name, 0).read_bytes() for name in ("first", "second")]
    assert step0[0] == step0[1]
    # anything the replies depend on changes the key: the budget, the batch (padding), the prompts
    assert run("budget", eval_max_new_tokens=5) == [6, 6]
    assert run("batch", eval_batch_size=3) == [6, 6]
    assert run("prompts", eval_data=str(with_answers(tmp_path / "other.jsonl", 5))) == [5, 5]


def test_a_damaged_or_mismatched_cache_entry_is_generated_again(tmp_path, monkeypatch):
    from infopo_cli.inference.prompts import PromptRow

    rows = [PromptRow(f"f:{i}", [{"role": "user", "content": "q"}], 1, "answer") for i in range(2)]
    made = [Reply("The answer is 1.", 5, True), Reply("2", 1, False)]
    calls = []
    monkeypatch.setattr(answer_eval, "generate", lambda *a, **k: calls.append(1) or made)
    model = torch.nn.Linear(1, 1)
    first = answer_eval.answer_records(model, None, rows, 8, 2, cache_key="k")
    assert answer_eval.answer_records(model, None, rows, 8, 2, cache_key="k") == first and len(calls) == 1
    for damaged in ("{not json", json.dumps({"replies": [{"text": "x"}]}), json.dumps({"replies": []})):
        answer_eval.cache_path("k").write_text(damaged)
        assert answer_eval.answer_records(model, None, rows, 8, 2, cache_key="k") == first
    assert len(calls) == 4 and [r["right"] for r in first] == [True, False]
