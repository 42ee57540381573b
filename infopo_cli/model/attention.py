"""`matmul` attention: softmax(q k^T * scale + mask) v as two batched matrix products, for 16-bit compute on a CPU.

On a CPU torch's fused attention kernel (sdpa's flash kernel) runs 16-bit inputs at about the speed of float32 ones,
while a 16-bit batched product runs on the CPU's bf16 units several times faster. Measured on SmolLM2's shape
(4 rows x 448 positions, 9 heads over 3 key/value heads, bf16, 2-core EPYC with avx512_bf16), forward and backward
together: sdpa with a 4-D mask 44 ms, this 23 ms per layer. The forward keeps no score matrix: the backward
recomputes the probabilities from q and k, as a flash kernel does, so what a layer saves is what sdpa's saves.
Rows are processed a few at a time, which bounds the transient score matrices, and a masked sequence's queries in
blocks of about 64, each block's products stopping at the last key one of its queries may see: a causal square in n
blocks costs (n + 1) / 2n of it, and the smaller score matrices stay in cache (fp32, 448 positions, 2-core Ice Lake
Xeon: one block 117 ms, seven 57 ms per layer, forward and backward).

On a CPU with AMX the forward is sdpa's instead (`forward_by_sdpa`): there torch's flash kernel runs its products
on the AMX tiles and beats two batched products 2.5x (2.9 against 7.3 ms per layer at that shape, bf16, 2-core Xeon
with AMX), while its backward is the slower one (16.4 against 14.4 ms), so the backward stays this one. Without AMX
(avx512_bf16 alone) both directions are this kernel's.

Grouped-query attention runs without repeating the key/value heads: the query heads of a group are stacked along
the query axis, so one product serves the whole group. The numbers are eager attention's: 16-bit scores, a
softmax computed in float32 and rounded to 16 bits, a 16-bit product with the values; on a CPU with AMX that is the
backward's, while the forward's are the flash kernel's (float32 scores), the same function to 16-bit rounding.

Registered with transformers as an attention implementation (and its mask as eager's additive one), so the model's
own attention modules call it; whatever it does not handle (CUDA, dropout, soft-capped scores, attention sinks, a
per-head mask) goes to sdpa unchanged, and so does generation (`float32_scores`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn

NAME = "matmul"
SCORES_PER_CALL = 1 << 25  # score elements (64 MiB in bf16) formed at once; rows are split to stay under it
QUERY_BLOCK = 64  # queries per block of a masked sequence (per layer, 448 positions: 7 blocks 2x faster than 1)
MAX_QUERY_BLOCKS = 32


_float32_scores = 0  # > 0 inside `float32_scores()`


@functools.cache
def forward_by_sdpa() -> bool:
    """Whether the forward is sdpa's flash kernel (a CPU with AMX, where that kernel runs on its tiles)."""
    from infopo_cli.model.precision import cpu_flags

    return "amx_bf16" in cpu_flags()


def describe(kernel: str | None, device: str = "cpu") -> str:
    """The attention kernel a model runs on `device`, as a run's first lines name it."""
    if kernel != NAME:
        return str(kernel)
    if device != "cpu":
        return f"{NAME} (on {device} every call goes to sdpa)"
    return f"{NAME} (its forward by sdpa's flash kernel: this CPU has AMX)" if forward_by_sdpa() else NAME


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


def _mask_rows(mask: Tensor | None, start: int, end: int) -> Tensor | None:
    return None if mask is None else (mask if mask.shape[0] == 1 else mask[start:end])


