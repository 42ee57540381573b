"""Per-sequence log-probs: equal to the plain full-logits computation; prompt and padding ignored."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from infopo_cli.train import logps as logps_module
from infopo_cli.data import widths
from infopo_cli.data.batching import collate, response_only
from infopo_cli.data.widths import PAD_MULTIPLE, padded_width
from infopo_cli.losses.types import Needs
from infopo_cli.train.logps import batch_logps, pair_logps, sequence_logps
from infopo_cli.data.tokenization import TokenizedPair


def naive(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    token = logits.log_softmax(-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (token * keep).sum(1), keep.sum(1)


def batch():
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8, 9]), TokenizedPair([10, 11], [12, 13, 14], [15])]
    return collate(pairs, pad_id=0)


def test_matches_full_logits_and_counts(tiny_model, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    b = batch()
    monkeypatch.setattr(logps_module, "CHUNK_TOKENS", 3)  # several chunks, as with long sequences
    monkeypatch.setattr(logps_module, "CPU_CHUNK_TOKENS", 3)  # the fused path's on a CPU
    out = sequence_logps(model, b.input_ids, b.attention_mask, b.labels)
    got, counts = out.sums, out.counts
    want, want_counts = naive(model, b.input_ids, b.attention_mask, b.labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == want_counts.tolist() == [2, 3, 4, 1]


def test_gradient_matches_full_logits(tiny_model, monkeypatch):
    monkeypatch.setattr(logps_module, "CHUNK_TOKENS", 2)
    monkeypatch.setattr(logps_module, "CPU_CHUNK_TOKENS", 2)  # the fused path's on a CPU
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    b = batch()
    sequence_logps(model, b.input_ids, b.attention_mask, b.labels).sums.sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    naive(model, b.input_ids, b.attention_mask, b.labels)[0].sum().backward()
    for g, p in zip(ours, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_collate_layout():
    b = batch()
    assert b.input_ids.shape == (4, 16) and b.n_pairs == 2       # 7 tokens, padded to PAD_MULTIPLE
    assert b.input_ids[0].tolist() == [1, 2, 3, 4, 5] + [0] * 11  # chosen rows first
    assert b.input_ids[2].tolist() == [1, 2, 3, 6, 7, 8, 9] + [0] * 9  # then rejected rows
    assert b.labels[0].tolist() == [-100, -100, -100, 4, 5] + [-100] * 11
    assert b.attention_mask[3].tolist() == [1, 1, 1] + [0] * 13
    assert b.n_tokens == 5 + 7 + 5 + 3


def test_padding_does_not_change_logps(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    alone = collate([TokenizedPair([1, 2, 3], [4, 5], [6])], pad_id=0)
    padded = collate([TokenizedPair([1, 2, 3], [4, 5], [6]), TokenizedPair([7] * 9, [8] * 9, [9] * 9)], pad_id=0)
    a = sequence_logps(model, alone.input_ids, alone.attention_mask, alone.labels).sums
    p = sequence_logps(model, padded.input_ids, padded.attention_mask, padded.labels).sums
    torch.testing.assert_close(a, p[[0, 2]], atol=1e-5, rtol=1e-5)


def test_kl_to_reference_matches_full_distributions(tiny_model, monkeypatch):
    """TDPO's sequence KL: sum over response positions of KL(p_ref(.|prefix) || p(.|prefix))."""
    monkeypatch.setattr(logps_module, "CHUNK_TOKENS", 3)
    monkeypatch.setattr(logps_module, "CPU_CHUNK_TOKENS", 3)  # the fused path's on a CPU
    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for p in policy.model.parameters():  # the body only: policy and reference share the output layer
            p.add_(torch.randn_like(p) * 0.05)
    b = batch()
    with torch.no_grad():
        ref = sequence_logps(reference, b.input_ids, b.attention_mask, b.labels)
    got = sequence_logps(policy, b.input_ids, b.attention_mask, b.labels, ref_hidden=ref.hidden).kl
    lp = policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].log_softmax(-1)
    lr = reference(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].log_softmax(-1)
    per_token = (lr.exp() * (lr - lp)).sum(-1) * (b.labels[:, 1:] != -100)
    torch.testing.assert_close(got, per_token.sum(1), atol=1e-5, rtol=1e-4)
    assert (got > 0).all()


