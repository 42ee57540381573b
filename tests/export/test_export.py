"""Export: merged weights equal adapter-on-base; the GGUF reloads to the merged model's logits."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from conftest import build_architecture

from infopo_cli.model import stack
from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError, ExportError, OutputError
from infopo_cli.inference.models import find_target
from infopo_cli.train import preflight
from infopo_cli.model.llama_runtime import load_llama
from infopo_cli.export.check import load_gguf
from infopo_cli.export.gguf import permute, write_gguf
from infopo_cli.export.merged import AdapterSource, export_merged, from_run, merged_model
from infopo_cli.export.modelfile import modelfile
from infopo_cli.model.precision import Precision
from infopo_cli.model.source import check_not_merged_in

IDS = torch.tensor([[5, 60, 70, 80, 90, 100, 110, 120]])


def llama_cpp_logits(path, ids: list[int]):
    """llama.cpp's logits at every position of `ids` read from the GGUF at `path` (a numpy array)."""
    import numpy as np

    llm = load_llama(str(path), n_ctx=128, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


def adapter_for(arch: str, tmp_path, tokenizer=None):
    """A tiny model of `arch` and a LoRA adapter with non-zero weights on all its linear layers."""
    base_dir = build_architecture(arch, tmp_path / f"{arch}-base", tokenizer)
    cfg = TrainConfig(dtype="fp32", load_in_4bit=False, lora_r=4, lora_alpha=8)
    model = stack.attach_lora(stack.load_base(base_dir, cfg, Precision("cpu", torch.float32, "test")), cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(tmp_path / f"{arch}-adapter")
    stack.load_tokenizer(base_dir).save_pretrained(tmp_path / f"{arch}-adapter")
    return AdapterSource(base_dir, tmp_path / f"{arch}-adapter")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2", "phi3", "gemma3"])
def test_merged_folder_equals_adapter_on_base(arch, tmp_path):
    source = adapter_for(arch, tmp_path)
    out = export_merged(source, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source.base, dtype=torch.float32), source.adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, on_base(IDS).logits, atol=1e-5, rtol=1e-5)
    assert (out / "tokenizer_config.json").is_file() and not list(tmp_path.glob(".merged.infopo-*"))
    assert out.stat().st_mode & 0o755 == 0o755  # not the owner-only mode of a temporary folder
    with pytest.raises(OutputError, match="already exists"):
        export_merged(source, out)


def tensor_types(path) -> set[str]:
    import gguf

    return {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


# The 4/5-bit types of the gguf library on the tiny Llama only: its quantisers do not depend on the architecture.
# Tolerances: about 1.5x the error measured here (q5_1 0.036, q5_0 0.066, q4_1 0.11, q4_0 0.074; logits up to 0.5).
GGUF_LIB_CASES = ([(arch, quant, atol) for arch in ("llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3")
                   for quant, atol in (("f32", 1e-4), ("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1))]
                  + [("llama", "q5_1", 1e-1), ("llama", "q5_0", 1e-1), ("llama", "q4_1", 1.6e-1), ("llama", "q4_0", 1.6e-1)])


@pytest.mark.parametrize("arch, quant, atol", GGUF_LIB_CASES)
def test_gguf_reloads_to_the_merged_logits(arch, quant, atol, tmp_path):
    """Tolerances: f32 exact up to float error; the others by their rounding (logits here are O(1))."""
    from infopo_cli.export.gguf import QUANTS

    merged, tokenizer = merged_model(adapter_for(arch, tmp_path))
    path = tmp_path / f"model-{quant}.gguf"
    write_gguf(merged, tokenizer, path, quant, model_name="tiny")
    assert QUANTS[quant].tensor_type in tensor_types(path)  # quantised, not all left at f16
    with torch.no_grad():
        want, got = merged(IDS).logits, load_gguf(path)(IDS).logits
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_k_quant_export_runs_in_llama_cpp(tmp_path, monkeypatch):
    """q4_k_m through llama.cpp's quantiser: real Q4_K/Q6_K tensors (rows of 256, the smallest that allows
    them), no intermediate left, the reload check given the output itself, and llama.cpp's logits close to the
    merged model's and to transformers' reading of the same file.

    Measured: llama.cpp vs merged 0.26 max (logits up to 1.26), top-1 agreement 82.5% on 40 positions of a
    random model whose median top-2 gap is 0.06, so greedy generations diverge; llama.cpp vs transformers 0.038.
    """
    import numpy as np

    import conftest
    from conftest import build_spm_tokenizer
    from infopo_cli.export import export_gguf as module

    monkeypatch.setitem(conftest.SMALL, "hidden_size", 256)
    monkeypatch.setitem(conftest.SMALL, "intermediate_size", 256)
    monkeypatch.setitem(conftest.SMALL, "num_hidden_layers", 1)
    source = adapter_for("llama", tmp_path, build_spm_tokenizer())
    notes = []
    path, _, result = module.export_gguf(source, tmp_path / "k.gguf", "q4_k_m", log=notes.append)
    assert len(notes) == 1 and notes[0].startswith("writing q4_k_m GGUF, about ") and {"Q4_K", "Q6_K"} <= tensor_types(path)
    # the check ran on the output itself: llama.cpp agrees with transformers reading it, at every answer token
    assert result.lossy and result.llama_cpp_checked and result.ok, result.lines()
    assert sorted(os.listdir(tmp_path)) == ["k.Modelfile", "k.gguf", "llama-adapter", "llama-base"]
    merged, _ = merged_model(source)
    ids = list(range(20, 60))
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0].numpy()
        transformers_reads = load_gguf(path)(torch.tensor([ids])).logits[0].numpy()
    llm = load_llama(path, n_ctx=64, logits_all=True, verbose=False)  # as infopo runs it (repacking crashes on AMX)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    assert np.abs(got - want).max() < 0.4 and (got.argmax(-1) == want.argmax(-1)).mean() >= 0.7
    assert np.abs(got - transformers_reads).max() < 0.1
    # llama.cpp's quantiser kept the metadata naming the adapter the file holds
    with pytest.raises(ConfigError, match="already holds the adapter"):
        check_not_merged_in(str(path), source.adapter, "--model")


def test_k_quant_of_narrow_tensors_says_what_llama_cpp_kept(tmp_path):
    """Rows of 64 cannot be K-quants: llama.cpp falls back per tensor (q4_k_m: q5_0, and q8_0 where it would use
    Q6_K), and the user is told, in one line per type."""
    merged, tokenizer = merged_model(adapter_for("llama", tmp_path))
    notes = write_gguf(merged, tokenizer, tmp_path / "narrow.gguf", "q4_k_m", model_name="tiny")
    assert notes and all(re.fullmatch(r"llama.cpp wrote \d+ tensors as q\d_0 instead of a K-quant: their rows are not "
                                      r"a multiple of 256 weights \(.*\)", line) for line in notes), notes
    assert tensor_types(tmp_path / "narrow.gguf") <= {"F32", "Q5_0", "Q8_0"}


def test_a_failed_k_quant_is_one_line_and_leaves_no_intermediate(tmp_path, monkeypatch):
    import llama_cpp

    from infopo_cli.export.gguf import llama_cpp_quantize

    merged, tokenizer = merged_model(adapter_for("llama", tmp_path))
    write_gguf(merged, tokenizer, tmp_path / "f16.gguf", "f16", model_name="tiny")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "f16.gguf").read_bytes()[:100_000])
    with pytest.raises(ExportError, match=r"^llama.cpp could not quantise to q4_k_m: tensor '.*' data is not within "
                                          r"the file bounds[^\n]*$"):
        llama_cpp_quantize(tmp_path / "cut.gguf", tmp_path / "out.gguf", "q4_k_m")
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *a: 1)
    with pytest.raises(ExportError, match="could not quantise to q2_k"):
        write_gguf(merged, tokenizer, tmp_path / "k.gguf", "q2_k", model_name="tiny")
    assert sorted(os.listdir(tmp_path)) == before  # the f16 intermediate's folder is gone too


def test_k_quant_without_llama_cpp_is_one_line_before_loading(tmp_path, monkeypatch):
    from infopo_cli.errors import ConfigError

    module = importlib.import_module("infopo_cli.export.export_gguf")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    monkeypatch.setattr(module, "merged_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(ConfigError) as err:
        module.export_gguf(AdapterSource("unused", tmp_path / "adapter"), tmp_path / "m.gguf", "q4_k_m")
    assert str(err.value) == "--quant q4_k_m needs llama.cpp's quantiser: pip install 'infopo[gguf-check]'"
    module.check_quant("q4_0")  # the gguf library's own types need nothing more


def test_quant_help_gives_every_types_size_per_billion_parameters():
    import typing

    from infopo_cli import cli
    from infopo_cli.export.gguf import QUANTS

    help_text = typing.get_type_hints(cli.export, include_extras=True)["quant"].__metadata__[0].help
    sizes = dict(re.findall(r"\b([a-z0-9_]+) (\d+\.\d+)\b", help_text))
    assert sizes.keys() == QUANTS.keys() and "gguf-check" in help_text
    for name, kind in QUANTS.items():
        assert float(sizes[name]) == pytest.approx(kind.bytes_per_weight, abs=0.006), name


def test_expected_size_of_each_type_is_the_written_files(tmp_path):
    """The estimate `--quant list` prints, against files written for a tiny model (rows of 64: narrow for the
    K-quants, which llama.cpp then writes at its fallback types). The default model's: within 5% (README)."""
    from infopo_cli.export.gguf import expected_bytes

    merged, tokenizer = merged_model(adapter_for("llama", tmp_path))
    for quant in ("f16", "q8_0", "q4_0", "q4_k_m"):
        write_gguf(merged, tokenizer, tmp_path / f"{quant}.gguf", quant, model_name="tiny")
        written = (tmp_path / f"{quant}.gguf").stat().st_size
        assert abs(expected_bytes(merged, quant) - written) < 0.1 * written, (quant, expected_bytes(merged, quant), written)


def test_qk_permutation_is_llama_cpps():
    w = torch.arange(4 * 4 * 2).reshape(8, 4).numpy()  # 2 heads of dim 4: rows (h0: 0 1 2 3, h1: 4 5 6 7)
    rows = permute(w, 2)[:, 0] // 4
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]  # halves interleaved within each head


def test_unsupported_architecture_and_rope_scaling_are_one_line(tmp_path):
    from types import SimpleNamespace

    from infopo_cli.export.gguf import arch_of

    unknown = type("GPT2LMHeadModel", (), {"config": SimpleNamespace()})()
    with pytest.raises(ExportError, match="GGUF export supports .*GPT2LMHeadModel is not yet supported — use --merged"):
        arch_of(unknown)
    merged, tokenizer = merged_model(adapter_for("llama", tmp_path))
    merged.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}
    with pytest.raises(ExportError, match="rope scaling 'yarn' is not yet supported"):
        write_gguf(merged, tokenizer, tmp_path / "g.gguf", "f16", "tiny")


