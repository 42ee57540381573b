"""`--backend unsloth`: settings and one-line errors everywhere; a real run where unsloth is installed.

Unsloth's pins (transformers <= 5.17, trl <= 1.15) conflict with the main environment, so the real-training
tests run in a venv of its own (CI: .ci/lowest-versions, through Unsloth's CPU fallback) and are skipped where
unsloth is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, infopo as run_infopo
from infopo_cli.config import TrainConfig, merge
from infopo_cli.errors import ConfigError
from infopo_cli.model import unsloth_backend



def infopo(*args: str, env: dict[str, str] | None = None, without_unsloth: bool = False) -> subprocess.CompletedProcess:
    """Offline, from the repository root; `without_unsloth`: as where unsloth is not installed."""
    return run_infopo(*args, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", **(env or {})}, timeout=900,
                      without=("unsloth",) if without_unsloth else ())


def error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


# --- settings -------------------------------------------------------------------------------------

def test_backend_is_a_setting_with_transformers_the_default(tmp_path):
    assert TrainConfig().backend == "transformers"
    cfg = merge(TrainConfig(), {"backend": "unsloth"}, source="command line")
    cfg.validate()
    from infopo_cli.config import to_toml
    from infopo_cli.presets import load_preset

    (tmp_path / "run.toml").write_text(to_toml(cfg.to_dict()))
    assert load_preset(str(tmp_path / "run.toml")).backend == "unsloth"  # config.toml keeps it, so --resume uses it
    with pytest.raises(ConfigError, match=r"backend must be one of transformers, unsloth \(got 'tensorrt'\)"):
        merge(TrainConfig(), {"backend": "tensorrt"}, source="command line")


def test_cli_takes_the_flag_and_refuses_other_values():
    out = infopo("train", "--help")
    assert out.returncode == 0 and "--backend" in out.stdout
    out = infopo("train", "--backend", "tensorrt")
    assert out.returncode == 2 and "backend must be one of transformers, unsloth" in error_line(out)


# --- one-line errors, before any data or model loads ------------------------------------------------

def test_missing_package_is_one_line_before_the_data_is_read(tmp_path):
    out = infopo("train", "--backend", "unsloth", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "r"),
                 without_unsloth=True)
    assert out.returncode == 2
    assert error_line(out) == "error: --backend unsloth needs the unsloth package: pip install 'infopo[unsloth]'"
    assert not (tmp_path / "r").exists()


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        unsloth_backend.check(TrainConfig(backend="unsloth"))
    assert str(err.value) == "--backend unsloth needs the unsloth package: pip install 'infopo[unsloth]'"


@pytest.fixture
def fake_unsloth(tmp_path, monkeypatch):
    """An `unsloth` package that raises on import what `body` says (found before any real one)."""
    def install(body: str) -> None:
        (tmp_path / "fake" / "unsloth").mkdir(parents=True)
        (tmp_path / "fake" / "unsloth" / "__init__.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path / "fake"))
        monkeypatch.delitem(sys.modules, "unsloth", raising=False)
        importlib.invalidate_caches()
    return install


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unsloth_without_a_cpu_fallback_says_it_needs_cuda(fake_unsloth):
    # what unsloth says on import where it finds no accelerator and has no CPU fallback (older releases, or
    # UNSLOTH_DISABLE_CPU_FALLBACK=1)
    fake_unsloth('raise NotImplementedError("Unsloth cannot find any torch accelerator? You need a GPU.")\n')
    with pytest.raises(ConfigError) as err:
        unsloth_backend.check(TrainConfig(backend="unsloth"))
    message = str(err.value)
    assert message.startswith("--backend unsloth needs a CUDA GPU here: unsloth ")
    assert "You need a GPU" in message and message.endswith("use --backend transformers") and "\n" not in message


def test_a_broken_unsloth_install_is_one_line(fake_unsloth):
    fake_unsloth('raise ImportError("Unsloth: Please install unsloth_zoo via `pip install unsloth_zoo`")\n')
    with pytest.raises(ConfigError, match=r"^--backend unsloth: unsloth \S+ does not import \(Unsloth: Please install "
                                          r"unsloth_zoo.*\); reinstall it with pip install 'infopo\[unsloth\]'$"):
        unsloth_backend.check(TrainConfig(backend="unsloth"))


def test_a_torchvision_that_does_not_match_torch_is_named(fake_unsloth, tmp_path, monkeypatch):
    # PyPI's torchvision is a CUDA build: against a CPU torch its operators do not load, and transformers'
    # Trainer (which Unsloth imports) fails with it
    fake_unsloth('raise ImportError("Could not import module \'Trainer\'")\n')
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    (tmp_path / "fake" / "torchvision").mkdir()
    (tmp_path / "fake" / "torchvision" / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    with pytest.raises(ConfigError, match=r"does not import because torchvision \S+ does not load with torch .*"
                                          r"\(operator torchvision::nms does not exist\): pip uninstall torchvision"):
        unsloth_backend.check(TrainConfig(backend="unsloth"))


def test_settings_unsloth_cannot_run_are_refused_before_import(fake_unsloth):
    fake_unsloth('raise AssertionError("must not be imported")\n')
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 only on a CUDA GPU: use --dtype bf16 or fp32"):
            unsloth_backend.check(TrainConfig(backend="unsloth", dtype="fp16"))
    with pytest.raises(ConfigError, match="--init-adapter is not supported with --backend unsloth"):
        unsloth_backend.check(TrainConfig(backend="unsloth", init_adapter="some/adapter"))


def test_recipe_checks_the_backend_before_reading_data(fake_unsloth, tmp_path):
    from infopo_cli.train import recipe

    fake_unsloth('raise ImportError("broken")\n')
    cfg = TrainConfig(backend="unsloth", data=str(tmp_path / "missing.jsonl"), output=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="unsloth .* does not import"):
        recipe.train(cfg)
    assert not (tmp_path / "r").exists()


# --- the seams the backend relies on (no unsloth needed) --------------------------------------------

def test_all_linear_is_spelt_out_as_the_decoders_linear_layers(tiny_model):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert unsloth_backend._linear_names(base) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # never lm_head


@pytest.mark.parametrize("setting, mode", [("off", False), (False, False), ("on", "unsloth"), (True, "unsloth"),
                                           ("offload", "unsloth"), ("auto", "unsloth")])
def test_checkpointing_settings_map_to_unsloths(setting, mode):
    cfg = merge(TrainConfig(), {"backend": "unsloth", "gradient_checkpointing": setting}, source="test")
    assert unsloth_backend.checkpointing_mode(cfg) == mode


NO_DROPOUT = "--backend unsloth trains with lora_dropout 0 (not {}): its fused LoRA kernels run only without dropout"


def test_unsloth_trains_without_dropout_and_says_so():
    from infopo_cli.presets import load_preset

    cfg = merge(load_preset("llama3-8b-qlora"), {"backend": "unsloth"}, source="command line")  # the preset's 0.05
    notes: list[str] = []
    fast = unsloth_backend.without_dropout(cfg, notes.append)
    assert cfg.lora_dropout == 0.05 and fast == dataclasses.replace(cfg, lora_dropout=0.0)  # nothing else changes
    assert notes == [NO_DROPOUT.format("0.05")]
    assert unsloth_backend.without_dropout(fast, notes.append) is fast and len(notes) == 1  # 0 already: no note


@pytest.mark.run
def test_a_run_records_the_dropout_it_trains_with_and_a_resume_keeps_its_own(tiny_model, pairs_file, tmp_path,
                                                                            monkeypatch):
    """The recipe's side, with transformers + peft standing in for Unsloth's model (the real run is below)."""
    from rich.console import Console

    from infopo_cli.model import stack
    from infopo_cli.presets import load_preset
    from infopo_cli.train import recipe
    from infopo_cli.train.progress import Reporter
    from infopo_cli.train.resume import resumed_config

    monkeypatch.setattr(unsloth_backend, "check", lambda cfg: None)
    monkeypatch.setattr(unsloth_backend, "load_model",
                        lambda source, cfg, precision: stack.attach_lora(stack.load_base(source, cfg, precision), cfg))

    def train(cfg: TrainConfig, resume: Path | None = None) -> str:
        text = io.StringIO()
        assert recipe.train(cfg, Reporter(Console(file=text, width=300)), resume=resume).status == "completed"
        return text.getvalue()

    def dropouts(run: Path) -> tuple[float, float]:
        return load_preset(str(run / "config.toml")).lora_dropout, json.loads((run / "adapter_config.json").read_text())["lora_dropout"]

    tiny = dict(model=str(tiny_model), data=str(pairs_file), eval_data="", dtype="fp32", load_in_4bit=False, lora_r=4,
                lora_alpha=8, max_steps=2, batch_size=4, max_length=128, max_prompt_length=64, lora_dropout=0.1)
    out = train(TrainConfig(backend="unsloth", output=str(tmp_path / "new"), **tiny))
    assert NO_DROPOUT.format("0.1") in out and dropouts(tmp_path / "new") == (0.0, 0.0)

    # a run that an earlier infopo started with dropout (its config.toml says so) resumes with it, exactly
    old = tmp_path / "old"
    train(TrainConfig(backend="transformers", output=str(old), **{**tiny, "max_steps": 4, "save_every": 2}))
    shutil.rmtree(old / "checkpoint-4")  # as if it had stopped after step 2
    settings = old / "config.toml"
    settings.write_text(settings.read_text().replace('backend = "transformers"', 'backend = "unsloth"'))
    out = train(resumed_config(load_preset(str(settings)), {}, old), resume=old)
    assert "resuming after step 2 of 4" in out and "lora_dropout" not in out and dropouts(old) == (0.1, 0.1)
    assert (old / "checkpoint-4").is_dir()


def test_a_model_that_drops_attention_masks_reads_pairs_as_two_rows(tiny_model):
    from transformers import AutoModelForCausalLM

    from infopo_cli.train.logps import takes_custom_masks

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    assert takes_custom_masks(model)
    setattr(model, unsloth_backend.MASKS_DROPPED, True)
    assert not takes_custom_masks(model)


# --- where unsloth is installed: a real run through its CPU fallback ----------------------------------

TINY_RUN = ("--dtype", "fp32", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "3", "--batch-size", "4",
            "--lr", "1e-2", "--eval-batch-size", "8", "--max-length", "128", "--max-prompt-length", "64")


@pytest.mark.run
def test_train_with_unsloth_on_cpu_saves_an_adapter_infopo_reloads_and_merges(tiny_model, pairs_file, tmp_path):
    pytest.importorskip("unsloth")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from infopo_cli.data.batching import collate, eval_batches
    from infopo_cli.data.loading import read_pairs
    from infopo_cli.data.tokenization import encode_pair
    from infopo_cli.export.merged import export_merged, from_run
    from infopo_cli.losses.registry import resolve
    from infopo_cli.model import stack
    from infopo_cli.model.precision import Precision
    from infopo_cli.presets import load_preset
    from infopo_cli.train.evaluate import Evaluator

    run = tmp_path / "run"
    (tmp_path / "dropout.toml").write_text("lora_dropout = 0.1\n")  # a preset's dropout (llama3-8b-qlora has 0.05)
    out = infopo("train", "--backend", "unsloth", "--preset", str(tmp_path / "dropout.toml"), "--model", str(tiny_model),
                 "--data", str(pairs_file), "--eval-data", str(pairs_file), "--output", str(run),
                 "--gradient-checkpointing", "on", *TINY_RUN)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Unsloth (CPU)" in out.stdout  # the model came from FastLanguageModel (its CPU fallback here)
    assert NO_DROPOUT.format("0.1") in " ".join(out.stdout.split())  # rich may wrap the line
    cfg = load_preset(str(run / "config.toml"))
    assert cfg.backend == "unsloth" and cfg.gradient_checkpointing == "on" and cfg.load_in_4bit
    assert cfg.lora_dropout == 0.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["eval_before"]["eval/loss"] == pytest.approx(1.0)  # InfoPO is exactly 1 while the adapter adds 0
    assert summary["eval_after"]["eval/loss"] != pytest.approx(1.0, abs=1e-4)  # it trained
    assert (run / "checkpoint-3").is_dir()

    # the adapter is infopo's POLICY adapter: transformers + peft reload it and reproduce the run's last evaluation
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and "lm_head" not in adapter["target_modules"]
    assert adapter["lora_dropout"] == 0.0
    base = stack.load_base(str(tiny_model), cfg, Precision("cpu", torch.float32, "test"))
    reloaded = PeftModel.from_pretrained(base, str(run))
    assert list(reloaded.peft_config) == [stack.POLICY]
    tokenizer = stack.load_tokenizer(str(run))
    pairs = [encode_pair(tokenizer, p, cfg.max_length, cfg.max_prompt_length) for p in read_pairs(cfg.eval_data)]
    batches = [collate(b, tokenizer.pad_token_id, cfg.share_prompt) for b in eval_batches(pairs, cfg.eval_batch_size)]
    metrics = Evaluator(batches, *resolve(cfg.loss, cfg.loss_overrides()), "cpu")(reloaded)
    for key in ("eval/logps/chosen", "eval/logps/rejected", "eval/loss"):
        assert metrics[key] == pytest.approx(summary["eval_after"][key], abs=1e-3), key

    # and `infopo export --merged` merges it into the unquantised base
    merged_dir = export_merged(from_run(run), tmp_path / "merged", log=lambda _: None)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(run))
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, on_base(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_real_unsloth_without_its_cpu_fallback_is_one_line(tmp_path):
    pytest.importorskip("unsloth")
    out = infopo("train", "--backend", "unsloth", "--data", str(tmp_path / "missing.jsonl"),
                 env={"UNSLOTH_DISABLE_CPU_FALLBACK": "1"})
    assert out.returncode == 2
    line = error_line(out)
    assert line.startswith("error: --backend unsloth needs a CUDA GPU here: unsloth 20") and "You need a GPU" in line
