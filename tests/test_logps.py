"""Per-sequence log-probs: equal to the plain full-logits computation; prompt and padding ignored."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from infopo_cli.train import logps as logps_module
from infopo_cli.data.batching import collate
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
    out = sequence_logps(model, b.input_ids, b.attention_mask, b.labels)
    got, counts = out.sums, out.counts
    want, want_counts = naive(model, b.input_ids, b.attention_mask, b.labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == want_counts.tolist() == [2, 3, 4, 1]


def test_gradient_matches_full_logits(tiny_model, monkeypatch):
    monkeypatch.setattr(logps_module, "CHUNK_TOKENS", 2)
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
    assert b.input_ids.shape == (4, 7) and b.n_pairs == 2
    assert b.input_ids[0].tolist() == [1, 2, 3, 4, 5, 0, 0]      # chosen rows first
    assert b.input_ids[2].tolist() == [1, 2, 3, 6, 7, 8, 9]      # then rejected rows
    assert b.labels[0].tolist() == [-100, -100, -100, 4, 5, -100, -100]
    assert b.attention_mask[3].tolist() == [1, 1, 1, 0, 0, 0, 0]
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
    from infopo_cli.data.batching import response_only

    rows = response_only(batch())
    assert rows.input_ids.tolist()[0][:2] == [4, 5] and rows.input_ids.tolist()[2] == [6, 7, 8, 9]
    assert rows.attention_mask.sum(1).tolist() == [2, 3, 4, 1]


def shared_and_plain(pairs):
    return collate(pairs, pad_id=0, share_prompt=True), collate(pairs, pad_id=0)


def test_shared_prompt_layout():
    shared, _ = shared_and_plain(batch_pairs())
    assert shared.input_ids.shape == (3, 9) and shared.n_pairs == 3
    assert shared.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # prompt, chosen, rejected
    assert shared.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]  # rejected restarts after the prompt
    assert shared.position_ids[1, :6].tolist() == [0, 1, 2, 3, 4, 2]
    allowed = shared.allowed[0]
    assert allowed[5].tolist() == [True, True, True, False, False, True, False, False, False]  # not the chosen
    assert allowed[4].tolist() == [True] * 5 + [False] * 4
    assert shared.allowed[1, 7].tolist() == [False] * 7 + [True, False]   # padding sees itself only
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
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    assert logps_module.takes_custom_masks(model)
    shared, plain = shared_and_plain(batch_pairs())
    if attn == "flex_attention" and not torch.cuda.is_available():  # torch's flex-attention has no CPU backward
        with torch.no_grad():
            torch.testing.assert_close(batch_logps(model, shared).sums, batch_logps(model, plain).sums,
                                       atol=1e-5, rtol=1e-5)
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
