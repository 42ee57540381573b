"""LoRA layers that keep their input as the base layer does: no float32 copy of it held for the backward.

peft casts a LoRA layer's input to the adapter's dtype (float32, the trained weights' precision) before its
down-projection A, and autograd saves that copy for A's gradient: per token and layer, a float32 copy of the
hidden state for each of q, k, v, o, gate, up (the same input cast three and two times) and of the MLP's
intermediate state for down. With a 16-bit base that is over half of the activations a step saves (measured
on SmolLM2-135M: 38 KiB per token per layer, 20 of them these copies). `keep_inputs` turns the cast off and
gives each A a down-projection that computes in float32 as before but saves the 16-bit input, the tensor the
base layer saves already, so the adapter adds none. The gradients are the same computation (float32 products,
the input gradient cast back to the input's dtype); what changes is only what stays in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _DownProjection(torch.autograd.Function):
    """x @ W^T computed in W's dtype; saves x in its own dtype and casts it again for W's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_w


class DownProjection(nn.Linear):
    """LoRA's A as an nn.Linear (the same weight, name and state dict) that saves its input as given."""

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is not None or x.dtype == self.weight.dtype:
            return super().forward(x)
        return _DownProjection.apply(x, self.weight)


def keep_inputs(model: nn.Module) -> int:
    """Switch every plain LoRA linear layer of `model` (not DoRA or other variants, whose forward reads A's
    weight itself) to `DownProjection` with peft's input cast off; the number of layers switched."""
    from peft.tuners.lora import LoraLayer

    switched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or getattr(module, "lora_variant", None):
            continue
        downs = list(getattr(module, "lora_A", {}).values())
        if not downs or not all(type(down) is nn.Linear for down in downs):
            continue
        for down in downs:
            down.__class__ = DownProjection
        module.cast_input_dtype_enabled = False
        switched += 1
    return switched
