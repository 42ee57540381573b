"""The memory plan (model/memory_plan.py) against hand-computed parts and against what autograd actually holds on CPU;
checkpointing chosen by it and applied layer by layer (model/recompute.py); `infopo plan` without a GPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import infopo
from infopo_cli.config import TrainConfig, merge
from infopo_cli.data.batching import collate
from infopo_cli.data.tokenization import TokenizedPair
from infopo_cli.errors import ConfigError
from infopo_cli.model import architectures, memory_plan as mp, recompute as recomputation

# tests/conftest.py's tiny Llama: hidden 64, intermediate 128, 2 layers, 4 heads (2 key/value), untied
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False}
ALL = None  # every linear layer gets a LoRA


def training(**kw) -> mp.Training:
    settings = dict(lora_r=4, targets=ALL, lora_dropout=0.0, compute_bytes=2, quantized=True,
                    optimizer="paged_adamw_8bit", device="cuda", attention="sdpa", lm_chunk=1024)
    return mp.Training(**{**settings, **kw})


# --- 1. the parts, by hand ----------------------------------------------------------------------------

def test_the_plan_chunks_the_output_layer_as_training_does():
    from infopo_cli.train.logps import CHUNK_TOKENS, CPU_CHUNK_TOKENS

    assert recomputation.training(TrainConfig(), "cuda", 2).lm_chunk == mp.LM_CHUNK == CHUNK_TOKENS
    assert recomputation.training(TrainConfig(), "cpu", 2).lm_chunk == mp.LM_CHUNK_CPU == CPU_CHUNK_TOKENS


def test_weights_lora_and_optimizer_of_a_tiny_config_by_hand():
    arch = mp.architecture(TINY)
    parts = {p.name: p.bytes for p in mp.static_parts(arch, training())}
    # per layer: q 64x64, k and v 64x32, o 64x64, gate and up 64x128, down 128x64
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    assert mp.NF4_BYTES == 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 absmax per 256 blocks
    assert parts["base weights, 4-bit NF4"] == round(linear * mp.NF4_BYTES)
    assert parts["embeddings and output layer, 16-bit"] == 2 * 300 * 64 * 2
    assert parts["norms and biases"] == (2 * 2 * 64 + 64) * 2
    # LoRA r=4: r x (in + out) per linear: q 128, k 96, v 96, o 128, gate 192, up 192, down 192 = 1024 per layer
    assert parts["LoRA weights, float32"] == parts["LoRA gradients, float32"] == 2 * 1024 * 4 * 4
    # every LoRA tensor here is under 4096 values: bitsandbytes keeps float32 states for those
    assert parts["optimizer: paged 8-bit AdamW"] == 8 * 2 * 1024 * 4


def test_8bit_optimizer_states_are_two_bytes_and_large_ones_are_paged():
    held, paged = mp.optimizer_bytes([1000, 50_000, 200_000], "paged_adamw_8bit")
    assert held == 8 * 1000 + (2 * 50_000 + 8 * math.ceil(50_000 / 256)) + 8 * math.ceil(200_000 / 256)
    assert paged == 2 * 200_000  # states of tensors >= 1e5 values live in unified memory, outside torch's allocator
    assert mp.optimizer_bytes([1000, 50_000], "adamw") == (8 * 51_000, 0)


def test_activations_of_a_layer_by_hand():
    """bf16 compute, LoRA on all seven linears, no dropout, per token: two RMSNorms keep their float32 input and 1/rms
    (2 x (4 x 64 + 4)); the LoRA layers' 16-bit input, once for q/k/v, once for gate/up, once for down (2 x (64 + 64 +
    128); o reads sdpa's output, which sdpa saves) and each rank-4 middle, 16-bit too (7 x 4 x 2); sdpa's query, keys
    and values repeated to 4 heads and output (4 x 2 x 64) and log-sum-exp (4 x 4); the MLP's gate, activation and up
    (3 x 2 x 128)."""
    arch, layout = mp.architecture(TINY), mp.Layout(2, 100, 120, True)
    expected = 2 * (4 * 64 + 4) + 2 * (64 + 64 + 128) + 7 * 4 * 2 + 4 * 2 * 64 + 4 * 4 + 3 * 2 * 128
    assert mp.layer_saved_per_token(arch, training(), layout) == expected == 2384
    # dropout: each LoRA layer its own dropped 16-bit copy and a bool mask (CUDA), instead of the shared inputs
    dropped = mp.layer_saved_per_token(arch, training(lora_dropout=0.05), layout)
    assert dropped - expected == (6 * 64 + 128) * (2 + 1) - 2 * (64 + 64 + 128)
    # eager attention: the (T x T) scores, float32 softmax and its bf16 copy, instead of the output and log-sum-exp;
    # o's input is then its own tensor, saved for o's LoRA
    eager = mp.layer_saved_per_token(arch, training(attention="eager"), layout)
    assert eager - expected == 4 * 100 * (4 + 2) - (2 * 64 + 4 * 4) + 2 * 64


def test_layouts_two_rows_per_pair_or_one_shared_row_padded_to_a_multiple_of_16():
    assert mp.Batch(2, 1024, 256, shared=False).layout() == mp.Layout(4, 1024, 4 * 768, False)
    assert mp.Batch(2, 1024, 256, shared=True).layout() == mp.Layout(2, 256 + 2 * 768, 4 * 768, True)
    # rows as collate pads them: 100 and 30 + 2 x 70 = 170 tokens are 112 and 176 positions, the scored ones as they are
    assert mp.Batch(1, 100, 30, shared=False).layout() == mp.Layout(2, 112, 2 * 70, False)
    assert mp.Batch(1, 100, 30, shared=True).layout() == mp.Layout(1, 176, 2 * 70, True)
    pairs = [(10, 5, 7), (50, 40, 2), (3, 1, 1)]
    assert mp.worst_layout(pairs, 2, shared=False) == mp.Layout(4, 96, 40 + 2 + 5 + 7, False)  # 90 tokens
    assert mp.worst_layout(pairs, 2, shared=True) == mp.Layout(2, 96, 54, True)  # 92 tokens
    assert mp.worst_layout([(8, 4, 4)], 1, shared=True).width == 16  # a whole multiple stays
    batch = collate([TokenizedPair(*([5] * n for n in lengths)) for lengths in pairs[:2]], 0, True)
    assert batch.input_ids.shape == (2, mp.worst_layout(pairs, 2, shared=True).width)  # what collate makes


def test_checkpointing_keeps_only_layer_inputs_and_the_peak_falls():
    arch, run, layout = mp.architecture(TINY), training(), mp.Batch(4, 512, 128, True).layout()
    none, half, every = (mp.plan(arch, run, layout, n) for n in (0, 1, 2))
    # (the last layer recomputed right at the backward's start holds as much as keeping it whole: no monotony there)
    assert none.allocated >= half.allocated and none.allocated > every.allocated
    inputs = next(p.bytes for p in every.dynamic if p.name.startswith("saved inputs"))
    assert inputs == 2 * 2 * 64 * layout.tokens  # 16-bit hidden states of both layers
    assert every.card == every.allocated + every.slack + mp.CUDA_CONTEXT
    offloaded = mp.plan(arch, run, layout, 2, offload=True)
    assert offloaded.host_bytes == inputs and offloaded.allocated < every.allocated


def test_the_8b_preset_at_the_measured_settings_is_within_ten_percent_of_the_gpu_measurement():
    """The one GPU measurement (issue 17): 8B Llama-3 shape, batch 2 pairs of 256 + 768 tokens in two rows each,
    every layer recomputed, LoRA r16 on all seven linears, dropout 0.05, paged 8-bit AdamW: 8.4 GiB peak allocated."""
    arch = mp.architecture(architectures.PUBLISHED["meta-llama/Meta-Llama-3-8B-Instruct"])
    run = training(lora_r=16, lora_dropout=0.05)
    predicted = mp.plan(arch, run, mp.Batch(2, 1024, 256, shared=False).layout(), arch.layers).allocated / mp.GIB
    assert abs(predicted - 8.4) / 8.4 < 0.10, predicted


def test_auto_keeps_as_many_layers_whole_as_fit():
    arch, run, layout = mp.architecture(TINY), training(), mp.Batch(4, 512, 128, True).layout()
    whole, every = mp.plan(arch, run, layout, 0), mp.plan(arch, run, layout, 2)
    assert mp.choose(arch, run, layout, "auto", whole.needed).plan.checkpointed == 0
    assert mp.choose(arch, run, layout, "auto", whole.needed - 1).plan.checkpointed >= 1
    least = min(mp.plan(arch, run, layout, n).needed for n in range(3))  # (recomputing the last layer too can cost more)
    tight = mp.choose(arch, run, layout, "auto", least - 1)
    assert tight.plan.checkpointed == 2 and not tight.fits  # nothing fits: every layer recomputes
    assert mp.choose(arch, run, layout, "off", 1).plan.checkpointed == 0  # as set, fitting or not
    assert mp.largest_batch(arch, run, mp.Batch(4, 512, 128, True), True, every.needed) >= 4
    assert mp.longest_length(arch, run, mp.Batch(4, 512, 128, True), True, every.needed) >= 512


def test_the_margin_is_a_tenth_of_the_card_and_at_least_one_and_a_half_gib_unless_given():
    assert mp.margin(24 * mp.GIB) == round(2.4 * mp.GIB) and mp.margin(16 * mp.GIB) == round(1.6 * mp.GIB)
    assert mp.margin(15 * mp.GIB) == mp.margin(8 * mp.GIB) == 1.5 * mp.GIB  # 10% would be 1.5 GiB or less
    assert mp.margin(80 * mp.GIB) == 8 * mp.GIB
    assert mp.margin(24 * mp.GIB, 0.5) == mp.GIB // 2 and mp.margin(24 * mp.GIB, 0.0) == 0


def test_what_a_cuda_process_holds_besides_is_in_the_8b_plan_each_part_named():
    arch = mp.architecture(architectures.PUBLISHED["meta-llama/Meta-Llama-3-8B-Instruct"])
    layout = mp.Batch(2, 1024, 512, shared=True).layout()
    p = mp.plan(arch, training(lora_r=16), layout, 16)
    static, dynamic = {q.name: q.bytes for q in p.static}, {q.name: q.bytes for q in p.dynamic}
    # torch's cuBLAS workspace (32 MiB on Hopper) and cuBLASLt's (1 MiB), for the forward's handle and autograd's
    assert static["cuBLAS and cuBLASLt workspaces"] == 2 * (32 + 1) * 2**20
    assert dynamic["attention mask"] == 2 * layout.rows * 1536 ** 2  # (R, 1, T, T) in bf16, counted once
    assert p.slack == round(0.10 * sum(dynamic.values())) > 0 and p.context == mp.CUDA_CONTEXT > 0
    assert p.card == p.allocated + p.slack + p.context
    cpu = mp.plan(arch, training(lora_r=16, device="cpu"), layout, 16)
    assert "cuBLAS and cuBLASLt workspaces" not in {q.name for q in cpu.static} and cpu.context == 0
    # two rows per pair: sdpa's boolean mask, a byte a position pair
    plain = mp.Batch(2, 1000, 512, shared=False).layout()
    assert plain.width == 1008 and mp._mask(training(), plain) == 4 * 1008 ** 2


def test_flex_and_flash_attention_hold_no_dense_mask():
    arch = mp.architecture(TINY)
    shared, plain = mp.Batch(2, 1000, 512, shared=True).layout(), mp.Batch(2, 1000, 512, shared=False).layout()
    assert mp._mask(training(attention="sdpa"), shared) == 2 * 2 * 1488 ** 2 and mp._mask(training(), plain) > 0
    for attention, layout in (("flex_attention", shared), ("flex_attention", plain), ("flash_attention_2", plain),
                              ("flash_attention_3", plain)):
        run = training(attention=attention)
        part = mp._mask_part(run, layout)
        assert mp._mask(run, layout) == part.bytes == 0
        assert ("a block mask" if attention == "flex_attention" else "none: flash-attention") in part.note
        with_mask = mp.plan(arch, training(), layout, 0)
        without = mp.plan(arch, run, layout, 0)
        assert {p.name: p.bytes for p in without.dynamic}.get("attention mask", 0) == 0
        assert with_mask.moments != without.moments
    # flash-attention takes no shared prompt: the plan lays a micro-batch out in two rows
    flash = TrainConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", attn_implementation="flash_attention_2",
                        max_length=512)
    assert not recomputation.for_settings(flash, "cuda", 2, None).batch.shared


def test_auto_in_infopo_plan_keeps_the_margin_free_and_says_how_much_it_keeps(monkeypatch):
    from io import StringIO

    from rich.console import Console

    from infopo_cli.presets import load_preset
    from infopo_cli.reporting import memory_table

    chosen = []
    real = mp.choose
    monkeypatch.setattr(mp, "choose", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])

    def plan(margin: float | None) -> tuple[str, mp.Plan]:
        out, chosen[:] = StringIO(), []
        cfg = merge(load_preset("llama3-8b-qlora"), {"gpu_mem_margin": margin} if margin is not None else {}, "test")
        memory_table.print_plan(Console(file=out, width=300), cfg, None, 24.0)
        return out.getvalue(), chosen[0].plan

    text, kept = plan(None)
    assert kept.card + round(2.4 * mp.GIB) <= 24 * mp.GIB  # auto recomputes enough to leave 2.4 GiB free
    assert f"fits in 24 GiB with {(24 * mp.GIB - kept.card) / mp.GIB:.2f} GiB margin" in text and "2.40" in text
    _, none = plan(0.0)
    assert none.checkpointed < kept.checkpointed and none.card <= 24 * mp.GIB
    _, wide = plan(6.0)
    assert wide.checkpointed > kept.checkpointed and wide.card + 6 * mp.GIB <= 24 * mp.GIB


def test_the_verdict_tells_a_fit_within_the_margin_from_one_outside_it():
    from infopo_cli.reporting.memory_table import verdict

    card, margin = 24 * mp.GIB, round(2.4 * mp.GIB)
    assert "fits in 24 GiB with 3.00 GiB margin" in verdict(24, card, 21 * mp.GIB, margin)
    tight = verdict(24, card, 23 * mp.GIB, margin)
    assert "with only 1.00 GiB margin" in tight and "less than the 2.40 GiB margin" in tight
    assert "does not fit in 24 GiB" in verdict(24, card, 25 * mp.GIB, margin)


# --- 2. against what autograd holds on CPU ------------------------------------------------------------

class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive, and their peak: what a step
    allocates on top of the weights (CPU has no allocator statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self.live:  # a view or an in-place result: nothing new
                continue
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


def _tiny_lora(folder: Path, dtype: str, recompute: recomputation.Recompute, dropout: float = 0.0,
               attention: str = "auto"):
    from infopo_cli.model import stack
    from infopo_cli.model.precision import choose

    cfg = TrainConfig(dtype=dtype, lora_r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                      attn_implementation=attention)
    base = stack.load_base(str(folder), cfg, choose(dtype))
    model = stack.attach_lora(base, cfg, recompute)
    model.train()
    return model, base


def _batch(shared: bool):
    pairs = [TokenizedPair(list(range(5, 21)), list(range(30, 78)), list(range(80, 125))) for _ in range(2)]
    batch = collate(pairs, 0, shared)
    return batch, mp.Layout(batch.input_ids.shape[0], batch.input_ids.shape[1], batch.targets.tokens.numel(), shared)


def _cpu_run(dtype: str, dropout: float = 0.0, attention: str = "auto") -> mp.Training:
    """The plan's settings for a CPU run (attention as `auto` resolves it there: matmul for bf16, model/attention.py)."""
    bf16 = dtype == "bf16"
    kernel = attention if attention != "auto" else ("matmul" if bf16 else "sdpa")
    return training(compute_bytes=2 if bf16 else 4, lora_dropout=dropout, device="cpu", optimizer="adamw", attention=kernel)


