"""What `infopo plan` prints: a run's predicted GPU memory part by part, whether it fits, what would, and what to
change (the numbers come from model/memory_plan.py)."""

from __future__ import annotations

import math
from dataclasses import replace

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError
from infopo_cli.model import memory_plan as mp, recompute as recomputation


def print_plan(console: Console, cfg: TrainConfig, prompt_length: int | None, gpu_mem_gib: float, fsdp: int = 1,
               preset: str | None = None) -> None:
    """Print `infopo plan` for `cfg` on a card of `gpu_mem_gib`: each part of the peak, whether it fits in each
    checkpointing mode, and what would. `fsdp` > 1: the base sharded over that many cards, each planned (1: one card);
    a run that does not fit is told how many cards would do (`preset`: the one its `infopo train` command names)."""
    if fsdp < 1:
        raise ConfigError(f"--fsdp must be the number of GPUs to shard the base over, 1 or more (got {fsdp})")
    if cfg.max_length == "auto":
        raise ConfigError("infopo plan needs --max-length as a number (auto depends on the data)")
    if not math.isfinite(gpu_mem_gib):
        raise ConfigError(f"--gpu-mem must be the GPU's memory in GiB, a finite number (got {gpu_mem_gib:g})")
    card = round(gpu_mem_gib * mp.GIB)
    if not card > mp.CUDA_CONTEXT:
        raise ConfigError(f"--gpu-mem must be more than the CUDA context's {mp.CUDA_CONTEXT / mp.GIB:g} GiB "
                          f"(got {gpu_mem_gib:g})")

    def budget_of(mode: str) -> tuple[int, int]:
        """(margin, bytes usable) for a run of `mode` once the CUDA context exists: only auto keeps a margin free."""
        kept = recomputation.budget(replace(cfg, gradient_checkpointing=mode), "cuda", card - mp.CUDA_CONTEXT, card)
        return kept.margin, kept.usable or 0

    compute = 4 if cfg.dtype == "fp32" else 2
    mode = cfg.gradient_checkpointing
    margin, budget = budget_of(mode)
    planned = recomputation.for_settings(cfg, "cuda", compute, budget, prompt_length)
    arch, where, batch, layout, no_grad = planned.arch, planned.where, planned.batch, planned.layout, planned.eval_layout
    run = replace(planned.run, fsdp=fsdp)
    shared = batch.shared
    choice = planned.choice if fsdp == 1 else mp.choose(arch, run, layout, mode, budget, eval_layout=no_grad)
    chosen = choice.plan

    response = cfg.max_length - batch.prompt_tokens
    console.print(f"[bold]{escape(cfg.model)}[/]: {arch.layers} layers, hidden {arch.hidden}, {arch.heads} heads "
                  f"({arch.kv_heads} key/value), vocabulary {arch.vocab} [dim]({escape(where)})[/]", highlight=False)
    rows = (f"{layout.rows} rows of prompt {batch.prompt_tokens} + chosen {response} + rejected {response}"
            if shared else f"{layout.rows} rows of prompt {batch.prompt_tokens} + response {response}")
    console.print(f"micro-batch of {batch.pairs} pairs: {rows} tokens, padded to {layout.width} ({layout.tokens} positions, "
                  f"{layout.scored} scored); "
                  f"{'fp32' if compute == 4 else 'bf16' if cfg.dtype != 'fp16' else 'fp16'} compute"
                  f"{' (what auto picks on a GPU with bf16)' if cfg.dtype == 'auto' else ''}, {run.attention} attention, "
                  f"LoRA r={cfg.lora_r}, {run.optimizer}", highlight=False)
    if fsdp > 1:
        console.print(f"the base sharded over {fsdp} GPUs (--fsdp), each card planned: its share of the split weights, "
                      "the adapter, output layer and NF4 statistics whole, one micro-batch's activations", highlight=False)

    where = f"usable on a {gpu_mem_gib:g} GiB GPU once its CUDA context" + (
        f" and a {_gib(margin)} GiB margin are kept" if margin else " is made")
    per_card = f" per card of {fsdp}" if fsdp > 1 else ""
    table = Table(title=f"predicted peak GPU memory{per_card}, gradient checkpointing {mode}: {recomputation.describe(choice, mode, budget, where)}",
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
    table.add_row("allocator rounding and fragmentation", _gib(chosen.slack),
                  f"~{mp.SLACK:.0%} of the step's activations: 512 B blocks in 2 MiB segments, expandable (estimate)")
    table.add_row("CUDA context", _gib(chosen.context), "driver and kernels, outside the allocator (estimate)")
    table.add_row("[bold]needed on the GPU[/]", f"[bold]{_gib(chosen.card)}[/]", "")
    why = ("--gpu-mem-margin" if cfg.gpu_mem_margin is not None else f"max({mp.MARGIN_SHARE:.0%} of the card, "
           f"{mp.MARGIN_MIN / mp.GIB:g} GiB): what the plan does not see, other processes included")
    table.add_row("margin kept free", _gib(margin), why if mode == "auto" else
                  f"auto only (it would keep {_gib(budget_of('auto')[0])} GiB, {why}); {mode} plans with all the memory")
    console.print(table)
    others = {name: peak for name, peak in chosen.moments.items() if name != chosen.moment}
    console.print("[dim]other moments of the step: " + "; ".join(f"{name} {_gib(peak)} GiB" for name, peak in others.items())
                  + (f"; the saved inputs in pinned CPU memory: {_gib(chosen.host_bytes)} GiB" if chosen.host_bytes else "")
                  + "[/]", highlight=False)
    console.print((f"each of {fsdp} cards: " if fsdp > 1 else "") + verdict(gpu_mem_gib, card, chosen.card, margin),
                  highlight=False)
    if not choice.fits:
        cards = mp.fewest_cards(arch, run, layout, mode, budget, no_grad, start=fsdp + 1)
        console.print(more_cards(gpu_mem_gib, fsdp, cards, preset, tight=chosen.card <= card), highlight=False)
    elif fsdp > 1:
        console.print(f"train it so: {escape(_train_command(fsdp, preset))}", highlight=False)

    options = Table("--gradient-checkpointing", "recomputes", "peak allocated GiB", "needed GiB", "fits", title_justify="left",
                    title="the choices")
    for name in mp.MODES:
        option = choice if name == mode else mp.choose(arch, run, layout, name, budget_of(name)[1], eval_layout=no_grad)
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


def verdict(gpu_mem_gib: float, card: int, needed: int, margin: int) -> str:
    """Whether `needed` bytes fit on a card of `card` bytes keeping `margin` free (0: none kept), in one line."""
    spare = card - needed
    if spare >= margin:
        return (f"[green]fits in {gpu_mem_gib:g} GiB with {_gib(spare)} GiB " + (
            f"margin[/]: {_gib(needed)} GiB needed (at least {_gib(margin)} kept free)" if margin else
            f"to spare[/]: {_gib(needed)} GiB needed"))
    if spare >= 0:
        return (f"[yellow]fits in {gpu_mem_gib:g} GiB with only {_gib(spare)} GiB margin[/]: {_gib(needed)} GiB needed, "
                f"less than the {_gib(margin)} GiB margin kept free")
    return f"[red]does not fit in {gpu_mem_gib:g} GiB[/]: {_gib(needed)} GiB needed"


def more_cards(gpu_mem_gib: float, fsdp: int, cards: int | None, preset: str | None, tight: bool = False) -> str:
    """What a run that does not fit `fsdp` cards (1: one card) of `gpu_mem_gib` needs (`tight`: it fits, but inside
    the margin auto keeps free): the fewest cards `--fsdp` fits on (`cards`; None: none up to mp.MOST_CARDS), and the
    command, in one line."""
    gpus = f"one {gpu_mem_gib:g} GiB GPU" if fsdp == 1 else f"{fsdp} GPUs of {gpu_mem_gib:g} GiB"
    head = f"fits {gpus} only inside the margin" if tight else f"does not fit {gpus}"
    if cards is not None:
        return f"{head}; with --fsdp it fits on {cards} cards: {escape(_train_command(cards, preset))}"
    if fsdp >= mp.MOST_CARDS:
        return head
    return (f"{head}, nor {mp.MOST_CARDS} with --fsdp (the adapter, the output layer and the NF4 statistics are whole on "
            "every card)")


def _train_command(cards: int, preset: str | None) -> str:
    return f"infopo train{f' --preset {preset}' if preset else ''} --fsdp --nproc {cards} --data ..."


def _gib(n: float) -> str:
    return f"{n / mp.GIB:.2f}"
