"""Per-sequence log-probabilities of response tokens: the one number every preference loss needs.

We run the transformer body once over chosen and rejected responses together (with the prompt read
once per pair in the shared-prompt layout, see `batching`), then apply the output layer only at the
positions that predict response tokens, in chunks that are recomputed in the backward pass. Prompt and
padding positions never reach the (vocab-sized) output layer, and the full (tokens x vocab) float32
log-softmax is never held in memory: with Llama-3's 128k vocabulary that is the largest activation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from infopo_cli.data.batching import (PreferenceBatch, Targets, response_only, segment_bounds, shared_allowed,
                                      targets_from_labels)
from infopo_cli.errors import ConfigError
from infopo_cli.losses.types import Needs, PairLogps
from infopo_cli.model import stack
from infopo_cli.model.memory_plan import NO_GRAD_CPU_TOKENS  # positions per pass without gradients on a CPU
from infopo_cli.train import output_layer

CHUNK_TOKENS = 1024
CPU_CHUNK_TOKENS = 256  # the output layer's chunk on a CPU (train/output_layer.py: its buffers stay cached there)
FLEX_BLOCK = 128  # flex-attention's default sparse block; block masks are built at widths rounded up to it


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM under a peft wrapper (LoRA layers live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _token_logps(hidden: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None) -> Tensor:
    return _log_softmax(hidden, lm_head, softcap).gather(1, targets.unsqueeze(1)).squeeze(1)


def _log_softmax(hidden: Tensor, lm_head: nn.Module, softcap: float | None) -> Tensor:
    logits = lm_head(hidden).float()
    if softcap:  # Gemma-2 squashes its logits; the model's own forward would too
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(dim=-1)


def _token_logps_and_kl(hidden: Tensor, ref_hidden: Tensor, targets: Tensor, lm_head: nn.Module,
                        softcap: float | None) -> tuple[Tensor, Tensor]:
    """Token log-probs and KL(pi_ref(.|prefix) || pi(.|prefix)) over the whole vocabulary (TDPO).

    The reference's logits come from its final hidden states through the same output layer: the
    adapter never touches the output layer when a loss needs the KL (checked in `pair_logps`).
    """
    policy = _log_softmax(hidden, lm_head, softcap)
    with torch.no_grad():
        reference = _log_softmax(ref_hidden, lm_head, softcap)
    kl = (reference.exp() * (reference - policy)).sum(dim=-1)
    return policy.gather(1, targets.unsqueeze(1)).squeeze(1), kl


@dataclass
class SequenceLogps:
    """Per-sequence log-prob sums and token counts of one forward, with the hidden states the KL priors read."""

    sums: Tensor                    # (N,) summed log-probs of the labelled tokens
    counts: Tensor                  # (N,) number of labelled tokens
    hidden: Tensor                  # (tokens, H) final hidden states at labelled positions
    kl: Tensor | None = None        # (N,) summed per-token KL to the reference, when asked for


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                   ref_hidden: Tensor | None = None) -> SequenceLogps:
    """Sum of log p(token | prefix) over positions where labels != -100, per row, and the token counts.

    With `ref_hidden` (the reference pass's `hidden`), also the summed per-token KL from the
    reference's next-token distribution to the policy's. Shapes: (N, T) inputs -> (N,) outputs.
    """
    return target_logps(model, input_ids, attention_mask, targets_from_labels(labels), ref_hidden=ref_hidden)


def batch_logps(model: nn.Module, batch: PreferenceBatch, ref_hidden: Tensor | None = None) -> SequenceLogps:
    """`target_logps` over a collated batch, in either layout: (2B,) sums, chosen first."""
    mask = (shared_prompt_mask(batch.segments, batch.input_ids.shape[1], model) if batch.segments is not None
            else batch.attention_mask)
    return target_logps(model, batch.input_ids, mask, batch.targets, batch.position_ids, ref_hidden)


def attention_kernel(model: nn.Module) -> str | None:
    """The attention implementation the model runs (what `auto` resolved to)."""
    return getattr(_causal_lm(model).config, "_attn_implementation", None)


def takes_custom_masks(model: nn.Module) -> bool:
    """Whether the attention kernel honours the shared-prompt layout's mask (a 4-D mask, or flex-attention's block
    mask); flash-attention does not, nor Unsloth's CUDA forward (model/unsloth_backend.py marks such a model)."""
    if getattr(model, "infopo_drops_attention_masks", False):
        return False
    return attention_kernel(model) in ("sdpa", "eager", "flex_attention", "matmul")


