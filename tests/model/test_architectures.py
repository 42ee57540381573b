"""Every architecture among the presets: log-probs match the model's own logits, every preset's LoRA targets exist
in its architecture, and each architecture trains two steps with its presets' settings."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_architecture, write_pairs
from safetensors.torch import load_file

from infopo_cli.model import stack
from infopo_cli.model.precision import Precision
from infopo_cli.train import recipe
from infopo_cli.data.batching import collate
from infopo_cli.config import TrainConfig
from infopo_cli.train.logps import batch_logps, sequence_logps
from infopo_cli.presets import available, load_preset
from infopo_cli.data.tokenization import TokenizedPair

def arch_of(model_id: str) -> str:
    for prefix, arch in (("meta-llama/", "llama"), ("embedded:smollm2", "llama"), ("HuggingFaceTB/SmolLM2", "llama"),
                         ("mistralai/", "mistral"), ("Qwen/Qwen2", "qwen2"), ("google/gemma-2", "gemma2"),
                         ("microsoft/Phi-3", "phi3")):
        if model_id.startswith(prefix):
            return arch
    raise AssertionError(f"no tiny test architecture for {model_id}: add one below")


ARCHS = sorted({arch_of(load_preset(name).model) for name in available()})
# One preset per architecture (the first by name) trains. Presets of one architecture differ in numbers (lr, r, beta,
# dropout, lengths: one code path), in their LoRA targets (checked for every preset below, without training) and in
# gradient checkpointing auto/off (off is the default preset's, trained end to end by test_integration.py).
FIRST_PRESET = {arch: min(n for n in available() if arch_of(load_preset(n).model) == arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> the folder of its tiny random model, built once for the module."""
    folders: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in folders:
            folders[arch] = build_architecture(arch, tmp_path_factory.mktemp(arch))
        return folders[arch]

    return get


def test_every_preset_has_a_tiny_architecture():
    assert {"llama", "mistral", "qwen2", "gemma2", "phi3"} <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_logps_match_the_models_own_logits(arch, tiny):
    """Our response-only output layer (with Gemma-2's soft-capping) equals the model's full forward, values and gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny(arch), dtype=torch.float32, attn_implementation="eager")
    b = collate([TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8, 9]), TokenizedPair([10, 11], [12, 13, 14], [15])], pad_id=0)
    for param in model.parameters():  # a frozen base, as in training
        param.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # something upstream to differentiate
    got = sequence_logps(model, b.input_ids, b.attention_mask, b.labels).sums
    got.sum().backward()
    ours = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
    keep = b.labels[:, 1:] != -100
    want = (logits.log_softmax(-1).gather(2, b.labels[:, 1:].clamp(min=0).unsqueeze(2)).squeeze(2) * keep).sum(1)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, model.get_input_embeddings().weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_matches_plain_rows(arch, tiny):
    """Reading the prompt once (4-D mask, restarted positions) changes nothing on any architecture."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny(arch), dtype=torch.float32)
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8, 9]), TokenizedPair([10, 11], [12, 13, 14], [15])]
    with torch.no_grad():
        got = batch_logps(model, collate(pairs, pad_id=0, share_prompt=True)).sums
        want = batch_logps(model, collate(pairs, pad_id=0)).sums
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(available()))
def test_preset_lora_targets_exist_in_its_architecture(name, tiny):
    """The adapter lands on exactly the layers the preset names (all-linear: every linear layer but the output one)."""
    preset = load_preset(name)
    cfg = TrainConfig(**{**preset.to_dict(), "model": tiny(arch_of(preset.model)), "load_in_4bit": False,
                         "dtype": "fp32"})
    base = stack.load_base(cfg.model, cfg, Precision("cpu", torch.float32, "test"))
    linear = {n.rsplit(".", 1)[-1] for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in n}
    model = stack.attach_lora(base, cfg)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == (set(preset.target_modules) if isinstance(preset.target_modules, list) else linear)
    assert "lm_head" not in wrapped


@pytest.mark.run
@pytest.mark.parametrize("arch", ARCHS)
def test_preset_trains_two_steps_on_its_architecture(arch, tiny, tmp_path):
    """With the preset's own settings (4-bit NF4 included), only the batch shapes and lengths made tiny."""
    preset = load_preset(FIRST_PRESET[arch])
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    cfg = TrainConfig(**{**preset.to_dict(), "model": tiny(arch), "data": str(pairs), "eval_data": "", "output": str(tmp_path / "out"),
                         "max_steps": 2, "batch_size": 2, "grad_accum": 2, "max_length": 128, "max_prompt_length": 64,
                         "dtype": "fp32", "optimizer": "adamw", "save_every": 0})
    summary = recipe.train(cfg)
    assert summary.steps == 2 and math.isfinite(summary.last_step["loss"])
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(bool(v.any()) for k, v in saved.items() if "lora_B" in k)  # B starts at zero: the steps moved it
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    if isinstance(preset.target_modules, list):
        assert set(adapter["target_modules"]) == set(preset.target_modules)
