"""The settings options of `train`, `compare`, `plan` and `data check` are built from TrainConfig's fields: each flag
shows its field's help, a flag not given never overrides the preset, and the README's flags table names them all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from conftest import ROOT, infopo
from typer.testing import CliRunner

from infopo_cli import cli
from infopo_cli.config import CLI_SETTINGS, FIELDS, cli_option, from_flag, merge, override
from infopo_cli.errors import ConfigError
from infopo_cli.presets import load_preset

README = (ROOT / "README.md").read_text()
COMMANDS = typer.main.get_command(cli.app).commands


def flat(text: str) -> str:
    """Rich's help with its boxes and line wraps taken out: one line of words."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("command, names", [
    (("train",), CLI_SETTINGS),
    # its --loss and --output are its own; its runs train one after another in one process (no --nproc, --fsdp)
    (("compare",), [n for n in CLI_SETTINGS if n not in ("loss", "output", "nproc", "fsdp")]),
])
def test_every_setting_flag_is_in_the_help_with_its_fields_text(command, names):
    out = infopo(*command, "--help")
    assert out.returncode == 0, out.stderr
    text = flat(out.stdout)
    for name in names:
        option = cli_option(name)
        for flag in option.decls[0].split("/"):
            assert re.search(rf"(^|\s){re.escape(flag)}(\s|$)", text), (name, flag)
        assert flat(FIELDS[name].metadata["help"]) in text, name  # unchanged, [unsloth] included


def test_compare_refuses_the_flags_of_several_processes():
    for flag in ("--nproc", "--fsdp"):
        out = infopo("compare", "--loss", "dpo", flag, *(["2"] if flag == "--nproc" else []), "--dry-run")
        assert out.returncode == 2 and f"No such option: {flag}" in flat(out.stderr), out.stderr


def test_options_are_typed_as_their_fields():
    params = {p.name: p for p in COMMANDS["train"].params}
    assert set(CLI_SETTINGS) <= set(params)
    assert params["data"].multiple and params["eval_data"].multiple and not params["model"].multiple
    assert params["load_in_4bit"].opts == ["--4bit"] and params["load_in_4bit"].secondary_opts == ["--no-4bit"]
    assert params["skip_invalid"].is_flag and params["skip_invalid"].secondary_opts == []
    assert params["data_format"].opts == ["--format"] and params["system_prompt"].opts == ["--system"]
    assert params["preset"].opts == ["--preset", "-p"]
    assert params["max_length"].metavar == "N|auto" and params["gradient_checkpointing"].metavar == "auto|on|off|offload"
    got = COMMANDS["train"].make_context("train", ["--lora-r", "8", "--lr", "1e-3", "--max-length", "auto",
                                                   "--no-share-prompt", "--data", "a.jsonl"]).params
    assert (got["lora_r"], got["lr"], got["max_length"], got["share_prompt"]) == (8, 1e-3, "auto", False)
    # plan's --max-length is a number (no auto: a plan needs a length) with its own help
    plan_max = next(p for p in COMMANDS["plan"].params if p.name == "max_length")
    assert plan_max.help == "Longest prompt+response in tokens (default: the preset's)."
    assert COMMANDS["plan"].make_context("plan", ["--max-length", "128"]).params["max_length"] == 128
    with pytest.raises(Exception, match="valid int"):
        COMMANDS["plan"].make_context("plan", ["--max-length", "auto"])
    for settings_free in ("lora_dropout", "warmup_ratio", "weight_decay", "max_grad_norm"):  # preset files only
        assert settings_free not in params


PRESET = """loss = "simpo"
beta = 2.5
gamma = 1.2
data = ["a.jsonl", "b.jsonl"]
eval_data = ""
lora_r = 4
lora_alpha = 8
max_length = 128
max_prompt_length = 64
share_prompt = false
load_in_4bit = false
skip_invalid = true
batch_size = 3
dtype = "fp32"
gradient_checkpointing = "on"
report_to = "none"
"""


@pytest.fixture
def preset_file(tmp_path) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(PRESET)
    return path


def test_a_flag_not_given_leaves_the_presets_value(preset_file, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_dry_run", lambda cfg, resume=None: seen.setdefault("train", cfg))
    result = CliRunner().invoke(cli.app, ["train", "--preset", str(preset_file), "--lr", "0.001", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert seen["train"] == override(load_preset(str(preset_file)), {"lr": 0.001}, "test")
    assert seen["train"].beta == 2.5 and seen["train"].data == ["a.jsonl", "b.jsonl"] and not seen["train"].share_prompt

    from infopo_cli.reporting import memory_table

    monkeypatch.setattr(memory_table, "print_plan", lambda console, cfg, prompt_length, gpu_mem, **kw: seen.setdefault("plan", cfg))
    result = CliRunner().invoke(cli.app, ["plan", "--preset", str(preset_file), "--batch-size", "2", "--no-4bit"])
    assert result.exit_code == 0, result.output
    assert seen["plan"] == merge(load_preset(str(preset_file)), {"batch_size": 2, "load_in_4bit": False}, "test")

    from infopo_cli.train import compare

    def stop(losses, sweep, output, flags, preset):
        seen["compare"] = flags
        raise typer.Exit(0)

    monkeypatch.setattr(compare, "prepare", stop)
    result = CliRunner().invoke(cli.app, ["compare", "--loss", "dpo", "--max-steps", "4", "--no-length-normalize"])
    assert result.exit_code == 0, result.output
    assert seen["compare"] == {"max_steps": 4, "length_normalize": False}  # not given: not there, not None or ()


def test_a_swept_value_is_typed_as_its_flag():
    assert from_flag("beta", "0.3") == 0.3 and from_flag("lora_r", "8") == 8 and from_flag("max_length", "auto") == "auto"
    assert from_flag("share_prompt", "False") is False
    with pytest.raises(ConfigError, match=r"^--lora-r big: must be a whole number$"):
        from_flag("lora_r", "big")


# --- the README's flags table ---------------------------------------------------------------------------------------

def readme_flags() -> dict[str, list[str] | None]:
    """Each flag of the README's `infopo train` table, with the choices its row lists (`--reference a\\|b`) or None."""
    section = README.split("### Flags of `infopo train`", 1)[1].split("\n\n", 2)[1]
    flags: dict[str, list[str] | None] = {}
    for row in section.splitlines()[2:]:
        first_cell = re.split(r"(?<!\\)\|", row)[1]
        for span in re.findall(r"`([^`]+)`", first_cell):
            words = span.replace("\\|", "|").replace(",", " ").split()
            choices = next((w.split("|") for w in words[1:] if "|" in w), None)
            for word in words:
                for flag in word.split("/") if word.startswith("-") else ():
                    assert flag not in flags, f"{flag} has two rows"
                    flags[flag] = choices
    return flags


def test_the_readme_flags_table_names_every_train_flag_and_no_other():
    params = COMMANDS["train"].params
    expected = {flag for p in params for flag in p.opts + p.secondary_opts} - {"--help"}
    table = readme_flags()
    assert sorted(expected - set(table)) == [], "train flags missing from the README's table"
    assert sorted(set(table) - expected) == [], "flags in the README's table that `infopo train` does not take"


def test_the_readme_lists_each_fields_choices_as_the_config_has_them():
    table = readme_flags()
    for name in CLI_SETTINGS:
        choices = FIELDS[name].metadata["choices"]
        listed = table[cli_option(name).decls[0].split("/")[0]]
        if choices or listed:  # a row that lists values lists the field's, and a field with choices has them listed
            assert listed == list(choices or ()), f"{name}: the README lists {listed}, the config {choices}"