def test_modelfile_for_chatml():
    text = modelfile("m.gguf", "{{ '<|im_start|>' + message['role'] }}", "<|im_end|>")
    assert text.startswith("FROM ./m.gguf\nTEMPLATE") and 'PARAMETER stop "<|im_end|>"' in text
    assert not any(line.startswith("TEMPLATE") for line in modelfile("m.gguf", "{{ custom }}", "</s>").splitlines())


def test_cli_errors_are_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    out = subprocess.run([sys.executable, "-m", "infopo_cli", "export", str(run), "--merged", str(tmp_path / "m")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith(f"error: {run} has no adapter") and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "infopo_cli", "export", str(run)], capture_output=True, text=True)
    assert out.returncode == 2 and "exactly one of --merged" in out.stderr


def test_exported_gguf_and_modelfile_are_readable_by_others(tmp_path):
    """Ollama often runs as its own user: an owner-only (0600) GGUF would not load."""
    from infopo_cli.export.export_gguf import export_gguf

    path, modelfile_path, _ = export_gguf(adapter_for("llama", tmp_path), tmp_path / "m.gguf", "f16", check=False)
    assert path.stat().st_mode & 0o644 == 0o644 and modelfile_path.stat().st_mode & 0o644 == 0o644
    with pytest.raises(OutputError, match="already exists"):
        export_gguf(adapter_for("llama", tmp_path / "again"), path, "f16", check=False)


