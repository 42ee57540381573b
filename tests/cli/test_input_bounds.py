"""Bad input a tester found crashing or slipping through: seeds past torch's range, text that is not UTF-8, `presets
show` that was not TOML, `plan --prompt-length` out of range, repeated sweep values and --sweep flags, and --debug's
exit code. Each is one line, exit 2, checked before a model loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import infopo, write_pairs
from typer.testing import CliRunner

from infopo_cli.cli import app
from infopo_cli.config import SEED_MAX, TrainConfig, override
from infopo_cli.errors import ConfigError
from infopo_cli.presets import available, load_preset, tomllib  # tomli on Python 3.10

HUGE = "99999999999999999999"  # > 2**64 - 1
NOT_UTF8 = os.fsdecode(b"\xff hi")  # what Python makes of such argv bytes: lone surrogates


def one_error_line(out: subprocess.CompletedProcess, message: str) -> None:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.strip() == f"error: {message}" and "Traceback" not in out.stderr + out.stdout


# --- A. seeds ---------------------------------------------------------------------------------------------------

def test_a_seed_past_torchs_range_is_refused_by_validate_the_command_line_and_a_preset(tmp_path, monkeypatch):
    message = f"seed must be <= {SEED_MAX}, the largest seed torch takes (got {HUGE})"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        TrainConfig(seed=int(HUGE)).validate()
    TrainConfig(seed=SEED_MAX).validate()  # the largest torch takes is fine
    with pytest.raises(ConfigError, match=f"^command line: seed must be <= {SEED_MAX}"):
        override(load_preset("smollm2-135m"), {"seed": SEED_MAX + 1}, "command line")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.toml").write_text(f"seed = {HUGE}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^mine.toml: {re.escape(message)}$"):
        load_preset("mine.toml")


def test_train_dry_run_refuses_a_huge_seed():
    one_error_line(infopo("train", "--seed", HUGE, "--dry-run"),
                   f"command line: seed must be <= {SEED_MAX}, the largest seed torch takes (got {HUGE})")


def test_generate_refuses_a_seed_out_of_range_before_the_model_loads(tiny_model):
    one_error_line(infopo("generate", str(tiny_model), "--prompt", "hi", "--temperature", "0.7", "--seed", HUGE),
                   f"--seed must be from 0 to {SEED_MAX} (got {HUGE})")
    one_error_line(infopo("chat", str(tiny_model), "--seed", "-1"), f"--seed must be from 0 to {SEED_MAX} (got -1)")


# --- B. text that is not UTF-8 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--prompt", "--system"])
def test_generate_names_a_text_option_that_is_not_utf8(tiny_model, flag):
    args = {"--prompt": "hi", flag: NOT_UTF8}
    one_error_line(infopo("generate", str(tiny_model), *[part for pair in args.items() for part in pair]),
                   f"{flag} is not valid UTF-8")


def test_train_dry_run_and_chat_refuse_a_system_message_that_is_not_utf8(tiny_model):
    one_error_line(infopo("train", "--system", NOT_UTF8, "--dry-run"), "--system is not valid UTF-8")
    one_error_line(infopo("chat", str(tiny_model), "--system", NOT_UTF8), "--system is not valid UTF-8")


# --- D. presets show --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(available()))
def test_presets_show_prints_toml_that_reads_back_as_the_preset(name):
    out = CliRunner().invoke(app, ["presets", "show", name])
    assert out.exit_code == 0, out.output
    shown = tomllib.loads(out.stdout)
    cfg = load_preset(name).to_dict()
    assert shown == {key: value for key, value in cfg.items() if value is not None}
    assert all(f"# {key} = (unset)" in out.stdout for key, value in cfg.items() if value is None)


# --- E. plan --prompt-length ------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, message", [
    ("-1", "--prompt-length must be > 0 (got -1)"), ("0", "--prompt-length must be > 0 (got 0)"),
    ("5000", "--prompt-length (5000) must be < max_length (1024)"),
    ("1024", "--prompt-length (1024) must be < max_length (1024)")])
def test_plan_refuses_a_prompt_length_train_would_refuse(length, message):
    one_error_line(infopo("plan", "--preset", "llama3-8b-qlora", "--prompt-length", length), message)


# --- F. compare --sweep -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sweep, message", [
    ("beta=0.1,0.1", "0.1 is given twice"), ("beta=0.1,0.3,0.10", "0.10 is the same value as 0.1"),
    ("seed=1,01", "01 is the same value as 1"), ("load_in_4bit=true,True", "True is the same value as true")])
def test_a_swept_value_given_twice_is_refused(tmp_path, tiny_model, sweep, message):
    from infopo_cli.train import compare

    flags = {"model": str(tiny_model), "data": str(write_pairs(tmp_path / "pairs.jsonl", 8)), "eval_data": ""}
    with pytest.raises(ConfigError, match=f"^{re.escape(f'--sweep {sweep}: {message}; give each value once')}$"):
        compare.prepare("dpo,infopo", sweep, str(tmp_path / "cmp"), flags, "smollm2-135m")
    assert not (tmp_path / "cmp").exists()


def test_a_second_sweep_is_refused_not_ignored(tmp_path):
    one_error_line(infopo("compare", "--loss", "dpo", "--sweep", "seed=1,2", "--sweep", "beta=0.1,0.2", "--output",
                          str(tmp_path / "cmp"), "--dry-run"),
                   "--sweep given 2 times: give one --sweep (a comparison sweeps one setting)")
    # a flag the sweep sets for every run would be dropped without a word
    one_error_line(infopo("compare", "--loss", "infopo,dpo", "--beta", "0.1", "--sweep", "beta=0.2,0.3", "--output",
                          str(tmp_path / "cmp"), "--dry-run"),
                   "--sweep beta=0.2,0.3 sets beta for every run, and --beta is given too; drop one")


# --- G. --debug keeps the exit code ---------------------------------------------------------------------------------

def test_debug_shows_the_traceback_and_keeps_exit_2_for_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "c"}\n')
    out = infopo("--debug", "data", "check", str(bad), "--no-tokenizer")
    assert out.returncode == 2 and "Traceback" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: {bad}:2: field 'rejected': missing"


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on():
    from infopo_cli.inference.chat import ChatSession, run_chat

    def strict_reader_fails():  # input() on a terminal decodes strictly
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    lines = iter([lambda: "hi", lambda: NOT_UTF8, strict_reader_fails, lambda: "there", lambda: None])
    asked, notes = [], []
    replies = run_chat(ChatSession(), lambda messages: asked.append(messages[-1]["content"]) or ["ok"],
                       lambda: next(lines)(), lambda piece: None, notes.append)
    assert replies == 2 and asked == ["hi", "there"]
    assert notes == ["(that line is not valid UTF-8; skipped)"] * 2


def test_the_chat_command_reads_past_a_line_that_is_not_utf8(tiny_model):
    def chat(stdin: bytes) -> subprocess.CompletedProcess:  # bytes: a random model's reply may hold any character
        return subprocess.run([sys.executable, "-m", "infopo_cli", "chat", str(tiny_model), "--max-new-tokens", "3"],
                              input=stdin, capture_output=True, timeout=300,
                              env={**os.environ, "COLUMNS": "200", "PYTHONIOENCODING": "utf-8:strict"})

    out = chat(b"hi\n\xff\xfe hi\nthere\n")
    err = out.stderr.decode()
    assert out.returncode == 0 and "error" not in err and "Traceback" not in err, err
    assert err.count("(that line is not valid UTF-8; skipped)") == 1
    assert out.stdout == chat(b"hi\nthere\n").stdout  # the same (greedy) replies to both good lines


def test_a_gguf_model_refuses_a_seed_llama_cpp_cannot_take():
    from infopo_cli.errors import ConfigError
    from infopo_cli.inference.generation import Sampling
    from infopo_cli.inference.gguf_model import GgufModel

    model = GgufModel.__new__(GgufModel)  # _options reads no state of a loaded file
    assert model._options(Sampling(8, 0.7, seed=2**32 - 2))["seed"] == 2**32 - 2
    with pytest.raises(ConfigError, match=r"^--seed 4294967295: llama.cpp takes seeds below 4294967295"):
        model._options(Sampling(8, 0.7, seed=2**32 - 1))
