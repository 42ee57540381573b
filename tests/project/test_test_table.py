"""benchmarks/test_table.py on a synthetic test-split folder: each setting over its seeds at the end of training, per
task and pooled, with Wilson and mean intervals against hand values, and the paired tests against the first setting."""

from __future__ import annotations

import json

import pytest

from conftest import benchmark_module
from test_sweep_table import write_run


@pytest.fixture(scope="module")
def table():
    with benchmark_module("test_table.py") as module:
        yield module


def finished(out, task: str, name: str, answers: dict[int, list[bool]], split: str = "test"):
    """A test run that completed (its summary.json says so, as `infopo train` writes it)."""
    run = write_run(out, task, name, answers, split)
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    (run / "config.toml").write_text("")
    return run


def test_each_setting_over_its_seeds_per_task_and_pooled(table, tmp_path, capsys):
    right, wrong = [True] * 5, [False] * 5
    for seed, units in ((42, [True] * 4 + [False]), (1, [True] * 3 + [False] * 2)):
        finished(tmp_path, "units", f"infopo-lr0.0005-2ep|-0evals-seed{seed}", {0: wrong, 150: units})
        finished(tmp_path, "word", f"infopo-lr0.0005-2ep|-0evals-seed{seed}", {0: wrong, 150: right})
        finished(tmp_path, "units", f"dpo-1ep|-0evals-seed{seed}", {0: wrong, 75: wrong})
        finished(tmp_path, "word", f"dpo-1ep|-0evals-seed{seed}", {0: wrong, 75: [True] + [False] * 4})
    stopped = write_run(tmp_path, "units", "simpo-2ep|-4evals-seed42", {0: wrong, 38: right}, "test")
    (stopped / "config.toml").write_text("")  # stopped part-way: resumable, not finished
    finished(tmp_path, "units", "kto-2ep|-0evals-seed42", {0: wrong})  # finished without answers after step 0
    write_run(tmp_path, "units", "ipo-1ep|-100heldout-seed42", {0: wrong, 75: right})  # validation: not reported

    assert table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # seed 42 on units: 4 of 5, Wilson 37.6-96.4; the seeds' 0.8 and 0.6: mean 70.0, t(1) = 12.706 x 0.1 -> clipped
    # to 0-100; Wilson at the mean, 3.5 of 5: 29.9-92.7
    assert ("| infopo-lr0.0005-2ep-0evals | units | seed 1: 3 / 5 (23.1–88.2); seed 42: 4 / 5 (37.6–96.4) | 70.0 | "
            "0.0–100.0 | 29.9–92.7 |") in out
    assert ("| infopo-lr0.0005-2ep-0evals | pooled | seed 1: 8 / 10 (49.0–94.3); seed 42: 9 / 10 (59.6–98.2) | 85.0 |"
            in out)
    assert ("Left out: units/ipo-1ep-units-validation-100heldout-seed42 (not a test-split run); "
            "units/kto-2ep-units-test-0evals-seed42 (no answers after training); "
            "units/simpo-2ep-units-test-4evals-seed42 (not finished).") in out
    # the base model is the runs' step 0: the same for every seed, so no spread over seeds
    assert ("| base model (step 0) | units | seed 1: 0 / 5 (0.0–43.4); seed 42: 0 / 5 (0.0–43.4) | 0.0 | 0.0–0.0 | "
            "0.0–43.4 |") in out
    assert "| base model (step 0) | pooled | 1, 42 (sign test) | 9 | 0 | 0.00391 | a real difference |" in out  # 2 x 0.5^9
    # against DPO: per task and seed McNemar; units seed 42: 4 only InfoPO right, p = 2 x 0.5^4 = 0.125
    assert "| dpo-1ep-0evals | units | 42 | 4 | 0 | 0.125 | within chance |" in out
    # pooled seed 42: 4 + 4 only InfoPO (word: DPO gets problem 0 as InfoPO does), p = 2 x 0.5^8 = 0.00781
    assert "| dpo-1ep-0evals | pooled | 42 | 8 | 0 | 0.00781 | a real difference |" in out
    # the sign test over both seeds counts each problem once: units problems 0-3 (InfoPO right on one seed or both)
    assert "| dpo-1ep-0evals | units | 1, 42 (sign test) | 4 | 0 | 0.125 | within chance |" in out