@pytest.mark.parametrize("dtype, dropout, shared, attention", [
    ("bf16", 0.0, False, "auto"), ("bf16", 0.0, True, "auto"), ("fp32", 0.1, True, "auto"),
    ("bf16", 0.0, False, "sdpa"), ("bf16", 0.0, True, "sdpa")])
def test_a_layers_saved_activations_are_what_autograd_saves(tiny_model, dtype, dropout, shared, attention):
    """Every tensor autograd saves in the last decoder layer (the first one's input needs no gradient), counted once
    per storage, parameters and what earlier layers saved too (rotary cos/sin, the mask) excluded: exactly the plan's
    layer."""
    from infopo_cli.train.logps import batch_logps

    model, base = _tiny_lora(tiny_model, dtype, recomputation.Recompute(0), dropout, attention)
    batch, layout = _batch(shared)
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    inside, saved = [False], {}
    last = recomputation.decoder_layers(base)[-1]
    last.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    last.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if not inside[0]:
            known.add(key)
        elif key not in known:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        batch_logps(model, batch)
    arch = mp.architecture(TINY | {"vocab_size": base.config.vocab_size})
    assert sum(saved.values()) == mp.layer_bytes(arch, _cpu_run(dtype, dropout, attention), layout)


@pytest.mark.parametrize("recomputed", [0, 2])
def test_a_steps_peak_on_cpu_is_the_plans(tiny_model, recomputed):
    """The peak of what a forward and backward allocate on top of the weights, measured, against the plan's peak less
    its weights, LoRA and optimizer (its LoRA gradients kept: they exist from the second micro-batch on). The plan
    errs on the safe side."""
    from infopo_cli.train.logps import batch_logps

    from infopo_cli.train import output_layer

    model, base = _tiny_lora(tiny_model, "bf16", recomputation.Recompute(recomputed))
    batch, layout = _batch(shared=True)
    output_layer._held.clear()  # as in a run's first step: its kept buffers are made within it
    mode = LiveBytes()
    with mode:
        batch_logps(model, batch).sums.sum().backward()
    arch = mp.architecture(TINY | {"vocab_size": base.config.vocab_size})
    plan = mp.plan(arch, _cpu_run("bf16"), layout, recomputed)
    gradients = next(p.bytes for p in plan.static if p.name.startswith("LoRA gradients"))
    predicted = plan.allocated - sum(p.bytes for p in plan.static) + gradients
    assert 0.95 < predicted / mode.peak < 1.3, (predicted, mode.peak, plan.moment, plan.moments)


