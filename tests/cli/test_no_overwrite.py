"""Nothing the user had is overwritten, and a command that fails early leaves nothing behind: the writers outside a
fresh run folder (eval, report), the checks that come before a run folder is claimed, a refused resume, presets
that would name folders outside ./runs, and flags that were not given overriding the preset in `compare`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import typer

from conftest import infopo, tiny_cfg, write_pairs
from infopo_cli import cli, presets
from infopo_cli.errors import CheckpointError, ConfigError, OutputError
from infopo_cli.inference.generation import Sampling
from infopo_cli.workflows.evaluation import EvalRequest, evaluate
from infopo_cli.train import recipe


def one_line(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ow-run")
    pairs = write_pairs(folder / "pairs.jsonl", 8)
    summary = recipe.train(tiny_cfg(tiny_model, pairs, folder / "run", max_steps=2))
    assert summary.status == "completed"
    return Path(summary.output)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- eval --out, report --out ----------------------------------------------------------------------

@pytest.mark.run
def test_eval_out_refuses_existing_files_and_never_writes_over_its_data(run, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "prefs.jsonl", 6)
    before = data.read_bytes()
    loads = []
    monkeypatch.setattr("infopo_cli.workflows.evaluation.load_target", lambda *a, **k: loads.append(a) or 1 / 0)
    # the bug report's case: --out prefs.json beside the data prefs.jsonl; the .jsonl of the replies is the data
    with pytest.raises(ConfigError, match="the data this evaluation reads"):
        evaluate(EvalRequest(str(run), data=str(data), generate=True, out=str(tmp_path / "prefs.json"), overwrite=True))
    (tmp_path / "mine.md").write_text("my notes")
    with pytest.raises(OutputError, match=r"mine\.md already exists; .*--overwrite"):
        evaluate(EvalRequest(str(run), data=str(data), generate=True, out=str(tmp_path / "mine.json")))
    assert data.read_bytes() == before and (tmp_path / "mine.md").read_text() == "my notes"
    assert not (tmp_path / "mine.json").exists() and not loads  # refused before any model loaded
    for name in ("metrics.json", "summary.json"):  # the run's training log and summary, even with --overwrite
        with pytest.raises(ConfigError, match=rf"would write .*{name[:-5]}\.json.?l?, a file of the run in"):
            evaluate(EvalRequest(str(run), data=str(data), generate=True, out=str(run / name), overwrite=True))
    (tmp_path / "afile").write_text("x")  # --out under a file: no folder to write in
    with pytest.raises(OutputError, match=r"^--out .*afile/e\.json: cannot write there, .*afile is a file"):
        evaluate(EvalRequest(str(run), data=str(data), out=str(tmp_path / "afile" / "e.json")))
    assert not loads


@pytest.mark.run
def test_eval_out_without_generate_claims_only_the_summary(run, tmp_path):
    data = write_pairs(tmp_path / "held.jsonl", 6)
    (tmp_path / "res.md").write_text("kept")
    evaluate(EvalRequest(str(run), data=str(data), out=str(tmp_path / "res.json")), log=lambda _: None)
    assert json.loads((tmp_path / "res.json").read_text())["preference"] and (tmp_path / "res.md").read_text() == "kept"
    with pytest.raises(OutputError, match=r"res\.json already exists"):
        evaluate(EvalRequest(str(run), data=str(data), out=str(tmp_path / "res.json")), log=lambda _: None)
    evaluate(EvalRequest(str(run), data=str(data), out=str(tmp_path / "res.json"), overwrite=True), log=lambda _: None)
    assert (tmp_path / "res.md").read_text() == "kept"  # not written by an eval: not ours to remove
    evaluate(EvalRequest(str(run), data=str(data), out=str(tmp_path / "g.json"), generate=True,
                         sampling=Sampling(max_new_tokens=4)), log=lambda _: None)
    assert (tmp_path / "g.jsonl").is_file() and (tmp_path / "g.md").is_file()
    evaluate(EvalRequest(str(run), data=str(data), out=str(tmp_path / "g.json"), overwrite=True), log=lambda _: None)
    assert not (tmp_path / "g.jsonl").exists() and not (tmp_path / "g.md").exists()  # the replaced eval's replies


@pytest.mark.run
def test_eval_on_the_runs_own_training_data_says_so(run, tmp_path):
    trained_on = presets.load_preset(str(run / "config.toml")).data
    result = evaluate(EvalRequest(str(run), data=trained_on, out=str(tmp_path / "e.json")), log=lambda _: None)
    assert any("this run trained on it" in note for note in result.notes)
    held_out = write_pairs(tmp_path / "held.jsonl", 4, seed=3)
    result = evaluate(EvalRequest(str(run), data=str(held_out), out=str(tmp_path / "f.json")), log=lambda _: None)
    assert not any("trained on it" in note for note in result.notes)


@pytest.mark.run
def test_report_out_refuses_an_existing_figure(run, tmp_path):
    figure = tmp_path / "fig.png"
    figure.write_bytes(b"my figure")
    out = infopo("report", str(run), "--out", str(figure))
    assert out.returncode == 2 and "fig.png already exists" in one_line(out) and figure.read_bytes() == b"my figure"
    assert infopo("report", str(run), "--out", str(figure), "--overwrite").returncode == 0
    assert figure.read_bytes().startswith(b"\x89PNG")


# --- compare: flags not given, names checked before anything is written ------------------------------

def test_compare_flags_not_given_do_not_override_the_preset():
    """The README's compare command crashed: --data/--eval-data not given came through as empty tuples."""
    train = typer.main.get_command(cli.app).commands["train"]
    flags = cli._train_flags(train.make_context("train", ["--max-steps", "40"]).params)
    assert flags == {"max_steps": 40}
    two = cli._train_flags(train.make_context("train", ["--data", "a.jsonl", "--data", "b.jsonl"]).params)
    assert two == {"data": ["a.jsonl", "b.jsonl"]}