def test_a_check_stopped_by_ctrl_c_leaves_no_gguf_and_the_same_command_runs_again(tmp_path, monkeypatch):
    """The GGUF is checked before it takes its name: a half-done check left OUT.gguf, which a rerun refused."""
    module = importlib.import_module("infopo_cli.export.export_gguf")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "compare", stopped)
    with pytest.raises(KeyboardInterrupt):
        module.export_gguf(adapter_for("llama", tmp_path / "run"), tmp_path / "m.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    checked = []  # the file the check reads: whole, under its temporary name, with no m.gguf yet
    monkeypatch.setattr(module, "compare", lambda model, tokenizer, path, **kw: checked.append(
        (path.is_file(), path.name != "m.gguf", (tmp_path / "m.gguf").exists())) or "checked")
    path, modelfile_path, result = module.export_gguf(adapter_for("llama", tmp_path / "run2"), tmp_path / "m.gguf", "f16")
    assert checked == [(True, True, False)] and result == "checked"
    assert path.is_file() and modelfile_path.is_file() and not [p for p in tmp_path.iterdir() if "tmp" in p.name]



def test_a_gguf_llama_cpp_cannot_load_still_takes_its_name_for_inspection(tmp_path, monkeypatch):
    from infopo_cli.errors import ExportCheckFailed

    module = importlib.import_module("infopo_cli.export.export_gguf")

    def unloadable(model, tokenizer, path, shown=None, **kwargs):
        raise ExportCheckFailed(f"check failed: llama.cpp cannot load {shown or path}; the file is kept for inspection")

    monkeypatch.setattr(module, "compare", unloadable)
    with pytest.raises(ExportCheckFailed, match=re.escape(f"cannot load {tmp_path / 'm.gguf'};")):
        module.export_gguf(adapter_for("llama", tmp_path / "run"), tmp_path / "m.gguf", "f16")
    assert (tmp_path / "m.gguf").is_file() and (tmp_path / "m.Modelfile").is_file()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("existing", ["m.gguf", "m.Modelfile"])
def test_an_existing_gguf_or_modelfile_is_refused_before_the_model_loads(existing, tmp_path, monkeypatch):
    """Without --overwrite neither output may be replaced; the Modelfile used to be, silently."""
    module = importlib.import_module("infopo_cli.export.export_gguf")
    monkeypatch.setattr(module, "merged_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    (tmp_path / existing).write_text("the user's")
    with pytest.raises(OutputError, match=re.escape(f"{tmp_path / existing} already exists")):
        module.export_gguf(AdapterSource("unused", tmp_path / "adapter"), tmp_path / "m.gguf", check=False)
    assert os.listdir(tmp_path) == [existing] and (tmp_path / existing).read_text() == "the user's"


@pytest.mark.run
def test_a_gguf_file_trains_as_the_model(tmp_path, monkeypatch):
    """Users of llama.cpp/Ollama bring GGUF files: --model file.gguf is converted once and trained on."""
    from conftest import tiny_cfg, write_pairs

    from infopo_cli.train import recipe
    from infopo_cli.model.stack import resolve_source

    monkeypatch.setenv("INFOPO_HOME", str(tmp_path / "home"))
    merged, tokenizer = merged_model(adapter_for("llama", tmp_path))
    path = tmp_path / "mine.gguf"
    write_gguf(merged, tokenizer, path, "f32", model_name="tiny")
    import gguf
    from infopo_cli.model import source

    parsed, reader, parse = [], gguf.GGUFReader, gguf.GGUFReader.__init__

    def counted(self, *args, **kwargs):  # every real parse, however a caller reaches the class
        parsed.append(args)
        parse(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted)
    monkeypatch.setattr(source, "_PARSED", set())
    source.check_source(str(path))  # a run's early check, before its load
    folder = resolve_source(str(path), log=lambda _: None)
    assert len(parsed) == 2, "the check parses it; the conversion's reads (config, weights, ...) share one more parse"
    assert gguf.GGUFReader is reader  # the sharing ends with the conversion
    monkeypatch.setattr(source, "_PARSED", set())  # a new process
    assert resolve_source(str(path), log=lambda _: pytest.fail("converted twice")) == folder
    source.check_source(str(path))
    assert len(parsed) == 2, "a file converted before is not parsed again by a later run"
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder)(IDS).logits, merged(IDS).logits,
                                   atol=1e-4, rtol=0)
    cfg = tiny_cfg(path, write_pairs(tmp_path / "p.jsonl", 4), tmp_path / "run", eval_data="", max_steps=1, batch_size=2)
    assert recipe.train(cfg).steps == 1