def test_response_only_rows_drop_the_prompt():
    rows = response_only(batch())
    assert rows.input_ids.shape == (4, 16)
    assert rows.input_ids.tolist()[0][:2] == [4, 5] and rows.input_ids.tolist()[2][:5] == [6, 7, 8, 9, 0]
    assert rows.attention_mask.sum(1).tolist() == [2, 3, 4, 1]


def shared_and_plain(pairs):
    return collate(pairs, pad_id=0, share_prompt=True), collate(pairs, pad_id=0)


def test_shared_prompt_layout():
    shared, _ = shared_and_plain(batch_pairs())
    assert shared.input_ids.shape == (3, 16) and shared.n_pairs == 3
    assert shared.input_ids[0, :10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # prompt, chosen, rejected
    assert shared.position_ids[0, :9].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]  # rejected restarts after the prompt
    assert shared.position_ids[1, :6].tolist() == [0, 1, 2, 3, 4, 2]
    assert shared.segments.tolist() == [[3, 2, 4], [2, 3, 1], [1, 1, 2]]
    allowed = logps_module.allowed_mask(shared.segments, 16)
    assert allowed[0, 5].tolist() == [True, True, True, False, False, True] + [False] * 10  # not the chosen
    assert allowed[0, 4].tolist() == [True] * 5 + [False] * 11
    assert allowed[1, 7].tolist() == [False] * 7 + [True] + [False] * 8  # padding sees itself only
    assert shared.targets.counts().tolist() == [2, 3, 1, 4, 1, 2]         # chosen 0-2, then rejected 0-2
    assert shared.n_tokens == 9 + 6 + 4                                   # each prompt counted once


def batch_pairs():
    return [TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8, 9]), TokenizedPair([10, 11], [12, 13, 14], [15]),
            TokenizedPair([16], [17], [18, 19])]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention", "matmul"])
