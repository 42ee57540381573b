"""Per-sequence log-probabilities of response tokens: the one number every preference loss needs.

We run the transformer body once over chosen and rejected rows together, then apply the output
layer only at response positions, in chunks that are recomputed in the backward pass. Prompt and
padding positions never reach the (vocab-sized) output layer, and the full (tokens x vocab) float32
log-softmax is never held in memory: with Llama-3's 128k vocabulary that is the largest activation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_TOKENS = 1024


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM under a peft wrapper (LoRA layers live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _token_logps(hidden: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None) -> Tensor:
    logits = lm_head(hidden).float()
    if softcap:  # Gemma-2 squashes its logits; the model's own forward would too
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Return (sum of log p(token | prefix) over positions where labels != -100, count of such tokens).

    Shapes: input_ids, attention_mask, labels (N, T) -> two tensors of shape (N,).
    """
    lm = _causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]                    # position t predicts token t+1
    mask = targets != IGNORE
    selected = hidden[:, :-1][mask]            # (tokens, H): response positions only
    wanted = targets[mask]
    lm_head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    pieces = []
    for start in range(0, selected.shape[0], CHUNK_TOKENS):
        h, t = selected[start:start + CHUNK_TOKENS], wanted[start:start + CHUNK_TOKENS]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logps, h, t, lm_head, softcap, use_reentrant=False))
        else:
            pieces.append(_token_logps(h, t, lm_head, softcap))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_logps)
    return sums, mask.sum(dim=1)


class PairLogps:
    """Summed response log-probs of a batch of pairs under the policy and (optionally) the reference."""

    def __init__(self, policy: Tensor, reference: Tensor | None, counts: Tensor, n_pairs: int) -> None:
        self.policy_chosen, self.policy_rejected = policy[:n_pairs], policy[n_pairs:]
        self.ref_chosen = self.ref_rejected = None
        if reference is not None:
            self.ref_chosen, self.ref_rejected = reference[:n_pairs], reference[n_pairs:]
        self.chosen_counts, self.rejected_counts = counts[:n_pairs], counts[n_pairs:]


def pair_logps(model: nn.Module, batch, with_reference: bool, reference: Tensor | None = None,
               policy_is_reference: bool = False) -> PairLogps:
    """One forward over chosen+rejected rows for the policy, one for the reference (adapter off).

    The reference pass runs first and under no-grad, so its activations are gone before the policy's
    graph is built. A precomputed `reference` (e.g. cached for evaluation) skips that pass, and so does
    `policy_is_reference` (an adapter that still adds exactly zero).
    """
    from infopo_cli.model import reference_mode

    if with_reference and reference is None and not policy_is_reference:
        with reference_mode(model):
            reference, _ = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels)
    policy, counts = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels)
    if with_reference and policy_is_reference and reference is None:
        reference = policy.detach()
    return PairLogps(policy, reference if with_reference else None, counts, batch.n_pairs)