@pytest.mark.parametrize("arch", ["mistral", "phi3", "gemma2", "gemma3"])
def test_sentencepiece_gguf_runs_in_llama_cpp_like_transformers(arch, tmp_path):
    """Llama 2 / Mistral / Phi-3 layout: llama.cpp's SentencePiece tokenizer on our tokens, scores and types,
    and its forward pass on our tensors (Phi-3's fused qkv and gate/up included)."""

    from conftest import build_spm_tokenizer
    from infopo_cli.export.check import check_llama_cpp

    spm = build_spm_tokenizer()
    if arch == "phi3":  # llama.cpp looks these up by name for Phi-3 (its end-of-turn tokens)
        spm.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>"]})
    merged, tokenizer = merged_model(adapter_for(arch, tmp_path, spm))
    path = tmp_path / "spm.gguf"
    write_gguf(merged, tokenizer, path, "f32", model_name=f"tiny-{arch}")
    with torch.no_grad():
        torch.testing.assert_close(load_gguf(path)(IDS).logits, merged(IDS).logits, atol=1e-4, rtol=0)
    llm = load_llama(str(path), n_ctx=64, verbose=False)
    try:
        for text in ("what is the 2+3?", "the  cat is in the hat!", "é ünïcode", "is it"):
            assert llm.tokenize(text.encode(), add_bos=True) == tokenizer(text)["input_ids"], text
    finally:
        llm.close()
    assert check_llama_cpp(merged.float().eval(), tokenizer, path, ("what is the", "the hat is"), 6) == [True, True]


