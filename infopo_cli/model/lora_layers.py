"""How infopo's LoRA layers compute: 16-bit products on a 16-bit base, and the adapter's term summed into the base
output by the product itself.

Inputs. peft casts a LoRA layer's input to the adapter's dtype (float32, the trained weights' precision), so with a
16-bit base every adapter product runs in float32 on a float32 copy of the input, autograd saves that copy for A's
gradient, and the float32 result is added to the base output and cast back. Here the adapter's A and B instead cast
their (small) weights to the input's dtype: the products run in 16 bits, the saved input is the 16-bit tensor the base
layer saved already, and the weights and their gradients stay float32 for the optimizer. This is the mixed precision
TRL (under autocast) and Unsloth train with. With fp16 compute the products stay float32 (as peft's), only the saved
input is the 16-bit one: fp16 overflows where bf16 does not.

Sums. peft adds the adapter's term as `base + B(A(x)) * scaling` (and on a 4-bit base clones the base output first):
three or four passes over an output-sized tensor per layer and step (clone, scale, add, and the scale's backward), as
much memory traffic as a product's. `FusedSum` layers make it one product that accumulates into the base output,
`addmm(base, A(x), B^T, alpha=scaling)`: the same sum, rounded once.
On a CPU with native bf16 the 16-bit products make a policy step about a quarter faster and a quarter smaller
(`benchmarks/vs_trl.py` times a whole epoch).
"""

from __future__ import annotations

from typing import Any

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


_PEFT_KWARGS = ("adapter_names", "alora_offsets")  # peft's own: per-row adapters, aLoRA offsets


def _fused_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """peft's LoRA forward for plain adapters (`FusedSum`) with each adapter's term summed into the base output by
    its B product; peft's own forward for whatever else it handles (adapters off or merged, per-row adapters, DoRA)."""
    if self.disable_adapters or self.merged or any(kwargs.get(key) is not None for key in _PEFT_KWARGS):
        return self.unfused_forward(x, *args, **kwargs)
    kwargs = {key: value for key, value in kwargs.items() if key not in _PEFT_KWARGS}  # not the base layer's
    active = [name for name in self.active_adapters if name in self.lora_A]
    if any(name in self.lora_variant or self.lora_B[name].bias is not None for name in active):
        return self.unfused_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for name in active:
        hidden = self.lora_A[name](self.lora_dropout[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype)))
        if hidden.dtype != result.dtype:  # fp16 (or peft's input cast): the float32 product, added as peft adds it
            result = result + (self.lora_B[name](hidden) * self.scaling[name]).to(result.dtype)
            continue
        weight = self.lora_B[name].weight.to(result.dtype).t()
        result = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), weight,
                             alpha=self.scaling[name]).view(result.shape)
    return result


class FusedSum:
    """Marks a LoRA layer whose adapter terms are summed into the base output by the B product (`_fused_forward`)."""


_FUSED: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """`cls` (a peft LoRA layer class) with the fused forward; peft's stays at hand as `unfused_forward`."""
    if cls not in _FUSED:
        _FUSED[cls] = type(f"Fused{cls.__name__}", (FusedSum, cls),
                           {"forward": _fused_forward, "unfused_forward": cls.forward})
    return _FUSED[cls]


def _summable() -> tuple[type, ...]:
    """The peft layer classes whose forward is `base_layer(x) + B(A(x)) * scaling` (others, such as a LoRA on
    parameters or on attention, compute another way)."""
    from peft.tuners.lora import Linear
    from peft.tuners.lora.bnb import Linear4bit

    return Linear, Linear4bit


def adapt(model: nn.Module) -> int:
    """Switch every plain LoRA layer of `model` (not DoRA or other variants, whose forward reads A's weight itself)
    to 16-bit products (`AdapterLinear`, peft's input cast off), and those of a linear layer to fused sums; the
    number of layers switched."""
    from peft.tuners.lora import LoraLayer

    summable = _summable()
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
        if type(module) in summable:
            module.__class__ = _fused_class(type(module))
        switched += 1
    return switched
