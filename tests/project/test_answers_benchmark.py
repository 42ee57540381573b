"""benchmarks/answers.py without training: its plan (steps, quarter-epoch evaluations, names, settings), the
check that a results folder holds the planned run, and the curves, table and figure from synthetic metrics."""

from __future__ import annotations

import pytest

from conftest import benchmark_module
from infopo_cli import presets
from infopo_cli.config import override
from infopo_cli.errors import ConfigError


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("answers.py") as module:
        yield module


def test_schedule_counts_steps_as_infopo_train_does(bench):
    assert bench.schedule(600, 8, 3) == (75, 225, 19)   # the bundled data: 75 steps an epoch, 18.75 a quarter
    assert bench.schedule(601, 8, 1) == (76, 76, 19)    # a last partial batch is a step
    assert bench.schedule(64, 8, 0.5) == (8, 4, 2)
    assert bench.schedule(3, 8, 1) == (1, 1, 1)         # never zero steps, never "every 0 steps" (that is off)
    assert bench.schedule(600, 8, 3, evals_per_epoch=2) == (75, 225, 38)
    assert bench.schedule(600, 8, 2, evals_per_epoch=0) == (75, 150, 150)  # the start and the end only


def test_a_model_setting_names_the_run_by_the_models_name_not_its_path(bench):
    assert bench.tag({"model": "/home/me/models/gemma-3-270m-q4_k_m.gguf", "lr": 1e-4}) == \
        "-lr0.0001-modelgemma-3-270m-q4_k_m"
    assert bench.model_name("org/name") == "name" and bench.model_name("./my model/") == "my model"


def test_plan_on_the_bundled_data(bench):
    specs = bench.plan("smollm2-135m", ["infopo", "dpo"], [42, 1], 3.0,
                       bench.parse_settings(["infopo:beta=0.5,lr=1e-5"]))
    assert [s.name for s in specs] == ["infopo-beta0.5-lr1e-05-3ep-seed42", "dpo-3ep-seed42",
                                       "infopo-beta0.5-lr1e-05-3ep-seed1", "dpo-3ep-seed1"]  # seed by seed
    assert all(s.settings["max_steps"] == 225 and s.settings["eval_generate_every"] == 19 and s.steps_per_epoch == 75
               for s in specs)
    assert all(s.settings["save_every"] == 19 for s in specs)  # a killed run loses at most a quarter epoch
    assert specs[0].settings["beta"] == 0.5 and specs[0].settings["lr"] == 1e-5
    assert "beta" not in specs[1].settings and "lr" not in specs[1].settings  # dpo keeps its own defaults
    with pytest.raises(ConfigError, match="does not apply to loss 'dpo'"):  # refused before any run starts
        bench.plan("smollm2-135m", ["dpo"], [42], 1.0, bench.parse_settings(["dpo:gamma=1"]))
    with pytest.raises(SystemExit, match="not among --losses"):
        bench.plan("smollm2-135m", ["dpo"], [42], 1.0, bench.parse_settings(["simpo:gamma=1"]))


def test_an_epoch_of_unpaired_rows_is_twice_the_steps(bench):
    """kto and --unpair train on rows: 1200 of the bundled 600 pairs, 150 steps of 8 an epoch."""
    specs = bench.plan("smollm2-135m", ["infopo", "kto"], [42], 1.0, bench.parse_settings(["infopo:unpair=true"]))
    assert [(s.name, s.settings["max_steps"], s.steps_per_epoch) for s in specs] == [
        ("infopo-unpairTrue-1ep-seed42", 150, 150), ("kto-1ep-seed42", 150, 150)]
    assert bench.plan("smollm2-135m", ["infopo"], [42], 1.0, {})[0].settings["max_steps"] == 75