def test_llama3_rope_scaling_matches_in_llama_cpp(tmp_path):
    """Llama 3.1's rope scaling goes into rope_freqs.weight: llama.cpp's logits then equal the merged model's,
    and without that tensor they do not (so the comparison can tell)."""
    import numpy as np

    import transformers as T
    from conftest import build_spm_tokenizer

    from infopo_cli.export.gguf import llama3_rope_factors

    tokenizer = build_spm_tokenizer()
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 32},
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).eval()
    factors = llama3_rope_factors(config, 16)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and np.all(np.diff(factors) >= 0)
    ids = list(range(20, 80))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()

    write_gguf(model, tokenizer, tmp_path / "scaled.gguf", "f32", "tiny")
    scaled = np.abs(llama_cpp_logits(tmp_path / "scaled.gguf", ids) - want).max()
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}  # same weights, no rope_freqs
    write_gguf(model, tokenizer, tmp_path / "unscaled.gguf", "f32", "tiny")
    unscaled = np.abs(llama_cpp_logits(tmp_path / "unscaled.gguf", ids) - want).max()
    assert scaled < 2e-4 and unscaled > 10 * scaled, (scaled, unscaled)  # logits here are O(0.1)


def test_phi3_longrope_matches_in_llama_cpp(tmp_path):
    """Phi-3.5's longrope: short/long factor tensors and the attention factor; llama.cpp's logits equal the model's."""
    import numpy as np
    import transformers as T
    from conftest import build_spm_tokenizer

    tokenizer = build_spm_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>"]})
    rng = np.random.default_rng(0)
    config = T.Phi3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          original_max_position_embeddings=256,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "short_factor": (1 + rng.random(8)).tolist(), "long_factor": (2 + rng.random(8)).tolist(),
                                           "original_max_position_embeddings": 256},
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    torch.manual_seed(0)
    model = T.Phi3ForCausalLM(config).eval()
    ids = list(range(20, 80))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    write_gguf(model, tokenizer, tmp_path / "phi.gguf", "f32", "tiny-phi3")
    assert np.abs(llama_cpp_logits(tmp_path / "phi.gguf", ids) - want).max() < 2e-4


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 8.0}])
def test_gemma3_matches_in_llama_cpp_sliding_window_and_global_layers(scaling, tmp_path):
    """Gemma 3 alternates five sliding-window layers (rope base 1e4) with a global one (1e6, linearly scaled from 4B
    up): over 40 tokens and a window of 16, llama.cpp's logits equal the model's; a config llama.cpp would read
    otherwise is refused."""
    import numpy as np

    import transformers as T
    from conftest import build_spm_tokenizer

    tokenizer = build_spm_tokenizer()
    full = {"rope_type": "default", "rope_theta": 1e6, **(scaling or {})}
    config = T.Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=256, query_pre_attn_scalar=256,
                                max_position_embeddings=512, sliding_window=16,
                                rope_parameters={"full_attention": full,
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = T.Gemma3ForCausalLM(config).eval()
    ids = list(range(20, 60))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    write_gguf(model, tokenizer, tmp_path / "gemma3.gguf", "f32", "tiny")
    got = llama_cpp_logits(tmp_path / "gemma3.gguf", ids)
    error = np.abs(got - want).max()  # logits here are O(0.3); llama.cpp keeps its KV cache in f16

    def logits_if(**changes):  # the same weights read as a model without the window, or without the scaling
        other = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**{**config.to_dict(), **changes})).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            return other(torch.tensor([ids])).logits[0].numpy()

    unwindowed = np.abs(got - logits_if(sliding_window=512)).max()
    unscaled = np.abs(got - logits_if(rope_parameters={**config.rope_parameters, "full_attention": {
        "rope_type": "default", "rope_theta": 1e6}})).max()
    assert error < 1e-3 and unwindowed > 10 * error and (scaling is None or unscaled > 10 * error), \
        (error, unwindowed, unscaled)
    model.config.rope_parameters["sliding_attention"]["rope_theta"] = 1e5
    with pytest.raises(ExportError, match="sliding-window layers' rope base is 100000.0"):
        write_gguf(model, tokenizer, tmp_path / "other.gguf", "f32", "tiny")