def shared_prompt_mask(segments: Tensor, width: int, model: nn.Module):
    """The shared-prompt layout's mask, built on the segments' device from each row's (prompt, chosen, rejected)
    lengths, as the model's kernel reads it: a flex-attention block mask (which skips the blocks no query may see:
    the rejected answer's view of the chosen one, padding), else an additive 4-D mask."""
    if attention_kernel(model) == "flex_attention":
        return block_mask(segments, width)
    return attention_mask_4d(segments, width, _causal_lm(model).get_input_embeddings().weight.dtype)


def allowed_mask(segments: Tensor, width: int) -> Tensor:
    """(R, 3) segment lengths -> (R, T, T) bool, query i may attend to key j (`batching.shared_allowed`)."""
    positions = torch.arange(width, device=segments.device)
    bounds = (b[:, None, None] for b in segment_bounds(segments))
    return shared_allowed(*bounds, positions[:, None], positions[None, :])


def attention_mask_4d(segments: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """(R, 1, T, T) additive mask in the compute dtype, which transformers passes to every attention kernel as is
    (a boolean 4-D mask is misread by eager attention)."""
    allowed = allowed_mask(segments, width)
    return torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=segments.device).masked_fill_(
        allowed, 0).unsqueeze(1)


def block_mask(segments: Tensor, width: int):
    """Flex-attention's BlockMask for every head (transformers passes a 4-D one through as is), from a `mask_mod`
    over the segment bounds: compiled, its construction never holds the (R, T, T) mask.

    Built at the width rounded up to FLEX_BLOCK (the same blocks), then given the batch's own width, as flex-attention
    requires. So the compiled builder sees few widths, and after its first recompile dynamic shapes absorb new ones
    (4 graphs over batches of 1-4 rows and widths up to 416); and on a CPU, inductor's code for a width that is not a
    whole number of blocks fails to compile (torch 2.13).
    """
    from torch.nn.attention.flex_attention import BlockMask

    # int32 as flex's indices, each in its own storage: a strided view of `segments` fails flex's compiled CPU kernel
    chosen_start, rejected_start, end = (b.to(torch.int32) for b in segment_bounds(segments))

    def mask_mod(row: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
        return shared_allowed(chosen_start[row], rejected_start[row], end[row], query, key)

    bucket = -(-width // FLEX_BLOCK) * FLEX_BLOCK
    with torch.no_grad():  # one grad mode for the reference and the policy pass: compiled graphs guard on it
        blocks = _compiled_create_block_mask()(mask_mod, B=segments.shape[0], H=None, Q_LEN=bucket, KV_LEN=bucket,
                                               device=segments.device, BLOCK_SIZE=FLEX_BLOCK)
    return BlockMask.from_kv_blocks(blocks.kv_num_blocks, blocks.kv_indices, blocks.full_kv_num_blocks,
                                    blocks.full_kv_indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(width, width))


@functools.cache
def _compiled_create_block_mask():
    """`create_block_mask` under torch.compile (what its deprecated `_compile=True` does on each call), one per
    process so its compiled graphs are reused."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def target_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, targets: Targets,
                 position_ids: Tensor | None = None, ref_hidden: Tensor | None = None) -> SequenceLogps:
    """Per sequence of `targets`: the summed log-probs of its tokens and their count (and the KL, as above)."""
    lm = _causal_lm(model)
    hidden = _decoder_states(lm.get_decoder(), input_ids, attention_mask, position_ids)
    selected = hidden[targets.rows, targets.cols]  # (tokens, H): positions that predict response tokens
    wanted = targets.tokens
    lm_head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if ref_hidden is None and output_layer.fusable(lm_head):  # the fast path: no vocab-wide tensor kept
        chunk = CPU_CHUNK_TOKENS if selected.device.type == "cpu" else CHUNK_TOKENS
        flat = output_layer.target_logps(selected, wanted, lm_head, softcap, chunk)
        return SequenceLogps(_per_sequence(flat, targets), targets.counts(), selected)
    grad = torch.is_grad_enabled() and selected.requires_grad
    logps, kls = [], []
    for start in range(0, selected.shape[0], CHUNK_TOKENS):
        h, t = selected[start:start + CHUNK_TOKENS], wanted[start:start + CHUNK_TOKENS]
        if ref_hidden is not None:
            args = (h, ref_hidden[start:start + CHUNK_TOKENS], t, lm_head, softcap)
            lp, kl = checkpoint(_token_logps_and_kl, *args, use_reentrant=False) if grad else _token_logps_and_kl(*args)
            kls.append(kl)
        else:
            lp = checkpoint(_token_logps, h, t, lm_head, softcap, use_reentrant=False) if grad else _token_logps(h, t, lm_head, softcap)
        logps.append(lp)
    flat = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    kl = _per_sequence(torch.cat(kls) if kls else flat, targets) if ref_hidden is not None else None
    return SequenceLogps(_per_sequence(flat, targets), targets.counts(), selected, kl)


def _decoder_states(decoder: nn.Module, input_ids: Tensor, attention_mask, position_ids: Tensor | None) -> Tensor:
    """The decoder's last hidden states, (rows, T, H). Without gradients on a CPU, a few rows at a time: a large
    batch's per-layer activations are blocks glibc maps afresh, each page faulting at every layer (the 64-pair
    reference batch of a vs_trl epoch, on a 2-core Xeon: 20 s in one pass, 11 s in slices of 4096 positions); a slice's
    stay on the heap and in cache. Each row's values are its own either way (no row sees another)."""
    rows, width = input_ids.shape
    step = max(1, NO_GRAD_CPU_TOKENS // max(1, width))
    # not in a run of several processes, whose decoder passes must match one for one (an FSDP layer gathers its
    # weights from every process), nor with a mask that is no tensor (flex-attention's block mask)
    if torch.is_grad_enabled() or input_ids.device.type != "cpu" or rows <= step or _distributed() \
            or not (attention_mask is None or isinstance(attention_mask, Tensor)):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state

    def part(x, start: int):
        return x if x is None or x.shape[0] == 1 else x[start:start + step]

    return torch.cat([decoder(input_ids=input_ids[i:i + step], attention_mask=part(attention_mask, i),
                              position_ids=part(position_ids, i), use_cache=False).last_hidden_state
                      for i in range(0, rows, step)])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _per_sequence(per_token: Tensor, targets: Targets) -> Tensor:
    """(tokens,) values -> (sequences,) sums."""
    return torch.zeros(targets.n_seqs, dtype=torch.float32, device=per_token.device).index_add(0, targets.seq, per_token)


def _halves(values: Tensor | None, n: int) -> tuple[Tensor | None, Tensor | None]:
    return (None, None) if values is None else (values[:n], values[n:])


def response_only_logps(model: nn.Module, batch) -> Tensor:
    """The policy's average log-prob of each response on its own, no prompt and no BOS (RMiPO's marginal).

    The first response token has no prefix and is not scored, so the average runs over n - 1 tokens;
    a one-token response gives 0 rather than 0/0.
    """
    with torch.no_grad():
        out = batch_logps(model, response_only(batch))
    return out.sums / out.counts.clamp(min=1)


def pair_logps(model: nn.Module, batch, needs: Needs, reference: Tensor | None = None,
               policy_is_reference: bool = False) -> PairLogps:
    """One forward over chosen+rejected rows for the policy, plus what `needs` asks for.

    The reference pass runs first and under no-grad, so its activations are gone before the policy's
    graph is built. A precomputed `reference` (cached for evaluation) skips that pass, and so does
    `policy_is_reference` (an adapter that still adds exactly zero).
    """
    if needs.kl and hasattr(_causal_lm(model).get_output_embeddings(), "lora_A"):
        raise ConfigError("the tdpo priors need the output layer shared with the reference: remove lm_head from target_modules")
    ref_out = None
    if (needs.reference and reference is None and not policy_is_reference) or needs.kl:
        with stack.reference_mode(model):
            ref_out = batch_logps(model, batch)
        reference = ref_out.sums
    policy = batch_logps(model, batch, ref_hidden=ref_out.hidden if needs.kl else None)
    if needs.reference and reference is None:  # policy_is_reference
        reference = policy.sums.detach()
    n = batch.n_pairs
    marginal = response_only_logps(model, batch) if needs.marginal else None
    return PairLogps(policy.sums[:n], policy.sums[n:], policy.counts[:n], policy.counts[n:],
                     *_halves(reference if needs.reference else None, n), *_halves(policy.kl, n), *_halves(marginal, n),
                     batch.desirable)