def test_shared_prompt_gives_the_plain_logps_and_gradients(tiny_model, attn, monkeypatch):
    """Every kernel that takes the shared-prompt layout: the 4-D mask (sdpa, eager, matmul), flex-attention's block
    mask (grouped-query: the tiny model has 4 heads over 2)."""
    from infopo_cli.model import attention

    attention.register()
    monkeypatch.setattr(logps_module, "CHUNK_TOKENS", 3)
    monkeypatch.setattr(logps_module, "CPU_CHUNK_TOKENS", 3)  # the fused path's on a CPU
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    assert logps_module.takes_custom_masks(model)
    shared, plain = shared_and_plain(batch_pairs())
    if attn == "flex_attention" and not torch.cuda.is_available():
        # torch's flex-attention has no CPU backward; and its compiled CPU kernel fails to build transformers' own
        # padding mask once a second mask has made the shapes dynamic, so the plain rows are read with sdpa here
        with torch.no_grad():
            got = batch_logps(model, shared).sums
            model.set_attn_implementation("sdpa")
            torch.testing.assert_close(got, batch_logps(model, plain).sums, atol=1e-5, rtol=1e-5)
        return
    got = batch_logps(model, shared)
    got.sums.sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = batch_logps(model, plain)
    want.sums.sum().backward()
    torch.testing.assert_close(got.sums, want.sums, atol=1e-5, rtol=1e-5)
    assert got.counts.tolist() == want.counts.tolist()
    for g, p in zip(ours, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_shared_prompt_kl_and_marginals_match_plain(tiny_model):
    """TDPO's KL and RMiPO's response-only pass read the same tokens in either layout."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(0)  # a random (non-zero) adapter, so that policy and reference differ
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    shared, plain = shared_and_plain(batch_pairs())
    with torch.no_grad():
        got = pair_logps(model, shared, Needs(reference=True, kl=True, marginal=True))
        want = pair_logps(model, plain, Needs(reference=True, kl=True, marginal=True))
    for field in ("policy_chosen", "policy_rejected", "ref_rejected", "kl_chosen", "marginal_rejected_avg"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-5, rtol=1e-5)
    assert (got.kl_chosen > 0).all()


def random_pairs(rng: random.Random, n: int) -> list[TokenizedPair]:
    return [TokenizedPair([rng.randint(1, 60) for _ in range(rng.randint(1, 12))],
                          [rng.randint(1, 60) for _ in range(rng.randint(1, 12))],
                          [rng.randint(1, 60) for _ in range(rng.randint(1, 12))]) for _ in range(n)]


def test_every_collated_width_is_the_next_multiple_of_16():
    rng = random.Random(0)
    for n in range(1, 8):
        pairs = random_pairs(rng, n)
        plain, shared = collate(pairs, 0), collate(pairs, 0, share_prompt=True)
        longest = [(plain, max(p.length for p in pairs)),
                   (shared, max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)),
                   (response_only(plain), max(len(r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)))]
        for b, real in longest:
            assert b.input_ids.shape[1] % PAD_MULTIPLE == 0 and real <= b.input_ids.shape[1] < real + PAD_MULTIPLE
            assert b.input_ids.shape == b.attention_mask.shape
            assert b.n_tokens == int(b.attention_mask.sum()) and b.attention_mask[:, real:].sum() == 0
    assert [padded_width(n) for n in (0, 1, 16, 17)] == [16, 16, 16, 32]


@pytest.mark.parametrize("share_prompt", [False, True])
def test_padding_to_16_changes_no_logp_count_or_token(tiny_model, monkeypatch, share_prompt):
    """The same pairs collated at their exact width and padded to 16: the same log-probs (RMiPO's response-only rows
    too), token counts and tokens read."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    pairs = random_pairs(random.Random(1), 5)
    padded = collate(pairs, 0, share_prompt)
    monkeypatch.setattr(widths, "PAD_MULTIPLE", 1)
    exact = collate(pairs, 0, share_prompt)
    assert exact.input_ids.shape[1] % 16 and padded.input_ids.shape[1] > exact.input_ids.shape[1]
    with torch.no_grad():
        got = pair_logps(model, padded, Needs(marginal=True))
        want = pair_logps(model, exact, Needs(marginal=True))
    for field in ("policy_chosen", "policy_rejected", "chosen_counts", "rejected_counts", "marginal_rejected_avg"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-5, rtol=1e-5)
    assert padded.n_tokens == exact.n_tokens


def dense_reference(segments: list[tuple[int, int, int]], width: int) -> torch.Tensor:
    """The shared layout's (R, T, T) mask as it was built on the host, position by position."""
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(segments), 1, 1)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for i, (n_p, n_c, n_r) in enumerate(segments):
        end = n_p + n_c + n_r
        allowed[i, :end, :end] = causal[:end, :end]
        allowed[i, n_p + n_c:end, n_p:n_p + n_c] = False  # the rejected answer never sees the chosen one
    return allowed


def test_the_device_built_masks_are_the_dense_definition():
    """Random lengths, rows of padding only, widths padded to 16 (and beyond): the boolean and additive masks."""
    rng = random.Random(2)
    for _ in range(30):
        segments = [(rng.randint(0, 20), rng.randint(0, 20), rng.randint(0, 20)) for _ in range(rng.randint(1, 5))]
        segments[rng.randrange(len(segments))] = (0, 0, 0)
        width = padded_width(max(sum(s) for s in segments)) + rng.choice([0, PAD_MULTIPLE])
        want = dense_reference(segments, width)
        lengths = torch.tensor(segments)
        assert torch.equal(logps_module.allowed_mask(lengths, width), want)
        additive = logps_module.attention_mask_4d(lengths, width, torch.bfloat16)
        assert additive.shape == (len(segments), 1, width, width) and additive.dtype == torch.bfloat16
        assert torch.equal(additive[:, 0] == 0, want)
        assert (additive[:, 0][~want] == torch.finfo(torch.bfloat16).min).all()