def test_a_task_trains_on_its_train_split_and_scores_validation_unless_told_test(bench):
    sources = bench.task_sources("columns", "validation")
    assert sources == {"data": "bundled:columns_train", "eval_data": "bundled:columns_validation"}
    specs = bench.plan("smollm2-135m", ["infopo"], [42], 1.0, {}, sources, "-columns-validation")
    assert specs[0].name == "infopo-1ep-columns-validation-seed42" and specs[0].settings["eval_data"].endswith("_validation")
    assert specs[0].steps_per_epoch == 75  # 600 training pairs, batches of 8
    assert bench.task_sources("units", "test")["eval_data"] == "bundled:units_test"
    with pytest.raises(SystemExit, match="one of word, columns, units"):
        bench.task_sources("arith", "validation")
    with pytest.raises(SystemExit, match="validation .* or test"):
        bench.task_sources("word", "train")


def test_careless_seeds_and_an_out_that_is_a_file_are_one_line(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --seeds abc: whole numbers"):
        bench.main(["--seeds", "abc"])
    (tmp_path / "a-file").write_text("the user's")
    with pytest.raises(SystemExit, match="a file is there"):
        bench.main(["--out", str(tmp_path / "a-file"), "--max-pairs", "2"])
    assert (tmp_path / "a-file").read_text() == "the user's"


def test_a_tasks_answer_budget_lets_its_longest_chosen_reply_finish_twice_over(bench, tmp_path):
    def words(text, add_special_tokens=False):  # a tokenizer of whitespace-separated words
        return {"input_ids": text.split()}

    rows = tmp_path / "heldout.jsonl"
    rows.write_text('{"prompt": "p", "chosen": "a b c", "rejected": "x"}\n'
                    '{"prompt": "q", "chosen": "a b c d e f g", "rejected": "y z"}\n', encoding="utf-8")
    assert bench.answer_budget(str(rows), words) == 14
    rows.write_text('{"prompt": "p", "messages": []}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match="no chosen reply"):
        bench.answer_budget(str(rows), words)


def test_the_columns_task_gets_more_new_tokens_than_the_preset_and_a_loss_of_its_own_keeps_its_own(bench, default_model):
    # SmolLM2's tokens: the columns task's longest worked reply is 146 of them, past the default preset's 128
    budget = bench.answer_budget("bundled:columns_validation", bench.task_tokenizer(str(default_model)))
    assert budget == 292
    data = {**bench.task_sources("columns", "validation"), "eval_max_new_tokens": budget}
    specs = bench.plan("smollm2-135m", ["infopo", "dpo"], [42], 1.0, bench.parse_settings(["dpo:eval_max_new_tokens=64"]),
                       data, "-columns-validation")
    assert [s.settings["eval_max_new_tokens"] for s in specs] == [292, 64]
    assert bench.reply_budgets(specs) == ", replies of up to 292 (infopo), 64 (dpo) new tokens"
    assert bench.reply_budgets(specs[:1]) == ", replies of up to 292 new tokens"
    with pytest.raises(SystemExit, match="cannot read the tokenizer of"):
        bench.task_tokenizer(str(default_model.parent))  # a folder, but not a model's


def test_the_plan_runs_each_spec_as_a_train_run_in_its_own_folder(bench, tmp_path):
    from types import SimpleNamespace

    specs = bench.plan("smollm2-135m", ["infopo", "dpo"], [42], 1.0, {}, bench.task_sources("units", "validation"))
    trained, said = [], []

    def train(cfg, resume=None):
        trained.append(cfg)
        return SimpleNamespace(status="completed", steps=cfg.max_steps, seconds=1.0, exit_code=0)

    stopped, seconds = bench.run_plan(specs, tmp_path / "runs", "smollm2-135m", train, said.append)
    assert stopped is None and set(seconds) == {s.name for s in specs}
    assert [(c.loss, c.seed, c.max_steps, c.data, c.eval_data, c.output) for c in trained] == [
        (s.loss, 42, s.settings["max_steps"], "bundled:units_train", "bundled:units_validation",
         str(tmp_path / "runs" / s.name)) for s in specs]
    assert said[0] == f"[1/2] {specs[0].name}: training"


def test_set_takes_toml_values_and_refuses_what_the_benchmark_decides(bench):
    assert bench.parse_settings(["infopo:beta=0.5,lr=1e-5", "eval_max_new_tokens=96", "infopo:beta=1",
                                 "dpo:reference=online"]) == {
        "infopo": {"beta": 1, "lr": 1e-5}, bench.ALL: {"eval_max_new_tokens": 96}, "dpo": {"reference": "online"}}
    with pytest.raises(SystemExit, match="set by the benchmark"):
        bench.parse_settings(["infopo:seed=3"])
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        bench.parse_settings(["infopo:bta=0.5"])
    with pytest.raises(SystemExit, match="KEY=V"):
        bench.parse_settings(["infopo:beta"])


def test_a_folder_trained_with_other_settings_is_not_taken_for_the_planned_run(bench):
    base = presets.load_preset("smollm2-135m")
    saved = override(base, {"loss": "dpo", "seed": 1, "max_steps": 225, "beta": 0.1}, "config.toml")  # beta resolved
    planned = {"loss": "dpo", "seed": 1, "max_steps": 225}
    assert bench.differences(saved, override(base, planned, "benchmark")) == []  # the loss's default is not compared
    assert bench.differences(saved, override(base, {**planned, "lr": 1e-5}, "benchmark")) == [
        "lr 0.0005 there, 1e-05 now"]
    # how often it saved leaves its numbers as they are: a folder saved at other steps is still this run
    assert bench.differences(saved, override(base, {**planned, "save_every": 19}, "benchmark")) == []


def records(accuracies: dict[int, float], extra_eval_at: int = 10) -> list[dict]:
    """metrics.jsonl of a run: train steps, evaluations that scored answers, one that did not."""
    out = [{"kind": "train", "step": s, "loss": 1.0} for s in range(1, max(accuracies) + 1)]
    out += [{"kind": "eval", "step": s, "eval/loss": 1.0, "eval/answers/accuracy": a} for s, a in accuracies.items()]
    return out + [{"kind": "eval", "step": extra_eval_at, "eval/loss": 1.0}]


@pytest.fixture
def curves(bench):
    infopo = bench.curve("infopo (beta=0.25)", {42: records({0: 0.12, 19: 0.20, 38: 0.30}),
                                                1: records({0: 0.12, 19: 0.10, 38: 0.20}),
                                                7: records({0: 0.12, 19: 0.15})}, 75)  # seed 7 stopped early
    dpo = bench.curve("dpo (beta=0.1)", {42: records({0: 0.12, 19: 0.25, 38: 0.05})}, 75)
    return infopo, dpo


def test_curves_gather_the_seeds_step_by_step(bench, curves):
    infopo, dpo = curves
    assert [p.step for p in infopo.points] == [0, 19, 38]  # the evaluation without answers is not a point
    assert infopo.points[1].by_seed == {42: 0.20, 1: 0.10, 7: 0.15}
    assert (infopo.points[1].mean, infopo.points[1].low, infopo.points[1].high) == pytest.approx((0.15, 0.10, 0.20))
    assert infopo.points[2].by_seed == {42: 0.30, 1: 0.20} and infopo.best().step == 38
    assert dpo.best().step == 19 and bench.base_accuracy(curves) == pytest.approx(0.12)


def test_the_table_has_a_row_per_evaluation_and_each_seed_in_each_cell(bench, curves):
    lines = bench.markdown(curves).splitlines()
    assert lines[0] == "| step | epoch | infopo (beta=0.25), seeds 42 / 1 / 7 | dpo (beta=0.1), seed 42 |"
    assert lines[2] == "| 0 | 0.00 | 12.0 / 12.0 / 12.0 (mean 12.0, 95% CI 12.0–12.0) | 12.0 |"
    # sd 5 points over 3 seeds: t(0.975, 2) * 5 / sqrt(3) = 12.4 points either side
    assert lines[3] == "| 19 | 0.25 | 20.0 / 10.0 / 15.0 (mean 15.0, 95% CI 2.6–27.4) | 25.0 |"
    assert lines[4] == "| 38 | 0.51 | 30.0 / 20.0 / – (mean 25.0, 95% CI 0.0–88.5) | 5.0 |"  # 2 seeds: t = 12.7
    assert lines[5] == "| best mean | | **25.0** at step 38 | **25.0** at step 19 |" and len(lines) == 6
    reported = bench.markdown(curves, choose=False).splitlines()  # on test data: the end of training, not the best step
    assert reported[:5] == lines[:5] and reported[5] == "| end of training | | **25.0** at step 38 | **5.0** at step 38 |"


def test_the_figure_draws_each_mean_its_range_and_the_base_model(bench, curves, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from infopo_cli.reporting import plot as run_plot

    drawn = []
    monkeypatch.setattr(run_plot, "save_figure", lambda fig, path: drawn.append(fig))
    assert bench.plot(curves, tmp_path / "answers.png", "title")
    (ax,) = [a for a in drawn[0].axes if a.get_ylabel()]
    means = {line.get_label(): line for line in ax.get_lines()}
    infopo = means["infopo (beta=0.25) (mean of 3 seeds, band: min–max)"]
    assert list(infopo.get_xdata()) == [0, 19, 38] and list(infopo.get_ydata()) == pytest.approx([0.12, 0.15, 0.25])
    bands = [c.get_paths()[0].vertices[:, 1] for c in ax.collections]
    assert len(bands) == 2 and (bands[0].min(), bands[0].max()) == pytest.approx((0.10, 0.30))
    base = means["base model (step 0): 12.0%"]
    assert list(base.get_xdata()) == [0] and list(base.get_ydata()) == pytest.approx([0.12])
    plt.close(drawn[0])


def scored_run(bench, loss, seed, task, right, step=225):
    return bench.Scored(loss, seed, task, step, tuple(f"{task}:{i}" for i in range(len(right))), tuple(right))


def test_problem_by_problem_each_run_gets_its_interval_and_the_first_loss_a_paired_test_per_seed_and_over_seeds(bench):
    infopo_42 = [True] * 10 + [False] * 10   # 10 / 20
    dpo_42 = [True] * 2 + [False] * 18       # only infopo right on 8, only dpo on 0
    infopo_1 = [True, False] * 10
    dpo_1 = [False, True] * 10               # 10 each way
    runs = [scored_run(bench, "dpo", 42, "units", dpo_42), scored_run(bench, "infopo", 42, "units", infopo_42),
            scored_run(bench, "dpo", 1, "units", dpo_1), scored_run(bench, "infopo", 1, "units", infopo_1)]
    lines = bench.problem_tables(runs, "infopo", choose=False).splitlines()
    assert lines[0] == "| loss | task | seed | step | right | accuracy, 95% CI |"
    assert lines[3] == "| infopo | units | 42 | 225 | 10 / 20 | 50.0 (29.9–70.1) |"  # Wilson, by hand in test_intervals
    assert lines[2] == "| dpo | units | 42 | 225 | 2 / 20 | 10.0 (2.8–30.1) |"
    table = lines[lines.index("| infopo against | seeds | problems | only infopo right | only the other right | p | verdict |"):]
    assert table[2] == "| dpo | 42 | 20 | 8 | 0 | 0.00781 | a real difference |"  # 2 * 0.5**8
    assert table[3] == "| dpo | 1 | 20 | 10 | 10 | 1 | within chance |"
    # over both seeds, each problem once (seeds right, infopo vs dpo): problem 0 2-1 and 2, 4, 6, 8 2-0 -> infopo;
    # 1 1-2 -> dpo; 3, 5, 7, 9 1-1 -> tie; 10..18 even 1-0 -> infopo; 11..19 odd 0-1 -> dpo: 10 against 6,
    # 2 * P(X <= 6) for X ~ B(16, 1/2) = 0.454
    assert table[4] == "| dpo | 42, 1 (sign test) | 20 | 10 | 6 | 0.454 | within chance |"
    assert "exploratory" not in "\n".join(lines)
    assert bench.problem_tables(runs, "infopo", choose=True).splitlines()[-3].endswith("| exploratory |")
    pooled = bench.problem_tables([*runs, scored_run(bench, "infopo", 42, "word", [True] * 5),
                                   scored_run(bench, "dpo", 42, "word", [False] * 5)], "infopo", False).splitlines()
    assert "| infopo | all | 42 |  | 15 / 25 | 60.0 (40.7–76.6) |" in pooled  # each loss and seed over its tasks
    assert "| dpo | 42 | 25 | 13 | 0 | 0.000244 | a real difference |" in pooled  # 2 * 0.5**13
    assert not [line for line in pooled if "sign test" in line]  # seed 1 has no word run: no seeds over every task
    base = [scored_run(bench, loss, 42, "", [True], step=0) for loss in ("infopo", "dpo")]
    assert bench.problem_tables(base, "infopo", True).splitlines()[-1].endswith("| both are the base model (step 0) |")
    with pytest.raises(SystemExit, match="different problems"):  # the same count of other problems is not a pair
        bench.problem_tables([scored_run(bench, "infopo", 42, "a", [True]),
                              bench.Scored("dpo", 42, "a", 225, ("other:0",), (True,))], "infopo", False)


def test_the_reported_step_is_the_best_on_validation_and_the_end_on_test(bench, curves, tmp_path):
    import json

    specs = [bench.RunSpec("infopo", 42, "i42", {}, 75), bench.RunSpec("dpo", 42, "d42", {}, 75)]
    for name, step in (("i42", 38), ("d42", 19), ("d42", 38)):
        (tmp_path / name / "answers").mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "answers" / f"step-{step}.jsonl").write_text(
            "".join(json.dumps({"where": f"f:{i}", "right": right}) + "\n" for i, right in enumerate((True, step == 38))))
    chosen, missing = bench.scored_runs(specs, curves, tmp_path, choose=True)
    assert [(r.loss, r.step, r.right) for r in chosen] == [("infopo", 38, (True, True)), ("dpo", 19, (True, False))]
    assert chosen[0].problems == ("f:0", "f:1") and missing == []
    reported, _ = bench.scored_runs(specs, curves, tmp_path, choose=False)
    assert [(r.loss, r.step) for r in reported] == [("infopo", 38), ("dpo", 38)]
    (tmp_path / "d42" / "answers" / "step-38.jsonl").unlink()  # a run trained before infopo wrote them: named, not wrong
    reported, missing = bench.scored_runs(specs, curves, tmp_path, choose=False)
    assert [r.loss for r in reported] == ["infopo"] and missing == ["d42 (step 38)"]


def test_an_unknown_task_in_a_list_is_refused_before_any_training(bench, monkeypatch):
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("trained before checking every task"))
    with pytest.raises(SystemExit, match="--task bogus: one of word, columns, units"):
        bench.main(["--task", "word,bogus"])
    with pytest.raises(SystemExit, match="name each task once"):
        bench.main(["--task", "word,word"])


def test_a_slice_of_the_presets_data_keeps_its_held_out_set(bench, tmp_path, monkeypatch):
    """`--max-pairs` slices the preset's bundled data into a file: it is still that data, scored on its held-out set
    (a file of one's own drops the preset's bundled held-out set)."""
    planned: dict = {}

    def plan(preset, losses, seeds, epochs, overrides, data, *rest):
        planned.update(data)
        raise SystemExit(0)

    monkeypatch.setattr(bench, "plan", plan)
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "o"), "--max-pairs", "2"])
    assert planned["eval_data"] == "bundled:arith_eval" and planned["data"].endswith(".jsonl")
