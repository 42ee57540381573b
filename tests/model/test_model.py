"""The model stack: 4-bit base, LoRA policy, reference = same weights with the adapter off."""

from __future__ import annotations

import gc
import subprocess
import sys
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from infopo_cli import files
from infopo_cli.model import stack
from infopo_cli.data.batching import collate
from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError, ModelError
from infopo_cli.losses.types import Needs
from infopo_cli.train.logps import pair_logps
from infopo_cli.model.precision import Precision, cpu_flags
from infopo_cli.data.tokenization import TokenizedPair

FP32 = Precision("cpu", torch.float32, "test")
CFG = TrainConfig(dtype="fp32", lora_r=4, lora_alpha=8)


def policy(tiny_model, cfg: TrainConfig = CFG, precision: Precision = FP32):
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, precision), cfg)
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at init
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model


def batch():
    return collate([TokenizedPair([5, 6, 7], [8, 9, 10], [11, 12]), TokenizedPair([13, 14], [15], [16, 17, 18])], 0)


def test_base_is_nf4_and_only_lora_trains(tiny_model):
    model = policy(tiny_model)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # every projection of both layers is 4-bit
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_reference_logps_equal_the_bare_base(tiny_model):
    model = policy(tiny_model)
    bare = stack.load_base(str(tiny_model), CFG, FP32)
    b = batch()
    logps = pair_logps(model, b, Needs(reference=True))
    bare_logps = pair_logps(bare, b, Needs())
    torch.testing.assert_close(logps.ref_chosen, bare_logps.policy_chosen, rtol=0, atol=1e-6)
    torch.testing.assert_close(logps.ref_rejected, bare_logps.policy_rejected, rtol=0, atol=1e-6)
    assert not torch.allclose(logps.policy_chosen, logps.ref_chosen)  # the adapter is on for the policy


def test_one_set_of_base_weights_in_the_process(tiny_model):
    gc.collect()  # earlier tests' models must not be counted: whatever is still alive now is not this model's
    before = {id(o) for o in gc.get_objects() if isinstance(o, bnb.nn.Params4bit)}
    model = policy(tiny_model)
    pair_logps(model, batch(), Needs(reference=True)).policy_chosen.sum().backward()
    gc.collect()
    alive = {id(o) for o in gc.get_objects() if isinstance(o, bnb.nn.Params4bit)} - before
    own = {id(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(own) == 14 and alive == own


def _saved_bytes_and_grads(model, b) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the distinct tensors autograd saves in one policy forward, and the LoRA gradients it gives."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = pair_logps(model, b, Needs())
    (logps.policy_chosen.sum() - logps.policy_rejected.sum()).backward()
    return sum(saved.values()), [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]


def test_lora_computes_in_16_bits_saves_no_float32_copy_and_keeps_float32_gradients(tiny_model):
    """model/lora_layers.py: A and B run in the base's bf16 (weights cast, not the input), saving less than peft's
    float32 path; the weights and gradients stay float32 and equal peft's to bf16 rounding."""
    from torch import nn

    from infopo_cli.model.lora_layers import AdapterLinear

    cfg = TrainConfig(dtype="bf16", lora_r=4, lora_alpha=8)
    model = policy(tiny_model, cfg, Precision("cpu", torch.bfloat16, "test"))
    adapters = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    assert len(adapters) == 28  # A and B of every LoRA layer of both transformer layers
    with torch.no_grad():  # a trained-looking B, so that every gradient is non-zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    b = batch()
    kept, grads = _saved_bytes_and_grads(model, b)
    for adapter in adapters:  # back to peft's own: a float32 copy of the input, made and saved by each LoRA layer
        adapter.__class__ = nn.Linear
    unfuse(model)
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = True
    copied, peft_grads = _saved_bytes_and_grads(model, b)
    for ours, theirs in zip(grads, peft_grads, strict=True):
        assert ours.dtype == torch.float32 and ours.abs().sum() > 0
        assert (ours - theirs).norm() <= 0.03 * theirs.norm(), ((ours - theirs).norm(), theirs.norm())
    assert kept < 0.8 * copied, (kept, copied)


def unfuse(model) -> int:
    """Back to peft's own LoRA forward (`base + B(A(x)) * scaling`) for every fused layer; how many there were."""
    from infopo_cli.model.lora_layers import FusedSum

    fused = [m for m in model.modules() if isinstance(m, FusedSum)]
    for module in fused:
        module.__class__ = type(module).__bases__[1]
    return len(fused)


def _logits_and_grads(model, ids: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)  # the same LoRA dropout masks in both runs
    logits = model(input_ids=ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float32, 0.2), (torch.bfloat16, 0.0)])