def _blocks(mask: Tensor | None, q_len: int, k_len: int) -> list[tuple[int, int, int]]:
    """(first query, end of the queries, end of the keys they may see) for the query blocks of some rows.

    A key no query of a block may see (every key after the block's last query in a causal mask, trailing padding)
    contributes exp(min - max) = 0 to each of its softmax sums, and nothing to any gradient, so the block's
    products stop at the last key any of its queries sees: a causal mask computes (n + 1) / 2n of the square with
    n blocks instead of all of it, with the same values."""
    if mask is None or q_len < 2 * QUERY_BLOCK:
        return [(0, q_len, k_len)]
    positions = torch.arange(1, k_len + 1, device=mask.device, dtype=torch.int32)
    reach = (mask > torch.finfo(mask.dtype).min).mul(positions).amax(dim=-1).amax(dim=(0, 1))  # (Tq,): 1 + last key seen
    n = min(MAX_QUERY_BLOCKS, q_len // QUERY_BLOCK)
    bounds = [q_len * i // n for i in range(n + 1)]
    ends = [max(1, int(e)) for e in torch.stack([reach[a:b].max() for a, b in zip(bounds, bounds[1:])]).tolist()]
    return [(a, b, e) for a, b, e in zip(bounds, bounds[1:], ends)]


class _Block:
    """One block of rows [r0, r1) and queries [q0, q1), grouped by key/value head, against keys [0, k_end)."""

    def __init__(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                 rows: tuple[int, int], queries: tuple[int, int], k_end: int) -> None:
        (r0, r1), (q0, q1) = rows, queries
        b, heads, _, dim = query.shape
        self.kv_heads, self.q_span, self.queries, self.rows = key.shape[1], q1 - q0, slice(q0, q1), slice(r0, r1)
        self.shape = (r1 - r0, self.kv_heads, heads // self.kv_heads, self.q_span, dim)
        # scaling q (T x D) instead of the scores (T x T): exact for a power-of-two scale such as 64 ** -0.5
        self.q = self.grouped(query[r0:r1, :, q0:q1].mul(scale))
        self.k, self.v = key[r0:r1, :, :k_end], value[r0:r1, :, :k_end]
        rows_mask = _mask_rows(mask, r0, r1)
        self.mask = None if rows_mask is None else rows_mask[:, :, q0:q1, :k_end]

    def grouped(self, x: Tensor) -> Tensor:
        """(b, H, t, D) -> (b, Hkv, G*t, D): each key/value head's query heads stacked along the positions."""
        return x.reshape(x.shape[0], self.kv_heads, -1, x.shape[-1])

    def place(self, into: Tensor, grouped: Tensor) -> None:
        """Write a (b, Hkv, G*t, D) result into the block's rows and queries of a contiguous (B, H, Tq, D) tensor."""
        b, kv, g, _, d = self.shape
        into.view(into.shape[0], kv, g, into.shape[2], d)[self.rows, :, :, self.queries] = grouped.view(self.shape)

    def probabilities(self) -> Tensor:
        """softmax(q k^T + mask) over the block, in q's dtype."""
        scores = torch.matmul(self.q, self.k.transpose(-1, -2))
        if self.mask is not None:
            b, kv, g, t, d = self.shape
            scores.view(b, kv, g, t, scores.shape[-1]).add_(self.mask[:, :, None])
        return scores.softmax(dim=-1)


def _each_block(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Iterator[_Block]:
    step = _row_blocks(query, key)
    for r0 in range(0, query.shape[0], step):
        r1 = min(r0 + step, query.shape[0])
        for q0, q1, k_end in _blocks(_mask_rows(mask, r0, r1), query.shape[2], key.shape[2]):
            yield _Block(query, key, value, mask, scale, (r0, r1), (q0, q1), k_end)


class _MatmulAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        if forward_by_sdpa():
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                                   enable_gqa=key.shape[1] != query.shape[1])
        else:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
            for block in _each_block(query, key, value, mask, scale):
                block.place(out, torch.matmul(block.probabilities(), block.v))
        ctx.save_for_backward(query, key, value, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        query, key, value, mask = ctx.saved_tensors
        scale = ctx.scale
        grad_q = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        # keys and values gather from several query blocks: summed in float32, rounded once as one product would be
        grad_k = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
        grad_v = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        for block in _each_block(query, key, value, mask, scale):
            probs = block.probabilities()
            g = block.grouped(grad_out[block.rows, :, block.queries])
            k_end = block.k.shape[2]
            grad_v[block.rows, :, :k_end] += torch.matmul(probs.transpose(-1, -2), g)
            grad_scores = torch._softmax_backward_data(torch.matmul(g, block.v.transpose(-1, -2)), probs, -1, probs.dtype)
            block.place(grad_q, torch.matmul(grad_scores, block.k).mul_(scale))
            grad_k[block.rows, :, :k_end] += torch.matmul(grad_scores.transpose(-1, -2), block.q)
        return grad_q, grad_k.to(key.dtype), grad_v.to(value.dtype), None, None
