"""`infopo compare`: one run per loss (or swept value) under one parent, one report, resumable."""

from __future__ import annotations

import json

import pytest
from conftest import at_forward, ctrl_c, infopo, write_pairs

from infopo_cli.errors import ConfigError
from infopo_cli.train import compare, recipe

TINY = ["--dtype", "fp32", "--no-4bit", "--lora-r", "4", "--lora-alpha", "8", "--batch-size", "4", "--max-steps", "2",
        "--lr", "1e-2", "--max-length", "128", "--max-prompt-length", "64", "--eval-batch-size", "8"]


@pytest.mark.run
def test_compare_trains_one_run_per_loss_and_writes_one_report(tmp_path, tiny_model):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 16)
    parent = tmp_path / "cmp"
    args = ["compare", "--loss", "infopo,dpo", "--output", str(parent), "--model", str(tiny_model), "--data", str(pairs),
            "--eval-data", str(pairs), *TINY]
    proc = infopo(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in parent.iterdir()) == ["compare.json", "dpo", "infopo", "report.md", "report.png"]
    for loss in ("infopo", "dpo"):
        assert json.loads((parent / loss / "summary.json").read_text())["status"] == "completed"
        assert f'loss = "{loss}"' in (parent / loss / "config.toml").read_text()
    report = (parent / "report.md").read_text()
    assert report.count("| infopo") + report.count("| dpo") >= 2 and (parent / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert proc.stdout.count("reference log-probs of the 8 of 16 pairs in 2 steps computed once") == 1  # infopo's
    assert proc.stdout.count("reference log-probs of the 8 of 16 pairs in 2 steps read from the cache") == 1  # dpo's
    again = infopo(*args)  # finished runs are kept, not retrained
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == 2, again.stdout[-2000:]
    other = infopo(*[a if a != "infopo,dpo" else "infopo,simpo" for a in args])
    assert other.returncode == 2 and "holds another comparison (infopo, dpo)" in other.stderr


@pytest.mark.run
def test_a_stopped_comparison_continues_at_the_run_it_was_in(tmp_path, tiny_model, monkeypatch):
    from infopo_cli.train.progress import Reporter

    pairs = write_pairs(tmp_path / "pairs.jsonl", 16)
    flags = {"model": str(tiny_model), "data": str(pairs), "eval_data": "", "dtype": "fp32", "load_in_4bit": False,
             "lora_r": 4, "lora_alpha": 8,
             "batch_size": 4, "max_steps": 3, "max_length": 128, "max_prompt_length": 64}
    variants, parent = compare.plan(["infopo", "dpo"], None), tmp_path / "cmp"
    compare.claim_parent(parent, variants, {k: str(v) for k, v in flags.items()})
    settings = compare.configs(variants, flags, parent, "smollm2-135m")
    said = []
    at_forward(monkeypatch, 5, ctrl_c)  # run 1 takes passes 1-3; Ctrl-C in run 2's second step
    folders, stopped = compare.run_all(variants, settings, parent, lambda cfg, resume=None:
                                       recipe.train(cfg, Reporter(), resume=resume), said.append)
    assert stopped is not None and stopped.exit_code == 130 and stopped.steps == 2
    assert compare.state_of(parent / "infopo") == "done" and compare.state_of(parent / "dpo") == "stopped"
    monkeypatch.undo()
    folders, stopped = compare.run_all(variants, settings, parent, lambda cfg, resume=None:
                                       recipe.train(cfg, Reporter(), resume=resume), said.append)
    assert stopped is None and said[-2:] == ["[1/2] infopo: finished before, kept", "[2/2] dpo: resuming"]
    assert json.loads((parent / "dpo" / "summary.json").read_text())["steps"] == 3


def test_a_sweep_names_each_run_by_what_differs():
    variants = compare.plan(["infopo", "dpo"], compare.parse_sweep("beta=0.1,0.3"))
    assert [v.name for v in variants] == ["infopo-beta0.1", "infopo-beta0.3", "dpo-beta0.1", "dpo-beta0.3"]
    assert variants[1].settings == {"loss": "infopo", "beta": "0.3"}
    for bad in ("beta", "beta=", "output=a,b", "nonsense=1,2"):
        with pytest.raises(ConfigError):
            compare.parse_sweep(bad)
    with pytest.raises(ConfigError, match="presets are not swept"):  # the field only names a preset: nothing would load
        compare.parse_sweep("preset=a,b")
    assert compare.parse_sweep("weight_decay=0,0.1") == ("weight_decay", ["0", "0.1"])  # a preset-only setting sweeps
    with pytest.raises(ConfigError, match="name each loss once"):
        compare.plan(["dpo", "dpo"], None)
    with pytest.raises(ConfigError, match=r"^--loss: name at least one loss"):
        compare.plan([], None)


def test_a_swept_value_is_typed_as_the_train_flag_is(tmp_path, tiny_model):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    flags = {"model": str(tiny_model), "data": str(pairs), "eval_data": "", "load_in_4bit": False}
    planned = compare.prepare("dpo", "beta=0.05,0.5", str(tmp_path / "cmp"), flags, "smollm2-135m")
    assert [(cfg.beta, type(cfg.beta), cfg.output) for cfg in planned.configs] == [
        (0.05, float, str(tmp_path / "cmp" / "dpo-beta0.05")), (0.5, float, str(tmp_path / "cmp" / "dpo-beta0.5"))]
    proc = infopo("compare", "--loss", "dpo", "--sweep", "beta=0.05,0.5", "--output", str(tmp_path / "cmp"),
                  "--model", str(tiny_model), "--data", str(pairs), "--eval-data", "", *TINY, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 runs under" in proc.stdout and "dpo-beta0.05, dpo-beta0.5" in proc.stdout
    assert "loss dpo (beta=0.05" in proc.stdout and not (tmp_path / "cmp").exists()


def test_the_eval_table_pairs_the_runs_on_the_same_problems():
    """`compare --generate`'s eval.md: each run's tuned accuracy with its interval, then each two runs with the
    problems only one of them gets right and McNemar's p."""
    from types import SimpleNamespace

    from infopo_cli.reporting.intervals import wilson

    def result(right: list[bool]) -> SimpleNamespace:
        rows = [{"tuned": {"correct": r}, "base": {"correct": False}} for r in right]
        tuned = {"accuracy": sum(right) / len(right), "interval": list(wilson(sum(right), len(right)))}
        return SimpleNamespace(preference=None, rows=rows,
                               generation={"base": {"accuracy": 0.0}, "tuned": tuned, "changed": 1.0})

    a, b = [True] * 10 + [False] * 10, [False] * 20  # a gets 10 problems b misses; b none that a misses
    table = compare.eval_markdown([("infopo", result(a)), ("dpo", result(b)), ("simpo", result(a))])
    assert "| infopo | n/a | n/a | 0% | 50% (30%-70%) | 100% |" in table
    assert "| infopo | dpo | 10 | 0 | 0.00195 | a real difference |" in table      # 2 / 2**10
    assert "| infopo | simpo | 0 | 0 | 1 | within chance |" in table
    assert "| dpo | simpo | 0 | 10 | 0.00195 | a real difference |" in table
