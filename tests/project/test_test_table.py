"""benchmarks/test_table.py on a synthetic test-split folder: each setting over its seeds at the end of training, per
task and pooled, with Wilson and mean intervals against hand values, and the paired tests against the first setting."""

from __future__ import annotations

import pytest

from conftest import benchmark_module
from test_sweep_table import write_run


@pytest.fixture(scope="module")
def table():
    with benchmark_module("test_table.py") as module:
        yield module


def test_each_setting_over_its_seeds_per_task_and_pooled(table, tmp_path, capsys):
    right, wrong = [True] * 5, [False] * 5
    for seed, units in ((42, [True] * 4 + [False]), (1, [True] * 3 + [False] * 2)):
        write_run(tmp_path, "units", f"infopo-lr0.0005-2ep|-0evals-seed{seed}", {0: wrong, 150: units}, "test")
        write_run(tmp_path, "word", f"infopo-lr0.0005-2ep|-0evals-seed{seed}", {0: wrong, 150: right}, "test")
        write_run(tmp_path, "units", f"dpo-1ep|-0evals-seed{seed}", {0: wrong, 75: wrong}, "test")
        write_run(tmp_path, "word", f"dpo-1ep|-0evals-seed{seed}", {0: wrong, 75: [True] + [False] * 4}, "test")
    write_run(tmp_path, "units", "simpo-2ep|-0evals-seed42", {0: wrong}, "test")  # still training: step 0 only
    write_run(tmp_path, "units", "ipo-1ep|-100heldout-seed42", {0: wrong, 75: right})  # validation: not reported

    assert table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # seed 42 on units: 4 of 5, Wilson 37.6-96.4; two seeds 0.8 and 0.6: mean 0.7, t(1) = 12.706 x 0.1 -> clipped to 0-100
    assert ("| infopo-lr0.0005-2ep-0evals | units | seed 1: 3 / 5 (23.1–88.2); seed 42: 4 / 5 (37.6–96.4) | "
            "70.0 (0.0–100.0) |") in out
    assert "| infopo-lr0.0005-2ep-0evals | pooled | seed 1: 8 / 10 (49.0–94.3); seed 42: 9 / 10 (59.6–98.2) |" in out
    assert "ipo" not in out and "Not finished yet (left out): simpo-2ep-0evals seed 42 on units." in out
    # against DPO: per task and seed McNemar; units seed 42: 4 only InfoPO right, p = 2 x 0.5^4 = 0.125
    assert "| dpo-1ep-0evals | units | 42 | 4 | 0 | 0.125 | within chance |" in out
    # pooled seed 42: 4 + 4 only InfoPO (word: DPO gets problem 0 as InfoPO does), p = 2 x 0.5^8 = 0.00781
    assert "| dpo-1ep-0evals | pooled | 42 | 8 | 0 | 0.00781 | a real difference |" in out
    # the sign test over both seeds counts each problem once: units problems 0-3 (InfoPO right on one seed or both)
    assert "| dpo-1ep-0evals | units | 1, 42 (sign test) | 4 | 0 | 0.125 | within chance |" in out


def test_first_names_the_setting_others_are_compared_with(table, tmp_path, capsys):
    for name, right in (("infopo-2ep|-0evals-seed42", [True, False]), ("dpo-1ep|-0evals-seed42", [False, True])):
        write_run(tmp_path, "units", name, {0: [False, False], 150: right}, "test")
    assert table.main([str(tmp_path), "--first", "dpo"]) == 0
    assert "| dpo-1ep-0evals against |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--first simpo: no such setting"):
        table.main([str(tmp_path), "--first", "simpo"])


def test_runs_scored_on_other_problems_are_refused_and_an_empty_folder_named(table, tmp_path):
    with pytest.raises(SystemExit, match="no finished test-split run"):
        table.main([str(tmp_path)])
    write_run(tmp_path, "units", "infopo-2ep|-0evals-seed42", {150: [True, False]}, "test")
    write_run(tmp_path, "units", "dpo-1ep|-0evals-seed42", {75: [True, False, True]}, "test")
    with pytest.raises(SystemExit, match="scored on different problems"):
        table.main([str(tmp_path)])


def test_the_figure_is_written(table, tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path, "units", "infopo-2ep|-0evals-seed42", {150: [True, False]}, "test")
    write_run(tmp_path, "units", "infopo-2ep|-0evals-seed1", {150: [True, True]}, "test")
    assert table.main([str(tmp_path), "--plot", str(tmp_path / "test.png")]) == 0
    assert (tmp_path / "test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
