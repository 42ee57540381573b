"""`infopo train`: the training recipe, top to bottom.

data -> run folder (locked) -> hardware -> model (4-bit base + LoRA) -> tokens -> optimizer, schedule
-> resume? -> evaluate -> loop (policy and reference log-probs, loss, backward, clip, step; stop,
evaluate and checkpoint only between steps) -> evaluate -> save -> summary.

Every ordinary stop ends at a step boundary with a checkpoint from which `infopo train --resume RUN`
continues exactly: Ctrl-C or SIGTERM (after the current step), CUDA out-of-memory (the state before the
failed step), too many non-finite steps in a row. What the user sees is printed by a `Reporter`.

`_train` reads top to bottom as setup -> loop -> finish. A `Run` holds what a step, an evaluation and a checkpoint
share; its `TrainState` (train/state.py) is what moves from step to step and what a checkpoint's counters hold.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from infopo_cli import __version__, files
from infopo_cli.config import TrainConfig, to_toml
from infopo_cli.data.batching import collate, eval_batches, pairs_read, shuffled_batches
from infopo_cli.data.formats import PreferencePair
from infopo_cli.data.loading import Loaded, data_kind, no_pairs, unit
from infopo_cli.data.mixing import as_list
from infopo_cli.data.feedback import mismatched
from infopo_cli.data.token_cache import tokenize_cached
from infopo_cli.data.tokenization import (TokenizedPair, auto_max_length, control_token_note, pairs_digest,
                                         same_once_truncated, truncate)
from infopo_cli.errors import ConfigError
from infopo_cli.inference.generation import budget_note, context_of
from infopo_cli.inference.prompts import PromptRow
from infopo_cli.losses import registry
from infopo_cli.losses.registry import LossSpec
from infopo_cli.model import attention, recompute as recomputation, sharding, stack, unsloth_backend
from infopo_cli.model.precision import Precision, choose
from infopo_cli.model.recompute import Recompute
from infopo_cli.model.source import check_source
from infopo_cli.reporting import displacement
from infopo_cli.reporting.model_card import write_run_documents
from infopo_cli.reporting.plot import plot_run
from infopo_cli.reporting.runs import read_records
from infopo_cli.train import answer_eval, checkpoint, distributed, preflight, reference_cache, trackers
from infopo_cli.train.memory_fallback import Fallback, free_accelerator_memory as _free_accelerator_memory, is_out_of_memory
from infopo_cli.train.reference_cache import ReferenceTable
from infopo_cli.train.evaluate import Evaluator
from infopo_cli.train.logps import attention_kernel, pair_logps, takes_custom_masks
from infopo_cli.train.metrics import MetricsLog, PairMetrics
from infopo_cli.train.progress import Reporter
from infopo_cli.presets import record_start
from infopo_cli.train.resume import accepted_schedule, check_length, check_resumable
from infopo_cli.train.schedule import WarmupCosine
from infopo_cli.train.state import TrainState
from infopo_cli.train.stops import (ShardedOutOfMemory, Stop, StopRequests, diverged, eval_out_of_memory, not_started,
                                     out_of_memory, stopped)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TIMING_KEYS = ("tokens_per_s", "step_seconds")  # the only metrics that differ between identical runs


@dataclass
class RunSummary:
    output: str
    status: str                       # completed, stopped, out of memory, diverged
    steps: int
    seconds: float                    # training time of the whole run (every resumed part)
    tokens_per_s: float
    peak_memory_gib: float
    device: str
    dtype: str
    exit_code: int = 0                # 130 SIGINT, 143 SIGTERM, 3 out of memory, 4 non-finite steps
    message: str = ""                 # why it stopped and how to carry on
    skipped_steps: int = 0            # optimizer steps skipped for a non-finite loss or gradient
    first_step: dict = field(default_factory=dict)
    last_step: dict = field(default_factory=dict)
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # sources, rows read, pairs, format: for the report and model card
    displacement: str | None = None           # the likelihood-displacement warning (reporting/displacement.py)


def _finished(run_dir: Path, total_steps: int) -> RunSummary | None:
    """The summary of a run that completed `total_steps` and wrote its outputs (None: a run stopped after its last
    checkpoint but before them, which the resume finishes)."""
    try:
        saved = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("status") != "completed" or saved.get("steps") != total_steps:
        return None
    known = {f.name for f in fields(RunSummary)}
    try:
        return RunSummary(**{k: v for k, v in saved.items() if k in known})
    except TypeError:  # a summary missing a field: write the outputs again
        return None


def default_output(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.preset or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def train(cfg: TrainConfig, report: Reporter | None = None, resume: Path | None = None) -> RunSummary:
    """Run the recipe; with `resume` (a run folder), continue from its newest complete checkpoint.

    Under torchrun or `accelerate launch` every process runs it: one data-parallel run (train/distributed.py)."""
    cfg.validate()
    world = distributed.from_environment()
    distributed.start(world, choose(cfg.dtype).device)
    finished = False
    try:
        summary, finished = _train(cfg, report or Reporter(), resume, world), True
        return summary
    finally:
        distributed.stop(world, finished)


def _train(cfg: TrainConfig, report: Reporter, resume: Path | None, world: distributed.World) -> RunSummary:
    """One process's part of the run: setup -> loop -> finish."""
    report = report if world.is_main else report.silenced()  # rank 0 speaks for the run
    cfg, spec, loss_params, loaded, eval_pairs, run_dir, created = _prepare(cfg, report, resume, world)
    world = replace(world, sharded=cfg.fsdp and world.active)  # every forward pass together (train/distributed.py)
    cfg = replace(cfg, nproc=world.size)  # the global batch counts every process; the memory plan shards over them
    with contextlib.ExitStack() as held:
        if created:  # pushed first, so it runs last: after the lock is released
            held.push(lambda kind, error, trace: _remove_if_unstarted(run_dir, error))
        # --- the run folder is ours alone; stops are requests the loop reads between steps ----------
        if world.is_main:
            report.lock(held.enter_context(files.RunLock(run_dir)).took_over)
            for repair in files.clean_temporaries(run_dir):  # what a crashed run left behind
                report.note(repair)
        stops = held.enter_context(StopRequests(str(run_dir), report.stop_requested, same_within=2.0 if world.active else 0.0))
        resume_from = checkpoint.latest_checkpoint(run_dir) if resume else None
        if resume and not resume_from:
            report.fresh_resume(run_dir)
        if resume_from:  # before a long model load
            check_length(run_dir, checkpoint.step_of(resume_from), cfg.max_steps)

        # --- hardware, seed, tokens, recomputation, settings, model ------------------------------
        precision = choose(cfg.dtype)
        report.precision(precision)
        if world.active:
            report.note(f"{'sharded (FSDP2) ' if world.sharded else ''}data-parallel over {world.size} processes "
                        f"({torch.distributed.get_backend()}): each trains on its share of every global batch of "
                        f"{cfg.batch_size * cfg.grad_accum * world.size} pairs")
        elif cfg.fsdp:
            report.note("fsdp: one process, nothing to shard: the whole base is on this device")
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        saved_state = checkpoint.read_state(resume_from) if resume_from else None
        # a checkpoint of a release before pairs made the same by truncation were left out trained on them too
        cfg, source, tokenizer, train_tok, eval_tok = _tokens(cfg, loaded.pairs, eval_pairs, report, world,
                                                              drop_same=not saved_state or "data_sha256" in saved_state)
        if spec.needs(loss_params).mismatched:  # KTO's reference point reads other rows' completions after each prompt
            train_tok, eval_tok = mismatched(train_tok, eval_tok, cfg.max_length)
        # A step is one global batch, split into micro-batches: the data order depends only on the
        # global batch, so a resume may split it differently (after running out of memory).
        global_batch = distributed.global_batch(cfg.batch_size, cfg.grad_accum, world.size)
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_tok) / global_batch)))
        if note := preflight.batch_note(global_batch, len(train_tok), unit(train_tok)):
            report.note(f"warning: {note}")
        data_sha256 = pairs_digest(train_tok)
        if saved_state:  # a checkpoint this run cannot continue is refused before the long model load
            check_resumable(saved_state, resume_from, run_dir, global_batch, len(train_tok), total_steps, data_sha256)
            if saved_state["step"] >= total_steps and (done := _finished(run_dir, total_steps)):
                report.note(f"{run_dir} finished its {total_steps} steps already: nothing to do, its outputs are "
                            "left as they are")
                return done
        # which layers recompute: the memory plan of the longest micro-batch against the free memory; on CUDA a run that
        # cannot fit stops here, before its settings are written and the model loads (Unsloth checkpoints its own way)
        recompute = None if cfg.backend == "unsloth" else recomputation.for_run(
            cfg, source, train_tok, eval_tok, precision.device, precision.dtype.itemsize, cfg.share_prompt)
        if world.sharded:  # the same layers recompute on every rank: the same passes, the same gathers
            recompute = world.broadcast(recompute)
        if recompute:
            report.checkpointing(recompute.message)
        resolved = {**cfg.to_dict(), **loss_params, "output": str(run_dir), "dtype": precision.dtype_name}
        if world.is_main and not resume:  # on disk before anything long starts; a resume's once its checkpoint is accepted
            write_settings(run_dir, resolved)
            record_start(run_dir)
        model, init_sha256, share_prompt = _load_model(cfg, source, precision, spec, loss_params, recompute, report, world)
        if world.any(stops.requested):  # stopped while loading: nothing trained yet, nothing to save
            return unstarted(run_dir, precision, stops.signum, saved_state["step"] if saved_state else 0)
        if recompute and recompute.dequantised:  # the plan found room (model/recompute.py)
            held.enter_context(stack.dequantised(model))
            report.note(f"4-bit base held de-quantised for the run as well ({recompute.dequantised / 2**30:.2f} GiB of "
                        f"{precision.dtype_name} in RAM): bitsandbytes has no CPU training kernel and would de-quantise "
                        "each weight at every call")
        answers = _answers(cfg, eval_pairs, bool(eval_tok), report)  # held-out rows whose answers are scored
        answer_eval.check_room(tokenizer, answers, context_of(model))  # before anything else long
        if answers and (note := budget_note(context_of(model), cfg.eval_max_new_tokens, "--eval-max-new-tokens")):
            report.note(note)

        # --- optimizer, schedule, gradient scaler; a resume's state ------------------------------
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params, precision.device)
        schedule = WarmupCosine(cfg.lr, int(cfg.warmup_ratio * total_steps), total_steps)
        # fp16 overflows where bf16 does not: scale the loss, skip steps whose gradients overflow
        scaler = torch.amp.GradScaler(precision.device, enabled=precision.dtype == torch.float16)
        state, saved_rng = TrainState(), None
        if resume_from:
            saved = checkpoint.load_checkpoint(resume_from, model, optimizer, saved_state)
            state, saved_rng = TrainState.from_state(saved), saved["rng"]
            schedule = accepted_schedule(saved, resume_from, run_dir, cfg.init_adapter, init_sha256, global_batch,
                                         len(train_tok), total_steps, data_sha256)
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            report.resumed(state.step, total_steps, resume_from, schedule)
        if world.is_main and resume:
            write_settings(run_dir, resolved)
        log, guard = _open_log(cfg, run_dir, resolved, state.step if resume else None, report, world, held)
        evaluator = _evaluator(eval_tok, cfg, spec, loss_params, tokenizer.pad_token_id, share_prompt, precision, world)
        reference = _reference(model, train_tok, cfg, spec, loss_params, source, precision, tokenizer.pad_token_id,
                               share_prompt, init_sha256, report, world, global_batch, total_steps, state.step,
                               lambda: stops.requested)
        if world.any(stops.requested):  # in the reference pass (an hour on a large set): what it finished is cached
            return summarise(log, run_dir, precision, not_started(stops.signum, run_dir, state.step),
                             state.skipped_steps, state.step)
        base_answers = _base_answers_key(cfg, model, tokenizer, answers, source, precision, init_sha256, world) \
            if state.step == 0 else None
        # an auto run that runs out of memory in a step runs it again recomputing more (train/memory_fallback.py)
        # (sharded weights: a rank out of memory inside a pass cannot wait for the others, see `train_step`)
        fallback = Fallback(model, params, recompute if cfg.gradient_checkpointing == "auto" and not world.sharded else None,
                            report.note,
                            lambda mode: world.is_main and write_settings(run_dir, {**resolved, "gradient_checkpointing": mode}))
        run = Run(cfg=cfg, spec=spec, loss_params=loss_params, world=world, report=report, stops=stops, run_dir=run_dir,
                  precision=precision, model=model, tokenizer=tokenizer, params=params, optimizer=optimizer,
                  schedule=schedule, scaler=scaler, fallback=fallback, log=log, evaluator=evaluator, answers=answers,
                  base_answers=base_answers,
                  reference=reference, share_prompt=share_prompt, train_pairs=len(train_tok), global_batch=global_batch,
                  total_steps=total_steps, init_sha256=init_sha256, data_sha256=data_sha256, state=state)

        stop = run.loop(shuffled_batches(train_tok, global_batch, cfg.seed), saved_rng)

        # --- finish: save, report ------------------------------------------------------------------
        summary = summarise(log, run_dir, precision, stop, state.skipped_steps, state.step)
        if not world.is_main or not log.records:  # stopped in the step-0 evaluation: nothing logged to write up
            return summary
        _write_outputs(summary, cfg, loaded, len(train_tok), len(eval_tok), source, model, tokenizer, run_dir, log, guard,
                       report)
        return summary