# --- 3. checkpointing layer by layer ------------------------------------------------------------------

def _four_layers(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-4-layers")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    return folder


def test_partial_checkpointing_gives_the_same_gradients_and_recomputes_only_the_chosen_layers(tmp_path_factory):
    from infopo_cli.train.logps import batch_logps

    folder, (batch, _) = _four_layers(tmp_path_factory), _batch(shared=True)

    def step(layers: int | None):
        torch.manual_seed(0)  # the same LoRA initialisation
        model, base = _tiny_lora(folder, "fp32", recomputation.Recompute(layers), dropout=0.1)
        calls = []
        for i, layer in enumerate(recomputation.decoder_layers(base)):
            # module hooks do not run in a recompute; a layer's MLP forward itself does
            real = layer.mlp.forward
            layer.mlp.forward = lambda *a, real=real, i=i, **k: calls.append(i) or real(*a, **k)
        torch.manual_seed(1)  # the same dropout masks (a recompute replays them)
        batch_logps(model, batch).sums.sum().backward()
        flags = [layer.gradient_checkpointing for layer in recomputation.decoder_layers(base)]
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, sorted(calls), flags

    whole, calls, flags = step(0)
    assert calls == [0, 1, 2, 3] and flags == [False] * 4
    for layers, recomputed in ((2, [0, 1]), (None, [0, 1, 2, 3])):
        grads, calls, flags = step(layers)
        assert all(torch.equal(grads[name], whole[name]) for name in whole), layers
        assert calls == sorted([0, 1, 2, 3] + recomputed)  # the first `layers` run twice, the last ones once
        assert flags == [i in recomputed for i in range(4)]


def _pairs(n: int, prompt: int, response: int) -> list[TokenizedPair]:
    return [TokenizedPair([5] * prompt, [6] * response, [7] * response) for _ in range(n)]


def test_auto_picks_off_when_memory_is_ample_on_when_not_and_refuses_what_cannot_fit(tiny_model):
    cfg = TrainConfig(model=str(tiny_model), batch_size=4, eval_batch_size=4, lora_r=4, max_length=512, gpu_mem_margin=0.0)
    train = _pairs(8, 64, 400)
    arch = architectures.find_architecture(str(tiny_model))[0]
    run = recomputation.training(cfg, "cuda", 2)
    layout = mp.worst_layout([(64, 400, 400)] * 8, 4, True)
    need = {n: mp.plan(arch, run, layout, n, eval_layout=layout).needed for n in (0, 2)}

    def decide(free: int, device: str = "cuda", mode: str = "auto") -> recomputation.Recompute:
        return recomputation.for_run(merge(cfg, {"gradient_checkpointing": mode}, "test"), str(tiny_model), train, [],
                                     device, 2, share_prompt=True, free=free, card=24 * mp.GIB)

    ample = decide(10 * need[0])
    assert ample.layers == 0 and ample.message.startswith("gradient checkpointing auto: off, no layer recomputes (the run needs")
    short = decide(need[0] - 1)
    assert short.layers in (1, 2) and "(without recomputation the run needs" in short.message
    with pytest.raises(ConfigError) as refused:
        decide(need[2] - 1)
    message = str(refused.value)
    assert "\n" not in message and "even recomputing every layer" in message and "try --" in message
    # on a CPU nothing is refused: every layer recomputes and the system may swap; offload copies nothing
    assert decide(need[2] // 2, device="cpu").layers == 2
    offload = decide(10 * need[0], device="cpu", mode="offload")
    assert offload.layers is None and "nothing is copied" in offload.message
    assert decide(need[0] - 1, mode="off").message.count("warning: the plan predicts") == 1


def test_auto_on_a_gpu_keeps_its_margin_and_refuses_only_what_does_not_fit_without_it(tiny_model):
    cfg = TrainConfig(model=str(tiny_model), batch_size=4, eval_batch_size=4, lora_r=4, max_length=512)
    train = _pairs(8, 64, 400)
    arch = architectures.find_architecture(str(tiny_model))[0]
    layout = mp.worst_layout([(64, 400, 400)] * 8, 4, True)
    need = {n: mp.plan(arch, recomputation.training(cfg, "cuda", 2), layout, n, eval_layout=layout).needed for n in (0, 2)}
    margin = mp.margin(16 * mp.GIB)  # 1.6 GiB

    def decide(free: int, **settings) -> recomputation.Recompute:
        return recomputation.for_run(merge(cfg, settings, "test"), str(tiny_model), train, [], "cuda", 2,
                                     share_prompt=True, free=free, card=16 * mp.GIB)

    assert decide(need[0] + margin).layers == 0
    assert "once a 1.60 GiB margin is kept" in decide(need[0] + margin).message
    assert decide(need[0] + margin - 1).layers in (1, 2)  # fits, but not with the margin: recompute
    inside = decide(need[2])  # every layer recomputed fits only inside the margin: tried, not refused
    assert inside.layers == 2 and "even so the run needs" in inside.message
    with pytest.raises(ConfigError, match="even recomputing every layer"):
        decide(need[2] - 1)
    assert decide(need[0], gpu_mem_margin=0.0).layers == 0  # --gpu-mem-margin 0: the plan alone decides
    assert decide(need[0] + mp.GIB, gpu_mem_margin=1.0).layers == 0
    assert decide(need[0] + mp.GIB - 1, gpu_mem_margin=1.0).layers in (1, 2)
    # free memory under the margin: nothing usable, not a negative amount
    assert "more than the 0.00 GiB free GPU memory once a 1.60 GiB margin is kept" in inside.message


def test_a_cpu_run_holds_its_4bit_base_dequantised_where_that_fits_without_recomputing_more(tiny_model):
    """model/recompute.py: on a CPU the de-quantised copy (the linear weights in the compute dtype) is planned as a
    part of its own and taken only where it fits the free RAM with no more layers recomputed; never on CUDA, nor for
    an unquantised base."""
    cfg = TrainConfig(model=str(tiny_model), batch_size=4, eval_batch_size=4, lora_r=4, max_length=512)
    train = _pairs(8, 64, 400)
    arch = architectures.find_architecture(str(tiny_model))[0]
    layout = mp.worst_layout([(64, 400, 400)] * 8, 4, True)
    run = recomputation.training(cfg, "cpu", 2)
    need = {held: mp.plan(arch, replace(run, dequantised=held), layout, 0, eval_layout=layout).needed
            for held in (False, True)}
    copy = arch.linear_params * 2
    parts = dict((p.name, p.bytes) for p in mp.static_parts(arch, replace(run, dequantised=True)))
    assert parts["base weights de-quantised, 16-bit"] == copy and "base weights de-quantised, 16-bit" not in dict(
        (p.name, p.bytes) for p in mp.static_parts(arch, run))
    # the copy's bytes, less the one weight per layer the per-call path de-quantises at a time
    assert copy - 2 * max(lin.fan_in * lin.fan_out for lin in arch.linears) <= need[True] - need[False] <= copy

    def decide(free: int, device: str = "cpu", **settings) -> recomputation.Recompute:
        return recomputation.for_run(merge(cfg, settings, "test"), str(tiny_model), train, [], device, 2,
                                     share_prompt=True, free=free, card=24 * mp.GIB)

    room = need[True] + recomputation.CPU_HEADROOM  # the copy only saves time: it leaves some RAM to spare
    assert decide(room).dequantised == copy and decide(room).layers == 0
    short = decide(room - 1)  # the copy would cost recomputation or the spare RAM: weights de-quantise at each call
    assert short.dequantised == 0 and short.layers == 0
    assert decide(room, gradient_checkpointing="on").dequantised == copy  # fits beside every layer recomputing
    assert decide(10 * room, device="cuda").dequantised == 0
    assert decide(10 * room, load_in_4bit=False).dequantised == 0
    assert decide(10 * room, nproc=2).dequantised == 0  # processes on one machine each measured the same free RAM
    choice = mp.choose(arch, run, layout, "auto", None, eval_layout=layout)
    assert recomputation._dequantised(arch, run, layout, "auto", None, layout, choice, 1) == (run, choice)  # RAM unknown


def test_training_with_the_base_held_dequantised_gives_the_same_gradients(tiny_model):
    """The copy holds the weights bitsandbytes de-quantises at each call: the same loss and LoRA gradients."""
    from infopo_cli.losses.types import Needs
    from infopo_cli.model import stack
    from infopo_cli.model.precision import Precision
    from infopo_cli.train.logps import pair_logps

    cfg = TrainConfig(dtype="fp32", lora_r=4, lora_alpha=8)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, Precision("cpu", torch.float32, "test")), cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    b = collate([TokenizedPair([5, 6, 7], [8, 9, 10], [11, 12]), TokenizedPair([13, 14], [15], [16, 17, 18])], 0)

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logps = pair_logps(model, b, Needs())
        (logps.policy_chosen.sum() - 2 * logps.policy_rejected.sum()).backward()
        return logps.policy_chosen.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    per_call = grads()
    with stack.dequantised(model):
        held = grads()
    torch.testing.assert_close(held[0], per_call[0], rtol=1e-5, atol=1e-5)
    assert len(held[1]) == 28
    for ours, theirs in zip(held[1], per_call[1], strict=True):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["on", "off", "offload"])
