"""`matmul` attention: softmax(q k^T * scale + mask) v as two batched matrix products, for 16-bit compute on a CPU.

On a CPU torch's fused attention kernel (sdpa's flash kernel) runs 16-bit inputs at about the speed of float32 ones,
while a 16-bit batched product runs on the CPU's bf16 units several times faster. Measured on SmolLM2's shape
(4 rows x 448 positions, 9 heads over 3 key/value heads, bf16, 2-core EPYC with avx512_bf16), forward and backward
together: sdpa with a 4-D mask 44 ms, this 23 ms per layer. The forward keeps no score matrix: the backward
recomputes the probabilities from q and k, as a flash kernel does, so what a layer saves is what sdpa's saves.
Rows are processed a few at a time, which bounds the transient score matrices.

Grouped-query attention runs without repeating the key/value heads: the query heads of a group are stacked along
the query axis, so one product serves the whole group. The numbers are eager attention's: 16-bit scores, a
softmax computed in float32 and rounded to 16 bits, a 16-bit product with the values.

Registered with transformers as an attention implementation (and its mask as eager's additive one), so the model's
own attention modules call it; whatever it does not handle (CUDA, dropout, soft-capped scores, attention sinks, a
per-head mask) goes to sdpa unchanged, and so does generation (`float32_scores`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

NAME = "matmul"
SCORES_PER_CALL = 1 << 25  # score elements (64 MiB in bf16) formed at once; rows are split to stay under it


_float32_scores = 0  # > 0 inside `float32_scores()`


@contextlib.contextmanager
def float32_scores() -> Iterator[None]:
    """Within the block `matmul` hands every call to sdpa, whose CPU kernel keeps the scores in float32. Greedy
    generation reads argmaxes, which 16-bit scores flip often enough to halve the base SmolLM2's greedy accuracy on
    the bundled held-out problems; training reads sums of log-probs over many tokens, which such flips barely move."""
    global _float32_scores
    _float32_scores += 1
    try:
        yield
    finally:
        _float32_scores -= 1


def register() -> None:
    """Make `attn_implementation="matmul"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, matmul_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)


def suits(device: str, dtype: torch.dtype, config) -> bool:
    """Where `auto` picks this kernel: 16-bit compute on a CPU, for a model whose attention is plain softmax."""
    return device == "cpu" and dtype in (torch.bfloat16, torch.float16) and not getattr(config, "attn_logit_softcapping", None)


def matmul_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: (B, H, Tq, D) queries, (B, Hkv, Tk, D) keys and values -> the
    (B, Tq, H, D) output and no weights."""
    unsupported = (_float32_scores or query.device.type != "cpu" or (dropout and module.training) or kwargs.get("softcap")
                   or kwargs.get("s_aux") is not None or (attention_mask is not None and attention_mask.shape[1] != 1))
    if unsupported:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    mask = _additive(attention_mask, query, key, getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _MatmulAttention.apply(query, key, value, mask, scale)
    return out.transpose(1, 2).contiguous(), None


def _additive(mask: Tensor | None, query: Tensor, key: Tensor, causal: bool) -> Tensor | None:
    """The mask as (B or 1, 1, Tq, Tk) additive values in the query's dtype; a causal one when none was given."""
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        if not causal or q_len == 1:
            return None
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        mask = allowed[None, None]
    mask = mask[..., :k_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min)
    return mask.to(query.dtype)


def _row_blocks(query: Tensor, key: Tensor) -> int:
    per_row = query.shape[1] * query.shape[2] * key.shape[2]
    return max(1, SCORES_PER_CALL // max(1, per_row))


def _probabilities(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """(b, Hkv, G*Tq, D) grouped queries, (b, Hkv, Tk, D) keys -> (b, Hkv, G*Tq, Tk) softmax in q's dtype."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        b, groups, rows, k_len = scores.shape
        q_len = mask.shape[-2]
        scores.view(b, groups, rows // q_len, q_len, k_len).add_(mask[:, :, None])
    return scores.softmax(dim=-1)


def _grouped(x: Tensor, kv_heads: int) -> Tensor:
    """(b, H, T, D) -> (b, Hkv, H/Hkv * T, D): each key/value head's query heads stacked along the positions."""
    b, heads, length, dim = x.shape
    return x.reshape(b, kv_heads, heads // kv_heads * length, dim)


def _mask_rows(mask: Tensor | None, start: int, end: int) -> Tensor | None:
    return None if mask is None else (mask if mask.shape[0] == 1 else mask[start:end])


class _MatmulAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        kv_heads, step = key.shape[1], _row_blocks(query, key)
        out = torch.empty_like(query)
        for start in range(0, query.shape[0], step):
            end = min(start + step, query.shape[0])
            q = _grouped(query[start:end], kv_heads)
            probs = _probabilities(q, key[start:end], _mask_rows(mask, start, end), scale)
            out[start:end] = torch.matmul(probs, value[start:end]).view(out[start:end].shape)
        ctx.save_for_backward(query, key, value, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        query, key, value, mask = ctx.saved_tensors
        scale = ctx.scale
        kv_heads, step = key.shape[1], _row_blocks(query, key)
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        for start in range(0, query.shape[0], step):
            end = min(start + step, query.shape[0])
            q, k, v = _grouped(query[start:end], kv_heads), key[start:end], value[start:end]
            probs = _probabilities(q, k, _mask_rows(mask, start, end), scale)
            g = _grouped(grad_out[start:end].contiguous(), kv_heads)
            grad_v[start:end] = torch.matmul(probs.transpose(-1, -2), g)
            grad_probs = torch.matmul(g, v.transpose(-1, -2))
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(scale)
            grad_q[start:end] = torch.matmul(grad_scores, k).view(grad_q[start:end].shape)
            grad_k[start:end] = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None
