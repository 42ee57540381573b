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


def _capped_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, into: Tensor) -> Tensor:
    """`into` (float32, reused between chunks) <- the chunk's logits in the compute dtype's rounding, soft-capped."""
    into.copy_(nn.functional.linear(hidden, weight, bias))
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
        buffer = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z = _capped_logits(hidden[start:end], weight, bias, softcap, buffer[:end - start])
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
        buffer = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h, g = hidden[start:end], grad[start:end, None].float()
            z = _capped_logits(h, weight, bias, softcap, buffer[:end - start])
            slope = 1 - (z / softcap) ** 2 if softcap else None  # d cap(x) / dx = 1 - tanh^2
            # d log p(t) / dz = onehot(t) - softmax(z), times the incoming gradient, formed in place
            z.sub_(log_norm[start:end, None]).exp_().mul_(-g)
            z.scatter_add_(1, targets[start:end, None], g)
            if slope is not None:
                z.mul_(slope)
            grad_z = z.to(weight.dtype)
            if want_h:
                grad_h[start:end] = grad_z @ weight
            if want_w:
                grad_w.addmm_(grad_z.t().float(), h.float())
            if want_b:
                grad_b += z.sum(dim=0)
        return (grad_h, grad_w.to(weight.dtype) if want_w else None, grad_b.to(bias.dtype) if want_b else None,
                None, None, None)
