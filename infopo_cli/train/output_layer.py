"""The output layer and log-softmax fused: log p(target | prefix) for each scored position, without a
vocab-wide tensor kept between the forward and the backward.

Over a chunk of positions, log p(t) = z_t - logsumexp(z) with z = h W^T (+ b), soft-capped on Gemma-2. The
forward keeps only the hidden states and one float32 log-normaliser per position; the backward recomputes z
chunk by chunk and forms its gradient in place, g (onehot(t) - softmax(z)), in one float32 buffer. Against
autograd over `log_softmax(...).gather(...)` under checkpointing that is the same three matrix products but
three fewer vocab-wide tensors per chunk (the log-softmax, its gradient, the gather's zero-filled gradient),
and each fresh vocab-wide tensor costs a page-faulting allocation on a CPU about as long as the arithmetic on
it. The numbers are the same: the logits are rounded to the compute dtype by the product in both, then
normalised in float32.

On a CPU the chunk's two vocab-wide buffers (the product's 16-bit logits, their float32 copy) are the same memory
from chunk to chunk and call to call (`_scratch`), and chunks are smaller (train/logps.py): glibc maps a block this
large afresh at every allocation, and its pages fault and are zeroed on first touch, which costs as long as the
product that fills them (1536 positions x 49152 vocabulary, bf16, forward and backward, 2-core Xeon with AMX: 542 ms
in chunks of 1024 with fresh buffers, 338 with kept ones, 279 in chunks of 256 with kept ones).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def fusable(lm_head: nn.Module) -> bool:
    """A plain linear output layer (not one wrapped by LoRA or quantised), whose weight we can read directly."""
    return type(lm_head) is nn.Linear


def target_logps(hidden: Tensor, targets: Tensor, lm_head: nn.Linear, softcap: float | None, chunk: int) -> Tensor:
    """(tokens, H) hidden states and (tokens,) target ids -> (tokens,) float32 log-probs, differentiable in
    `hidden` (and in the layer's weight and bias where they require grad)."""
    return _TargetLogps.apply(hidden, lm_head.weight, lm_head.bias, targets, softcap, chunk)


_held: dict[str, Tensor] = {}  # CPU scratch buffers by role, grown as needed and kept for the process


def _scratch(role: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (rows, cols) buffer of `dtype` whose values are garbage: on a CPU the same memory as the last call's for
    `role`, elsewhere a new tensor (CUDA's caching allocator already reuses blocks, and a buffer kept between
    calls would be memory the GPU plan does not count)."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    held = _held.get(role)
    if held is None or held.dtype != dtype or held.shape[1] != cols or held.shape[0] < rows:
        _held.pop(role, None)  # freed before the larger one is made
        held = _held[role] = torch.empty(rows, cols, dtype=dtype)
    return held[:rows]


def _capped_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """The chunk's logits in the compute dtype's rounding, soft-capped, in a float32 scratch buffer (which the next
    chunk overwrites)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    if torch.is_grad_enabled():  # a backward that builds a graph (create_graph): fresh tensors, no `out=`
        into = nn.functional.linear(hidden, weight, bias).float()
    else:
        product = _scratch("product", rows, vocab, hidden.dtype, hidden.device)
        if bias is None:
            torch.mm(hidden, weight.t(), out=product)
        else:
            torch.addmm(bias, hidden, weight.t(), out=product)
        into = _scratch("logits", rows, vocab, torch.float32, hidden.device).copy_(product)
    if softcap:
        into.div_(softcap).tanh_().mul_(softcap)
    return into


class _TargetLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None,
                chunk: int) -> Tensor:
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_norm = torch.empty_like(logps)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z = _capped_logits(hidden[start:end], weight, bias, softcap)
            top = z.amax(dim=1, keepdim=True)
            picked = z.gather(1, targets[start:end, None]).squeeze(1)
            log_norm[start:end] = top.squeeze(1) + z.sub_(top).exp_().sum(dim=1).log_()
            logps[start:end] = picked - log_norm[start:end]
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.softcap, ctx.chunk = softcap, chunk
        return logps

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        softcap, chunk = ctx.softcap, ctx.chunk
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h, g = hidden[start:end], grad[start:end, None].float()
            z = _capped_logits(h, weight, bias, softcap)
            slope = 1 - (z / softcap) ** 2 if softcap else None  # d cap(x) / dx = 1 - tanh^2
            # d log p(t) / dz = onehot(t) - softmax(z), times the incoming gradient, formed in place
            z.sub_(log_norm[start:end, None]).exp_().mul_(-g)
            z.scatter_add_(1, targets[start:end, None], g)
            if slope is not None:
                z.mul_(slope)
            if torch.is_grad_enabled():
                grad_z = z.to(weight.dtype)
                if want_h:
                    grad_h[start:end] = grad_z @ weight
            else:
                grad_z = _scratch("product", end - start, z.shape[1], weight.dtype, z.device).copy_(z)
                if want_h:
                    torch.mm(grad_z, weight, out=grad_h[start:end])
            if want_w:
                grad_w.addmm_(grad_z.t().float(), h.float())
            if want_b:
                grad_b += z.sum(dim=0)
        return (grad_h, grad_w.to(weight.dtype) if want_w else None, grad_b.to(bias.dtype) if want_b else None,
                None, None, None)