def _prepare(cfg: TrainConfig, report: Reporter, resume: Path | None, world: distributed.World
             ) -> tuple[TrainConfig, LossSpec, dict[str, float], Loaded, list[PreferencePair], Path, bool]:
    """What can fail without a model fails now, before the run folder exists; then the run folder (the one rank 0
    claimed: one set of outputs). Returns the checked settings, loss, data, run folder and whether this run made it."""
    cfg, spec, loss_params = preflight.check_settings(cfg)
    if cfg.backend == "unsloth" and not resume:  # a resume trains with the dropout its config.toml holds
        cfg = unsloth_backend.without_dropout(cfg, report.note)
    output = resume or (Path(cfg.output) if cfg.output else default_output(cfg))
    if not resume:
        preflight.check_output(output)
    with world.main_first():  # a hub dataset is downloaded once, by rank 0
        loaded, eval_pairs, loss_params = preflight.load_data(cfg, spec, loss_params)
    check_source(cfg.model)  # a missing path, a folder that is no model or holds its own code: before the run folder
    report.skipped_rows(loaded.skipped, loaded.rows)
    for line in ([f"mix: {loaded.mix}"] if loaded.mix else []) + loaded.info + [f"warning: {n}" for n in loaded.notes]:
        report.note(line)
    created = not resume and world.is_main and not output.exists()
    run_dir = resume or (files.claim_output_dir(output) if world.is_main else None)
    run_dir = Path(world.broadcast(str(run_dir)))  # the folder rank 0 claimed: one set of outputs
    report.start(cfg.loss, loss_params, preflight.counted(loaded), ", ".join(as_list(cfg.data)), len(eval_pairs), run_dir)
    if note := preflight.idle_eval_note(cfg, len(eval_pairs)):
        report.note(f"warning: {note}")
    return cfg, spec, loss_params, loaded, eval_pairs, run_dir, created