@pytest.mark.parametrize("changes, says", [
    ({"layer_types": ["full_attention"] * 6}, "not global every 6th"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}},
     "sliding-window layers' rope is scaled"),
    ({"query_pre_attn_scalar": 64}, "query scale 1/sqrt(64) is not llama.cpp's 1/sqrt(256)"),
    ({"final_logit_softcapping": 30.0}, "caps its logits"),
    ({"num_hidden_layers": 62, "hidden_size": 5376, "num_attention_heads": 32, "layer_types": None, "head_dim": 128,
      "query_pre_attn_scalar": 128}, "1/sqrt(128) is not llama.cpp's 1/sqrt(168) for 62 layers")])  # the 27B rule
def test_a_gemma3_config_llama_cpp_would_read_otherwise_is_refused(changes, says):
    import transformers as T

    from infopo_cli.export.gguf import arch_for

    base = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=256, query_pre_attn_scalar=256)
    assert arch_for("Gemma3ForCausalLM", T.Gemma3TextConfig(**base)).gguf_name == "gemma3"
    with pytest.raises(ExportError, match=re.escape(says)):
        arch_for("Gemma3ForCausalLM", T.Gemma3TextConfig(**{**base, **changes}))
    if changes.get("num_hidden_layers") == 62:  # and 27B with its own scale passes
        arch_for("Gemma3ForCausalLM", T.Gemma3TextConfig(**{**base, **changes, "query_pre_attn_scalar": 168}))