def test_a_given_setting_keeps_no_margin_it_is_measured_against_all_the_free_memory(tiny_model, mode):
    cfg = TrainConfig(model=str(tiny_model), batch_size=4, eval_batch_size=4, lora_r=4, max_length=512,
                      gradient_checkpointing=mode)
    memory = recomputation.budget(cfg, "cuda", free=mp.GIB, card=16 * mp.GIB)
    assert (memory.free, memory.margin, memory.usable, memory.where) == (mp.GIB, 0, mp.GIB, "free GPU memory")
    auto = recomputation.budget(merge(cfg, {"gradient_checkpointing": "auto"}, "test"), "cuda", free=mp.GIB,
                                card=16 * mp.GIB)
    assert (auto.margin, auto.usable) == (mp.margin(16 * mp.GIB), 0)  # 1.6 GiB kept of 1 GiB free: none usable
    layout = mp.worst_layout([(64, 400, 400)] * 8, 4, True)
    arch = architectures.find_architecture(str(tiny_model))[0]
    needed = mp.choose(arch, recomputation.training(cfg, "cuda", 2), layout, mode, None, eval_layout=layout).plan.needed
    # it fits, but not with auto's margin: no warning (a margin of 1.6 GiB would have made one)
    fits = recomputation.for_run(cfg, str(tiny_model), _pairs(8, 64, 400), [], "cuda", 2, share_prompt=True,
                                 free=needed, card=16 * mp.GIB)
    assert "warning" not in fits.message and f"of {mp.gib(needed)} GiB free GPU memory)" in fits.message


