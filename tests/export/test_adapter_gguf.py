"""`infopo export --gguf-adapter`: llama.cpp's LoRA adapter layout read back with the gguf library, the Ollama
Modelfile on the base, and base + adapter in llama.cpp against transformers reading the same files."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from infopo_cli.errors import ConfigError, ExportError
from infopo_cli.export import adapter_gguf
from infopo_cli.export.export_adapter import export_adapter
from infopo_cli.export.gguf import permute, write_gguf
from infopo_cli.export.merged import AdapterSource
from infopo_cli.model import stack
from infopo_cli.model.source import read_gguf
from infopo_cli.config import TrainConfig
from infopo_cli.model.precision import Precision

from conftest import build_spm_tokenizer
from test_export import adapter_for

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def base_gguf(source: AdapterSource, tmp_path):
    """The tiny base written as an f32 GGUF (lossless: llama.cpp then computes what transformers does)."""
    cfg = TrainConfig(dtype="fp32", load_in_4bit=False)
    model = stack.load_base(source.base, cfg, Precision("cpu", torch.float32, "test"))
    path = tmp_path / "base-f32.gguf"
    write_gguf(model, stack.load_tokenizer(str(source.adapter)), path, "f32", "tiny-llama")
    return path, model.config


def test_adapter_gguf_metadata_and_layout(tmp_path):
    source = adapter_for("llama", tmp_path)
    base, config = base_gguf(source, tmp_path)
    out, modelfile, _ = export_adapter(source, tmp_path / "adapter.gguf", "f32", base, check=False, log=lambda _: None)
    reader = read_gguf(out)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha_field = reader.fields["adapter.lora.alpha"]
    assert fields["adapter.lora.alpha"] == 8.0 and alpha_field.types[0].name == "FLOAT32"  # llama.cpp reads only f32
    tensors = {t.name: t for t in reader.tensors}
    state = load_file(str(source.adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn"
    a, b = state[f"{prefix}.q_proj.lora_A.weight"].numpy(), state[f"{prefix}.q_proj.lora_B.weight"].numpy()
    # A as peft stores it (rank x in), B (out x rank) with the base GGUF's q row permutation
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight.lora_a"].data), a)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data),
                                  permute(b, config.num_attention_heads))
    v = state[f"{prefix}.v_proj.lora_B.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_v.weight.lora_b"].data), v)  # v: not permuted
    assert len(tensors) == 2 * sum(1 for k in state if "lora_A" in k)
    text = modelfile.read_text()
    assert text.splitlines()[:2] == [f'FROM "{base.resolve()}"', "ADAPTER ./adapter.gguf"]


def test_rslora_and_alpha_patterns_fold_into_b(tmp_path):
    settings = {"lora_alpha": 16, "use_rslora": True, "alpha_pattern": {"v_proj": 4}}
    assert adapter_gguf.peft_scale("model.layers.0.self_attn.q_proj", 4, settings) == pytest.approx(16 / 2)
    assert adapter_gguf.peft_scale("model.layers.0.self_attn.v_proj", 4, settings) == pytest.approx(4 / 2)
    assert adapter_gguf.peft_scale("model.layers.0.self_attn.q_proj", 4, {"lora_alpha": 16}) == 4.0
    source = adapter_for("qwen2", tmp_path)
    config = json.loads((source.adapter / "adapter_config.json").read_text())
    (source.adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    out, _, _ = export_adapter(source, tmp_path / "rs.gguf", "f32", check=False, log=lambda _: None)
    tensors = {t.name: np.asarray(t.data) for t in read_gguf(out).tensors}
    state = load_file(str(source.adapter / "adapter_model.safetensors"))
    b = state["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].numpy()
    rank, alpha = 4, config["lora_alpha"]
    # llama.cpp multiplies by alpha / rank; rsLoRA by alpha / sqrt(rank): B carries the ratio
    np.testing.assert_allclose(tensors["blk.0.ffn_up.weight.lora_b"], b * (alpha / math.sqrt(rank)) / (alpha / rank),
                               rtol=1e-6)


def test_what_the_format_cannot_hold_is_refused_in_one_line(tmp_path):
    source = adapter_for("llama", tmp_path)
    config = json.loads((source.adapter / "adapter_config.json").read_text())
    (source.adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ExportError, match="DoRA"):
        export_adapter(source, tmp_path / "dora.gguf", check=False, log=lambda _: None)
    (source.adapter / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(str(source.adapter / "adapter_model.safetensors"))
    save_file({**state, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)},
              str(source.adapter / "adapter_model.safetensors"))
    with pytest.raises(ExportError, match="embedding LoRA"):
        export_adapter(source, tmp_path / "emb.gguf", check=False, log=lambda _: None)
    with pytest.raises(ConfigError, match="writes f32, f16, bf16"):
        export_adapter(source, tmp_path / "q.gguf", "q8_0", check=False, log=lambda _: None)


def test_a_base_gguf_of_another_model_is_refused_before_writing(tmp_path):
    source = adapter_for("llama", tmp_path)
    other = adapter_for("qwen2", tmp_path / "other")
    wrong, _ = base_gguf(other, tmp_path / "other")
    with pytest.raises(ConfigError, match="qwen2 model; this adapter was trained on a llama one"):
        export_adapter(source, tmp_path / "a.gguf", base_gguf=wrong, log=lambda _: None)
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.skipif(not LLAMA_CPP, reason="needs llama.cpp: pip install 'infopo[gguf-check]' (CI installs it)")
@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_base_plus_adapter_in_llama_cpp_answers_as_transformers(arch, tmp_path):
    source = adapter_for(arch, tmp_path, build_spm_tokenizer())  # llama.cpp reads a tokenizer with merges/scores
    base, _ = base_gguf(source, tmp_path)
    _, _, result = export_adapter(source, tmp_path / "adapter.gguf", "f32", base, log=lambda _: None)
    assert result is not None and result.ok, result.lines()
    assert result.effect > 0.99 and result.slope == pytest.approx(1.0, abs=0.02)


@pytest.mark.skipif(not LLAMA_CPP, reason="needs llama.cpp: pip install 'infopo[gguf-check]' (CI installs it)")
def test_a_misread_adapter_fails_the_check(tmp_path, monkeypatch):
    """llama.cpp loads these pairs without complaint; the check must not pass them: unpermuted q/k rows change the
    answers of a strongly trained adapter, and a wrong scale of a lightly trained one (B 20 times smaller than
    adapter_for's) shows in the adapter's effect on the logits (slope 2), not only in its answers."""
    source = adapter_for("mistral", tmp_path, build_spm_tokenizer())
    base, _ = base_gguf(source, tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(adapter_gguf, "permute", lambda weight, n_head: weight)
        _, _, result = export_adapter(source, tmp_path / "unpermuted.gguf", "f32", base, log=lambda _: None)
    assert not result.ok
    weights = source.adapter / "adapter_model.safetensors"
    save_file({k: v * 0.05 if "lora_B" in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    _, _, light = export_adapter(source, tmp_path / "light.gguf", "f32", base, log=lambda _: None)
    assert light.ok and light.slope == pytest.approx(1.0, abs=0.02)
    monkeypatch.setattr(adapter_gguf, "peft_scale", lambda module, rank, settings: 2 * settings["lora_alpha"] / rank)
    _, _, twice = export_adapter(source, tmp_path / "twice.gguf", "f32", base, log=lambda _: None)
    assert not twice.ok and twice.slope == pytest.approx(2.0, abs=0.1)
    assert "moves llama.cpp's logits unlike" in " ".join(twice.problems())


@pytest.mark.skipif(not LLAMA_CPP, reason="needs llama.cpp: pip install 'infopo[gguf-check]' (CI installs it)")
def test_the_adapter_is_checked_before_it_takes_its_name(tmp_path, monkeypatch):
    """As the merged GGUF: a check stopped half-way (Ctrl-C) leaves no unchecked a.gguf or a.Modelfile that the same
    command, run again, would refuse to replace; one llama.cpp cannot load still takes its name, for inspection."""
    from infopo_cli.errors import ExportCheckFailed
    from infopo_cli.export import export_adapter as module

    source = adapter_for("llama", tmp_path / "run", build_spm_tokenizer())
    base = tmp_path / "base" / "base.gguf"
    base.parent.mkdir()
    base_path, _ = base_gguf(source, base.parent)
    seen = []

    def interrupted(source, base, adapter, tokenizer, shown=None):
        seen.append((adapter.is_file(), adapter != tmp_path / "a.gguf", shown, (tmp_path / "a.gguf").exists(),
                     (tmp_path / "a.Modelfile").exists()))
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "check_pair", interrupted)
    with pytest.raises(KeyboardInterrupt):
        module.export_adapter(source, tmp_path / "a.gguf", "f32", base_path, log=lambda _: None)
    assert seen == [(True, True, tmp_path / "a.gguf", False, False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "run"]  # no a.gguf, no a.Modelfile, no temporary

    def unloadable(source, base, adapter, tokenizer, shown=None):
        raise ExportCheckFailed(f"check failed: llama.cpp cannot load {base} with the adapter {shown}; the file is kept "
                                "for inspection")

    monkeypatch.setattr(module, "check_pair", unloadable)
    with pytest.raises(ExportCheckFailed, match=f"with the adapter {tmp_path / 'a.gguf'};"):
        module.export_adapter(source, tmp_path / "a.gguf", "f32", base_path, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.Modelfile", "a.gguf", "base", "run"]

    def out_of_memory(*args, **kwargs):  # a check that cannot run: the adapter, read back whole, is kept
        raise MemoryError("cannot allocate 32 GiB")

    monkeypatch.setattr(module, "check_pair", out_of_memory)
    with pytest.raises(ExportCheckFailed, match=re.escape(
            f"the check could not run (cannot allocate 32 GiB); {tmp_path / 'b.gguf'} is written, unchecked")):
        module.export_adapter(source, tmp_path / "b.gguf", "f32", base_path, log=lambda _: None)
    assert (tmp_path / "b.gguf").is_file() and (tmp_path / "b.Modelfile").is_file()


def test_cli_writes_the_adapter_and_needs_a_base_gguf_for_the_modelfile(tmp_path):
    source = adapter_for("llama", tmp_path)
    run = [sys.executable, "-m", "infopo_cli", "export", "--base", source.base, "--adapter", str(source.adapter)]
    out = subprocess.run(run + ["--gguf-adapter", str(tmp_path / "a.gguf")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "pass --base-gguf" in out.stdout and not (tmp_path / "a.Modelfile").exists()
    out = subprocess.run(run + ["--gguf-adapter", str(tmp_path / "a.gguf")], capture_output=True, text=True)
    assert out.returncode == 2 and "already exists" in out.stderr
    out = subprocess.run(run + ["--gguf", str(tmp_path / "m.gguf"), "--base-gguf", str(tmp_path / "a.gguf")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--base-gguf goes with --gguf-adapter" in out.stderr


def test_quant_list_size_is_the_written_adapters(tmp_path):
    source = adapter_for("llama", tmp_path)
    for quant in ("f16", "f32"):
        out, _, _ = export_adapter(source, tmp_path / f"a-{quant}.gguf", quant, check=False, log=lambda _: None)
        tensor_bytes = sum(int(t.n_bytes) for t in read_gguf(out).tensors)
        assert adapter_gguf.adapter_file_bytes(source.adapter, quant) == tensor_bytes


def test_alpha_patterns_match_as_peft_matches_them():
    settings = {"lora_alpha": 16, "alpha_pattern": {"q_proj|k_proj": 64, r"layers\.1\.self_attn\.v_proj": 32}}
    assert adapter_gguf.peft_scale("model.layers.0.self_attn.k_proj", 8, settings) == 8.0
    assert adapter_gguf.peft_scale("model.layers.1.self_attn.v_proj", 8, settings) == 4.0
    assert adapter_gguf.peft_scale("model.layers.0.self_attn.v_proj", 8, settings) == 2.0
    assert adapter_gguf.peft_scale("model.layers.0.self_attn.xq_proj", 8, settings) == 2.0  # a name's end, not any end


def test_base_gguf_with_another_export_is_refused(tmp_path):
    source = adapter_for("llama", tmp_path)
    out = subprocess.run([sys.executable, "-m", "infopo_cli", "export", "--base", source.base, "--adapter",
                          str(source.adapter), "--merged", str(tmp_path / "m"), "--base-gguf", "nope.gguf"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--base-gguf goes with --gguf-adapter" in out.stderr and not (tmp_path / "m").exists()


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16"])
def test_the_written_file_is_read_back_and_a_wrong_one_is_not_kept(tmp_path, monkeypatch, quant):
    source = adapter_for("qwen2", tmp_path)
    export_adapter(source, tmp_path / f"ok-{quant}.gguf", quant, check=False, log=lambda _: None)  # read back: passes
    real = adapter_gguf.write_adapter_gguf
    zeroed = lambda tensors, *args: real([adapter_gguf.AdapterTensor(t.name, t.a, t.b * 0) for t in tensors], *args)  # noqa: E731
    monkeypatch.setattr("infopo_cli.export.export_adapter.write_adapter_gguf", zeroed)
    with pytest.raises(ExportError, match="does not hold"):
        export_adapter(source, tmp_path / "zero.gguf", quant, check=False, log=lambda _: None)
    assert not (tmp_path / "zero.gguf").exists()


def test_the_slope_is_judged_below_the_cosines_noise_floor():
    from infopo_cli.export.export_adapter import AdapterCheck
    from infopo_cli.export.check import Agreement

    quiet = dict(agreements=[Agreement(8, 0, 8)], tokens_same=[True], answers=["x"])
    assert AdapterCheck(**quiet, slope=0.93, signal=2.3).ok  # a light adapter on a quantised base: right
    assert not AdapterCheck(**quiet, slope=1.95, signal=0.8).ok  # scaled twice over
    assert not AdapterCheck(**quiet, slope=0.0, signal=0.8).ok  # read as zero
    assert not AdapterCheck(**quiet, slope=float("nan"), signal=float("nan")).ok  # non-finite logits
    assert AdapterCheck(**quiet, slope=None, signal=0.05).ok  # too small to say anything
    assert not AdapterCheck(**quiet, effect=0.5, slope=1.0, signal=5.0).ok  # high signal: the cosine judges too
