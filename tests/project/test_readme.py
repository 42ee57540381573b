"""The README is the user's guide: its commands and flags must match the code."""

from __future__ import annotations

import re

import typer

from infopo_cli.cli import app
from infopo_cli.losses.registry import LOSSES
from infopo_cli.presets import available
from conftest import ROOT

README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def test_every_flag_of_every_command_is_documented():
    commands = typer.main.get_command(app).commands
    missing = [f"infopo {name} {flag}" for name in ("train", "export") for param in commands[name].params
               for flag in param.opts + getattr(param, "secondary_opts", [])
               if flag.startswith("--") and flag not in ("--help", "--debug") and flag not in README]
    assert not missing, f"not in the README: {missing}"


def test_every_loss_and_preset_is_documented():
    for name in LOSSES:
        assert f"`{name}`" in README, name
    for name in available():
        assert f"`{name}`" in README, name


def test_the_two_setup_commands_are_there_and_ci_runs_the_test_one():
    run = re.search(r"<!-- run-command -->\s*```bash\n(.+?)\n```", README, re.S).group(1)
    test = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", README, re.S).group(1)
    assert run.startswith("python3 -m venv .venv") and run.endswith("infopo train")
    assert "pip install torch==2.13.0 &&" in test and test.endswith("python -m pytest -q")
    assert "gguf-check" in test  # CI loads exported GGUF files in llama.cpp itself
    assert "<!-- test-command -->" in CI  # .ci/run extracts and runs exactly that block
