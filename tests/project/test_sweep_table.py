"""benchmarks/sweep_table.py on a synthetic sweep folder: one row per setting over every task, the counts at each
step, the pooled last common step and the paired test against a chosen run."""

from __future__ import annotations

import json

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def sweep():
    with benchmark_module("sweep_table.py") as module:
        yield module


def write_run(out, task: str, name: str, answers: dict[int, list[bool]], split: str = "validation"):
    """A run folder OUT/TASK/runs/NAME with its answers/step-N.jsonl ('|' in `name` is where the task and split go)."""
    folder = out / task / "runs" / f"{name.split('|')[0]}-{task}-{split}{name.split('|')[1]}" / "answers"
    folder.mkdir(parents=True)
    for step, right in answers.items():
        (folder / f"step-{step}.jsonl").write_text(
            "".join(json.dumps({"where": f"f:{i}", "right": r}) + "\n" for i, r in enumerate(right)))
    return folder.parent


def test_a_sweep_is_one_row_per_setting_over_every_task(sweep, tmp_path):
    write_run(tmp_path, "units", "infopo-2ep|-100heldout-seed42", {0: [False] * 4, 150: [True, True, False, False]})
    write_run(tmp_path, "word", "infopo-2ep|-100heldout-seed42", {0: [False] * 4, 150: [True, False, False, False]})
    write_run(tmp_path, "units", "dpo-2ep|-100heldout-seed42", {0: [False] * 4, 75: [True] * 4, 150: [True] * 4})
    table = sweep.collect(tmp_path)
    # the task left the name, the split is kept
    assert set(table) == {"infopo-2ep-100heldout-seed42 (validation)", "dpo-2ep-100heldout-seed42 (validation)"}
    assert list(table["infopo-2ep-100heldout-seed42 (validation)"]["word"][150].values()) == [True, False, False, False]
    text = sweep.markdown(table, against="infopo-2ep")  # the only setting that starts so
    infopo_row = next(line for line in text.splitlines() if line.startswith("| infopo"))
    dpo_row = next(line for line in text.splitlines() if line.startswith("| dpo"))
    assert "0 → 2 of 4 (steps 0, 150)" in infopo_row and "0 → 3 / 8 at steps 0, 150" in infopo_row
    assert "+0 / −0, p = 1.000" in infopo_row                     # itself
    # no word run: its units pooled alone, said so, and not paired with a row over both tasks; no pick for dpo
    assert "0 → 4 → 4 of 4" in dpo_row and "0 → 4 → 4 / 4 at steps 0, 75, 150 (51.0–100.0) over units only" in dpo_row
    assert dpo_row.endswith("| other problems |")
    assert text.splitlines()[-1] == "- infopo: infopo-2ep-100heldout-seed42 (validation) at step 150, 3 / 8"
    with pytest.raises(SystemExit, match="no run with answers"):
        sweep.main([str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="no such run"):
        sweep.markdown(table, against="ipo")


def test_the_run_compared_with_is_named_once_and_problems_pair_by_where_they_come_from(sweep, tmp_path):
    write_run(tmp_path, "units", "infopo-2ep|-seed42", {150: [True, False, False, False]})
    write_run(tmp_path, "units", "infopo-2ep|-seed1", {150: [False, True, False, False]})
    table = sweep.collect(tmp_path)
    with pytest.raises(SystemExit, match="2 runs start so"):  # a prefix of two seeds: which one was meant?
        sweep.markdown(table, against="infopo-2ep")
    seed1 = next(line for line in sweep.markdown(table, against="infopo-2ep-seed42").splitlines() if "seed1 " in line)
    assert "+1 / −1, p = 1.000" in seed1  # problem 0 right only in seed 42, problem 1 only in seed 1
    write_run(tmp_path, "units", "dpo-2ep|-seed42", {150: [True, True, True]})  # another problem set
    other = sweep.markdown(sweep.collect(tmp_path), against="infopo-2ep-seed42")
    assert "other problems" in next(line for line in other.splitlines() if line.startswith("| dpo"))


def test_the_best_row_of_each_loss_is_the_most_right_answers_at_any_step_ties_to_the_shorter_run(sweep, tmp_path):
    write_run(tmp_path, "units", "infopo-2ep|-seed42", {0: [True] * 4, 75: [True, True, False, False], 150: [True] * 3 + [False]})
    write_run(tmp_path, "units", "infopo-beta2-2ep|-seed42", {75: [True] * 3 + [False], 150: [True] * 3 + [False]})
    write_run(tmp_path, "units", "dpo-2ep|-seed42", {0: [True] * 4, 75: [False] * 4, 150: [True] + [False] * 3})
    best = sweep.best_per_loss(sweep.collect(tmp_path), ["units"])
    # step 0 (the base, 4 right) never counts; 3 right at step 75 beats 3 at step 150 and the default's name is no help
    assert best == {"infopo": ("infopo-beta2-2ep-seed42 (validation)", 75, 3, 4), "dpo": ("dpo-2ep-seed42 (validation)", 150, 1, 4)}
    # by share, not count: 1 of 4 beats 2 of 10 (a run over more problems)
    write_run(tmp_path, "units", "dpo-lr1e-05-2ep|-seed42", {150: [True] * 2 + [False] * 8})
    assert sweep.best_per_loss(sweep.collect(tmp_path), ["units"])["dpo"] == ("dpo-2ep-seed42 (validation)", 150, 1, 4)
    write_run(tmp_path, "units", "dpo-lr1e-05-2ep|-seed7", {150: [True] * 4})
    assert sweep.best_per_loss(sweep.collect(tmp_path), ["units"])["dpo"][:2] == ("dpo-lr1e-05-2ep-seed7 (validation)", 150)


def test_a_test_run_and_a_validation_run_of_one_setting_are_two_rows(sweep, tmp_path):
    write_run(tmp_path, "units", "infopo-2ep|-seed42", {150: [True, False]})
    write_run(tmp_path, "units", "infopo-2ep|-seed42", {150: [False, False, False]}, split="test")
    table = sweep.collect(tmp_path)
    assert {name: len(by_task["units"][150]) for name, by_task in table.items()} == {
        "infopo-2ep-seed42 (validation)": 2, "infopo-2ep-seed42 (test)": 3}
