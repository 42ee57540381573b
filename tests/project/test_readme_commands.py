"""Every `infopo` command line in the README's code blocks runs as written.

Each one parses (its flags exist and take the values given); `train` and `compare` run with `--dry-run` in a folder
holding the files they name (every preset, flag, loss and data row checked, no model loaded); the commands that need
neither a model nor a trained run (`losses`, `presets`, `plan`, `data check`, `doctor`) run for real. The commands that act on
a trained run (`eval`, `export`, `generate`, `chat`, `report`) are parsed here and run by the tests of each command.
"""

from __future__ import annotations

import json
import shutil
import shlex
import sys
from pathlib import Path

import pytest
import typer

from conftest import ROOT, write_pairs
from infopo_cli import cli

README = (ROOT / "README.md").read_text()
RUN_FOR_REAL = ("losses", "presets", "plan", "data", "doctor")
DRY_RUN = ("train", "compare")


def readme_commands() -> list[str]:
    """The `infopo ...` commands of the README's fenced code blocks, comments cut, `a && b` split."""
    commands, fence = [], None
    for line in README.splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
        elif fence in ("bash", "sh", "console", ""):
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("infopo "):
                    commands.append(shlex.join(shlex.split(part, comments=True)))
    return commands


COMMANDS = readme_commands()


def args_of(command: str) -> list[str]:
    return cli._fill_optional_values(shlex.split(command)[1:])


def run(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`infopo ARGS` in this process (a subprocess per command would import torch thirty times)."""
    monkeypatch.setattr(sys, "argv", ["infopo", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as stop:
        code = stop.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_readme_has_commands_of_every_kind():
    kinds = {shlex.split(c)[1] for c in COMMANDS}
    assert {"train", "compare", "eval", "export", "report", "plan", "data", "presets", "generate", "chat"} <= kinds


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command):
    """Flags and values as the command line takes them (a typo in the README, or a flag renamed in the code, fails)."""
    group = typer.main.get_command(cli.app)
    args = args_of(command)
    while args and args[0] in getattr(group, "commands", {}):
        group, args = group.commands[args[0]], args[1:]
    group.make_context("infopo", list(args), resilient_parsing=False)


@pytest.fixture
def readme_folder(tmp_path, tiny_model, monkeypatch) -> Path:
    """A folder holding every file the README's commands name, as a user's would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("my_prefs.jsonl", "more.jsonl", "hh.jsonl"):
        write_pairs(tmp_path / name, 24)
    nectar = [{"prompt": f"\n\nHuman: What is {i} + 1?\n\nAssistant:", "answers": [
        {"answer": f"{i + 1}.", "rank": 1}, {"answer": f"{i + 2}.", "rank": 2}, {"answer": f"{i}.", "rank": 3}]} for i in range(8)]
    (tmp_path / "nectar.jsonl").write_text("".join(json.dumps(r) + "\n" for r in nectar))
    import pyarrow as pa
    import pyarrow.parquet as pq

    scored = [{"instruction": f"What is {i} + 2?", "completions": [
        {"response": f"{i + 2}.", "overall_score": 9.0}, {"response": f"{i + 3}.", "overall_score": 4.0},
        {"response": f"{i}.", "overall_score": 1.0}]} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(scored), tmp_path / "openbmb-ultrafeedback.parquet")
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in (tmp_path / "hh.jsonl").read_text().splitlines()]),
                   tmp_path / "shp.parquet")
    for folder in ("my-local-model", "my-model", "my-base"):
        (tmp_path / folder).symlink_to(tiny_model, target_is_directory=True)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained("./my-base")  # an SFT adapter trained on the README's ./my-base
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).save_pretrained(tmp_path / "sft-adapter")
    shared = tmp_path / "shared-run"  # `--resume my-run.tar`: a run shared with its checkpoint (no training needed)
    for folder in (shared, shared / "checkpoint-2"):
        shutil.copytree(tmp_path / "sft-adapter", folder, dirs_exist_ok=True)
    from infopo_cli.bundles import write_bundle
    from infopo_cli.config import TrainConfig
    from infopo_cli.train.recipe import write_settings

    write_settings(shared, TrainConfig(model="./my-base", data="my_prefs.jsonl", eval_data="", max_steps=4).to_dict())
    write_bundle(shared, tmp_path / "my-run.tar", shared / "checkpoint-2")
    gguf = tmp_path / "home" / "models" / "some-model.Q8_0.gguf"
    gguf.parent.mkdir(parents=True)
    import gguf as gguf_library

    writer = gguf_library.GGUFWriter(str(gguf), "llama")  # a dry run parses the file's header, loads no tensor
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return tmp_path


@pytest.mark.parametrize("command", [c for c in COMMANDS if shlex.split(c)[1] in DRY_RUN])
def test_every_readme_training_command_passes_its_dry_run(command, readme_folder, monkeypatch, capsys):
    code, out = run([*args_of(command), "--dry-run"], monkeypatch, capsys)
    assert code == 0 and "dry run: the command is valid" in out, out[-3000:]
    assert "Traceback" not in out
    assert not (readme_folder / "runs").exists() or not any((readme_folder / "runs").rglob("config.toml"))


@pytest.mark.parametrize("command", [c for c in COMMANDS if shlex.split(c)[1] in RUN_FOR_REAL])
def test_every_cheap_readme_command_runs(command, readme_folder, default_model, monkeypatch, capsys):
    code, out = run(args_of(command), monkeypatch, capsys)
    assert code == 0 and "error:" not in out and "Traceback" not in out, out[-3000:]
