"""The model stack: 4-bit base, LoRA policy, reference = same weights with the adapter off."""

from __future__ import annotations

import gc
import warnings

import bitsandbytes as bnb
import pytest
import torch

from infopo_cli.model import loading as stack
from infopo_cli.data.batching import collate
from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError, ModelError
from infopo_cli.losses.types import Needs
from infopo_cli.train.logps import pair_logps
from infopo_cli.model.precision import Precision
from infopo_cli.data.tokenization import TokenizedPair

FP32 = Precision("cpu", torch.float32, "test")
CFG = TrainConfig(dtype="fp32", lora_r=4, lora_alpha=8)


def policy(tiny_model, cfg: TrainConfig = CFG):
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, FP32), cfg)
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
    gc.collect()  # earlier tests' models must not be counted
    model = policy(tiny_model)
    pair_logps(model, batch(), Needs(reference=True)).policy_chosen.sum().backward()
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, bnb.nn.Params4bit)]
    own = {id(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(own) == 14 and {id(p) for p in alive} == own


def test_evaluation_mode_does_not_corrupt_training_gradients(tiny_model):
    """bitsandbytes repacks 4-bit weights on an eval-mode forward; its kernel has no autograd."""
    cfg = TrainConfig(dtype="bf16", lora_r=4, lora_alpha=8)
    bf16 = Precision("cpu", torch.bfloat16, "test")
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, bf16), cfg)
    first_a = next(p for n, p in model.named_parameters() if "layers.0" in n and "lora_A" in n)

    def grad() -> torch.Tensor:
        model.zero_grad()
        pair_logps(model, batch(), Needs()).policy_chosen.sum().backward()
        return first_a.grad.clone()

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    before = grad()
    model.eval()
    with torch.no_grad():
        pair_logps(model, batch(), Needs())
    model.train()
    torch.testing.assert_close(grad(), before)


def test_unquantised_base_and_gradient_checkpointing_flags(tiny_model):
    cfg = TrainConfig(dtype="fp32", load_in_4bit=False, gradient_checkpointing=False, lora_r=2, lora_alpha=2)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, FP32), cfg)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not model.get_base_model().is_activation_checkpointing
    with warnings.catch_warnings():  # a user sees no deprecation noise from peft/transformers on the way
        warnings.simplefilter("error", FutureWarning)
        checkpointed = stack.attach_lora(stack.load_base(str(tiny_model), CFG, FP32), CFG)
    assert checkpointed.get_base_model().is_activation_checkpointing


def test_wrong_target_modules_name_the_real_ones(tiny_model):
    cfg = TrainConfig(dtype="fp32", target_modules=["qkv_proj"])
    with pytest.raises(ConfigError, match=r"do not match this model's layers \(it has: .*q_proj"):
        stack.attach_lora(stack.load_base(str(tiny_model), cfg, FP32), cfg)


def test_missing_model_is_one_line(tmp_path):
    with pytest.raises(ModelError, match="cannot load model"):
        stack.load_tokenizer(str(tmp_path / "no-such-model"))
