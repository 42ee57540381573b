"""The command line as a user meets it: instant help, presets, one-line errors, exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import infopo

from infopo_cli import __version__
from infopo_cli.errors import ConfigError
from infopo_cli.presets import load_preset


def test_help_does_not_import_torch():
    """`infopo --help` must answer at once: torch/transformers are imported only by commands that train."""
    code = "import sys, infopo_cli.cli; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_and_version():
    out = infopo("--help")
    assert out.returncode == 0 and "train" in out.stdout and "presets" in out.stdout
    out = infopo("train", "--help")
    for flag in ("--preset", "--data", "--output", "--loss", "--beta", "--lr", "--epochs", "--max-steps",
                 "--batch-size", "--grad-accum", "--max-length", "--lora-r", "--seed", "--model", "--dtype"):
        assert flag in out.stdout, flag
    assert infopo("--version").stdout.strip() == f"infopo {__version__}"


def test_presets_listed_and_shown():
    out = infopo("presets")
    assert "smollm2-135m" in out.stdout and "llama3-8b-qlora" in out.stdout
    out = infopo("presets", "show", "llama3-8b-qlora")
    assert out.returncode == 0 and "meta-llama/Meta-Llama-3-8B-Instruct" in out.stdout


def test_bad_row_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "c"}\n')
    out = infopo("train", "--data", str(bad), "--model", str(tmp_path / "never-loaded"), "--output", str(tmp_path / "o"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {bad}:2: field 'rejected': missing"
    assert "Traceback" not in out.stderr + out.stdout and not (tmp_path / "o").exists()


def test_bad_flag_values_are_one_line(tmp_path):
    out = infopo("train", "--batch-size", "0", "--dtype", "fp8")
    assert out.returncode == 2 and "batch_size must be > 0" in out.stderr and "dtype must be one of" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = infopo("train", "--loss", "nope", "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and "unknown loss 'nope'" in out.stderr


def test_losses_lists_every_loss_with_paper_and_defaults():
    out = infopo("losses")
    assert out.returncode == 0
    for name in ("infopo", "rmipo", "mi", "dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo"):
        assert f"│ {name} " in out.stdout, name
    for paper in ("2505.08507", "2604.24804", "2501.01544", "2405.14734"):
        assert paper in out.stdout
    assert "tdpo1" in out.stdout and "--sft-weight" in out.stdout


def test_a_flag_the_loss_does_not_take_is_one_line(tmp_path):
    out = infopo("train", "--loss", "dpo", "--gamma", "0.5", "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --gamma does not apply to loss 'dpo'")
    out = infopo("train", "--loss", "mi", "--prior", "nope", "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and "unknown prior 'nope'" in out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lines, said", [
    ('loss = "dpo"\ngamma = 0.5\n', "gamma does not apply to loss 'dpo' (it takes: beta, sft_weight)"),
    ('loss = "dpo"\nlabel_smoothing = 0.2\n', "label_smoothing does not apply to loss 'dpo'"),
    ('loss = "mi"\nprior = "nope"\n', "unknown prior 'nope' for loss 'mi'"),
    ('loss = "cdpo"\nlabel_smoothing = 0.7\n', "label_smoothing must be in [0, 0.5)"),
    ('loss = "nope"\n', "unknown loss 'nope'")])
def test_a_loss_setting_wrong_in_a_preset_file_names_the_file_and_key(lines, said, tmp_path):
    """Found by the loss check after the preset and flags merged, it used to name a flag (--gamma) no one typed."""
    preset = tmp_path / "mine.toml"
    preset.write_text('extends = "smollm2-135m"\n' + lines)
    for command in (("train", "--dry-run"), ("compare", "--loss", "infopo,dpo", "--dry-run")):
        out = infopo(*command, "--preset", str(preset), cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.strip().startswith(f"error: {preset}: {said}"), out.stderr
        assert out.stderr.strip().count("\n") == 0 and "--" not in out.stderr, out.stderr


def test_every_command_that_reads_a_preset_refuses_a_loss_setting_its_loss_does_not_take(tmp_path):
    """plan, doctor, presets show and data check used to show such a preset as if it would train."""
    preset = tmp_path / "mine.toml"
    preset.write_text('extends = "smollm2-135m"\nloss = "dpo"\ngamma = 0.5\n')
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    for command in (("plan", "--preset", str(preset)), ("doctor", "--preset", str(preset)),
                    ("presets", "show", str(preset)), ("data", "check", str(pairs), "--no-tokenizer", "--preset", str(preset))):
        out = infopo(*command, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.strip() == (
            f"error: {preset}: gamma does not apply to loss 'dpo' (it takes: beta, sft_weight)"), (command, out.stderr)


def test_the_preset_file_blamed_is_the_one_whose_own_setting_is_wrong(tmp_path):
    """A preset that extends a wrong one: the parent's key is the mistake, not the file the user named."""
    from infopo_cli.losses.registry import load_preset as checked

    (tmp_path / "parent.toml").write_text('extends = "smollm2-135m"\nloss = "dpo"\ngamma = 0.5\n')
    (tmp_path / "child.toml").write_text('extends = "parent.toml"\nlr = 1e-4\n')
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'parent.toml'}: gamma does not apply to loss 'dpo'")):
        checked(str(tmp_path / "child.toml"))
    (tmp_path / "fixed.toml").write_text('extends = "parent.toml"\nloss = "simpo"\n')  # another loss drops gamma
    assert checked(str(tmp_path / "fixed.toml")).loss == "simpo"
    (tmp_path / "blank.toml").write_text('extends = " "\n')
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'blank.toml'}: 'extends' must be a preset name")):
        load_preset(str(tmp_path / "blank.toml"))


