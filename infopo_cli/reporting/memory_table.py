"""What `infopo plan` prints: a run's predicted GPU memory part by part, whether it fits, what would, and what to
change (the numbers come from model/memory_plan.py)."""

from __future__ import annotations

from dataclasses import replace

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError
from infopo_cli.model import checkpointing, memory_plan as mp
from infopo_cli.model.architectures import find_architecture


def print_plan(console: Console, cfg: TrainConfig, prompt_length: int | None, gpu_mem_gib: float) -> None:
    if cfg.max_length == "auto":
        raise ConfigError("infopo plan needs --max-length as a number (auto depends on the data)")
    if not gpu_mem_gib > mp.CUDA_CONTEXT / mp.GIB:
        raise ConfigError(f"--gpu-mem must be more than the CUDA context's {mp.CUDA_CONTEXT / mp.GIB:g} GiB (got {gpu_mem_gib:g})")
    arch, where = find_architecture(cfg.model)
    compute = 4 if cfg.dtype == "fp32" else 2
    run = checkpointing.training(cfg, "cuda", compute)
    shared = cfg.share_prompt and run.attention != "flash_attention_2"
    batch = mp.Batch(cfg.batch_size, cfg.max_length, cfg.max_prompt_length if prompt_length is None else prompt_length, shared)
    layout, no_grad = batch.layout(), replace(batch, pairs=cfg.eval_batch_size).layout()
    budget = round(gpu_mem_gib * mp.GIB) - mp.CUDA_CONTEXT  # what torch can allocate once the context exists
    mode = cfg.gradient_checkpointing
    choice = mp.choose(arch, run, layout, mode, budget, eval_layout=no_grad)
    chosen = choice.plan

    response = cfg.max_length - min(batch.prompt, cfg.max_length - 1)
    console.print(f"[bold]{escape(cfg.model)}[/]: {arch.layers} layers, hidden {arch.hidden}, {arch.heads} heads "
                  f"({arch.kv_heads} key/value), vocabulary {arch.vocab} [dim]({escape(where)})[/]", highlight=False)
    rows = (f"{layout.rows} rows of prompt {layout.width - 2 * response} + chosen {response} + rejected {response}"
            if shared else f"{layout.rows} rows of prompt {layout.width - response} + response {response}")
    console.print(f"micro-batch of {batch.pairs} pairs: {rows} tokens ({layout.tokens} positions, {layout.scored} scored); "
                  f"{'fp32' if compute == 4 else 'bf16' if cfg.dtype != 'fp16' else 'fp16'} compute"
                  f"{' (what auto picks on a GPU with bf16)' if cfg.dtype == 'auto' else ''}, {run.attention} attention, "
                  f"LoRA r={cfg.lora_r}, {run.optimizer}", highlight=False)

    table = Table(title=f"predicted peak GPU memory, gradient checkpointing {mode}: {checkpointing.describe(choice, mode, budget, f'free on a {gpu_mem_gib:g} GiB GPU')}",
                  title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("", style="dim")
    for part in chosen.static:
        table.add_row(part.name, _gib(part.bytes), part.note)
    table.add_section()
    table.add_row(f"[italic]at the peak, {chosen.moment}:[/]", "", "")
    for part in chosen.dynamic:
        table.add_row(part.name, _gib(part.bytes), part.note)
    table.add_section()
    table.add_row("[bold]peak allocated[/]", f"[bold]{_gib(chosen.allocated)}[/]", "what infopo's 'peak memory' reports "
                  "(torch.cuda.max_memory_allocated)")
    table.add_row("allocator slack", _gib(chosen.slack), f"~{mp.SLACK:.0%} of the step's activations (fragmentation)")
    table.add_row("CUDA context", _gib(chosen.context), "driver and kernels, outside the allocator (estimate)")
    table.add_row("[bold]needed on the GPU[/]", f"[bold]{_gib(chosen.card)}[/]", "")
    console.print(table)
    others = {name: peak for name, peak in chosen.moments.items() if name != chosen.moment}
    console.print("[dim]other moments of the step: " + "; ".join(f"{name} {_gib(peak)} GiB" for name, peak in others.items())
                  + (f"; the saved inputs in pinned CPU memory: {_gib(chosen.host_bytes)} GiB" if chosen.host_bytes else "")
                  + "[/]", highlight=False)
    if choice.fits:
        console.print(f"[green]fits in {gpu_mem_gib:g} GiB[/]: {_gib(chosen.card)} GiB needed, "
                      f"{_gib(gpu_mem_gib * mp.GIB - chosen.card)} to spare", highlight=False)
    else:
        console.print(f"[red]does not fit in {gpu_mem_gib:g} GiB[/]: {_gib(chosen.card)} GiB needed", highlight=False)

    options = Table("--gradient-checkpointing", "recomputes", "peak allocated GiB", "needed GiB", "fits", title_justify="left",
                    title="the choices")
    for name in mp.MODES:
        option = choice if name == mode else mp.choose(arch, run, layout, name, budget, eval_layout=no_grad)
        p = option.plan
        layers = "offloaded, every layer" if p.offload else f"{p.checkpointed} of {p.layers} layers"
        options.add_row(name, layers, _gib(p.allocated), _gib(p.card), "[green]yes[/]" if option.fits else "[red]no[/]")
    console.print(options)
    for label, ckpt in (("with checkpointing", True), ("without", False)):
        pairs = mp.largest_batch(arch, run, batch, ckpt, budget)
        length = mp.longest_length(arch, run, batch, ckpt, budget)
        console.print(f"{label}: largest --batch-size at --max-length {cfg.max_length}: {pairs or 'none'}; "
                      f"longest --max-length at --batch-size {batch.pairs}: {length or 'none'}", highlight=False)
    tips = mp.advice(arch, run, batch, cfg.grad_accum, budget, mode)
    if tips:
        console.print("what to change:", highlight=False)
        for tip in tips:
            console.print(f"  - {escape(tip)}", highlight=False)


def _gib(n: float) -> str:
    return f"{n / mp.GIB:.2f}"