def test_fused_lora_sums_equal_pefts(tiny_model, dtype, dropout, monkeypatch):
    """model/lora_layers.py: the adapter's term summed into the base output by the B product (one addmm) gives peft's
    logits and LoRA gradients (float32: to rounding; bf16: peft rounds the term and the sum, the fused sum once), with
    dropout drawing the same masks; with the adapter off both give the base's."""
    from peft.tuners.lora import LoraLayer

    cfg = TrainConfig(dtype="bf16" if dtype == torch.bfloat16 else "fp32", lora_r=4, lora_alpha=8, lora_dropout=dropout)
    model = policy(tiny_model, cfg, Precision("cpu", dtype, "test"))
    model.train()
    assert len([m for m in model.modules() if isinstance(m, LoraLayer)]) == 14
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    with monkeypatch.context() as patched:  # the policy's pass is the fused one, not peft's
        for cls in {type(m) for m in model.modules() if isinstance(m, LoraLayer)}:
            patched.setattr(cls, "unfused_forward", lambda *a, **k: pytest.fail("peft's forward ran"))
        logits, grads = _logits_and_grads(model, ids)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    assert unfuse(model) == 14
    peft_logits, peft_grads = _logits_and_grads(model, ids)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
    tolerance = 1e-5 if dtype == torch.float32 else 0.03  # bf16: roundings of 2 ** -8 through two layers
    assert (logits - peft_logits).float().norm() <= tolerance * peft_logits.float().norm()
    assert (logits - base).float().norm() > 0.1 * base.float().norm()  # the adapter's term is not negligible
    for ours, theirs in zip(grads, peft_grads, strict=True):
        assert ours.dtype == torch.float32 and theirs.abs().sum() > 0
        assert (ours - theirs).norm() <= 3 * tolerance * theirs.norm(), ((ours - theirs).norm(), theirs.norm())


def test_dequantised_layers_give_the_4bit_models_logits_and_go_back(tiny_model):
    """Answer scoring on a CPU swaps the 4-bit layers for their de-quantised weights, only inside the block."""
    model = policy(tiny_model)
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with stack.dequantised(model):
            assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
            got = model(input_ids=ids).logits
            assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert len([m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]) == 14
        with pytest.raises(KeyboardInterrupt), stack.dequantised(model):
            raise KeyboardInterrupt  # a stop inside the block still puts the 4-bit layers back
        assert len([m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]) == 14
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


@pytest.mark.skipif("avx512_bf16" not in cpu_flags(),
                    reason="this CPU lacks avx512_bf16: bitsandbytes never repacks 4-bit weights here, nothing to test")
@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded-control"])
def test_evaluation_mode_does_not_corrupt_training_gradients(tiny_model, monkeypatch, guarded):
    """bitsandbytes repacks 4-bit weights on an eval-mode forward; its kernel has no autograd.

    The unguarded control (without `_keep_4bit_layout_trainable`) shows the check is live on this CPU: the
    weights are repacked and the training gradients change.
    """
    if not guarded:
        monkeypatch.setattr(stack, "_keep_4bit_layout_trainable", lambda model: None)
    cfg = TrainConfig(dtype="bf16", lora_r=4, lora_alpha=8)
    model = policy(tiny_model, cfg, Precision("cpu", torch.bfloat16, "test"))
    first_a = next(p for n, p in model.named_parameters() if "layers.0" in n and "lora_A" in n)

    def grad() -> torch.Tensor:
        model.zero_grad()
        with warnings.catch_warnings():  # torch warns when backward meets the repacked kernel (the control)
            warnings.simplefilter("ignore", UserWarning)
            pair_logps(model, batch(), Needs()).policy_chosen.sum().backward()
        return first_a.grad.clone()

    before = grad()
    model.eval()
    with torch.no_grad():
        pair_logps(model, batch(), Needs())
    model.train()
    after = grad()
    repacked = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    if guarded:
        assert repacked == 0
        torch.testing.assert_close(after, before)
    else:
        assert repacked == 14 and not torch.allclose(after, before)


def test_unquantised_base_and_gradient_checkpointing_flags(tiny_model):
    cfg = TrainConfig(dtype="fp32", load_in_4bit=False, gradient_checkpointing=False, lora_r=2, lora_alpha=2)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, FP32), cfg)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())

    def on(model) -> bool:  # transformers after 5.17 renamed is_gradient_checkpointing (the old name warns there)
        base = model.get_base_model()
        return base.is_activation_checkpointing if hasattr(type(base), "is_activation_checkpointing") \
            else base.is_gradient_checkpointing

    assert not on(model)
    with warnings.catch_warnings():  # a user sees no deprecation noise from peft/transformers on the way
        warnings.simplefilter("error", FutureWarning)
        checkpointed = stack.attach_lora(stack.load_base(str(tiny_model), CFG, FP32), CFG)
    assert on(checkpointed)