def test_switching_loss_drops_the_presets_loss_settings(tmp_path):
    from infopo_cli.config import override
    from infopo_cli.losses.registry import resolve

    preset = tmp_path / "p.toml"
    preset.write_text('loss = "simpo"\nbeta = 2.5\ngamma = 1.4\n')
    with pytest.raises(ConfigError, match="--gamma does not apply to loss 'dpo'"):
        resolve("dpo", load_preset(str(preset)).loss_overrides())  # kept, the preset's gamma would be an error for dpo
    # the preset's gamma and beta belong to simpo: with --loss dpo they are dropped, and dpo takes its own beta
    cfg = override(load_preset(str(preset)), {"loss": "dpo"}, "command line")
    spec, params = resolve(cfg.loss, cfg.loss_overrides())
    assert spec.name == "dpo" and params == {"beta": 0.1, "sft_weight": 0.0}
    # the CLI too, up to a check made after the loss is resolved: the data file is read only then
    missing = tmp_path / "missing.jsonl"
    out = infopo("train", "--preset", str(preset), "--loss", "dpo", "--data", str(missing), "--output", str(tmp_path / "o"))
    assert out.returncode != 0 and out.stderr.strip() == f"error: {missing}: no such file"


def test_override_keeps_loss_settings_only_for_the_presets_own_loss():
    from infopo_cli.config import TrainConfig, override

    preset = TrainConfig(loss="infopo", beta=0.25, gamma=None)
    assert override(preset, {"lr": 1e-4}, "t").beta == 0.25            # same loss: the tuned beta stays
    assert override(preset, {"loss": "infopo"}, "t").beta == 0.25
    assert override(preset, {"loss": "dpo"}, "t").beta is None         # another loss: its own default
    assert override(preset, {"loss": "dpo", "beta": 0.3}, "t").beta == 0.3


def test_a_preset_that_extends_another_and_switches_loss_drops_the_others_loss_settings(tmp_path):
    """`extends = "smollm2-135m"` with `loss = "dpo"` kept InfoPO's tuned beta 0.25 for DPO."""
    preset = tmp_path / "dpo.toml"
    preset.write_text('extends = "smollm2-135m"\nloss = "dpo"\n')
    assert load_preset(str(preset)).beta is None
    preset.write_text('extends = "smollm2-135m"\nloss = "dpo"\nbeta = 0.2\n')
    assert load_preset(str(preset)).beta == 0.2


