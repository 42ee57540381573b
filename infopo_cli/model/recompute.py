"""Which decoder layers recompute their activations in the backward: chosen for a run from the memory plan
(`--gradient-checkpointing auto`) or as given, and applied to a loaded model layer by layer.

transformers 5's decoder layers are `GradientCheckpointingLayer`s: enabling checkpointing sets each layer's
`gradient_checkpointing` flag, and a layer whose flag is then switched off runs (and keeps its activations) as
usual. The layers kept whole are the last ones: the backward reaches them first, so their activations are
freed before any recompute happens.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError, ModelError
from infopo_cli.model import memory_plan as mp
from infopo_cli.model.architectures import find_architecture
from infopo_cli.model.source import loadable

if TYPE_CHECKING:
    from torch import nn

    from infopo_cli.data.tokenization import TokenizedPair


@dataclass(frozen=True)
class Recompute:
    """`layers`: how many decoder layers recompute, the first ones (None: every one); `offload`: their saved inputs
    in pinned CPU memory (CUDA only); `message`: what was chosen and why, for the user."""

    layers: int | None
    offload: bool = False
    message: str = ""
    dequantised: int = 0  # bytes of the de-quantised copy of a CPU run's 4-bit base held for speed; 0: none


CPU_HEADROOM = mp.GIB // 2  # free RAM the de-quantised copy leaves beside the plan: it only saves time


def _dequantised(arch: mp.Architecture, run: mp.Training, layout: mp.Layout, mode: str, usable: int | None,
                 no_grad: mp.Layout, choice: mp.Choice, processes: int) -> tuple[mp.Training, mp.Choice]:
    """On a CPU, the run with its 4-bit base also held de-quantised where that fits the free RAM (with
    `CPU_HEADROOM` to spare) without recomputing more layers: bitsandbytes has no CPU training kernel and otherwise
    de-quantises every weight at each call, twice a step (forward and backward; three times for a recomputed layer).
    Not for several processes on one machine, which each measured the same free RAM. Else the run and choice as
    they are."""
    if run.device != "cpu" or not run.quantized or processes > 1 or usable is None:
        return run, choice
    held = replace(run, dequantised=True)
    faster = mp.choose(arch, held, layout, mode, usable - CPU_HEADROOM, eval_layout=no_grad)
    if faster.fits and faster.plan.checkpointed <= choice.plan.checkpointed:
        return held, faster
    return run, choice


def given(mode: str) -> Recompute:
    """The setting without a plan (a model loaded outside `infopo train`): auto recomputes every layer, as on."""
    return Recompute(0 if mode == "off" else None, offload=mode == "offload")


def training(cfg: TrainConfig, device: str, compute_bytes: int, softcapped: bool = False) -> mp.Training:
    """The plan's view of a run's settings on `device` (optimizer and attention kernel as `auto` resolves them)."""
    targets = None if cfg.target_modules == "all-linear" else frozenset([cfg.target_modules] if isinstance(
        cfg.target_modules, str) else cfg.target_modules)
    optimizer = cfg.optimizer if cfg.optimizer != "auto" else ("paged_adamw_8bit" if device == "cuda" else "adamw")
    attention = cfg.attn_implementation
    if attention == "auto":  # as model/stack.py resolves it (model/attention.py)
        attention = "matmul" if device == "cpu" and compute_bytes == 2 and not softcapped else "sdpa"
    return mp.Training(cfg.lora_r, targets, cfg.lora_dropout, compute_bytes, cfg.load_in_4bit, optimizer, device,
                       attention, mp.LM_CHUNK_CPU if device == "cpu" else mp.LM_CHUNK, fsdp=cfg.nproc if cfg.fsdp else 1)


@dataclass(frozen=True)
class SettingsPlan:
    """The plan of a run's settings before any data is read: micro-batches at `max_length` (`where`: where the model's
    config was read; `eval_layout`: the held-out batch's)."""

    arch: mp.Architecture
    where: str
    run: mp.Training
    batch: mp.Batch
    layout: mp.Layout
    eval_layout: mp.Layout
    choice: mp.Choice


def for_settings(cfg: TrainConfig, device: str, compute_bytes: int, budget: int | None,
                 prompt_length: int | None = None) -> SettingsPlan:
    """What `cfg.gradient_checkpointing` picks on `device` with `budget` bytes free, planned from the settings alone
    (`infopo plan`, `infopo doctor`; a run plans its own longest micro-batch, `for_run`). `cfg.max_length` is a number."""
    arch, where = find_architecture(cfg.model)
    run = training(cfg, device, compute_bytes, arch.attn_softcap)
    shared = cfg.share_prompt and run.attention not in mp.MASKLESS
    batch = mp.Batch(cfg.batch_size, cfg.max_length, cfg.max_prompt_length if prompt_length is None else prompt_length,
                     shared)
    layout, no_grad = batch.layout(), replace(batch, pairs=cfg.eval_batch_size).layout()
    choice = mp.choose(arch, run, layout, cfg.gradient_checkpointing, budget, eval_layout=no_grad)
    run, choice = _dequantised(arch, run, layout, cfg.gradient_checkpointing, budget, no_grad, choice, cfg.nproc)
    return SettingsPlan(arch, where, run, batch, layout, no_grad, choice)