@pytest.mark.parametrize("targets", [["qkv_proj"], ["q_proj", "v_projj"]])  # none, or one of two (peft would drop it)
def test_wrong_target_modules_name_the_real_ones(tiny_model, targets):
    cfg = TrainConfig(dtype="fp32", target_modules=targets)
    with pytest.raises(ConfigError, match=rf"^target_modules {targets[-1]}: no such layer in this model \(it has: .*q_proj"):
        stack.attach_lora(stack.load_base(str(tiny_model), cfg, FP32), cfg)
    with pytest.raises(ConfigError, match=rf"^target_modules {targets[-1]}: no such layer"):  # and before any load
        stack.check_targets_before_loading(str(tiny_model), targets)


@pytest.mark.parametrize("targets", [["mlp"], ["q_proj", "input_layernorm"]])
def test_a_block_or_norm_as_target_is_refused_naming_the_linear_layers(tiny_model, targets):
    """peft cannot adapt a block (`mlp`) or a norm: it raised after the load with a Python list in the message."""
    cfg = TrainConfig(dtype="fp32", target_modules=targets)
    says = rf"^target_modules {targets[-1]}: a block or norm, not a linear layer; LoRA adapts linear layers \(this model's: .*q_proj"
    with pytest.raises(ConfigError, match=says):
        stack.check_targets_before_loading(str(tiny_model), targets)
    with pytest.raises(ConfigError, match=says):
        stack.attach_lora(stack.load_base(str(tiny_model), cfg, FP32), cfg)


def test_a_refusal_names_gpt2_style_conv1d_layers_and_not_the_embedding():
    """GPT-2's attention is a Conv1D (`c_attn`), which LoRA adapts: the names a refusal suggests include it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ConfigError, match=r"no such layer in this model \(it has: c_attn, c_fc, c_proj, lm_head\)$"):
        stack.check_targets(tiny, ["q_proj"])


def test_the_folder_a_model_would_load_from_is_found_only_where_it_is_here(tiny_model, tmp_path):
    from infopo_cli.model.source import known_folder

    assert known_folder(str(tiny_model)) == tiny_model
    assert known_folder(str(tmp_path)) is None                       # no config.json
    assert known_folder("no-such-org/no-such-model") is None         # a hub id not in the cache: nothing downloaded
    assert known_folder("not a hub id/at all") is None               # nor an error: the load names the problem
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert known_folder(str(gguf)) is None                           # not converted yet: nothing converted here


def test_target_modules_match_as_peft_matches_them():
    names = ["", "model", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    assert stack.unmatched_targets(names, ["q_proj", "mlp.down_proj", "lm_head", "all-linear"]) == ["all-linear"]
    assert stack.unmatched_targets(names, ["proj", "self_attn.q"]) == ["proj", "self_attn.q"]  # whole dotted parts only
    assert stack.unmatched_targets(names, "all-linear") == []


def test_missing_model_is_one_line(tmp_path):
    with pytest.raises(ModelError, match=f"^no such model folder or file: {tmp_path / 'no-such-model'}$"):
        stack.load_tokenizer(str(tmp_path / "no-such-model"))


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_has_its_own_infopo_home_and_shares_the_converted_models(run, home, shared_home, tmp_path_factory):
    """conftest: no test writes into ~/.cache/infopo; token caches are per test, converted models per session."""
    assert files.infopo_home() == home and home.is_relative_to(tmp_path_factory.getbasetemp())
    assert not home.resolve().is_relative_to((Path.home() / ".cache" / "infopo").resolve())
    assert (home / "models").resolve() == (shared_home / "models").resolve()
    assert [p.name for p in home.iterdir()] == ["models"]  # the other run's cache folder is not here
    (home / "cache").mkdir()
    child = subprocess.run([sys.executable, "-c", "from infopo_cli.files import infopo_home; print(infopo_home())"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str(home)  # the CLI in a subprocess uses it too


def test_with_fp16_inputs_the_adapter_products_stay_float32():
    """fp16 overflows under loss scaling where bf16 does not: its adapter products are float32, as peft's, with only
    the 16-bit input saved."""
    from torch import nn

    from infopo_cli.model.lora_layers import AdapterLinear

    torch.manual_seed(0)
    layer = nn.Linear(8, 4, bias=False)
    ours = AdapterLinear(8, 4, bias=False)
    ours.load_state_dict(layer.state_dict())
    x = torch.randn(5, 8).half().requires_grad_()
    out = ours(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    want = layer(x.detach().float())
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(ours.weight.grad, layer.weight.grad)
    assert x.grad.dtype == torch.float16