@pytest.mark.parametrize("width, segments, first_full", [
    (256, [(200, 30, 26), (10, 100, 50), (0, 0, 0)], [[0, 0], [1, 0]]),  # the second prompt block sees all of the first
    (208, [(150, 30, 28), (10, 100, 50), (0, 0, 0)], [[0, 0], [0, 0]])])  # its rows past 208 are padding, built at 256
def test_the_flex_block_mask_is_the_dense_mask(width, segments, first_full):
    """The compiled block-mask builder: its blocks (present, full) are the dense mask's and its mask_mod is the dense
    mask, position by position (two 128-blocks a side: full blocks, the rejected answer's blind block, padding). A
    width that is not a whole number of blocks (208) is built at the next one (256) and then narrowed to its own."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    block = logps_module.FLEX_BLOCK
    mask = logps_module.block_mask(torch.tensor(segments), width)
    assert mask.shape == (3, 1, width, width) and mask.seq_lengths == (width, width)
    assert torch.equal(create_mask(mask.mask_mod, 3, 1, width, width, "cpu")[:, 0], dense_reference(segments, width))
    tiles = dense_reference(segments, 2 * block).view(3, 2, block, 2, block)  # the blocks, as built at 256
    full = BlockMask.from_kv_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, BLOCK_SIZE=block)
    assert torch.equal(mask.to_dense()[:, 0].bool() | full.to_dense()[:, 0].bool(), tiles.any(4).any(2))
    assert torch.equal(full.to_dense()[:, 0].bool(), tiles.all(4).all(2))
    assert full.to_dense()[0, 0].tolist() == first_full


@pytest.mark.parametrize("layout", ["plain", "shared"])
def test_a_pass_without_gradients_on_a_cpu_runs_a_few_rows_at_a_time_with_the_same_logps(tiny_model, layout,
                                                                                          monkeypatch):
    """Reference and held-out passes slice a large batch's rows (their activations stay on the heap), each row's
    log-probs as in one pass; a pass with gradients is never sliced."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    shared, plain = shared_and_plain(batch_pairs())
    b = shared if layout == "shared" else plain
    calls = []
    model.get_decoder().register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                              with_kwargs=True)
    with torch.no_grad():
        whole = batch_logps(model, b).sums
        assert calls == [b.input_ids.shape[0]]
        monkeypatch.setattr(logps_module, "NO_GRAD_CPU_TOKENS", b.input_ids.shape[1] * 2)  # two rows a pass
        calls.clear()
        sliced = batch_logps(model, b).sums
    assert calls == [2] * (b.input_ids.shape[0] // 2) + [1] * (b.input_ids.shape[0] % 2)
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)
    calls.clear()
    batch_logps(model, b)
    assert calls == [b.input_ids.shape[0]]



def test_a_pass_without_gradients_is_not_sliced_across_processes_or_with_a_mask_that_is_no_tensor(tiny_model,
                                                                                                 monkeypatch):
    """An FSDP layer gathers its weights from every process at each call, so the processes' passes must match one for
    one, whatever rows each holds; flex-attention's block mask cannot be sliced by rows."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    _, plain = shared_and_plain(batch_pairs())
    calls = []
    model.get_decoder().register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                              with_kwargs=True)
    monkeypatch.setattr(logps_module, "NO_GRAD_CPU_TOKENS", 1)
    with torch.no_grad():
        monkeypatch.setattr(logps_module, "_distributed", lambda: True)
        batch_logps(model, plain)
        assert calls == [plain.input_ids.shape[0]]
        monkeypatch.setattr(logps_module, "_distributed", lambda: False)
        calls.clear()
        batch_logps(model, plain)
        assert calls == [1] * plain.input_ids.shape[0]
    seen = []
    fake = type("Decoder", (), {"__call__": lambda self, **kw: seen.append(kw["attention_mask"]) or
                                type("Out", (), {"last_hidden_state": torch.zeros(kw["input_ids"].shape[0], 1, 2)})()})()
    block_mask = object()
    with torch.no_grad():
        logps_module._decoder_states(fake, plain.input_ids, block_mask, None)
    assert seen == [block_mask]