def free_memory(device: str) -> int | None:
    """Bytes free for this run: the GPU's (its CUDA context already made), or the RAM the kernel says is available
    (/proc/meminfo, else sysconf; None when neither says)."""
    if device == "cuda":
        return _cuda_memory()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def card_memory() -> int:
    """The bytes of the GPU this process may use: the card's, or less under a per-process cap."""
    return _cuda_memory()[1]


def _cuda_memory() -> tuple[int, int]:
    """(bytes free for this run, bytes of the card this process may use)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    # a per-process cap (torch.cuda.set_per_process_memory_fraction: a shared card, a benchmark) binds before the card does
    fraction = torch.cuda.get_per_process_memory_fraction() if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0
    return int(min(free, fraction * total - torch.cuda.memory_reserved())), int(fraction * total)


@dataclass(frozen=True)
class Budget:
    """The memory a run may plan with: `free` bytes (GPU or RAM; None: unknown), less the `margin` auto keeps free
    on a GPU; `where` says what it is, for messages."""

    free: int | None
    margin: int
    where: str

    @property
    def usable(self) -> int | None:
        return None if self.free is None else max(0, self.free - self.margin)


def budget(cfg: TrainConfig, device: str, free: int | None = None, card: int | None = None) -> Budget:
    """What a run on `device` may plan with: `free` (else measured), and on CUDA under `--gradient-checkpointing auto`
    the margin of `cfg.gpu_mem_margin`, or of the card's memory (`card`, else measured), kept free. A given setting
    is not chosen from the budget: its warnings measure it against all the free memory."""
    free = free_memory(device) if free is None else free
    if device != "cuda" or free is None or cfg.gradient_checkpointing != "auto":
        return Budget(free, 0, "free RAM" if device != "cuda" else "free GPU memory")
    margin = mp.margin(card_memory() if card is None else card, cfg.gpu_mem_margin)
    return Budget(free, margin, f"free GPU memory once a {mp.gib(margin)} GiB margin is kept")


def for_run(cfg: TrainConfig, source: str, train: Sequence[TokenizedPair], held_out: Sequence[TokenizedPair], device: str,
            compute_bytes: int, share_prompt: bool, free: int | None = None, card: int | None = None) -> Recompute:
    """The checkpointing of a run about to load its model, from the plan of its longest micro-batch (and longest
    held-out or reference batch) and the free memory (`free`, else measured); on CUDA `auto` keeps a margin of the
    card's memory (`card`, else measured) free (`budget`). On CUDA a run that does not fit even recomputing every layer, margin
    or not, is refused with the plan's advice, in one line, before the model loads."""
    mode = cfg.gradient_checkpointing
    if device != "cuda" and mode == "offload":
        return Recompute(None, message="gradient checkpointing offload: on a CPU the activations are in host memory "
                                       "already, so nothing is copied: every layer recomputes (as on)")
    arch = _architecture(source)
    if arch is None:
        chosen = given(mode)
        return Recompute(chosen.layers, chosen.offload, f"gradient checkpointing {mode}: no config.json to plan from, "
                         + ("every layer recomputes" if chosen.layers is None else "no layer recomputes"))
    run = training(cfg, device, compute_bytes, arch.attn_softcap)
    shared = share_prompt and run.attention not in mp.MASKLESS
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in train]
    held = lengths + [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in held_out]
    layout = mp.worst_layout(lengths, cfg.batch_size, shared)
    no_grad = mp.worst_layout(held, cfg.eval_batch_size, shared)
    memory = budget(cfg, device, free, card)
    choice = mp.choose(arch, run, layout, mode, memory.usable, eval_layout=no_grad)
    run, choice = _dequantised(arch, run, layout, mode, memory.usable, no_grad, choice, cfg.nproc)
    if device == "cuda" and memory.free is not None:
        least = mp.plan(arch, run, layout, arch.layers, offload=mode == "offload", eval_layout=no_grad)
        # refused past what is free: inside the margin it may still fit (and a step out of memory recomputes more)
        if least.needed > memory.free:
            longest = max(lengths, key=lambda p: p[0] + max(p[1], p[2]))
            batch = mp.Batch(cfg.batch_size, longest[0] + max(longest[1], longest[2]), longest[0], shared)
            tips = mp.advice(arch, run, batch, cfg.grad_accum, memory.usable, mode)
            raise ConfigError(f"this run needs {mp.gib(least.needed)} GiB of GPU memory even recomputing every layer, "
                              f"and {mp.gib(memory.free)} GiB are free (the memory plan of its longest micro-batch; "
                              f"`infopo plan` shows the parts): try {'; or '.join(tips)}")
    return Recompute(choice.plan.checkpointed, choice.plan.offload,
                     f"gradient checkpointing {mode}: {describe(choice, mode, memory.usable, memory.where)}",
                     mp.dequantised_bytes(arch, run) if run.dequantised else 0)


