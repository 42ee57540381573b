"""Per-sequence log-probs: equal to the plain full-logits computation; prompt and padding ignored."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from infopo_cli import logps as logps_module
from infopo_cli.batching import collate
from infopo_cli.logps import sequence_logps
from infopo_cli.tokenization import TokenizedPair


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
    from infopo_cli.batching import response_only

    rows = response_only(batch())
    assert rows.input_ids.tolist()[0][:2] == [4, 5] and rows.input_ids.tolist()[2] == [6, 7, 8, 9]
    assert rows.attention_mask.sum(1).tolist() == [2, 3, 4, 1]
