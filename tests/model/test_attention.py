"""`matmul` attention (model/attention.py) against torch's sdpa: values and gradients, every mask form, grouped
heads, a KV cache; the model stack picks it for 16-bit compute on a CPU and nowhere else."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from infopo_cli.model import attention
from infopo_cli.model.attention import _MatmulAttention, matmul_attention_forward

attention.register()


class _Module(torch.nn.Module):
    num_key_value_groups, is_causal = 2, True


def _sdpa(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _inputs(dtype, q_len=7, k_len=7, rows=3):
    torch.manual_seed(0)
    q = torch.randn(rows, 4, q_len, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(rows, 2, k_len, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(rows, 2, k_len, 8, dtype=dtype, requires_grad=True)
    return q, k, v


def _values_and_grads(fn, q, k, v, mask, weights):
    out = fn(q, k, v, mask)
    (out.float() * weights).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return [out.detach()] + grads


def _ours(q, k, v, mask):
    return matmul_attention_forward(_Module(), q, k, v, mask)[0]


@pytest.mark.parametrize("query_block", [64, 2])  # 64: one block of 7 queries; 2: three blocks, each its own keys
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("form", ["bool", "additive", "none", "per-row-blocks"])
@pytest.mark.parametrize("by_sdpa", [False, True])  # the forward of a CPU without AMX, and of one with it
def test_values_and_gradients_are_sdpas(dtype, tol, form, query_block, by_sdpa, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", query_block)
    monkeypatch.setattr(attention, "forward_by_sdpa", lambda: by_sdpa)
    q, k, v = _inputs(dtype)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    allowed[5:, 2:4] = False  # a shared prompt's pattern: later queries skip a block of keys
    allowed = allowed.expand(3, 1, 7, 7).clone()
    allowed[2, :, 3:, :] = torch.eye(7, dtype=torch.bool)[3:]  # a row of padding that sees only itself
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    mask = {"bool": allowed, "additive": additive, "none": None, "per-row-blocks": additive}[form]
    reference_mask = allowed if form != "none" else torch.ones(7, 7, dtype=torch.bool).tril()
    if form == "per-row-blocks":
        monkeypatch.setattr(attention, "SCORES_PER_CALL", 4 * 7 * 7)  # one row at a time
    weights = torch.randn(3, 7, 4, 8)
    ours = _values_and_grads(_ours, q, k, v, mask, weights)
    want = _values_and_grads(lambda *a: _sdpa(*a[:3], reference_mask), q, k, v, None, weights)
    for got, ref in zip(ours, want, strict=True):
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_query_blocks_stop_at_the_last_key_any_of_their_queries_sees():
    from infopo_cli.model.attention import _blocks

    causal = torch.zeros(1, 1, 256, 256).masked_fill(~torch.ones(256, 256, dtype=torch.bool).tril(), float("-inf"))
    assert _blocks(causal, 256, 256) == [(0, 64, 64), (64, 128, 128), (128, 192, 192), (192, 256, 256)]
    padded = torch.full((2, 1, 256, 256), torch.finfo(torch.float32).min)
    padded[0, :, :, :100] = 0  # row 0 sees 100 keys, row 1 only 30: the blocks stop at 100 however late their queries
    padded[1, :, :, :30] = 0
    assert [end for _, _, end in _blocks(padded, 256, 256)] == [100] * 4
    assert _blocks(causal[..., :100, :], 100, 256) == [(0, 100, 256)]  # too few queries to split: one block
    assert _blocks(None, 256, 256) == [(0, 256, 256)]


def test_query_blocks_of_a_long_shared_prompt_row_equal_one_block(monkeypatch):
    """Real lengths (3 rows of 200 positions, 4 blocks): the blocked products against the same kernel in one block."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, h, 200, 16, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    allowed = torch.ones(200, 200, dtype=torch.bool).tril().expand(3, 1, 200, 200).clone()
    allowed[:, :, 120:, 40:110] = False  # the rejected answer skips the chosen one
    allowed[1, :, 150:, :] = torch.eye(200, dtype=torch.bool)[150:]  # padding after 150
    weights = torch.randn(3, 200, 4, 16)
    blocked = _values_and_grads(_ours, q, k, v, allowed, weights)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 1000)
    whole = _values_and_grads(_ours, q, k, v, allowed, weights)
    for got, want in zip(blocked, whole, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert blocked[0].float().sub(whole[0].float()).abs().max() < 1e-2  # same bf16 values but for rounding


def test_a_cached_decode_step_sees_every_key():
    """One query against 9 cached keys, no mask (transformers passes none when decoding alone)."""
    q, k, v = _inputs(torch.float32, q_len=1, k_len=9, rows=2)
    got = _ours(q, k, v, None)
    torch.testing.assert_close(got, _sdpa(q, k, v, None), atol=1e-5, rtol=1e-5)


def test_what_it_does_not_handle_goes_to_sdpa(monkeypatch):
    from transformers.integrations import sdpa_attention

    calls = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or ("sdpa", None))
    q, k, v = _inputs(torch.float32)
    assert matmul_attention_forward(_Module(), q, k, v, None, softcap=30.0)[0] == "sdpa"
    per_head = torch.zeros(3, 4, 7, 7)
    assert matmul_attention_forward(_Module(), q, k, v, per_head)[0] == "sdpa"
    assert len(calls) == 2 and calls[0]["softcap"] == 30.0