def test_export_from_base_and_adapter_on_the_command_line(tmp_path):
    source = adapter_for("llama", tmp_path)
    out = subprocess.run([sys.executable, "-m", "infopo_cli", "export", "--base", source.base, "--adapter", str(source.adapter),
                          "--merged", str(tmp_path / "merged")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-1500:]
    assert (tmp_path / "merged" / "config.json").is_file()
    out = subprocess.run([sys.executable, "-m", "infopo_cli", "export", "--base", source.base, "--adapter", str(source.adapter),
                          "--merged", str(tmp_path / "merged")], capture_output=True, text=True)
    assert out.returncode == 2 and "already exists" in out.stderr  # and --overwrite replaces it:
    out = subprocess.run([sys.executable, "-m", "infopo_cli", "export", "--base", source.base, "--adapter", str(source.adapter),
                          "--merged", str(tmp_path / "merged"), "--overwrite"], capture_output=True, text=True)
    assert out.returncode == 0


def test_a_merged_export_is_not_taken_as_the_base_of_the_adapter_it_holds(tmp_path):
    source = adapter_for("llama", tmp_path)
    merged = export_merged(source, tmp_path / "merged")
    for args in (["generate", str(source.adapter), "--base", str(merged), "--prompt", "hi"],
                 ["export", "--base", str(merged), "--adapter", str(source.adapter), "--merged", str(tmp_path / "twice")]):
        out = subprocess.run([sys.executable, "-m", "infopo_cli", *args], capture_output=True, text=True)
        assert out.returncode == 2 and "already holds the adapter" in out.stderr and "would apply it twice" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "twice").exists()
    with pytest.raises(ConfigError, match="already holds the adapter"):  # nor started from in training
        preflight.check_settings(TrainConfig(model=str(merged), init_adapter=str(source.adapter), dtype="fp32",
                                             load_in_4bit=False, lora_r=4, lora_alpha=8))
    # another adapter on the merged model (a second round on top of a merge) is a model someone trained: it passes
    other = tmp_path / "other"
    shutil.copytree(source.adapter, other)
    weights = load_file(other / "adapter_model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, other / "adapter_model.safetensors")
    assert find_target(other, str(merged)).kind == "adapter"
    # an adapter saved in peft's older .bin format merges, is marked and is recognised the same way
    old = tmp_path / "old-format"
    shutil.copytree(source.adapter, old)
    torch.save(load_file(old / "adapter_model.safetensors"), old / "adapter_model.bin")
    (old / "adapter_model.safetensors").unlink()
    merged_old = export_merged(AdapterSource(source.base, old), tmp_path / "merged-old")
    with pytest.raises(ConfigError, match="already holds the adapter"):
        find_target(old, str(merged_old))
    # the same tensors re-saved as .bin (other bytes) are the same adapter
    with pytest.raises(ConfigError, match="already holds the adapter"):
        find_target(old, str(merged))
    # a merge of a merge holds both adapters; so does a merge of an adapter whose run started from another
    # (`related`: its init adapter and checkpoints, which `from_run` lists)
    twice = export_merged(AdapterSource(str(merged), other), tmp_path / "merge-of-merge")
    started = export_merged(AdapterSource(source.base, other, related=(source.adapter,)), tmp_path / "started")
    for model in (twice, started):
        for adapter in (source.adapter, other):
            with pytest.raises(ConfigError, match="already holds the adapter"):
                check_not_merged_in(str(model), adapter, "--base")
    assert json.loads((twice / "infopo_merged.json").read_text())["base"] == str(merged.resolve())  # a full path
    run = shutil.copytree(other, tmp_path / "run")
    shutil.copytree(source.adapter, run / "checkpoint-1")
    (run / "checkpoint-1" / "training_state.pt").write_bytes(b"")  # a complete checkpoint's files
    (run / "config.toml").write_text(f'model = "{source.base}"\ninit_adapter = "{source.adapter}"\n')
    assert from_run(run).related == (source.adapter, run / "checkpoint-1")


def test_a_gguf_export_is_not_taken_as_the_base_of_the_adapter_it_holds(tmp_path):
    """A GGUF is always the adapter merged into its base: training from it (`--model FILE.gguf --init-adapter`) or
    exporting onto it with that adapter would apply it twice."""
    from infopo_cli.export.export_gguf import export_gguf

    source = adapter_for("llama", tmp_path)
    path, _, _ = export_gguf(source, tmp_path / "m.gguf", "f16", check=False)
    with pytest.raises(ConfigError, match=r"--model .*m\.gguf is a merged export that already holds the adapter"):
        preflight.check_settings(TrainConfig(model=str(path), init_adapter=str(source.adapter), dtype="fp32",
                                             load_in_4bit=False, lora_r=4, lora_alpha=8))
    with pytest.raises(ConfigError, match="already holds the adapter"):
        find_target(source.adapter, str(path))
    other = tmp_path / "other"  # another adapter on top of it passes
    shutil.copytree(source.adapter, other)
    save_file({k: v + 1 for k, v in load_file(other / "adapter_model.safetensors").items()}, other / "adapter_model.safetensors")
    check_not_merged_in(str(path), other, "--model")
    # and a GGUF no infopo export wrote (no such metadata) passes with any adapter
    merged, tokenizer = merged_model(source)
    write_gguf(merged, tokenizer, tmp_path / "plain.gguf", "f16", model_name="tiny")
    check_not_merged_in(str(tmp_path / "plain.gguf"), source.adapter, "--model")


def test_a_run_with_no_adapter_yet_says_why_and_what_to_do(tmp_path):
    from infopo_cli.files import RunLock

    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    for name in ("adapter_model.safetensors", "training_state.pt"):
        (run / "checkpoint-2" / name).write_bytes(b"")
    (run / "config.toml").write_text('model = "some/base"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{run} has no final adapter: the run stopped before writing it. "
                                                    f"`infopo train --resume {run}` finishes it, or export its newest "
                                                    f"checkpoint: --base some/base --adapter {run / 'checkpoint-2'}")):
        from_run(run)
    with RunLock(run), pytest.raises(ConfigError, match=rf"{re.escape(str(run))} is being trained now \(pid {os.getpid()} "):
        from_run(run)
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="pairs.jsonl: a file, not a run folder"):
        from_run(tmp_path / "pairs.jsonl")


def test_free_space_is_checked_before_writing(tmp_path):
    from infopo_cli.files import check_free_space

    check_free_space(tmp_path, 1024)
    with pytest.raises(OutputError, match="not enough disk space"):
        check_free_space(tmp_path, 10**18)