def test_compare_dry_run_keeps_the_presets_held_out_set(tmp_path):
    out = infopo("compare", "--loss", "infopo,dpo", "--max-steps", "4", "--output", str(tmp_path / "cmp"), "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held out: 150 pairs" in out.stdout and not (tmp_path / "cmp").exists()


def test_compare_refuses_an_unknown_loss_before_writing_its_plan(tmp_path):
    out = infopo("compare", "--loss", "infopo,dpoo", "--max-steps", "2", "--output", str(tmp_path / "cmp"))
    assert out.returncode == 2 and "unknown loss 'dpoo'" in one_line(out)
    assert not (tmp_path / "cmp").exists()


# --- no leftovers ------------------------------------------------------------------------------------

def test_an_unknown_attention_kernel_is_refused_before_the_run_folder(tmp_path, pairs_file):
    out = infopo("train", "--data", str(pairs_file), "--attn-implementation", "turbo", "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and "attn_implementation must be one of auto, matmul" in one_line(out)
    assert not (tmp_path / "o").exists()


def test_a_run_that_fails_before_its_first_step_removes_its_folder(tmp_path, pairs_file, tiny_model):
    broken = tmp_path / "broken-model"  # a config but no weights or tokenizer: it fails once the folder is claimed
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny_model / "config.json").read_bytes())
    out = infopo("train", "--data", str(pairs_file), "--eval-data", "", "--model", str(broken),
                 "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and one_line(out).startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_an_existing_empty_output_folder_is_kept_when_the_run_fails(tmp_path, pairs_file):
    (tmp_path / "o").mkdir()
    out = infopo("train", "--data", str(pairs_file), "--eval-data", "", "--model", str(tmp_path / "nothing"),
                 "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and (tmp_path / "o").is_dir() and not any((tmp_path / "o").iterdir())


@pytest.mark.run
def test_a_refused_resume_changes_nothing_on_disk(tiny_model, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 16)
    cfg = tiny_cfg(tiny_model, pairs, tmp_path / "run", max_steps=2, save_every=1, eval_data="")
    recipe.train(cfg)
    run_dir = tmp_path / "run"
    write_pairs(pairs, 20, seed=1)  # the data changed since the checkpoint
    before = snapshot(run_dir)
    from infopo_cli.train.resume import resumed_config

    resumed = resumed_config(presets.load_preset(str(run_dir / "config.toml")), {"max_steps": 4}, run_dir)
    with pytest.raises(CheckpointError, match="the training data changed"):
        recipe.train(resumed, resume=run_dir)
    assert snapshot(run_dir) == before


# --- presets -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", "..", ""])
def test_a_presets_name_is_a_plain_name(tmp_path, name):
    preset = tmp_path / "p.toml"
    preset.write_text(f"preset = {json.dumps(name)}\n")
    if not name:  # empty: the file's own name
        assert presets.load_preset(str(preset)).preset == "p"
        return
    with pytest.raises(ConfigError, match="'preset' must be a plain name"):
        presets.load_preset(str(preset))


def test_a_preset_file_name_becomes_a_plain_run_name(tmp_path):
    preset = tmp_path / "my preset (v2).toml"
    preset.write_text("lr = 1e-4\n")
    name = presets.load_preset(str(preset)).preset
    assert name == "my-preset--v2-" and recipe.default_output(presets.load_preset(str(preset))).parent == Path("runs")


def test_deeply_nested_toml_is_one_line(tmp_path):
    preset = tmp_path / "deep.toml"
    preset.write_text("x = " + "[" * 10000 + "]" * 10000 + "\n")
    out = infopo("train", "--preset", str(preset), "--dry-run")
    assert out.returncode == 2 and str(preset) in one_line(out)


def test_wrong_kinds_of_path_are_named_as_they_are(tmp_path):
    from infopo_cli import files
    from infopo_cli.model import stack

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"afile is a file, not a folder; choose another --output"):
        files.check_output_dir(tmp_path / "afile")
    with pytest.raises(ConfigError, match=r"--init-adapter .*afile: a file, not an adapter folder"):
        stack._read_init_adapter(tmp_path / "afile")
    with pytest.raises(ConfigError, match=r"--init-adapter .*nope: no such folder"):
        stack._read_init_adapter(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"^--resume .*nope: no such run folder$"):
        cli._resume(tmp_path / "nope", {})
    with pytest.raises(ConfigError, match=r"tmp.* is not a run folder \(no config.toml\)$"):
        cli._resume(tmp_path, {})