# --- 4. the setting ---------------------------------------------------------------------------------

def test_true_and_false_mean_on_and_off_in_files_flags_and_old_run_configs(tmp_path):
    from infopo_cli.cli import _fill_optional_values
    from infopo_cli.presets import load_preset
    from infopo_cli.train.resume import resumed_config

    assert TrainConfig().gradient_checkpointing == "auto"
    assert TrainConfig(gradient_checkpointing=False).gradient_checkpointing == "off"
    for given, meant in ((True, "on"), (False, "off"), ("true", "on"), ("OFF", "off"), ("offload", "offload")):
        assert merge(TrainConfig(), {"gradient_checkpointing": given}, "test").gradient_checkpointing == meant
    with pytest.raises(ConfigError, match="gradient_checkpointing must be one of auto, on, off, offload"):
        merge(TrainConfig(), {"gradient_checkpointing": "sometimes"}, "test")
    assert _fill_optional_values(["train", "--gradient-checkpointing", "--lr", "1"]) == [
        "train", "--gradient-checkpointing", "on", "--lr", "1"]
    assert _fill_optional_values(["train", "--no-gradient-checkpointing"]) == ["train", "--gradient-checkpointing", "off"]
    # a run folder written before auto existed resumes, and may change how much it recomputes
    (tmp_path / "config.toml").write_text('model = "x"\ngradient_checkpointing = true\n')
    saved = load_preset(str(tmp_path / "config.toml"))
    assert saved.gradient_checkpointing == "on"
    assert resumed_config(saved, {"gradient_checkpointing": "on"}, tmp_path).gradient_checkpointing == "on"
    assert resumed_config(saved, {"gradient_checkpointing": "auto"}, tmp_path).gradient_checkpointing == "auto"