def test_a_setting_on_fewer_tasks_is_pooled_over_its_own_and_not_compared_pooled(table, tmp_path, capsys):
    for task in ("units", "word", "columns"):
        finished(tmp_path, task, "infopo-2ep|-0evals-seed42", {150: [True, False]})
    for task in ("units", "word"):
        finished(tmp_path, task, "dpo-1ep|-0evals-seed42", {75: [False, False]})
    assert table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| infopo-2ep-0evals | pooled | seed 42: 3 / 6 (18.8–81.2) | 50.0 | – |" in out  # one seed: no t interval
    assert "| dpo-1ep-0evals | pooled over units, word | seed 42: 0 / 4 (0.0–49.0) | 0.0 | – |" in out
    paired = out[out.index("against |"):]
    assert "| dpo-1ep-0evals | word | 42 | 1 | 0 | 1 | within chance |" in paired and "pooled" not in paired.split("\n\n")[0]
    assert "Not compared pooled (they ran on other tasks than infopo-2ep-0evals): dpo-1ep-0evals." in out


def test_first_names_the_setting_others_are_compared_with(table, tmp_path, capsys):
    for name, right in (("infopo-2ep|-0evals-seed42", [True, False]), ("dpo-1ep|-0evals-seed42", [False, True])):
        finished(tmp_path, "units", name, {0: [False, False], 150: right})
    assert table.main([str(tmp_path), "--first", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "| dpo-1ep-0evals against |" in out
    # the table lists the base model, then the setting the others are compared with, then the rest
    rows = [line.split(" | ")[0] for line in out.split("\n\n")[0].splitlines() if line.startswith("| ")]
    assert [name for i, name in enumerate(rows) if name not in rows[:i]][1:] == [
        "| base model (step 0)", "| dpo-1ep-0evals", "| infopo-2ep-0evals"]
    assert table.main([str(tmp_path), "--first", "base"]) == 0  # the base model named: listed once, still first
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.split("\n\n")[0].splitlines()[2:]]
    assert rows.count("| base model (step 0)") == 1 and rows[0] == "| base model (step 0)"
    with pytest.raises(SystemExit, match="--first simpo: no such run"):
        table.main([str(tmp_path), "--first", "simpo"])
    finished(tmp_path, "units", "infopo-lr0.0005-2ep|-0evals-seed42", {150: [True, True]})
    with pytest.raises(SystemExit, match="2 InfoPO settings .*: name the one to compare with --first"):
        table.main([str(tmp_path)])


def test_runs_scored_on_other_problems_are_refused_and_an_empty_folder_named(table, tmp_path):
    with pytest.raises(SystemExit, match="no finished test-split run"):
        table.main([str(tmp_path)])
    finished(tmp_path, "units", "infopo-2ep|-0evals-seed42", {150: [True, False]})
    finished(tmp_path, "units", "dpo-1ep|-0evals-seed42", {75: [True, False, True]})
    with pytest.raises(SystemExit, match="scored on different problems"):
        table.main([str(tmp_path)])


def test_the_figure_is_written(table, tmp_path):
    pytest.importorskip("matplotlib")
    # the base never right on 3 problems: a bar at 0, whose Wilson bound comes out a hair above 0 in floating point
    finished(tmp_path, "units", "infopo-2ep|-0evals-seed42", {0: [False] * 3, 150: [True, False, False]})
    finished(tmp_path, "units", "infopo-2ep|-0evals-seed1", {150: [True, True, False]})
    finished(tmp_path, "word", "dpo-1ep|-0evals-seed42", {150: [True, True]})
    assert table.main([str(tmp_path), "--plot", str(tmp_path / "test.png")]) == 0
    assert (tmp_path / "test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