def _tokens(cfg: TrainConfig, pairs: list[PreferencePair], eval_pairs: list[PreferencePair], report: Reporter,
            world: distributed.World, drop_same: bool = True
            ) -> tuple[TrainConfig, str, PreTrainedTokenizerBase, list[TokenizedPair], list[TokenizedPair]]:
    """The model's source and tokenizer, and the training and held-out pairs as tokens; --max-length auto becomes a number
    in the returned settings. The tokenizer is quick to load, so rows it cannot encode fail before the model loads.
    `drop_same`: pairs that truncation makes the same are left out (not for a run that kept them from its start)."""
    with world.main_first():  # rank 0 converts the embedded model and fills the token cache; the others read them
        source = stack.resolve_source(cfg.model, log=report.note)
        tokenizer = stack.load_tokenizer(source)
        limits = (10**9, 10**9) if cfg.max_length == "auto" else (cfg.max_length, cfg.max_prompt_length)  # auto: whole first
        train_set, eval_set = (tokenize_cached(rows, tokenizer, *limits, cfg.skip_invalid) for rows in (pairs, eval_pairs))
    report.skipped_rows(train_set.skipped + eval_set.skipped, len(pairs) + len(eval_pairs))
    if note := control_token_note(tokenizer, pairs, unit(pairs)):
        report.note(f"warning: {note}")
    train_tok, eval_tok = train_set.pairs, eval_set.pairs
    if not train_tok:
        raise no_pairs(cfg.data, train_set.skipped)
    if cfg.max_length == "auto":  # the training pairs' 99th percentile; config.toml keeps the number
        cfg = replace(cfg, max_length=auto_max_length([p.length for p in train_tok]))
        cfg = replace(cfg, max_prompt_length=min(cfg.max_prompt_length, cfg.max_length // 2))
        report.note(f"max_length auto: {cfg.max_length} tokens keeps 99% of the training pairs whole "
                    f"(max_prompt_length {cfg.max_prompt_length})")
        train_tok, eval_tok = ([truncate(p.prompt_ids, p.chosen_ids, p.rejected_ids, cfg.max_length,
                                         cfg.max_prompt_length, p.label) for p in tokenized] for tokenized in (train_tok, eval_tok))
    for name, tokenized in (("training", train_tok), ("held-out", eval_tok)) if drop_same else ():
        if same := set(same_once_truncated(tokenized)):
            report.note(f"warning: {len(same)} {name} pairs are the same once truncated to max_length {cfg.max_length} "
                        "(their replies differ only past it): left out, they prefer nothing; raise --max-length to keep them")
            tokenized[:] = [p for i, p in enumerate(tokenized) if i not in same]
    if not train_tok:
        raise ConfigError(f"every training pair is the same once truncated to max_length {cfg.max_length}: raise "
                          "--max-length")
    report.tokenised(len(train_tok), len(eval_tok), train_set.cached,
                     sum(p.truncated for p in train_tok + eval_tok), cfg.max_length,
                     unit(train_tok))
    return cfg, source, tokenizer, train_tok, eval_tok


def _load_model(cfg: TrainConfig, source: str, precision: Precision, spec: LossSpec, loss_params: dict[str, float],
                recompute: Recompute | None, report: Reporter, world: distributed.World
                ) -> tuple[torch.nn.Module, str | None, bool]:
    """4-bit base, LoRA policy; the reference is the same base with the adapter off (--init-adapter: the policy starts
    from that adapter; the reference is a frozen copy of it, if the loss has one). Sharded (--fsdp), the processes load
    in turn, each into host memory, and keep their shard on the device. Returns the model, the init adapter's hash
    (None without one) and whether a prompt is read once for both replies."""
    t_load = time.perf_counter()
    mesh = sharding.device_mesh(precision.device, world.size) if world.sharded else None
    with world.one_at_a_time() if world.sharded else contextlib.nullcontext():
        if cfg.backend == "unsloth":  # Unsloth's FastLanguageModel makes the base and the LoRA (model/unsloth_backend.py)
            model, init_sha256 = unsloth_backend.load_model(source, cfg, precision), None
        elif cfg.init_adapter:
            model, init_sha256 = stack.load_init_adapter(stack.load_base(source, cfg, precision, world.sharded), cfg,
                                                         with_reference=spec.needs(loss_params).reference,
                                                         recompute=recompute)
        else:
            model, init_sha256 = stack.attach_lora(stack.load_base(source, cfg, precision, world.sharded), cfg,
                                                   recompute), None
        if mesh is not None:
            sharding.shard_base(model, mesh, precision.device)
    report.model(source, time.perf_counter() - t_load, cfg, *stack.count_parameters(model))
    report.attention(attention.describe(attention_kernel(model), precision.device))
    if mesh is not None:
        held = world.gather([sharding.held_bytes(model)])
        mib = ", ".join(f"{share[0].codes_held / 2**20:.2f}" for share in held)
        report.note(f"fsdp: the base's weights split {world.size} ways: each process holds {mib} MiB of its "
                    f"{held[0][0].codes_whole / 2**20:.2f} MiB of 4-bit codes ({held[0][0].held / 2**20:.2f} of "
                    f"{held[0][0].whole / 2**20:.2f} MiB of sharded weights on rank 0); the adapter and the output layer "
                    "are whole on each")
    share_prompt = cfg.share_prompt and takes_custom_masks(model)
    if cfg.share_prompt and not share_prompt:
        report.note("prompts are read twice per pair: " + ("Unsloth's CUDA forward drops 4-D masks" if cfg.backend == "unsloth"
                    else "this attention kernel takes no 4-D mask (use sdpa or eager to share them)"))
    return model, init_sha256, share_prompt


def _evaluator(eval_tok: list[TokenizedPair], cfg: TrainConfig, spec: LossSpec, loss_params: dict[str, float], pad_id: int,
               share_prompt: bool, precision: Precision, world: distributed.World) -> Evaluator | None:
    """Each process evaluates its share of the held-out batches (the sums are added up); with sharded weights a rank
    with fewer batches runs the first batch again, uncounted, to keep in step."""
    if not eval_tok:
        return None
    batches = eval_batches(eval_tok, cfg.eval_batch_size)
    mine = world.shard(batches)
    extra = batches[:1] * world.lacking(len(mine), world.longest_share(len(batches)))
    return Evaluator([collate(b, pad_id, share_prompt) for b in mine + extra], spec, loss_params, precision.device,
                     counted=len(mine))


def _open_log(cfg: TrainConfig, run_dir: Path, resolved: dict, resume_step: int | None, report: Reporter,
              world: distributed.World, held: contextlib.ExitStack) -> tuple[MetricsLog, displacement.Guard]:
    """metrics.jsonl (a resume's continues from `resume_step`), with the --report-to trackers (closed by `held` on every
    way out) and the likelihood-displacement guard, which warns once; a resume's earlier records count."""
    sinks = trackers.open_trackers(trackers.parse(cfg.report_to), run_dir, resolved, resume_step) if world.is_main else []
    for tracker in sinks:
        held.callback(tracker.close)
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step, sinks=sinks, writes=world.is_main)
    guard = displacement.Guard(cfg.loss, records=log.records, warn=lambda m: report.note(f"warning: {m}"))
    log.sinks.append(guard)
    return log, guard


def _reference(model: torch.nn.Module, train_tok: list[TokenizedPair], cfg: TrainConfig, spec: LossSpec,
               loss_params: dict[str, float], source: str, precision: Precision, pad_id: int, share_prompt: bool,
               init_sha256: str | None, report: Reporter, world: distributed.World, global_batch: int, total_steps: int,
               start: int, should_stop: Callable[[], bool]) -> ReferenceTable | None:
    """--reference precompute: the reference's log-probs of the pairs the run's global batches `start`..`total_steps`
    read (a resume needs none of the steps done), from one pass now (or the cache) instead of one in every step;
    `should_stop()` cuts the pass short (what it finished is cached)."""
    if not spec.needs(loss_params).reference:
        report.note(f"{cfg.loss} is reference-free: no reference forward pass")
    if not reference_cache.applies(cfg.reference, spec.needs(loss_params)):
        return None
    if start >= total_steps:  # resumed for the last evaluation only: no step left to read a reference
        return None
    reads = pairs_read(train_tok, global_batch, cfg.seed, total_steps, start)
    return precomputed_reference(model, train_tok, cfg, source, precision, pad_id, share_prompt, init_sha256, report, world,
                                 reads, total_steps - start, should_stop)


def _answers(cfg: TrainConfig, eval_pairs: list[PreferencePair], evaluating: bool, report: Reporter) -> list[PromptRow]:
    """The held-out rows whose answers --eval-generate-every scores (none without it, or without held-out pairs)."""
    if not (evaluating and cfg.eval_generate_every):
        return []
    answers = answer_eval.answer_rows(eval_pairs, cfg.eval_data, cfg.eval_split or cfg.split)
    if not answers:
        report.note("--eval-generate-every: no held-out row carries an answer ('answer' field, or a chosen reply "
                    "ending 'The answer is N.'); answers are not scored")
    return answers


def _base_answers_key(cfg: TrainConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[PromptRow],
                      source: str, precision: Precision, init_sha256: str | None,
                      world: distributed.World) -> str | None:
    """The cache key of the step-0 replies to `rows` (train/answer_eval.py); None where they are not cached: no rows,
    sharded weights (every process must decode together), or base files that cannot be found to key them."""
    if not rows or world.sharded:
        return None
    identity = reference_cache.model_identity(source)
    if identity is None:
        return None
    return answer_eval.cache_key(identity, _numerics(cfg, model, precision, init_sha256), tokenizer, world.shard(rows),
                                 cfg.eval_max_new_tokens, cfg.eval_batch_size, precision.device)


def _write_outputs(summary: RunSummary, cfg: TrainConfig, loaded: Loaded, train_pairs: int, eval_pairs: int, source: str,
                   model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, run_dir: Path, log: MetricsLog,
                   guard: displacement.Guard, report: Reporter) -> None:
    """Rank 0, at the end: the adapter, summary.json, plot.png, README.md (the model card) and report.md."""
    checkpoint.save_adapter(model, tokenizer, run_dir)
    summary.displacement = guard.message
    summary.data = {"train": as_list(cfg.data), "rows": loaded.rows, "pairs": train_pairs, "format": loaded.format,
                    "eval": as_list(cfg.eval_data) if cfg.eval_data else [], "eval_pairs": eval_pairs,
                    "unit": "pairs" if data_kind(loaded.pairs) == "pairs" else "unpaired rows"}
    files.write_json(run_dir / "summary.json", asdict(summary))
    if not plot_run(log.records, run_dir / "plot.png", f"{cfg.loss} on {', '.join(Path(d).name for d in as_list(cfg.data))} ({source})"):
        report.note("plot.png skipped: matplotlib is not installed (pip install 'infopo[plot]')")
    write_run_documents(run_dir)  # README.md (the model card, over peft's template) and report.md


@dataclass
class Run:
    """One process's part of a run once its model is loaded: what a step, an evaluation and a checkpoint share.

    `_train` sets it up and calls `loop`; its `state` is what moves from step to step."""

    cfg: TrainConfig
    spec: LossSpec
    loss_params: dict[str, float]
    world: distributed.World
    report: Reporter
    stops: StopRequests
    run_dir: Path
    precision: Precision
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    params: list[torch.nn.Parameter]   # the trainable ones: the adapter's
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    scaler: torch.amp.GradScaler
    fallback: Fallback
    log: MetricsLog
    evaluator: Evaluator | None
    answers: list[PromptRow]            # the held-out rows whose answers are scored (each process scores its share)
    base_answers: str | None            # the cache key of the step-0 replies (the base model's), or None
    reference: ReferenceTable | None    # precomputed reference log-probs, or None (a reference pass in every step)
    share_prompt: bool
    train_pairs: int
    global_batch: int
    total_steps: int
    init_sha256: str | None
    data_sha256: str                    # the training pairs' hash, kept in each checkpoint for --resume to check
    state: TrainState

    def loop(self, batches: Iterator[list[TokenizedPair]], saved_rng: dict[str, Any] | None) -> Stop | None:
        """Evaluate first, then step until the last step or a stop; evaluate, stop and checkpoint only between steps,
        and evaluate once more at the end. `batches`: the run's global batches from step 0 (those trained already are
        skipped, so a resume sees the same data order as an uninterrupted run); `saved_rng`: a resume's RNG state."""
        state, world, log = self.state, self.world, self.log
        stop, stopping = None, world.any(self.stops.requested)  # agreed by every process, at each step boundary
        if self.evaluator and (state.step == 0 or state.pending_eval) and not logged_eval(log, state.step) and not stopping:
            stop = self.evaluate(state.step)
            stopping = world.any(self.stops.requested)
        for _ in range(state.step):
            next(batches)
        if saved_rng:
            checkpoint.restore_rng(saved_rng)  # last, so nothing in the set-up draws from it
        if world.rank:  # other processes draw other LoRA dropout masks (rank 0 draws what one process would)
            torch.manual_seed((self.cfg.seed + 1_000_003 * world.rank + state.step) % 2**64)  # torch takes 64 bits
        self.model.train()
        with self.report.progress(self.total_steps, state.step) as bar:
            while state.step < self.total_steps and not stopping and not stop:
                record = self.train_step(next(batches))  # the global batch, the same on every process
                if isinstance(record, Stop):
                    stop = record
                    break
                bar.step(state.step, record)
                stop, stopping = self.between_steps()
        if not stop and stopping:
            stop = self.requested_stop()
        if self.evaluator and not stop and not logged_eval(log, state.step):
            stop = self.evaluate(state.step) or (self.requested_stop() if state.pending_eval else None)
        return stop

    def train_step(self, pairs: list[TokenizedPair]) -> dict[str, Any] | Stop:
        """One optimizer step on the global batch `pairs` (this process trains on its share, in micro-batches, through
        the out-of-memory fallback); returns its metrics record, logged, or the out-of-memory Stop."""
        cfg, world, state = self.cfg, self.world, self.state
        boundary_rng = checkpoint.capture_rng()
        mine = world.shard(pairs)
        micro_batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        # sharded weights: as many passes as the rank with the most micro-batches, the extra ones uncounted
        extra = (micro_batches[-1:] or [pairs[:cfg.batch_size]]) * world.lacking(
            len(micro_batches), -(-world.longest_share(len(pairs)) // cfg.batch_size))
        t_step, updating, short_of_memory = time.perf_counter(), False, False
        try:
            metrics, step_tokens = self.fallback.run(lambda: accumulate_gradients(
                self.model, micro_batches + extra, self.spec, self.loss_params, self.tokenizer.pad_token_id,
                self.precision.device, self.share_prompt, self.scaler, self.reference, n_pairs=len(pairs),
                counted=len(micro_batches)), boundary_rng, state.step + 1)
        except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
            if world.sharded:
                saved = self.save_alone(boundary_rng)
                raise ShardedOutOfMemory(out_of_memory(cfg, state.step + 1, micro_batches or [pairs], self.precision.device,
                                                       self.run_dir, saved=saved)) from None
            short_of_memory = True
        self.fallback.agree(world, state.step + 1)  # where one process had to recompute more, all do from now on
        try:
            if world.any(short_of_memory):  # on any process: all of them stop before the update
                raise MemoryError("out of memory in a micro-batch")
            world.sum_gradients(self.params)
            metrics, step_tokens = world.sum_metrics(metrics), int(world.sum_floats([step_tokens])[0])
            updating = True
            grad_norm, finite = apply_update(self.optimizer, self.scaler, self.params, cfg.max_grad_norm,
                                             self.schedule.lr(state.step), metrics.sums["loss"])
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            _free_accelerator_memory()
            # before the update the weights, optimizer and schedule are those after `step`: an exact
            # boundary; an update cut short may have changed some weights, so only older checkpoints count
            saved = (self.run_dir / f"{checkpoint.PREFIX}{state.step}").is_dir()
            if not updating and not saved:
                self.save(boundary_rng)
            return out_of_memory(replace(cfg, gradient_checkpointing=self.fallback.mode or cfg.gradient_checkpointing),
                                 state.step + 1, micro_batches, self.precision.device, self.run_dir,
                                 saved=saved or not updating)
        state.advance(len(pairs), finite)
        seconds = time.perf_counter() - t_step
        record = {"kind": "train", "step": state.step, **metrics.means(), "grad_norm": grad_norm,
                  "lr": self.schedule.lr(state.step - 1), "epoch": state.step * self.global_batch / self.train_pairs,
                  "tokens": step_tokens, "skipped": not finite, "skipped_steps": state.skipped_steps,
                  "tokens_per_s": step_tokens / seconds, "step_seconds": seconds}
        if self.scaler.is_enabled():
            record["grad_scale"] = float(self.scaler.get_scale())
        self.log.write(record)
        return record

    def between_steps(self) -> tuple[Stop | None, bool]:
        """At the boundary after a step: the evaluation due there (unless a stop was requested), then a checkpoint when
        the run stops or one is due. Returns the Stop that ends the run here, if any, and whether a stop was requested."""
        cfg, state, step = self.cfg, self.state, self.state.step
        stopping = self.world.any(self.stops.requested)
        state.pending_eval = bool(self.evaluator and step < self.total_steps and any(
            every and step % every == 0 for every in (cfg.eval_every, cfg.eval_generate_every)))
        stop = self.evaluate(step) if state.pending_eval and not stopping else None
        stopping = self.world.any(self.stops.requested)  # also a request that came during the evaluation
        if state.bad_streak >= cfg.max_bad_steps:
            stop = diverged(step, state.bad_streak, self.run_dir)
        if stop or stopping or step == self.total_steps or (cfg.save_every and step % cfg.save_every == 0):
            self.save(checkpoint.capture_rng())
        return stop, stopping

    def evaluate(self, step: int) -> Stop | None:
        """Held-out metrics at `step`, logged. Returns the out-of-memory Stop where any process ran out; an evaluation
        that did not finish (that, or a stop request) leaves `state.pending_eval` set, so a resume runs it."""
        t, totals, short_of_memory = time.perf_counter(), None, False
        requested = self.world.agreed(lambda: self.stops.requested)
        try:  # an adapter that has not trained is the reference (zero, or the init adapter): one pass gives both
            totals = self.evaluator.totals(self.model, policy_is_reference=step == 0, should_stop=requested)
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            if self.world.sharded:
                saved = self.save_alone(checkpoint.capture_rng())  # the evaluation put the RNG back as it was
                raise ShardedOutOfMemory(eval_out_of_memory(self.cfg, step, self.precision.device, self.run_dir,
                                                            saved)) from None
            short_of_memory = True
        self.state.pending_eval = True
        if self.world.any(short_of_memory):  # on any process: every process ends the run at this boundary
            _free_accelerator_memory()
            return eval_out_of_memory(self.cfg, step, self.precision.device, self.run_dir)
        if self.world.any(totals is None):  # a stop request cut it short
            return None
        metrics = self.world.sum_metrics(totals).means(prefix="eval/")
        if self.answers and (step in (0, self.total_steps) or step % self.cfg.eval_generate_every == 0):
            mine = self.world.shard(self.answers)
            if step == 0 and self.base_answers and answer_eval.cached_replies(self.base_answers, len(mine)) is not None:
                self.report.note("the base model's answers (step 0) read from the cache of an earlier run")
            extra = self.answers[:1] * self.world.lacking(len(mine), self.world.longest_share(len(self.answers)))
            records = answer_eval.answer_records(self.model, self.tokenizer, mine + extra, self.cfg.eval_max_new_tokens,
                                                 self.cfg.eval_batch_size, requested,
                                                 self.world.any if self.world.sharded else bool,
                                                 self.base_answers if step == 0 else None) if mine or extra else []
            records = records[:len(mine)] if records is not None else None
            if self.world.any(records is None):  # a stop request cut the replies short: a resume scores them again
                return None
            metrics.update(self.world.mean_over_ranks(answer_eval.answer_metrics(records), len(mine), answer_eval.KEYS))
            self._write_answers(step, records)
        self.state.pending_eval = False
        self.log.write({"kind": "eval", "step": step, **metrics})
        self.report.evaluation(step, metrics, time.perf_counter() - t)
        return None

    def _write_answers(self, step: int, records: list[dict[str, Any]]) -> None:
        """answers/step-N.jsonl: every held-out problem's reply at `step`, in the held-out set's order (rank r scored
        every size-th problem from r, so the ranks' shares interleave back)."""
        shares = self.world.gather(records)
        if not self.world.is_main:
            return
        ordered = [share[i] for i in range(max(map(len, shares))) for share in shares if i < len(share)]
        files.write_text(answer_eval.answers_file(self.run_dir, step),
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))

    def save(self, rng: dict[str, Any]) -> None:
        """checkpoint-STEP of `state` and `rng` (the RNG states at this boundary), reported. Every process holds the same
        adapter and optimizer state: rank 0 writes it."""
        state = self.state.state_dict(rng=rng, train_pairs=self.train_pairs, global_batch=self.global_batch,
                                      optimizer=self.optimizer, schedule=self.schedule, scaler=self.scaler,
                                      init_sha256=self.init_sha256, data_sha256=self.data_sha256)
        self.report.saved(checkpoint.save_checkpoint(self.run_dir, self.model, self.tokenizer, state, self.cfg.keep_checkpoints)
                          if self.world.is_main else self.run_dir / f"{checkpoint.PREFIX}{self.state.step}")

    def save_alone(self, rng: dict[str, Any]) -> bool:
        """Out of memory in a pass of a sharded run, which ends without the other processes (they wait in that pass):
        rank 0 saves the state at this boundary, unless it is saved already (the adapter and optimizer are whole on
        every rank; the RNG is rank 0's own). Returns whether that state is on disk."""
        self.optimizer.zero_grad(set_to_none=True)  # a partial step's gradients
        if (self.run_dir / f"{checkpoint.PREFIX}{self.state.step}").is_dir():
            return True
        if self.world.is_main:
            _free_accelerator_memory()
            self.save(rng)
        return self.world.is_main

    def requested_stop(self) -> Stop:
        """The Stop of a stop request, read at this boundary."""
        return stopped(self.stops.signum, self.state.step, self.total_steps, self.run_dir)


def write_settings(run_dir: Path, resolved: dict) -> None:
    files.write_text(run_dir / "config.toml", f"# infopo {__version__}; rerun with: infopo train --preset "
                                              f"{shlex.quote(str(run_dir / 'config.toml'))} --output NEW_DIR\n"
                     + to_toml(resolved))


def _remove_if_unstarted(run_dir: Path, error: BaseException | None) -> bool:
    """A fresh run that failed with an error before its first step leaves no folder behind (a stop request, which
    tells the user how to start it again, keeps it). Never swallows the error."""
    metrics = run_dir / "metrics.jsonl"
    trained = metrics.is_file() and any(r.get("kind") == "train" for r in read_records(metrics))
    if isinstance(error, Exception) and not trained and not checkpoint.complete_checkpoints(run_dir):
        files.remove_tree(run_dir)
    return False


def logged_eval(log: MetricsLog, step: int) -> bool:
    return any(r["step"] == step for r in log.of_kind("eval"))


def unstarted(run_dir: Path, precision: Precision, signum: int | None, step: int = 0) -> RunSummary:
    """The summary of a run (at `step`: a resume's) stopped while its model loaded: nothing trained in this start."""
    stop = not_started(signum, run_dir, step)
    return RunSummary(str(run_dir), stop.status, step, 0.0, 0.0, peak_memory_gib(precision.device), precision.device,
                      precision.dtype_name, stop.exit_code, stop.message)


def summarise(log: MetricsLog, run_dir: Path, precision: Precision, stop: Stop | None, skipped_steps: int, step: int) -> RunSummary:
    """The whole run's summary from its log, so a resumed run reports every part of it once."""
    steps, evals = log.of_kind("train"), log.of_kind("eval")
    seconds = sum(r.get("step_seconds") or 0.0 for r in steps)
    tokens = sum(r.get("tokens") or 0 for r in steps)
    return RunSummary(str(run_dir), stop.status if stop else "completed", step, seconds, tokens / seconds if seconds else 0.0,
                      peak_memory_gib(precision.device), precision.device, precision.dtype_name,
                      stop.exit_code if stop else 0, stop.message if stop else "", skipped_steps,
                      steps[0] if steps else {}, steps[-1] if steps else {},
                      evals[0] if evals and evals[0]["step"] == 0 else {},
                      evals[-1] if evals and not stop and evals[-1]["step"] == step else {})


def _numerics(cfg: TrainConfig, model: torch.nn.Module, precision: Precision, init_sha256: str | None) -> dict[str, Any]:
    """What the frozen model's outputs depend on besides its files, for the caches' keys."""
    return {"load_in_4bit": cfg.load_in_4bit, "dtype": precision.dtype_name,
            "attn": attention_kernel(model) or cfg.attn_implementation, "init_adapter": init_sha256,
            **({"init_adapter_config": stack.init_adapter_config_digest(cfg.init_adapter)} if cfg.init_adapter else {}),
            **({"backend": cfg.backend} if cfg.backend != "transformers" else {}),  # other kernels, other rounding
            **({"attn_forward": "sdpa"} if attention_kernel(model) == attention.NAME and precision.device == "cpu"
               and attention.forward_by_sdpa() else {})}


def precomputed_reference(model: torch.nn.Module, pairs: list[TokenizedPair], cfg: TrainConfig, source: str,
                          precision, pad_id: int, share_prompt: bool, init_sha256: str | None,
                          report: Reporter, world: distributed.World = distributed.World(), reads: set[int] | None = None,
                          steps: int = 0, should_stop: Callable[[], bool] = lambda: False) -> ReferenceTable:
    """The reference's log-probs of the training pairs a run reads (`reads`, indices into `pairs`, in its `steps`
    steps; None: every pair), from the cache or one no-grad pass (train/reference_cache.py). Only the batches that
    hold a pair read and not cached are computed (a short run of a large set pays for its own pairs); several
    processes each compute their share of those batches, and every process gets the whole table. A pass that
    `should_stop()` cuts short (a stop request) caches the batches it finished: the run's next start computes the rest."""
    settings = {**_numerics(cfg, model, precision, init_sha256), "share_prompt": share_prompt, "max_length": cfg.max_length,
                "max_prompt_length": cfg.max_prompt_length, "batch_size": cfg.eval_batch_size}  # padding: the last bits
    identity = reference_cache.model_identity(source)
    key = reference_cache.cache_key(identity, settings, pairs) if identity is not None else None
    started = time.perf_counter()
    reads = set(range(len(pairs))) if reads is None else reads
    table, filled = reference_cache.load_cached(key, len(pairs)) if world.is_main else (None, None)
    todo = world.broadcast([b for b in reference_cache.reference_batches(pairs, cfg.eval_batch_size)
                            if reads.intersection(b) and not bool(filled[b].all())] if world.is_main else None)
    which = (f"{len(reads)} {unit(pairs)}" if len(reads) == len(pairs) else
             f"the {len(reads)} of {len(pairs)} {unit(pairs)} in {steps} step{'s' * (steps != 1)}")
    if todo:
        cached = sum(1 for i in reads if filled[i]) if world.is_main else 0
        mine = world.shard(todo)
        extra = todo[:1] * world.lacking(len(mine), world.longest_share(len(todo)))  # sharded: uncounted, in step
        # one entry per batch of `mine` written, in order; sharded ranks stop at the same batch, unsharded ones each at
        # its own flag (`infopo train --nproc` forwards every signal to every process)
        finished: list[int] = []
        with report.task("reference log-probs", sum(map(len, mine))) as advance:
            part = world.sum_tensor(reference_cache.compute_batches(
                model, pairs, mine + extra, pad_id, share_prompt, precision.device,
                lambda n: (finished.append(n), advance(n)), counted=len(mine), should_stop=world.agreed(should_stop)))
        written = torch.zeros(len(pairs))
        written[[i for batch in mine[:len(finished)] for i in batch]] = 1.0
        written = world.sum_tensor(written) > 0  # every process's finished batches
        if world.is_main:
            table[written], filled[written] = part[written], True
            reference_cache.store(key, table, filled)
        computed, wanted = int(written.sum()), sum(map(len, todo))
        counted = "".join([f"; {cached} of them from the cache" if cached else "",
                           f"; {computed} computed with their batch-mates" if computed != len(reads) - cached else ""])
        if computed < wanted:  # stopped: the caller ends this start before it trains
            report.note(f"reference log-probs: stopped after {computed} of the {wanted} {unit(pairs)} to compute"
                        + (", those cached: the next start computes the rest" if key else ""))
        else:
            report.note(f"reference log-probs of {which} computed once ({time.perf_counter() - started:.0f}s{counted})"
                        + (", cached for later runs on this base and data" if key else
                           "; not cached: the base's files were not found to key them"))
    else:
        report.note(f"reference log-probs of {which} read from the cache")
    table = world.broadcast_tensor(table, (len(pairs), 2), torch.float32)
    filled = world.broadcast_tensor(filled, (len(pairs),), torch.bool)
    return reference_cache.ReferenceTable(pairs, table, filled)


def accumulate_gradients(model: torch.nn.Module, micro_batches: list[list[TokenizedPair]], spec: LossSpec,
                         loss_params: dict[str, float], pad_id: int, device: str, share_prompt: bool = False,
                         scaler: torch.amp.GradScaler | None = None, reference: ReferenceTable | None = None,
                         n_pairs: int | None = None, counted: int | None = None) -> tuple[PairMetrics, int]:
    """Forward and backward over the micro-batches of one optimizer step; returns metrics and tokens read.
    With `reference` (precomputed log-probs) the step runs no reference forward. `n_pairs`: the pairs of the
    global batch, when these micro-batches are one process's share of it (default: these micro-batches' pairs).
    `counted`: only the first so many micro-batches count; the others run forward and backward with no weight (a
    rank of a sharded run keeping in step with the others: train/distributed.py)."""
    counted = len(micro_batches) if counted is None else counted
    n_pairs = n_pairs or sum(len(pairs) for pairs in micro_batches[:counted])
    metrics, tokens = PairMetrics(), 0
    for i, pairs in enumerate(micro_batches):
        batch = collate(pairs, pad_id, share_prompt).to(device)
        cached = reference(pairs).to(device) if reference is not None else None
        logps = pair_logps(model, batch, spec.needs(loss_params), reference=cached)
        out = registry.compute(spec, logps, loss_params)
        # Sum over pairs / pairs in the global batch: the same loss and gradient however the global
        # batch is split into micro-batches (a mean per micro-batch would weight small ones more).
        loss = out.losses.sum() / n_pairs * (i < counted)
        (scaler.scale(loss) if scaler else loss).backward()
        if i < counted:
            metrics.add(out, logps)
            tokens += batch.n_tokens
    return metrics, tokens


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.nn.Parameter],
                 max_grad_norm: float, lr: float, loss_sum: float) -> tuple[float, bool]:
    """Clip and take the optimizer step at rate `lr`, unless the loss or the gradient is not finite (then the
    weights stay as they are). Returns (gradient norm before clipping, whether the step was taken)."""
    scaler.unscale_(optimizer)  # no-op unless fp16: the norm and the clipping see the true gradient
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if finite:
        scaler.step(optimizer)
    scaler.update()  # fp16: a skipped (overflowed) step lowers the scale
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: str) -> torch.optim.Optimizer:
    """AdamW; on CUDA bitsandbytes' paged 8-bit AdamW (optimizer state is a large part of 24 GB)."""
    choice = cfg.optimizer if cfg.optimizer != "auto" else ("paged_adamw_8bit" if device == "cuda" else "adamw")
    if choice == "paged_adamw_8bit":
        if device != "cuda":
            raise ConfigError("optimizer paged_adamw_8bit needs a CUDA GPU; use --optimizer adamw")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # torch's fused kernel: on a CPU its default is a loop of small ops per tensor (a LoRA of 420 tensors,
    # 4.9M values: 275 ms a step against 32 ms fused, 2-core Xeon), and `foreach` is slower still there
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
