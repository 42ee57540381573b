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
    got, counts = sequence_logps(model, b.input_ids, b.attention_mask, b.labels)
    want, want_counts = naive(model, b.input_ids, b.attention_mask, b.labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == want_counts.tolist() == [2, 3, 4, 1]


def test_gradient_matches_full_logits(tiny_model, monkeypatch):
    monkeypatch.setattr(logps_module, "CHUNK_TOKENS", 2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    b = batch()
    sequence_logps(model, b.input_ids, b.attention_mask, b.labels)[0].sum().backward()
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
    a = sequence_logps(model, alone.input_ids, alone.attention_mask, alone.labels)[0]
    p = sequence_logps(model, padded.input_ids, padded.attention_mask, padded.labels)[0]
    torch.testing.assert_close(a, p[[0, 2]], atol=1e-5, rtol=1e-5)
