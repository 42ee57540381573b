"""`infopo train`: the training recipe, top to bottom.

data -> output folder -> hardware -> model (4-bit base + LoRA) -> tokens -> optimizer -> evaluate
-> loop (policy and reference log-probs, loss, backward, clip, step) -> evaluate -> save -> summary.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from infopo_cli import __version__
from infopo_cli import files
from infopo_cli.train import checkpoint
from infopo_cli.model import loading as model_stack
from infopo_cli.losses import registry as objectives
from infopo_cli.data.batching import collate, eval_batches, shuffled_batches
from infopo_cli.config import TrainConfig, to_toml
from infopo_cli.data.loading import load_pairs
from infopo_cli.errors import ConfigError
from infopo_cli.losses.registry import LossSpec
from infopo_cli.train.evaluate import Evaluator
from infopo_cli.train.logps import pair_logps, takes_custom_masks
from infopo_cli.train.metrics import MetricsLog, PairMetrics
from infopo_cli.train.plot import plot_run
from infopo_cli.model.precision import choose
from infopo_cli.train.progress import TrainProgress
from infopo_cli.data.token_cache import tokenize_cached
from infopo_cli.data.tokenization import TokenizedPair, encode_pair


@dataclass
class RunSummary:
    output: str
    status: str                       # "completed" or "interrupted"
    steps: int
    seconds: float
    tokens_per_s: float
    peak_memory_gib: float
    device: str
    dtype: str
    first_step: dict = field(default_factory=dict)
    last_step: dict = field(default_factory=dict)
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)


def default_output(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.preset or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def train(cfg: TrainConfig, console: Console | None = None, resume: Path | None = None) -> RunSummary:
    """Run the recipe; with `resume` (a checkpoint folder of this run), continue after its step."""
    console = console or Console()
    say = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    cfg.validate()
    spec, loss_params = objectives.resolve(cfg.loss, cfg.loss_overrides())

    # --- data: every row checked before any model is loaded -----------------------------------
    options = cfg.data_options()
    loaded = load_pairs(cfg.data, options)
    if loaded.skipped:
        say(f"[yellow]skipped {len(loaded.skipped)} invalid rows of {loaded.rows}[/]; the first ones:")
        for reason in loaded.skipped[:3]:
            say(f"  {escape(reason)}")
    train_pairs = loaded.pairs
    eval_pairs = load_pairs(cfg.eval_data, cfg.data_options(cfg.eval_split)).pairs if cfg.eval_data else []
    output = resume.parent if resume else files.claim_output_dir(Path(cfg.output) if cfg.output else default_output(cfg))
    say(f"[bold]infopo[/] {cfg.loss} {escape(str(loss_params))} on {len(train_pairs)} {loaded.format} pairs "
        f"({escape(cfg.data)}), {len(eval_pairs)} held out -> {escape(str(output))}")

    # --- hardware and seed ---------------------------------------------------------------------
    precision = choose(cfg.dtype)
    say(f"device {precision.device}, compute dtype {precision.dtype_name}: {precision.reason}")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # --- model: 4-bit base, LoRA policy; the reference is the same base with the adapter off ---
    t_load = time.perf_counter()
    source = model_stack.resolve_source(cfg.model, log=lambda message: say(escape(message)))
    tokenizer = model_stack.load_tokenizer(source)
    model = model_stack.attach_lora(model_stack.load_base(source, cfg, precision), cfg)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = model_stack.count_parameters(model)
    say(f"model {escape(source)} loaded in {time.perf_counter() - t_load:.1f}s "
        f"({'NF4 4-bit' if cfg.load_in_4bit else 'unquantised'}); LoRA r={cfg.lora_r}: "
        f"{n_trainable / 1e6:.2f}M trainable of {n_total / 1e6:.0f}M parameters")
    share_prompt = cfg.share_prompt and takes_custom_masks(model)
    if cfg.share_prompt and not share_prompt:
        say("prompts are read twice per pair: this attention kernel takes no 4-D mask (use sdpa or eager to share them)")

    # --- tokens -----------------------------------------------------------------------------------
    encode = lambda pair: encode_pair(tokenizer, pair, cfg.max_length, cfg.max_prompt_length)  # noqa: E731
    (train_tok, cached), (eval_tok, _) = (tokenize_cached(p, tokenizer, cfg.max_length, cfg.max_prompt_length, encode)
                                          for p in (train_pairs, eval_pairs))
    truncated = sum(p.truncated for p in train_tok + eval_tok)
    say(f"tokenised{' (from cache)' if cached else ''}: {len(train_tok)} train / {len(eval_tok)} held-out pairs"
        + (f", [yellow]{truncated} truncated to max_length {cfg.max_length}[/]" if truncated else ""))

    # --- optimizer and schedule -------------------------------------------------------------------
    global_batch = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(math.ceil(len(train_tok) / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = make_optimizer(cfg, trainable_params, precision.device)
    scheduler = warmup_cosine(optimizer, warmup=int(cfg.warmup_ratio * total_steps), total=total_steps)

    start = checkpoint.load_checkpoint(resume, model, optimizer, scheduler) if resume else 0
    if resume:
        say(f"resuming after step {start} from {escape(str(resume))}")
    resolved = {**cfg.to_dict(), **loss_params, "output": str(output), "dtype": precision.dtype_name}
    files.write_text(output / "config.toml", f"# infopo {__version__}; "
                          f"rerun with: infopo train --preset {output / 'config.toml'} --output NEW_DIR\n"
                          + to_toml(resolved))
    log = MetricsLog(output / "metrics.jsonl")
    evaluator = Evaluator([collate(b, tokenizer.pad_token_id, share_prompt) for b in eval_batches(eval_tok, cfg.eval_batch_size)],
                          spec, loss_params, precision.device) if eval_tok else None
    if not spec.needs(loss_params).reference:
        say(f"{cfg.loss} is reference-free: no reference forward pass")
    summary = RunSummary(str(output), "completed", start, 0.0, 0.0, 0.0, precision.device, precision.dtype_name)

    def evaluate(step: int, fresh: bool = False) -> dict:
        t = time.perf_counter()
        metrics = evaluator(model, policy_is_reference=fresh)
        log.write({"kind": "eval", "step": step, **metrics})
        say(f"eval @ step {step} ({time.perf_counter() - t:.0f}s): loss {metrics['eval/loss']:.4f}  "
            f"logps/chosen {metrics['eval/logps/chosen']:.2f}  logps/rejected {metrics['eval/logps/rejected']:.2f}  "
            f"rewards/accuracies {metrics['eval/rewards/accuracies']:.3f}  logps/accuracies {metrics['eval/logps/accuracies']:.3f}")
        return metrics

    if evaluator and not resume:  # a fresh LoRA adds exactly zero: one pass gives policy and reference
        summary.eval_before = evaluate(0, fresh=True)

    # --- the loop -------------------------------------------------------------------------------
    batches = shuffled_batches(train_tok, cfg.batch_size, cfg.seed)
    for _ in range(start * cfg.grad_accum):  # the same data order as an uninterrupted run
        next(batches)
    model.train()
    started, tokens_seen, step = time.perf_counter(), 0, 0
    try:
        with TrainProgress(console, total_steps) as bar:
            bar.skip_to(start)
            for step in range(start + 1, total_steps + 1):
                t_step = time.perf_counter()
                micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
                metrics, step_tokens = accumulate_gradients(model, micro_batches, spec, loss_params,
                                                            tokenizer.pad_token_id, precision.device, share_prompt)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable_params, cfg.max_grad_norm or float("inf"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                seconds = time.perf_counter() - t_step
                tokens_seen += step_tokens
                record = {"kind": "train", "step": step, **metrics.means(), "grad_norm": float(grad_norm),
                          "lr": scheduler.get_last_lr()[0], "epoch": step * global_batch / len(train_tok),
                          "tokens_per_s": step_tokens / seconds, "step_seconds": seconds}
                log.write(record)
                bar.step(step, record)
                summary.first_step = summary.first_step or record
                summary.last_step, summary.steps = record, step
                if evaluator and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    evaluate(step)
                if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                    checkpoint.save_checkpoint(output, model, tokenizer, optimizer, scheduler, step, {})
    except KeyboardInterrupt:
        summary.status = "interrupted"
        saved = checkpoint.save_checkpoint(output, model, tokenizer, optimizer, scheduler, summary.steps, {})
        say(f"[yellow]interrupted at step {summary.steps}/{total_steps}: checkpoint saved to {escape(str(saved))}[/]")

    # --- finish: evaluate, save, report ----------------------------------------------------------
    summary.seconds = time.perf_counter() - started
    summary.tokens_per_s = tokens_seen / summary.seconds if summary.seconds else 0.0
    if evaluator and summary.status == "completed":
        summary.eval_after = evaluate(summary.steps)
    checkpoint.save_adapter(model, tokenizer, output)
    summary.peak_memory_gib = peak_memory_gib(precision.device)
    files.write_json(output / "summary.json", asdict(summary))
    if not plot_run(log.records, output / "plot.png", f"{cfg.loss} on {Path(str(cfg.data)).name} ({source})"):
        say("plot.png skipped: matplotlib is not installed (pip install 'infopo[plot]')")
    return summary


def accumulate_gradients(model: torch.nn.Module, micro_batches: list[list[TokenizedPair]], spec: LossSpec,
                         loss_params: dict[str, float], pad_id: int, device: str,
                         share_prompt: bool = False) -> tuple[PairMetrics, int]:
    """Forward and backward over the micro-batches of one optimizer step; returns metrics and tokens read."""
    n_pairs = sum(len(pairs) for pairs in micro_batches)
    metrics, tokens = PairMetrics(), 0
    for pairs in micro_batches:
        batch = collate(pairs, pad_id, share_prompt).to(device)
        logps = pair_logps(model, batch, spec.needs(loss_params))
        out = objectives.compute(spec, logps, loss_params)
        # Sum over pairs / pairs in the global batch: the same loss and gradient however the global
        # batch is split into micro-batches (a mean per micro-batch would weight small ones more).
        (out.losses.sum() / n_pairs).backward()
        metrics.add(out, logps)
        tokens += batch.n_tokens
    return metrics, tokens


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: str) -> torch.optim.Optimizer:
    """AdamW; on CUDA bitsandbytes' paged 8-bit AdamW (optimizer state is a large part of 24 GB)."""
    choice = cfg.optimizer if cfg.optimizer != "auto" else ("paged_adamw_8bit" if device == "cuda" else "adamw")
    if choice == "paged_adamw_8bit":
        if device != "cuda":
            raise ConfigError("optimizer paged_adamw_8bit needs a CUDA GPU; use --optimizer adamw")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak rate, then cosine decay to zero at the last step."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