def describe(choice: mp.Choice, mode: str, budget: int | None, where: str) -> str:
    """What `choice` recomputes and why, in one line (`where`: what the budget is, e.g. "free RAM")."""
    chosen, without = choice.plan, choice.without
    if chosen.checkpointed == 0:
        what = "off, no layer recomputes"
    elif chosen.checkpointed == chosen.layers:
        what = "every layer recomputes" + (", its saved input in pinned CPU memory" if chosen.offload else "")
    else:
        what = (f"the first {chosen.checkpointed} of {chosen.layers} layers recompute, the last "
                f"{chosen.layers - chosen.checkpointed} keep their activations")
    if budget is None:
        return f"{what} ({where} unknown)" if mode == "auto" else what
    need, free, whole = mp.gib(chosen.needed), f"{mp.gib(budget)} GiB {where}", mp.gib(without.needed)
    if mode != "auto":
        return what + (f" (the run needs {need} GiB of {free})" if choice.fits else
                       f"; warning: the plan predicts {need} GiB, more than the {free}")
    if chosen.checkpointed == 0:
        return f"{what} (the run needs {need} GiB of {free} without recomputation)"
    if not choice.fits:  # on a GPU the run is refused before this is said (for_run); RAM can swap
        return f"{what} (even so the run needs {need} GiB, more than the {free}" + (
            ": the system may swap)" if "RAM" in where else ")")
    return f"{what} (without recomputation the run needs {whole} GiB of {free}; with it, {need})"


def _architecture(source: str) -> mp.Architecture | None:
    """The architecture of a resolved model source (a folder, or a hub id whose files the load downloads anyway: its
    config.json may be fetched first); None when there is none to plan from."""
    try:
        return find_architecture(source)[0]
    except ModelError:
        pass
    from transformers import AutoConfig

    where = loadable(source)  # a folder with code of its own is refused here, not planned from
    try:
        return mp.architecture(AutoConfig.from_pretrained(where, trust_remote_code=False).to_dict())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules transformers can checkpoint one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply(base: nn.Module, recompute: Recompute) -> None:
    """Turn on non-reentrant checkpointing for the first `recompute.layers` decoder layers of `base` (before peft
    wraps it). Non-reentrant checkpointing needs no input that requires grad, so the frozen 4-bit base is used as
    it is (no float32 up-cast of every non-quantised weight)."""
    if recompute.layers == 0:
        return
    kwargs = {"use_reentrant": False}
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    # a base loaded to be sharded (--fsdp) is still in host memory here: it trains on the GPU all the same
    import torch

    offload = recompute.offload and (next(base.parameters()).device.type == "cuda" or torch.cuda.is_available())
    if offload and not _can_offload(base):
        raise ConfigError("--gradient-checkpointing offload needs a newer transformers (pip install -U transformers)")
    if enable is None:  # transformers <= 5.17: the older name, which offloads too
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **({"offload": True} if offload else {}))
    elif offload:
        enable(activation_checkpointing_kwargs=kwargs, offload=True)
    else:
        enable(activation_checkpointing_kwargs=kwargs)
    if recompute.layers is not None:
        for layer in decoder_layers(base)[recompute.layers:]:
            layer.gradient_checkpointing = False


def _can_offload(base: nn.Module) -> bool:
    enable = getattr(base, "activation_checkpointing_enable", None) or getattr(base, "gradient_checkpointing_enable", None)
    return enable is not None and "offload" in inspect.signature(enable).parameters


def recompute_more(model: nn.Module, recompute: Recompute) -> Recompute | None:
    """After a step ran out of memory: every decoder layer of `model` (a peft model or its base) recomputes, or where
    every one does already, their saved inputs go to pinned CPU memory (CUDA). Applied to the model at once; None when
    there is nothing more to do."""
    base = causal_lm(model)
    if not _every_layer(base, recompute):
        return recompute_as(model, recompute, "on")
    if not recompute.offload and next(base.parameters()).device.type == "cuda" and _can_offload(base):
        return recompute_as(model, recompute, "offload")
    return None


def recompute_as(model: nn.Module, recompute: Recompute, mode: str) -> Recompute:
    """`model`, which recomputes as `recompute` says, recomputing at least as `--gradient-checkpointing mode` (on or
    offload; offload only on CUDA) does: what another process of the run went on with after running out of memory.
    Applied to the model at once where it does less."""
    base = causal_lm(model)
    offload = recompute.offload or (mode == "offload" and next(base.parameters()).device.type == "cuda")
    more = Recompute(None, offload, "every layer recomputed" + (", its saved input in pinned CPU memory" if offload else ""))
    if not _every_layer(base, recompute) or offload != recompute.offload:
        apply(base, more)
    return more


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _every_layer(base: nn.Module, recompute: Recompute) -> bool:
    return recompute.layers is None or recompute.layers >= len(decoder_layers(base))