def test_ones_own_data_is_not_scored_on_the_presets_bundled_held_out_set(tmp_path):
    """The held-out arithmetic belongs to the bundled training data: a run on other data reported it as its own."""
    from infopo_cli.config import TrainConfig, override

    preset = load_preset("smollm2-135m")
    assert preset.eval_data == "bundled:arith_eval"
    assert override(preset, {"data": "mine.jsonl"}, "t").eval_data == ""
    assert override(preset, {"data": ["a.jsonl", "b.jsonl:0.3"]}, "t").eval_data == ""
    assert override(preset, {"data": "mine.jsonl", "eval_data": "held.jsonl"}, "t").eval_data == "held.jsonl"
    assert override(preset, {"data": "bundled:units_train"}, "t").eval_data == ""  # another task's data: its own eval
    assert override(preset, {"data": "bundled:arith_train"}, "t").eval_data == "bundled:arith_eval"  # the preset's
    assert override(preset, {"lr": 1e-4}, "t").eval_data == "bundled:arith_eval"
    mine = override(TrainConfig(eval_data="held.jsonl"), {"data": "mine.jsonl"}, "t")
    assert mine.eval_data == "held.jsonl"  # a preset's own held-out file stays
    own = tmp_path / "own.toml"  # a preset file naming its data: the same
    own.write_text('extends = "smollm2-135m"\ndata = "mine.jsonl"\n')
    assert load_preset(str(own)).eval_data == ""
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(f'{{"prompt": "Q{i}", "chosen": "a", "rejected": "b"}}\n' for i in range(4)))
    out = infopo("train", "--data", str(pairs), "--output", str(tmp_path / "o"), "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held out: none (--eval-data FILE gives held-out metrics" in out.stdout


def test_errors_with_brackets_in_user_content_stay_one_line(tmp_path):
    """Rich markup must not eat (or choke on) user text such as '[INST]' or '[/]' in paths and messages."""
    bad = tmp_path / "[data].jsonl"
    bad.write_text('{"prompt": "p", "chosen": [{"role": "[/]", "content": "x"}], "rejected": "y"}\n')
    out = infopo("train", "--data", str(bad), "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"error: {bad}:1: field 'chosen': message 1: unknown role '[/]' (expected one of system, user, assistant, tool)"


@pytest.mark.run
def test_skip_invalid_trains_on_the_good_rows_and_reports_the_bad(tmp_path, tiny_model, pairs_file):
    data = tmp_path / "mixed.jsonl"
    data.write_text(pairs_file.read_text() + '{"prompt": "p", "chosen": "c"}\nnot json\n')
    out = infopo("train", "--data", str(data), "--eval-data", "", "--model", str(tiny_model), "--skip-invalid",
                 "--max-steps", "1", "--batch-size", "2", "--dtype", "fp32", "--output", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr[-1500:]
    assert "skipped 2 invalid rows of 26" in out.stdout
    assert "mixed.jsonl:25: field 'rejected': missing" in out.stdout and "mixed.jsonl:26: not valid JSON" in out.stdout


def test_attention_kernel_flag_and_flex_attention_refused_for_training_on_a_cpu(tmp_path, tiny_model, pairs_file):
    out = infopo("train", "--data", str(pairs_file), "--model", str(tiny_model), "--attn-implementation",
                 "flex_attention", "--dtype", "fp32", "--output", str(tmp_path / "o"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: --attn-implementation flex_attention trains on CUDA only")
    assert not (tmp_path / "o").exists()  # refused before any run folder is made


def test_resume_needs_a_run_folder_and_refuses_settings_that_differ(tmp_path):
    out = infopo("train", "--resume", str(tmp_path))
    assert out.returncode == 2 and "is not a run folder" in out.stderr
    (tmp_path / "config.toml").write_text('model = "x"\nlr = 0.0002\n')
    out = infopo("train", "--resume", str(tmp_path), "--lr", "0.1")
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --lr 0.1 differs from this run's 0.0002")


def test_a_run_accepts_its_files_under_any_spelling_on_resume(tmp_path, monkeypatch):
    """The same file given as `./d/small.jsonl` or its absolute path was refused on --resume as different data (and a
    config.toml holding an absolute path resumes from any folder)."""
    from conftest import write_pairs
    from infopo_cli.config import TrainConfig, to_toml
    from infopo_cli.data.mixing import absolute
    from infopo_cli.train.resume import resumed_config

    (tmp_path / "d").mkdir()
    pairs = write_pairs(tmp_path / "d" / "small.jsonl", 8)
    monkeypatch.chdir(tmp_path)
    assert absolute("d/small.jsonl") == str(pairs) and absolute(["d/small.jsonl:0.5", "bundled:arith_train"]) == [
        f"{pairs}:0.5", "bundled:arith_train"]
    assert absolute("org/name") == "org/name" and absolute("missing.jsonl") == "missing.jsonl"  # not here: as given
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    saved = TrainConfig(data=absolute("d/small.jsonl"), eval_data="", output=str(run))
    (run / "config.toml").write_text(to_toml(saved.to_dict()))
    for spelling in ("d/small.jsonl", "./d/small.jsonl", str(pairs)):
        assert resumed_config(saved, {"data": spelling}, run).data == str(pairs)
    with pytest.raises(ConfigError, match="--data .* differs from this run's"):
        resumed_config(saved, {"data": "bundled:arith_train"}, run)
    out = infopo("train", "--resume", str(run), "--dry-run", cwd=tmp_path.parent)
    assert out.returncode == 0, out.stderr
    assert f"data {pairs}: 8 explicit pairs" in out.stdout


def test_a_run_resumed_from_another_folder_reads_its_relative_paths_from_where_it_started(tmp_path, tiny_model,
                                                                                          monkeypatch):
    """`cd proj; infopo train --data d/small.jsonl --output runs/a`, stopped; `infopo train --resume proj/runs/a` from
    the folder above found no d/small.jsonl. It goes on from proj (and says so), config.toml keeps the paths as typed,
    and the data spelt from here is the same data."""
    import shutil
    import tomllib

    from conftest import write_pairs
    from infopo_cli.presets import load_run_config

    proj = tmp_path / "proj"
    (proj / "d").mkdir(parents=True)
    write_pairs(proj / "d" / "small.jsonl", 8)
    common = ("--eval-data", "", "--model", str(tiny_model), "--batch-size", "2", "--dtype", "fp32")
    out = infopo("train", "--data", "d/small.jsonl", *common, "--max-steps", "4", "--save-every", "2", "--output",
                 "runs/a", cwd=proj)
    assert out.returncode == 0, out.stderr[-1500:]
    shutil.rmtree(proj / "runs" / "a" / "checkpoint-4")  # as if stopped after step 2
    shutil.copytree(proj / "runs" / "a", tmp_path / "other" / "runs" / "a")  # a copy in another project reads its own
    out = infopo("train", "--resume", "runs/a", "--dry-run", cwd=tmp_path / "other")
    assert out.returncode == 2 and "where this run started" not in out.stdout and "small.jsonl" in out.stderr
    out = infopo("train", "--resume", "proj/runs/a", "--data", "proj/d/small.jsonl", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-1500:]
    out = infopo("train", "--resume", "proj/runs/a", cwd=tmp_path, env={"INFOPO_HOME": "home"})
    assert out.returncode == 0, out.stderr[-1500:]
    # a relative INFOPO_HOME is the folder the user typed it in, not the one the run moved to
    assert (tmp_path / "home" / "cache").is_dir() and not (proj / "home").exists()
    said = " ".join(out.stdout.split())
    assert f"d/small.jsonl: read from {proj}, where this run started" in said and "resuming after step 2 of 4" in said
    saved = tomllib.loads((proj / "runs" / "a" / "config.toml").read_text())
    assert (saved["data"], saved["output"]) == ("d/small.jsonl", "runs/a")
    assert (proj / "runs" / "a" / "checkpoint-4").is_dir() and not (tmp_path / "runs").exists()
    monkeypatch.chdir(tmp_path)  # eval, generate and export read the run's files from where it started, too
    (tmp_path / "d").mkdir()
    write_pairs(tmp_path / "d" / "small.jsonl", 4)  # another project's file of the same name is not the run's
    assert load_run_config(Path("proj/runs/a")).data == str(proj / "d" / "small.jsonl")
    assert load_run_config(Path("proj/runs/a"), where_started=False).data == "d/small.jsonl"


def test_a_run_of_an_older_release_resumes_reading_its_rows_as_that_release_did(tmp_path):
    """A config.toml without `system_field` was written when a `system` column was ignored: resuming it reads none
    (its data hash would differ otherwise); a run of this release keeps its own."""
    from infopo_cli.config import TrainConfig, to_toml
    from infopo_cli.presets import load_run_config as saved_config
    from infopo_cli.train.resume import resumed_config

    old, new = tmp_path / "old", tmp_path / "new"
    for run in (old, new):
        run.mkdir()
    settings = TrainConfig(eval_data="").to_dict()
    (new / "config.toml").write_text(to_toml(settings))
    (old / "config.toml").write_text(to_toml({k: v for k, v in settings.items() if k != "system_field"}))
    assert saved_config(old).system_field == "" and saved_config(new).system_field == "system"
    with pytest.raises(ConfigError, match="--system-field 'system' differs from this run's ''"):
        resumed_config(saved_config(old), {"system_field": "system"}, old)


def test_a_tilde_in_a_path_is_the_home_folder_however_the_shell_passed_it(tmp_path):
    """bash leaves `--output=~/x` (and a quoted "~/x") as typed: a run folder named `~` in the working directory
    would be a trap (`rm -rf ~`). Flags, arguments and preset values alike."""
    from conftest import write_pairs
    from infopo_cli.config import TrainConfig, merge

    home = tmp_path / "home"
    home.mkdir()
    write_pairs(home / "pairs.jsonl", 8)
    work = tmp_path / "work"
    work.mkdir()
    out = infopo("train", "--output=~/runs/x", "--data=~/pairs.jsonl", "--dry-run", cwd=work, env={"HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert f"run folder {home / 'runs' / 'x'} (new)" in out.stdout and not list(work.iterdir())
    out = infopo("data", "check", "~/pairs.jsonl", cwd=work, env={"HOME": str(home)})  # an argument, as if quoted
    assert out.returncode == 0, out.stderr
    out = infopo("eval", "--out=~/e.json", "--base=~/nowhere", "~/no-adapter", cwd=work, env={"HOME": str(home)})
    assert out.returncode == 2 and str(home / "no-adapter") in out.stderr and not list(work.iterdir())
    cfg = merge(TrainConfig(), {"output": "~/r", "data": ["~/a.jsonl", "bundled:arith_train"], "system_prompt": "~hi"}, "preset")
    assert cfg.output == str(Path.home() / "r") and cfg.data == [str(Path.home() / "a.jsonl"), "bundled:arith_train"]
    assert cfg.system_prompt == "~hi"  # text, not a path


def test_usage_errors_are_one_line_without_class_names():
    for args, start in ((("train", "--bogus"), "error: No such option: --bogus"),
                        (("train", "--lr", "abc"), "error: Invalid value for '--lr'"),
                        (("presets", "show"), "error: Missing argument 'name'"),
                        (("data",), "error: missing a command (see `infopo data --help`)")):
        out = infopo(*args)
        lines = [line for line in out.stderr.splitlines() if "kernels" not in line]
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), out.stderr
        assert "Usage" not in lines[0] and "Error" not in lines[0].split(":")[0]


def test_export_gguf_alone_looks_for_the_newest_run(tmp_path):
    out = infopo("export", "--gguf", cwd=tmp_path)  # --gguf takes no value here: the default path
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: no finished run under runs/ to export; pass a run folder, or --base and --adapter")


def test_optional_values_and_the_default_export_paths(tmp_path):
    import os

    from infopo_cli.cli import _fill_optional_values
    from infopo_cli.export.merged import AdapterSource, default_output
    from infopo_cli.reporting.runs import newest_run

    assert _fill_optional_values(["export", "--gguf"]) == ["export", "--gguf", ""]
    assert _fill_optional_values(["export", "--gguf", "--quant", "q8_0"]) == ["export", "--gguf", "", "--quant", "q8_0"]
    assert _fill_optional_values(["export", "--merged", "out/"]) == ["export", "--merged", "out/"]
    runs = tmp_path / "runs"
    for name in ("older", "newer"):
        (runs / name).mkdir(parents=True)
        for file in ("adapter_config.json", "config.toml", "adapter_model.safetensors"):
            (runs / name / file).write_text("")
    os.utime(runs / "older" / "adapter_model.safetensors", (1, 1))
    (runs / "not-a-run").mkdir()
    assert newest_run(runs) == runs / "newer"
    source = AdapterSource("base", runs / "newer")
    assert default_output(source, "gguf", "q8_0") == runs / "newer" / "export" / "newer-q8_0.gguf"
    assert default_output(source, "merged") == runs / "newer" / "export" / "merged"


def test_small_guides_a_careless_user_gets(tmp_path):
    """A YAML preset, a model that is not here for `data check`, fewer pairs than one step's batch."""
    from conftest import write_pairs

    yaml = tmp_path / "p.yaml"
    yaml.write_text("loss: dpo\n")
    out = infopo("train", "--preset", str(yaml), "--dry-run")
    assert out.returncode == 2 and out.stderr.strip().endswith("(presets are TOML: key = value lines, strings quoted)")
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    out = infopo("data", "check", str(pairs), "--model", str(tmp_path / "no-model"))
    assert out.returncode == 2 and out.stderr.strip().endswith("(or check the rows alone with --no-tokenizer)")
    out = infopo("train", "--data", str(pairs), "--batch-size", "8", "--grad-accum", "1", "--dry-run",
                 "--output", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    assert "2 optimizer steps of 8 pairs" in out.stdout  # the default preset's two epochs
    assert "warning: a step's global batch of 8 pairs is more than the 4 training pairs" in out.stdout


def test_settings_that_would_do_nothing_with_this_data_are_warned_of(tmp_path):
    """--eval-every without held-out data, and --split on a single file (every row is read), were taken silently."""
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(f'{{"prompt": "Q{i}", "chosen": "a", "rejected": "b"}}\n' for i in range(4)))
    out = infopo("train", "--data", str(pairs), "--eval-data", "", "--eval-every", "5", "--eval-generate-every", "5",
                 "--split", "test", "--output", str(tmp_path / "o"), "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    said = " ".join(out.stdout.split())
    assert ("warning: eval_every 5 and eval_generate_every 5: nothing to evaluate without held-out data (--eval-data "
            "FILE)") in said
    assert f"warning: split 'test' applies to none of {pairs}: a single file has no splits, every row is read" in said
    out = infopo("train", "--data", str(pairs), "--eval-data", str(pairs), "--eval-every", "5", "--output",
                 str(tmp_path / "o"), "--dry-run")
    assert out.returncode == 0 and "nothing to evaluate" not in out.stdout and "applies to none" not in out.stdout
    from infopo_cli.data.mixing import split_note

    (tmp_path / "saved").mkdir()  # a split that a folder or hub dataset of the mix needs is no warning for its file
    assert split_note([str(pairs), str(tmp_path / "saved")], "test") is None
    assert split_note([str(pairs), "org/name"], "test") is None and split_note([str(pairs)], "train") is None
    assert split_note([str(pairs), "bundled:arith_eval"], "test").startswith("split 'test' applies to none of")


def test_a_comparisons_dry_run_refuses_what_would_stop_it_after_training(tmp_path):
    out = infopo("compare", "--loss", "infopo,dpo", "--generate", "--max-new-tokens", "0", "--dry-run", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("error: --max-new-tokens must be at least 1")
    out = infopo("compare", "--loss", "infopo,dpo", "--generate", "--eval-data", "", "--dry-run", cwd=tmp_path)
    assert out.returncode == 2 and "these runs hold none out: give --eval-data FILE" in out.stderr


def test_preset_files_as_editors_write_them_and_their_mistakes_name_the_file(tmp_path):
    (tmp_path / "bom.toml").write_bytes(b'\xef\xbb\xbfextends = "smollm2-135m"\nlr = 0.0001\n')
    assert load_preset(str(tmp_path / "bom.toml")).lr == 1e-4  # a BOM (Windows editors write one)
    (tmp_path / "ext.toml").write_text('extends = "nope.toml"\n')
    with pytest.raises(ConfigError, match=r"ext\.toml: extends = 'nope\.toml': preset file nope\.toml does not exist"):
        load_preset(str(tmp_path / "ext.toml"))
    (tmp_path / "empty.toml").write_text('extends = "smollm2-135m"\ndata = []\n')
    with pytest.raises(ConfigError, match=r"empty\.toml: data is an empty list: name at least one source"):
        load_preset(str(tmp_path / "empty.toml"))


def test_commands_we_suggest_paste_as_one_argument_per_path():
    from infopo_cli.train.stops import resume_hint

    assert resume_hint(Path("runs/sp ü")) == "infopo train --resume 'runs/sp ü'"
    assert resume_hint(Path("runs/a")) == "infopo train --resume runs/a"



@pytest.mark.parametrize("args, named", [
    (("eval", "--data", ""), "--data '' names no file"), (("eval", "--out", " "), "--out ' ' names no file"),
    (("report", "runs/a", "--out", ""), "--out '' names no file"), (("export", ""), "RUN_DIR '' names no file"),
    (("compare", "--output", "", "--dry-run"), "--output '' names no file"),
    (("train", "--preset", "", "--dry-run"), "--preset '' names no file"), (("train", "--resume", ""), "--resume ''"),
    (("plan", "-p", ""), "--preset '' names no file"), (("data", "check", ""), "SOURCE '' names no file"),
    (("train", "--output", "", "--dry-run"), "output '' names no folder"),
    (("train", "--model", " ", "--dry-run"), "model ' ' names no folder"),
    (("doctor", "--preset", ""), "--preset '' names no file"), (("data", "check", "-p", "", "x.jsonl"), "--preset ''"),
    (("export", "--gguf", " "), "--gguf ' ' names no file")])
def test_an_empty_path_is_one_line_not_the_default(args, named, tmp_path):
    """`train --eval-data ''` means no held-out data; an empty path elsewhere (a flag, a run folder, a preset) quietly
    meant the default one: a fresh run for `--resume ''`, the newest run for `export ''`."""
    out = infopo(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and named in out.stderr, out.stderr