def test_gpu_mem_margin_is_a_setting_that_resume_may_change_and_a_negative_one_is_one_line(tmp_path):
    from infopo_cli.config import to_toml
    from infopo_cli.presets import load_preset
    from infopo_cli.train.resume import resumed_config

    (tmp_path / "config.toml").write_text(to_toml({**TrainConfig(gpu_mem_margin=2.0).to_dict(), "model": "x"}))
    saved = load_preset(str(tmp_path / "config.toml"))
    assert saved.gpu_mem_margin == 2.0 and TrainConfig().gpu_mem_margin is None
    assert resumed_config(saved, {"gpu_mem_margin": 3.0}, tmp_path).gpu_mem_margin == 3.0
    with pytest.raises(ConfigError, match=r"^command line: gpu_mem_margin must be >= 0 \(got -1.0\)$"):
        merge(TrainConfig(), {"gpu_mem_margin": -1.0}, "command line")
    out = infopo("train", "--gpu-mem-margin", "-1", "--dry-run")
    assert out.returncode == 2 and out.stderr.strip() == "error: command line: gpu_mem_margin must be >= 0 (got -1.0)"


@pytest.mark.parametrize("given, expected", [
    ({}, "expandable_segments:True"),  # both names: torch >= 2.9 reads the first, older ones the second
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, None),  # the user's own setting, any value, is kept
    ({"PYTORCH_ALLOC_CONF": ""}, None)])
