"""`infopo report`, the run's report.md and model card, and the likelihood-displacement guard.

Two tiny runs (infopo and dpo, evaluated every 2 steps) are trained once for the module; the guard's thresholds are
checked on synthetic records and on the held-out figures measured on the default preset."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from infopo_cli.reporting import displacement, figure, runs, table
from infopo_cli.reporting.model_card import write_merged_card
from infopo_cli.train import recipe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tiny_model, tmp_path_factory) -> list[Path]:
    from conftest import tiny_cfg, write_pairs

    folder = tmp_path_factory.mktemp("report-runs")
    pairs = write_pairs(folder / "pairs.jsonl", 16)
    fast = dict(max_steps=3, eval_every=2, gradient_checkpointing=False)
    return [Path(recipe.train(tiny_cfg(tiny_model, pairs, folder / loss, loss=loss, **fast)).output)
            for loss in ("infopo", "dpo")]


def cli(*args: str) -> int:
    from infopo_cli import cli as entry

    old, sys.argv = sys.argv, ["infopo", *args]
    try:
        entry.main()
    except SystemExit as exit:
        return exit.code or 0
    finally:
        sys.argv = old
    return 0


# ---------------------------------------------------------------- what a run leaves


@pytest.mark.run
def test_run_folder_reads_back(two_runs):
    run = runs.read_run(two_runs[1])
    assert run.loss == "dpo" and run.loss_params == {"beta": 0.1} and run.steps == 3
    assert [r["step"] for r in run.evals] == [0, 2, 3]
    assert run.eval_before["step"] == 0 and run.eval_after["step"] == 3
    assert run.data_info["pairs"] == 16 and run.data_info["format"]
    assert replace(run, summary={"data": "held.jsonl"}).data_info == {}  # an eval's summary.json put there: no crash
    assert "displacement" in run.summary  # the guard's verdict: a message or null


@pytest.mark.run
def test_torn_last_line_is_skipped_and_a_non_run_is_one_line(two_runs, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.toml", "metrics.jsonl"):
        (copy / name).write_bytes((two_runs[0] / name).read_bytes())
    with (copy / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "step": 5, "lo')  # killed mid-write
    assert len(runs.read_run(copy).records) == len(runs.read_run(two_runs[0]).records)
    with pytest.raises(runs.NotARunError) as err:
        runs.read_run(tmp_path)
    assert "not a run folder" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.run
def test_model_card_and_report_md(two_runs):
    for folder, paper in zip(two_runs, ("arXiv:2505.08507", "arXiv:2305.18290")):
        card = (folder / "README.md").read_text()
        front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
        assert "library_name: peft" in front and "- infopo" in front and "- lora" in front
        assert f"- {runs.read_run(folder).loss}" in front and "base_model:" in front
        assert paper in body and "PeftModel.from_pretrained" in body and "--gguf" in body and "--merged" in body
        assert "![training curves](plot.png)" in body and "eval/logps/chosen" in body
        assert "More Information Needed" not in card  # peft's template is gone
        report = (folder / "report.md").read_text()
        assert report.startswith("# ") and paper in report and "plot.png" in report
    # the card's own lines load the adapter on the base it trained on (run from elsewhere: paths are whole)
    card = (two_runs[0] / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the card's text, written by this test's run
    assert type(scope["model"]).__name__ == "PeftModelForCausalLM" and scope["tokenizer"] is not None


@pytest.mark.run
def test_merged_export_card(two_runs, tmp_path):
    write_merged_card(tmp_path, two_runs[0], str(two_runs[0]), Path("out/merged"))
    card = (tmp_path / "README.md").read_text()
    assert "library_name: transformers" in card and "- merged" in card and "arXiv:2505.08507" in card
    assert 'from_pretrained("out/merged")' in card and "PeftModel" not in card
    assert (tmp_path / "plot.png").is_file()
    other = tmp_path / "other"
    other.mkdir()
    write_merged_card(other, tmp_path, "some/base", other)  # not a run folder: a short card
    assert "base_model: some/base" in (other / "README.md").read_text()


# ---------------------------------------------------------------- infopo report


@pytest.mark.run
def test_report_two_runs_writes_one_png_and_a_markdown_row_each(two_runs, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli("report", *map(str, two_runs), "--markdown") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 2 and lines[0].startswith("| run | model | loss |")
    assert "| infopo |" in lines[2] and "| dpo |" in lines[3] and "→" in lines[2]
    assert all(f"| {tiny_model} |" in line for line in lines[2:])  # the base each trained
    assert "note:" not in capsys.readouterr().err  # one model, one data set: nothing to say
    png = tmp_path / "report.png"  # several runs: in the current folder
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 0
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]  # nothing else, no temporaries


@pytest.mark.run
def test_report_one_run_rich_table_and_default_out(two_runs, capsys):
    assert cli("report", str(two_runs[1])) == 0
    out = capsys.readouterr().out
    assert "dpo" in out and "eval/logps/chosen" in out and "→" in out
    assert (two_runs[1] / "report.png").read_bytes()[:8] == PNG_SIGNATURE


def test_report_errors_are_one_line(tmp_path, capsys):
    assert cli("report", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a run folder" in err and "\n" not in err


@pytest.mark.run
def test_report_says_when_runs_trained_other_models_and_refuses_a_run_twice(two_runs, tmp_path, capsys):
    import shutil

    other = shutil.copytree(two_runs[0], tmp_path / "other")
    config = (other / "config.toml").read_text()
    (other / "config.toml").write_text(re.sub(r'(?m)^model = ".*"$', 'model = "Qwen/Qwen2.5-1.5B-Instruct"', config))
    assert cli("report", str(two_runs[0]), str(other), "--out", str(tmp_path / "r.png")) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "note: these runs trained on different base models" in said and "Qwen/Qwen2.5-1.5B-Instruct" in said
    assert cli("report", str(two_runs[0]), str(two_runs[0]) + "/", "--out", str(tmp_path / "s.png")) == 2
    assert "is given twice; name each run once" in capsys.readouterr().err


@pytest.mark.run
def test_without_matplotlib_the_table_is_still_printed(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert figure.plot_runs([runs.read_run(two_runs[0])], tmp_path / "x.png") is False
    assert cli("report", str(two_runs[0]), "--out", str(tmp_path / "x.png")) == 0
    captured = capsys.readouterr()
    assert "infopo[plot]" in captured.out and "eval/logps/chosen" in captured.out
    assert not (tmp_path / "x.png").exists()


@pytest.mark.run
def test_held_out_answer_accuracy_is_drawn_for_the_runs_that_scored_it(two_runs, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from infopo_cli.reporting import plot

    drawn = []
    monkeypatch.setattr(figure, "save_figure", lambda fig, path: drawn.append(fig))
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: drawn.append(fig))
    plain, scored = runs.read_run(two_runs[0]), runs.read_run(two_runs[1])
    for i, record in enumerate(scored.evals):  # as --eval-generate-every logs them, at steps 0, 2, 3
        record["eval/answers/accuracy"] = 0.1 * (i + 1)
    assert figure.plot_runs([plain], tmp_path / "a.png") and figure.plot_runs([plain, scored], tmp_path / "b.png")
    assert plot.plot_run(scored.records, tmp_path / "plot.png", "t")
    without, with_answers, run_plot = drawn
    assert figure.ANSWERS not in [ax.get_title() for ax in without.axes]  # no run scored answers: no such panel
    (panel,) = [ax for ax in with_answers.axes if ax.get_title() == figure.ANSWERS]
    (line,) = panel.get_lines()  # the run that scored them, in its colour (the second)
    assert list(line.get_xdata()) == [0, 2, 3] and list(line.get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    assert line.get_color() == plt.rcParams["axes.prop_cycle"].by_key()["color"][1]
    (accuracy,) = [ax for ax in run_plot.axes if ax.get_title() == "accuracy"]  # plot.png: the same helper
    (answers,) = [ln for ln in accuracy.get_lines() if ln.get_label() == "eval/answers/accuracy"]
    assert list(answers.get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    for fig in drawn:
        plt.close(fig)


@pytest.mark.run
def test_markdown_table_escapes_pipes(two_runs):
    run = runs.read_run(two_runs[0])
    run.settings["data"] = "a|b.jsonl"
    assert "a\\|b.jsonl" in table.markdown_table([run])


# ---------------------------------------------------------------- the displacement guard


def evals(chosen: list[float], margins: list[float], every: int = 10) -> list[dict]:
    return [{"kind": "eval", "step": i * every, "eval/logps/chosen": c, "eval/rewards/margins": m}
            for i, (c, m) in enumerate(zip(chosen, margins))]


def trains(chosen: list[float], margins: list[float]) -> list[dict]:
    return [{"kind": "train", "step": i + 1, "rewards/chosen": c, "rewards/margins": m}
            for i, (c, m) in enumerate(zip(chosen, margins))]


def test_guard_fires_on_held_out_displacement_only():
    found = displacement.detect(evals([-60.0, -60.4, -62.5], [0.0, 0.3, 0.9]), loss="dpo")
    assert found and found.step == 20 and found.source == "held-out"
    for text in ("-60.00", "-62.50", "-2.50", "--loss infopo", "--sft-weight 0.1", "--lr"):
        assert text in found.message
    assert displacement.detect(evals([-60.0, -59.5, -59.0], [0.0, 0.3, 0.9])) is None    # chosen rose
    assert displacement.detect(evals([-60.0, -62.0, -63.0], [0.0, -0.1, -0.2])) is None  # margin did not grow
    # held-out figures decide where there are any: noisy training rewards do not add a warning
    assert displacement.detect(evals([-60.0], [0.0]) + trains([0.0] + [-1.0] * 9, [0.0] + [1.0] * 9)) is None
    assert "--loss infopo" not in displacement.detect(evals([-60.0, -65.0], [0.0, 1.0]), loss="infopo").message


def test_guard_without_evals_uses_smoothed_training_rewards():
    falling = trains([-0.1 * i for i in range(10)], [0.1 * i for i in range(10)])
    found = displacement.detect(falling)
    assert found and found.source == "training" and "rewards/chosen" in found.message
    rising = trains([0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.25, 0.3], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert displacement.detect(rising) is None
    spike = trains([0.0, 0.05, -0.6, 0.1, 0.1, 0.1, 0.1, 0.1], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert displacement.detect(spike) is None  # one bad batch is smoothed away


def test_guard_warns_once_as_a_metrics_sink():
    said: list[str] = []
    guard = displacement.Guard("dpo", warn=said.append)
    for record in evals([-60.0, -62.0, -64.0, -66.0], [0.0, 0.5, 1.0, 1.5]):
        guard.log(record)
    assert len(said) == 1 and guard.message == said[0] and guard.found.step == 10
    resumed = displacement.Guard("dpo", records=evals([-60.0, -62.0], [0.0, 0.5]), warn=said.append)
    assert resumed.found and len(said) == 1  # an earlier part's warning is not printed again


# Measured by hand on the default preset (embedded SmolLM2-135M, bundled data, 40 steps, --eval-every 10):
# held-out eval/logps/chosen and eval/rewards/margins at steps 0, 10, 20, 30, 40 (see reporting/displacement.py).
MEASURED = {
    "dpo": ([-64.31, -67.24, -73.91, -78.51, -79.42], [0.0, 0.174, 0.446, 0.588, 0.626]),
    "infopo": ([-64.31, -63.43, -62.88, -64.09, -63.82], [0.0, 0.314, 0.599, 0.641, 0.646]),
}


@pytest.mark.parametrize("loss,fires", [("dpo", True), ("infopo", False)])
def test_guard_on_the_measured_default_runs(loss, fires):
    chosen, margins = MEASURED[loss]
    found = displacement.detect(evals(chosen, margins), loss)
    assert (found is not None) is fires
    assert not fires or found.step == 10  # DPO: at its first evaluation


@pytest.mark.run
def test_summary_json_holds_the_verdict(two_runs):
    for folder in two_runs:
        summary = json.loads((folder / "summary.json").read_text())
        run = runs.read_run(folder)
        found = displacement.detect(run.records, run.loss)
        assert summary["displacement"] == (found.message if found else None)


def test_runs_of_two_comparisons_that_share_a_name_are_told_apart(tmp_path):
    """`report cmp1/infopo cmp2/infopo` labelled both "infopo (infopo)" in the legend and the table."""
    for name in ("cmp 1/infopo", "cmp2/infopo", "cmp2/dpo"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.toml").write_text('loss = "infopo"\n')
        (tmp_path / name / "metrics.jsonl").write_text("")
    assert [r.name for r in runs.read_runs([tmp_path / "cmp 1/infopo", tmp_path / "cmp2/infopo"])] == [
        "cmp 1/infopo", "cmp2/infopo"]
    assert [r.name for r in runs.read_runs([tmp_path / "cmp2/dpo", tmp_path / "cmp2/infopo"])] == ["dpo", "infopo"]