def test_a_model_with_it_gives_sdpas_logits_with_padding_and_a_cache(tiny_model):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    logits = {}
    for kernel in ("sdpa", "matmul"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=kernel)
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits
            prefix = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
            step = model(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=prefix.past_key_values).logits
        logits[kernel] = (full[mask.bool()], step)
    for got, want in zip(logits["matmul"], logits["sdpa"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_picks_it_for_16_bit_cpu_compute_only(tiny_model):
    from infopo_cli.config import TrainConfig
    from infopo_cli.model import stack
    from infopo_cli.model.precision import Precision

    def kernel(dtype: torch.dtype, setting: str = "auto") -> str:
        cfg = TrainConfig(dtype="bf16" if dtype == torch.bfloat16 else "fp32", attn_implementation=setting)
        return stack.load_base(str(tiny_model), cfg, Precision("cpu", dtype, "test")).config._attn_implementation

    assert kernel(torch.bfloat16) == "matmul"
    assert kernel(torch.float32) == "sdpa"
    assert kernel(torch.bfloat16, "sdpa") == "sdpa"  # as asked
    assert not attention.suits("cuda", torch.bfloat16, object())
    assert not attention.suits("cpu", torch.bfloat16, type("Gemma2", (), {"attn_logit_softcapping": 50.0})())


def test_the_autograd_function_saves_no_score_matrix():
    """What the backward keeps is q, k, v and the mask (as sdpa's flash kernel keeps q, k, v and its output)."""
    q, k, v = _inputs(torch.float32, q_len=16, k_len=16)
    mask = torch.zeros(3, 1, 16, 16)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        _MatmulAttention.apply(q, k, v, mask, 8 ** -0.5)
    assert sorted(sizes) == sorted([q.numel(), k.numel(), v.numel(), mask.numel()])


def test_generation_hands_matmul_to_sdpas_float32_scores(monkeypatch):
    """Greedy argmaxes flip on 16-bit scores: inside `float32_scores` (the generation loop's model calls) sdpa runs."""
    from transformers.integrations import sdpa_attention

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: ("sdpa", None))
    q, k, v = _inputs(torch.bfloat16)
    with attention.float32_scores():
        assert matmul_attention_forward(_Module(), q, k, v, None)[0] == "sdpa"
    assert matmul_attention_forward(_Module(), q, k, v, None)[0] != "sdpa"


def test_the_generation_loop_runs_the_model_under_float32_scores(tiny_model, monkeypatch):
    from infopo_cli.inference import generation

    seen = []
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="matmul")
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: seen.append(attention._float32_scores) or real(*a, **k))
    sampling = generation.Sampling(max_new_tokens=3)
    ids = torch.tensor([[5, 6, 7]])
    list(generation.decode(model, ids, torch.ones_like(ids), sampling, set()))
    assert seen and all(seen) and attention._float32_scores == 0


def test_the_forward_is_sdpas_only_on_a_cpu_with_amx(monkeypatch):
    from infopo_cli.model import precision

    for flags, want in [({"avx512f", "avx512_bf16"}, False), ({"avx512_bf16", "amx_bf16", "amx_tile"}, True), (set(), False)]:
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: flags)
        attention.forward_by_sdpa.cache_clear()
        assert attention.forward_by_sdpa() is want
        assert ("sdpa's flash kernel" in attention.describe("matmul")) is want
    attention.forward_by_sdpa.cache_clear()
    assert attention.describe("sdpa") == "sdpa"
    assert "AMX" not in attention.describe("matmul", "cuda")  # there every call goes to sdpa