def test_the_cuda_allocator_grows_expandable_segments_unless_the_user_configured_it(monkeypatch, given, expected):
    from infopo_cli import cli

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # (so that what main() sets is undone after the test)
        monkeypatch.delenv(name)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["infopo", "--version"])
    cli.main()  # sets it first thing, before any command imports torch
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        assert os.environ.get(name) == (expected if expected is not None else given.get(name)), name


@pytest.mark.parametrize("command, imports_torch", [(["train", "--dry-run"], True),
                                                     (["plan", "--preset", "llama3-8b-qlora"], False),
                                                     (["presets", "show", "llama3-8b-qlora"], False)])
def test_a_command_imports_torch_with_the_allocator_setting_already_made(tmp_path, command, imports_torch):
    """In the `infopo` process itself: the variable is there when torch is first imported; `infopo plan`, arithmetic
    only, and `presets show` import no torch at all (their preset's loss settings are checked without it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    probe = ("import os, sys, builtins; real = builtins.__import__\n"
             "def spy(name, *a, **k):\n"
             "    if name == 'torch' and 'torch' not in sys.modules:\n"
             "        print('torch sees', os.environ.get('PYTORCH_ALLOC_CONF'), os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = spy\n"
             f"sys.argv = ['infopo', *{command!r}]\n"
             "from infopo_cli.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    seen = [line for line in out.stdout.splitlines() if line.startswith("torch sees")]
    assert seen == (["torch sees expandable_segments:True expandable_segments:True"] if imports_torch else [])


@pytest.mark.parametrize("hip, expected", [("hip: Optional[str] = None", "expandable_segments:True"),
                                           ("hip = None", "expandable_segments:True"),
                                           ("hip: Optional[str] = '6.2.41133-dd7f95766'", None),  # ROCm: unsupported
                                           (None, None)])  # no torch installed
def test_expandable_segments_are_not_asked_of_a_rocm_build_read_off_torch_without_importing_it(
        monkeypatch, tmp_path, hip, expected):
    import importlib.machinery
    import importlib.util

    from infopo_cli import cli

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('never imported')\n")
    if hip is not None:
        (tmp_path / "torch" / "version.py").write_text(
            f"from typing import Optional\n__version__ = '2.5.1'\ncuda: Optional[str] = None\n{hip}\n")
    spec = importlib.machinery.ModuleSpec("torch", None, origin=str(tmp_path / "torch" / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if hip is not None else None)
    monkeypatch.setattr(sys, "platform", "linux")
    cli.expandable_segments_by_default()
    assert os.environ.get("PYTORCH_ALLOC_CONF") == os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected


# --- 5. infopo plan -----------------------------------------------------------------------------------

def test_plan_of_the_8b_preset_runs_without_a_gpu_or_a_download(tmp_path):
    out = infopo("plan", "--preset", "llama3-8b-qlora",
                 env={"HF_HOME": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "the published config of meta-llama/Meta-Llama-3-8B-Instruct" in text
    for part in ("base weights, 4-bit NF4", "LoRA gradients", "paged 8-bit AdamW", "cuBLAS and cuBLASLt workspaces",
                 "attention mask", "allocator rounding and fragmentation", "CUDA context", "peak allocated",
                 "margin kept free", "fits in 24 GiB with", "largest --batch-size", "longest --max-length"):
        assert part in text, part
    assert not (tmp_path / "empty-hub").exists() or not any((tmp_path / "empty-hub").rglob("*.json"))


def test_plan_reads_a_local_folder_and_says_what_to_change_when_it_does_not_fit(tiny_model):
    out = infopo("plan", "--model", str(tiny_model), "--gpu-mem", "0.55", "--gpu-mem-margin", "0", "--batch-size", "64",
                 "--max-length", "2048", "--gradient-checkpointing", "off")
    assert out.returncode == 0, out.stderr
    assert str(tiny_model / "config.json") in out.stdout.replace("\n", "")
    assert "does not fit in 0.55 GiB" in out.stdout and "what to change:" in out.stdout


def test_plan_reads_a_gguf_as_train_takes_it_and_refuses_a_file_that_is_no_model(tiny_model, tmp_path):
    import json

    from infopo_cli.errors import ModelError
    from infopo_cli.export.gguf import write_gguf
    from infopo_cli.model import stack
    from infopo_cli.model.precision import Precision

    cfg = TrainConfig(dtype="fp32", load_in_4bit=False)
    write_gguf(stack.load_base(str(tiny_model), cfg, Precision("cpu", torch.float32, "test")), stack.load_tokenizer(str(tiny_model)),
               tmp_path / "tiny.gguf", "f32", "tiny")
    config, where = architectures.find_config(str(tmp_path / "tiny.gguf"))  # not converted yet: its metadata
    want = json.loads((tiny_model / "config.json").read_text())
    assert where.endswith("(its metadata)") and all(config[k] == want[k] for k in (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"))
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    with pytest.raises(ModelError, match="a file, not a model"):
        architectures.find_config(str(tmp_path / "pairs.jsonl"))


def test_plan_of_a_given_setting_keeps_no_margin_and_refuses_only_a_card_under_the_cuda_context():
    from io import StringIO

    from rich.console import Console

    from infopo_cli.presets import load_preset
    from infopo_cli.reporting.memory_table import print_plan

    def plan(gpu_mem: float, mode: str) -> str:
        out = StringIO()
        print_plan(Console(file=out, width=400), merge(load_preset("smollm2-135m"), {"gradient_checkpointing": mode}, "test"),
                   None, gpu_mem)
        return " ".join(out.getvalue().replace("│", " ").split())  # the table's rows as plain words

    on = plan(2.0, "on")  # 2 GiB: the 1.5 GiB margin and the 0.5 GiB context would leave nothing
    assert "once its CUDA context is made)" in on and "margin kept free 0.00 auto only (it would keep 1.50 GiB" in on
    assert "fits in 2 GiB with 0.50 GiB to spare" in on
    auto = plan(2.0, "auto")
    assert "a 1.50 GiB margin are kept" in auto and "margin kept free 1.50 max(10% of the card" in auto
    assert "-0." not in auto + on  # no negative amount anywhere
    for gpu_mem in (0.5, 0.1):
        with pytest.raises(ConfigError, match=r"^--gpu-mem must be more than the CUDA context's 0.5 GiB \(got"):
            plan(gpu_mem, "on")


def test_plan_errors_are_one_line(tmp_path):
    out = infopo("plan", "--model", "nobody/no-such-model", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    lines = [line for line in out.stderr.splitlines() if "kernels" not in line]
    assert out.returncode != 0 and len(lines) == 1 and "no config.json for 'nobody/no-such-model'" in lines[0]
    out = infopo("plan", "--gradient-checkpointing", "sometimes")
    assert out.returncode == 2 and "gradient_checkpointing must be one of" in out.stderr
    out = infopo("plan", "--gpu-mem", "inf")
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: --gpu-mem must be the GPU's memory in GiB, a finite number (got inf)")
