"""`--fsdp`: the frozen base sharded over the processes with FSDP2, for a model that does not fit one GPU.

Each decoder layer is one FSDP2 unit, the input embedding another and the decoder (its final norm) a third: between
passes every rank holds 1/N of each of their weights, and a unit's whole weights exist only while it runs (gathered
from every rank, the next layer's gathered ahead; the embedding's only for its lookup). The 4-bit codes are stored in the compute dtype (bitsandbytes'
`quant_storage`), so FSDP2 splits them like any 16-bit tensor; their quantisation statistics stay whole on every
rank with their module, where bitsandbytes finds them again after each gather.

Whole on every rank, never sharded: the LoRA adapter (trained in float32, its gradients summed over ranks in
one all-reduce as in data-parallel training, so checkpoints and resume are those of one process) and the output
layer, which infopo's fused output layer reads chunk by chunk outside any module call (train/output_layer.py).
The reference is the same sharded base with the adapter off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from infopo_cli.errors import ConfigError
from infopo_cli.model.recompute import causal_lm, decoder_layers
from infopo_cli.model.stack import holds_4bit_codes


@dataclass(frozen=True)
class Held:
    """The bytes of the base's sharded weights this rank holds, of their whole size (`whole`)."""

    held: int
    whole: int
    codes_held: int   # of those, the 4-bit codes of the quantised linear layers
    codes_whole: int


def device_mesh(device: str, size: int):
    """The one-dimensional mesh of every process, made by every rank together before any of them loads."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device, (size,))


def kept_whole(model: nn.Module) -> set[nn.Parameter]:
    """The parameters every rank keeps whole: the adapters' (trained, or a frozen reference copy) and the output
    layer's (with the embedding, where the two are one tensor)."""
    whole = {p for name, p in model.named_parameters() if p.requires_grad or "lora_" in name}
    return whole | set(causal_lm(model).get_output_embeddings().parameters())


def shard_base(model: nn.Module, mesh, device: str) -> None:
    """Shard `model`'s base over `mesh` in place: each decoder layer, then the decoder. On a GPU each unit's weights
    move there as it is sharded (one layer whole at a time) and what stays whole moves after."""
    from torch.distributed.fsdp import fully_shard

    whole = kept_whole(model)
    decoder = causal_lm(model).get_decoder()
    layers = decoder_layers(decoder)
    if not layers:
        raise ConfigError(f"--fsdp: cannot find the decoder layers of {type(decoder).__name__} to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=whole)
    embedding = decoder.get_input_embeddings()
    if not whole.intersection(embedding.parameters()):  # untied: its own unit, or it would stay whole for the pass
        fully_shard(embedding, mesh=mesh, ignored_params=whole)
    fully_shard(decoder, mesh=mesh, ignored_params=whole, reshard_after_forward=True)  # not kept after the pass
    if device != "cpu":
        with torch.no_grad():
            for param in whole:
                param.data = param.data.to(device)


def held_bytes(model: nn.Module) -> Held:
    """What this rank holds of the sharded weights (FSDP2's DTensors), and of their 4-bit codes."""
    from torch.distributed.tensor import DTensor

    held = whole = codes_held = codes_whole = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not isinstance(param, DTensor):
                continue
            mine, size = param.to_local().numel() * param.element_size(), param.numel() * param.element_size()
            held, whole = held + mine, whole + size
            if holds_4bit_codes(module, name):
                codes_held, codes_whole = codes_held + mine, codes_whole + size
    return Held(held, whole, codes_held, codes_whole)
