"""LoRA layers that compute in the base layer's dtype (bf16): float32 weights and gradients, 16-bit products.

peft casts a LoRA layer's input to the adapter's dtype (float32, the trained weights' precision), so with a 16-bit
base every adapter product runs in float32 on a float32 copy of the input, autograd saves that copy for A's
gradient, and the float32 result is added to the base output and cast back. With `keep_inputs` the adapter's A and
B instead cast their (small) weights to the input's dtype: the products run in 16 bits, the saved input is the
16-bit tensor the base layer saved already, and the weights and their gradients stay float32 for the optimizer.
This is the mixed precision TRL (under autocast) and Unsloth train with. The forward's numbers are unchanged where it
matters: the sum with the base layer's 16-bit output was rounded to 16 bits before as well. With fp16 compute the
products stay float32 (as peft's), only the saved input is the 16-bit one: fp16 overflows where bf16 does not.
On a CPU with native bf16 a policy step is about a quarter faster and a quarter smaller this way
(`benchmarks/vs_trl.py` times a whole epoch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Float32Product(torch.autograd.Function):
    """x @ W^T computed in W's dtype (float32); saves x in its own dtype and casts it again for W's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return nn.functional.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_w


class AdapterLinear(nn.Linear):
    """LoRA's A or B as an nn.Linear (the same float32 weight, name and state dict) that takes a 16-bit input as is:
    bf16 products on a bf16 input; float32 products on an fp16 one (fp16's range overflows in the adapter's gradients
    under loss scaling), its 16-bit input saved rather than a float32 copy."""

    def forward(self, x: Tensor) -> Tensor:
        """The adapter product in the input's 16-bit dtype (float32 weights cast per call); float32 inputs as peft."""
        if self.bias is not None or x.dtype == self.weight.dtype:
            return super().forward(x)
        if x.dtype == torch.bfloat16:
            return nn.functional.linear(x, self.weight.to(x.dtype))
        return _Float32Product.apply(x, self.weight)


def keep_inputs(model: nn.Module) -> int:
    """Switch every plain LoRA layer of `model` (not DoRA or other variants, whose forward reads A's weight itself)
    to `AdapterLinear` with peft's input cast off; the number of layers switched."""
    from peft.tuners.lora import LoraLayer

    switched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or getattr(module, "lora_variant", None):
            continue
        adapters = [*getattr(module, "lora_A", {}).values(), *getattr(module, "lora_B", {}).values()]
        if not adapters or not all(type(adapter) is nn.Linear for adapter in adapters):
            continue
        for adapter in adapters:
            adapter.__class__ = AdapterLinear
        module.cast_input_dtype_enabled = False
        switched += 1
    return switched