def test_a_quantised_file_is_checked_against_itself_a_lossless_one_against_the_merged_model():
    """q8_0 and below may pick another token at a near tie, and a coarse type may ramble on a small model: there
    agreement with the merged model is reported and rambling is a warning; what must hold is that llama.cpp
    tokenises and answers as transformers reading the same file, and stops on the model's own stop token."""
    from infopo_cli.export.check import Agreement, CheckResult, PromptCheck

    def result(lossy, vs_merged=Agreement(8, 0, 8), stops=True, llama=Agreement(8, 0, 8), tokens=True, eos=True,
               merged_stops=True):
        prompts = [PromptCheck("p", "a", True, Agreement(8, 0, 8), Agreement(8, 0, 8)),
                   PromptCheck("q", "b", stops, vs_merged, llama, tokens, merged_stops)]
        return CheckResult(quant="q4_0" if lossy else "f16", lossy=lossy, prompts=prompts, llama_cpp_checked=True,
                           llama_cpp_stop=eos)

    assert result(False).ok and result(True).ok and not result(True).warnings()
    another_answer = dict(vs_merged=Agreement(6, 0, 8))
    assert result(True, **another_answer).ok and result(False, **another_answer).problems() == [
        "answers differently from the merged model"]
    assert result(False, vs_merged=Agreement(6, 2, 8)).ok  # different only at near ties
    rambles = result(True, stops=False)
    assert rambles.ok and rambles.warnings() and "q4_0 is coarse" in rambles.lines()[-1]
    assert result(False, stops=False).problems() == ["generation does not stop"]
    # a base model without a chat template runs on in transformers too: the file is not at fault, for any type
    for lossy in (False, True):
        runs_on = result(lossy, stops=False, merged_stops=False)
        assert runs_on.ok and not runs_on.warnings() and "runs on, as the merged model does" in runs_on.lines()[1]
    assert result(True, llama=Agreement(7, 0, 8)).problems() == [
        "llama.cpp answers differently from transformers reading the same file"]
    assert result(True, tokens=False).problems() == ["llama.cpp tokenises the prompts differently"]
    assert result(True, eos=False).problems() == ["llama.cpp's end-of-sequence token is not the model's stop token"]


def test_a_different_top_token_counts_only_at_a_near_tie():
    from infopo_cli.export.check import TIE, agreement

    reference = torch.tensor([[0.0, 0.0, 0.0, 4.0, 3.9], [0.0, 0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 1.0, 4.0, 0.0]])
    reader = torch.tensor([[0.0, 0.0, 0.0, 3.9, 4.0], [0.0, 0.0, 0.0, 1.0, 4.0], [0.0, 0.0, 1.0, 4.0, 0.0]])
    found = agreement(reference, reader)  # row 0: 0.1 below the best (std ~1.9, margin ~0.48); row 1: 3.0 below
    assert (found.same, found.ties, found.total, found.within_ties) == (1, 1, 3, False)
    assert agreement(reference, reader, tie=0.0).ties == 0 and TIE > 0


@pytest.mark.parametrize("quant, share", [("q8_0", 1.0), ("q5_1", 0.85), ("q5_0", 0.85), ("q4_1", 0.85), ("q4_0", 0.85)])
def test_each_gguf_library_type_gives_the_merged_models_greedy_answers(quant, share, tmp_path):
    """transformers reading the file, on the merged model's greedy answers to the test prompts (teacher-forced):
    the same top-1 as the merged model, or a near tie (the check's rule), at every answer token for q8_0 and at
    `share` of them for the 4/5-bit types. Measured on this random tiny model (logit std 0.16, so its near-tie
    margin is 0.04 while 4/5-bit rounding moves logits by up to 0.17): q5_1 68/72, q5_0 70/72, q4_1 66/72,
    q4_0 72/72 answer tokens. The default model's figures per type are in the README."""
    from infopo_cli.export.check import PROMPTS, agreement, answer_logits, greedy, prompt_tensor
    from infopo_cli.inference.generation import stop_ids

    merged, tokenizer = merged_model(adapter_for("llama", tmp_path))
    path = tmp_path / f"model-{quant}.gguf"
    write_gguf(merged, tokenizer, path, quant, model_name="tiny")
    exported, stops, agreed, total = load_gguf(path), stop_ids(tokenizer), 0, 0
    for prompt in PROMPTS:
        ids = prompt_tensor(tokenizer, prompt)
        answer = greedy(merged, ids, stops, 24)
        found = agreement(answer_logits(merged, ids[0].tolist(), answer), answer_logits(exported, ids[0].tolist(), answer))
        agreed, total = agreed + found.same + found.ties, total + found.total
    assert total == 72 and agreed >= share * total, (agreed, total)


def test_a_gguf_replaced_while_it_converts_is_not_kept_under_the_new_files_key(tmp_path, monkeypatch):
    from infopo_cli.errors import ModelError
    from infopo_cli.model import embedded

    monkeypatch.setenv("INFOPO_HOME", str(tmp_path / "home"))
    path = tmp_path / "mine.gguf"
    path.write_bytes(b"old")

    def convert_while_replaced(gguf, out):
        (out / "config.json").write_text("{}")
        path.write_bytes(b"the new download")  # a download finishing meanwhile

    monkeypatch.setattr(embedded, "_convert", convert_while_replaced)
    with pytest.raises(ModelError, match="changed while it was being converted; run the command again"):
        embedded.gguf_folder(path, log=lambda _: None)
    assert not (embedded.gguf_target(path) / "config.json").exists()
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()] == []  # nothing kept, no temporary left
