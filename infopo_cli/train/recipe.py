"""`infopo train`: the training recipe, top to bottom.

data -> run folder (locked) -> hardware -> model (4-bit base + LoRA) -> tokens -> optimizer, schedule
-> resume? -> evaluate -> loop (policy and reference log-probs, loss, backward, clip, step; stop,
evaluate and checkpoint only between steps) -> evaluate -> save -> summary.

Every ordinary stop ends at a step boundary with a checkpoint from which `infopo train --resume RUN`
continues exactly: Ctrl-C or SIGTERM (after the current step), CUDA out-of-memory (the state before the
failed step), too many non-finite steps in a row. What the user sees is printed by a `Reporter`.
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch

from infopo_cli import __version__, files
from infopo_cli.config import TrainConfig, to_toml
from infopo_cli.data.batching import collate, eval_batches, shuffled_batches
from infopo_cli.data.loading import no_pairs
from infopo_cli.data.mixing import as_list
from infopo_cli.data.token_cache import tokenize_cached
from infopo_cli.data.tokenization import TokenizedPair, auto_max_length, truncate
from infopo_cli.errors import CheckpointError, ConfigError
from infopo_cli.losses import registry
from infopo_cli.losses.registry import LossSpec
from infopo_cli.model import checkpointing as recomputation, loading as model_stack, unsloth_backend
from infopo_cli.model.precision import choose
from infopo_cli.model.source import check_source
from infopo_cli.reporting import displacement
from infopo_cli.reporting.model_card import write_run_documents
from infopo_cli.train import answer_eval, checkpoint, distributed, preflight, reference_cache, trackers
from infopo_cli.train.memory_fallback import Fallback, free_accelerator_memory as _free_accelerator_memory, is_out_of_memory
from infopo_cli.train.reference_cache import ReferenceTable
from infopo_cli.train.evaluate import Evaluator
from infopo_cli.train.logps import attention_kernel, pair_logps, takes_custom_masks
from infopo_cli.train.metrics import MetricsLog, PairMetrics, read_records
from infopo_cli.train.plot import plot_run
from infopo_cli.train.progress import Reporter
from infopo_cli.train.schedule import WarmupCosine
from infopo_cli.train.stops import NAMES, StopRequests, resume_hint

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
    try:
        return _train(cfg, report or Reporter(), resume, world)
    finally:
        distributed.stop(world)


def _train(cfg: TrainConfig, report: Reporter, resume: Path | None, world: distributed.World) -> RunSummary:
    report = report if world.is_main else report.silenced()  # rank 0 speaks for the run
    # --- what can fail without a model fails now, before the run folder exists ----------------
    cfg, spec, loss_params = preflight.check_settings(cfg)
    if cfg.backend == "unsloth" and not resume:  # a resume trains with the dropout its config.toml holds
        cfg = unsloth_backend.without_dropout(cfg, report.note)
    output = resume or (Path(cfg.output) if cfg.output else default_output(cfg))
    if not resume:
        preflight.check_output(output)
    with world.main_first():  # a hub dataset is downloaded once, by rank 0
        loaded, eval_pairs = preflight.load_data(cfg)
    check_source(cfg.model)  # a missing path, a folder that is no model or holds its own code: before the run folder
    report.skipped_rows(loaded.skipped, loaded.rows)
    for line in ([f"mix: {loaded.mix}"] if loaded.mix else []) + loaded.info + [f"warning: {n}" for n in loaded.notes]:
        report.note(line)
    created = not resume and world.is_main and not output.exists()
    run_dir = resume or (files.claim_output_dir(output) if world.is_main else None)
    run_dir = Path(world.broadcast(str(run_dir)))  # the folder rank 0 claimed: one set of outputs
    report.start(cfg.loss, loss_params, len(loaded.pairs), loaded.format, ", ".join(as_list(cfg.data)), len(eval_pairs),
                 run_dir)

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
        if resume_from and cfg.max_steps and cfg.max_steps < checkpoint.step_of(resume_from):  # before a long model load
            raise ConfigError(f"{run_dir} is at step {checkpoint.step_of(resume_from)}; --max-steps must be at least that")

        # --- hardware and seed -----------------------------------------------------------------
        precision = choose(cfg.dtype)
        report.precision(precision)
        if world.active:
            report.note(f"data-parallel over {world.size} processes ({torch.distributed.get_backend()}): each trains on "
                        f"its share of every global batch of {cfg.batch_size * cfg.grad_accum * world.size} pairs")
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        # --- tokens: the tokenizer is quick to load, so rows it cannot encode fail before the model loads
        with world.main_first():  # rank 0 converts the embedded model and fills the token cache; the others read them
            source = model_stack.resolve_source(cfg.model, log=report.note)
            tokenizer = model_stack.load_tokenizer(source)
            limits = (10**9, 10**9) if cfg.max_length == "auto" else (cfg.max_length, cfg.max_prompt_length)  # auto: whole first
            train_set, eval_set = (tokenize_cached(pairs, tokenizer, *limits, cfg.skip_invalid) for pairs in (loaded.pairs, eval_pairs))
        report.skipped_rows(train_set.skipped + eval_set.skipped, len(loaded.pairs) + len(eval_pairs))
        train_tok, eval_tok = train_set.pairs, eval_set.pairs
        if not train_tok:
            raise no_pairs(cfg.data, train_set.skipped)
        if cfg.max_length == "auto":  # the training pairs' 99th percentile; config.toml keeps the number
            cfg = replace(cfg, max_length=auto_max_length([p.length for p in train_tok]))
            cfg = replace(cfg, max_prompt_length=min(cfg.max_prompt_length, cfg.max_length // 2))
            report.note(f"max_length auto: {cfg.max_length} tokens keeps 99% of the training pairs whole "
                        f"(max_prompt_length {cfg.max_prompt_length})")
            train_tok, eval_tok = ([truncate(p.prompt_ids, p.chosen_ids, p.rejected_ids, cfg.max_length,
                                             cfg.max_prompt_length) for p in pairs] for pairs in (train_tok, eval_tok))
        report.tokenised(len(train_tok), len(eval_tok), train_set.cached,
                         sum(p.truncated for p in train_tok + eval_tok), cfg.max_length)
        # --- which layers recompute: the memory plan of the longest micro-batch against the free memory; on CUDA a run
        # that cannot fit stops here, before its settings are written and the model loads (Unsloth checkpoints its own way)
        recompute = None if cfg.backend == "unsloth" else recomputation.for_run(
            cfg, source, train_tok, eval_tok, precision.device, precision.dtype.itemsize, cfg.share_prompt)
        if recompute:
            report.checkpointing(recompute.message)

        # --- the resolved settings are on disk before anything long starts ----------------------------
        cfg = replace(cfg, nproc=world.size)  # the global batch counts every process
        resolved = {**cfg.to_dict(), **loss_params, "output": str(run_dir), "dtype": precision.dtype_name}
        if world.is_main and not resume:  # a resume rewrites it only once its checkpoint is accepted
            write_settings(run_dir, resolved)

        # --- model: 4-bit base, LoRA policy; the reference is the same base with the adapter off -
        # (--init-adapter: the policy starts from that adapter; the reference is a frozen copy of it, if the loss has one)
        t_load = time.perf_counter()
        if cfg.backend == "unsloth":  # Unsloth's FastLanguageModel makes the base and the LoRA (model/unsloth_backend.py)
            model, init_sha256 = unsloth_backend.load_model(source, cfg, precision), None
        elif cfg.init_adapter:
            model, init_sha256 = model_stack.load_init_adapter(model_stack.load_base(source, cfg, precision), cfg,
                                                               with_reference=spec.needs(loss_params).reference,
                                                               recompute=recompute)
        else:
            model, init_sha256 = model_stack.attach_lora(model_stack.load_base(source, cfg, precision), cfg, recompute), None
        trainable_params = [p for p in model.parameters() if p.requires_grad]
        report.model(source, time.perf_counter() - t_load, cfg, *model_stack.count_parameters(model))
        share_prompt = cfg.share_prompt and takes_custom_masks(model)
        if cfg.share_prompt and not share_prompt:
            report.note("prompts are read twice per pair: " + ("Unsloth's CUDA forward drops 4-D masks" if cfg.backend == "unsloth"
                        else "this attention kernel takes no 4-D mask (use sdpa or eager to share them)"))
        if world.any(stops.requested):  # stopped while loading: nothing trained yet, nothing to save
            return not_started(run_dir, precision, stops.signum)

        # --- optimizer, schedule, gradient scaler ------------------------------------------------
        # A step is one global batch, split into micro-batches: the data order depends only on the
        # global batch, so a resume may split it differently (after running out of memory).
        global_batch = distributed.global_batch(cfg.batch_size, cfg.grad_accum, world.size)
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_tok) / global_batch)))
        optimizer = make_optimizer(cfg, trainable_params, precision.device)
        schedule = WarmupCosine(cfg.lr, int(cfg.warmup_ratio * total_steps), total_steps)
        # fp16 overflows where bf16 does not: scale the loss, skip steps whose gradients overflow
        scaler = torch.amp.GradScaler(precision.device, enabled=precision.dtype == torch.float16)
        start, pairs_seen, skipped_steps, bad_streak, pending_eval, saved_rng = 0, 0, 0, 0, False, None
        if resume_from:
            saved = checkpoint.load_checkpoint(resume_from, model, optimizer)
            start, pairs_seen = saved["step"], saved["pairs_seen"]
            skipped_steps, bad_streak = saved["skipped_steps"], saved["bad_streak"]
            pending_eval, saved_rng = saved["pending_eval"], saved["rng"]
            if saved.get("init_adapter_sha256") != init_sha256:
                raise CheckpointError(f"{cfg.init_adapter}: this run's init adapter changed since it started (its weights "
                                      "are the reference); put the original back or start a new run")
            if saved.get("global_batch", global_batch) != global_batch:
                raise CheckpointError(f"{resume_from}: its steps are global batches of {saved['global_batch']} pairs, this "
                                      f"resume's of {global_batch} (--batch-size x --grad-accum x processes); keep "
                                      f"{saved['global_batch']}")
            if saved["train_pairs"] != len(train_tok):
                raise CheckpointError(f"{resume_from}: the training data changed since this checkpoint "
                                      f"({saved['train_pairs']} pairs then, {len(train_tok)} now); start a new run")
            if total_steps < start:
                raise ConfigError(f"{run_dir} is at step {start}; --max-steps/--epochs must give at least that many "
                                  f"steps (got {total_steps})")
            planned = WarmupCosine.from_state_dict(saved["schedule"])
            if start >= planned.total and total_steps > start:
                raise ConfigError(f"{run_dir} finished its {start} steps and its learning rate has decayed to zero, so "
                                  "more steps would not train; start a new run (extend a run before it ends)")
            schedule = planned.resized(start, total_steps)
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            report.resumed(start, total_steps, resume_from, schedule)
        if world.is_main and resume:
            write_settings(run_dir, resolved)
        # --report-to: each record of metrics.jsonl also goes to these; a resumed run continues their runs from its step
        sinks = trackers.open_trackers(trackers.parse(cfg.report_to), run_dir, resolved, start if resume else None) \
            if world.is_main else []
        for tracker in sinks:
            held.callback(tracker.close)  # closed on every way out
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if resume else None, sinks=sinks, writes=world.is_main)
        # warns once if the chosen answers' likelihood falls while the margin grows; a resume's earlier records count
        guard = displacement.Guard(cfg.loss, records=log.records, warn=lambda m: report.note(f"warning: {m}"))
        log.sinks.append(guard)
        # each process evaluates its share of the held-out batches; the sums are added up
        evaluator = Evaluator([collate(b, tokenizer.pad_token_id, share_prompt)
                               for b in world.shard(eval_batches(eval_tok, cfg.eval_batch_size))],
                              spec, loss_params, precision.device) if eval_tok else None
        if not spec.needs(loss_params).reference:
            report.note(f"{cfg.loss} is reference-free: no reference forward pass")
        reference = None  # --reference precompute: one pass now (or the cache) instead of one in every step
        if reference_cache.applies(cfg.reference, spec.needs(loss_params)):
            reference = precomputed_reference(model, train_tok, cfg, source, precision, tokenizer.pad_token_id,
                                              share_prompt, init_sha256, report, world)

        eval_failed: list[Stop] = []  # an evaluation that ran out of memory ends the run at this boundary
        answers = answer_eval.answer_rows(eval_pairs, cfg.eval_data, cfg.eval_split or cfg.split) \
            if evaluator and cfg.eval_generate_every else []
        my_answers = world.shard(answers)
        if evaluator and cfg.eval_generate_every and not answers:
            report.note("--eval-generate-every: no held-out row carries an answer ('answer' field, or a chosen reply "
                        "ending 'The answer is N.'); answers are not scored")

        def evaluate(step: int) -> bool:
            """Held-out metrics at `step`, logged; False if a stop request or a lack of memory cut it short."""
            t, totals, short_of_memory = time.perf_counter(), None, False
            try:  # an adapter that has not trained is the reference (zero, or the init adapter): one pass gives both
                totals = evaluator.totals(model, policy_is_reference=step == 0, should_stop=lambda: stops.requested)
            except (RuntimeError, MemoryError) as err:
                if not is_out_of_memory(err):
                    raise
                short_of_memory = True
            if world.any(short_of_memory):  # on any process: every process ends the run at this boundary
                _free_accelerator_memory()
                eval_failed.append(eval_out_of_memory(cfg, step, precision.device, run_dir))
                return False
            if world.any(totals is None):  # a stop request cut it short
                return False
            metrics = world.sum_metrics(totals).means(prefix="eval/")
            if answers and (step in (0, total_steps) or step % cfg.eval_generate_every == 0):
                mine = answer_eval.answer_metrics(model, tokenizer, my_answers, cfg.eval_max_new_tokens,
                                                  cfg.eval_batch_size) if my_answers else {}
                metrics.update(world.mean_over_ranks(mine, len(my_answers), answer_eval.KEYS))
            log.write({"kind": "eval", "step": step, **metrics})
            report.evaluation(step, metrics, time.perf_counter() - t)
            return True

        def save(step: int, rng: dict, eval_due: bool = False) -> Path:
            # pairs_seen: the data position in pairs, which a different split of the global batch keeps
            state = {"step": step, "pairs_seen": pairs_seen, "train_pairs": len(train_tok), "global_batch": global_batch, "rng": rng,
                     "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "skipped_steps": skipped_steps, "bad_streak": bad_streak, "pending_eval": eval_due,
                     **({"init_adapter_sha256": init_sha256} if init_sha256 else {})}
            if not world.is_main:  # the processes hold the same adapter and optimizer state: rank 0 saves it
                return run_dir / f"{checkpoint.PREFIX}{step}"
            return checkpoint.save_checkpoint(run_dir, model, tokenizer, state, cfg.keep_checkpoints)

        stopping = world.any(stops.requested)  # agreed by every process, at each step boundary
        if evaluator and (start == 0 or pending_eval) and not logged_eval(log, start) and not stopping:
            pending_eval = not evaluate(start)
            stopping = world.any(stops.requested)

        # --- the loop ----------------------------------------------------------------------------
        batches = shuffled_batches(train_tok, global_batch, cfg.seed)
        for _ in range(start):  # the same data order as an uninterrupted run
            next(batches)
        if saved_rng:
            checkpoint.restore_rng(saved_rng)  # last, so nothing in the set-up above draws from it
        if world.rank:  # other processes draw other LoRA dropout masks (rank 0 draws what one process would)
            torch.manual_seed(cfg.seed + 1_000_003 * world.rank + start)
        model.train()
        step, stop = start, None
        # an auto run that runs out of memory in a step runs it again recomputing more (train/memory_fallback.py)
        fallback = Fallback(model, trainable_params, recompute if cfg.gradient_checkpointing == "auto" else None, report.note,
                            lambda mode: world.is_main and write_settings(run_dir, {**resolved, "gradient_checkpointing": mode}))
        with report.progress(total_steps, start) as bar:
            while step < total_steps and not stopping and not eval_failed:
                boundary_rng = checkpoint.capture_rng()
                pairs = next(batches)  # the global batch, the same on every process; each trains on its share
                mine = world.shard(pairs)
                micro_batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
                t_step, updating, short_of_memory = time.perf_counter(), False, False
                try:
                    metrics, step_tokens = fallback.run(lambda: accumulate_gradients(
                        model, micro_batches, spec, loss_params, tokenizer.pad_token_id, precision.device, share_prompt,
                        scaler, reference, n_pairs=len(pairs)), boundary_rng, step + 1)
                except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
                    if not is_out_of_memory(err):
                        raise
                    short_of_memory = True
                fallback.agree(world, step + 1)  # where one process had to recompute more, all do from now on
                try:
                    if world.any(short_of_memory):  # on any process: all of them stop before the update
                        raise MemoryError("out of memory in a micro-batch")
                    world.sum_gradients(trainable_params)
                    metrics, step_tokens = world.sum_metrics(metrics), int(world.sum_floats([step_tokens])[0])
                    updating = True
                    grad_norm, finite = apply_update(optimizer, scaler, trainable_params, cfg.max_grad_norm,
                                                     schedule.lr(step), metrics.sums["loss"])
                except (RuntimeError, MemoryError) as err:
                    if not is_out_of_memory(err):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    _free_accelerator_memory()
                    # before the update the weights, optimizer and schedule are those after `step`: an exact
                    # boundary; an update cut short may have changed some weights, so only older checkpoints count
                    saved = (run_dir / f"{checkpoint.PREFIX}{step}").is_dir()
                    if not updating and not saved:
                        report.saved(save(step, boundary_rng, pending_eval))
                    stop = out_of_memory(replace(cfg, gradient_checkpointing=fallback.mode or cfg.gradient_checkpointing),
                                         step + 1, micro_batches, precision.device, run_dir,
                                         saved=saved or not updating)
                    break
                step += 1
                pairs_seen += len(pairs)
                skipped_steps += not finite
                bad_streak = 0 if finite else bad_streak + 1

                seconds = time.perf_counter() - t_step
                record = {"kind": "train", "step": step, **metrics.means(), "grad_norm": grad_norm,
                          "lr": schedule.lr(step - 1), "epoch": step * global_batch / len(train_tok),
                          "tokens": step_tokens, "skipped": not finite, "skipped_steps": skipped_steps,
                          "tokens_per_s": step_tokens / seconds, "step_seconds": seconds}
                if scaler.is_enabled():
                    record["grad_scale"] = float(scaler.get_scale())
                log.write(record)
                bar.step(step, record)

                # --- between steps: evaluate, stop, checkpoint ------------------------------------
                stopping = world.any(stops.requested)
                eval_due = bool(evaluator and step < total_steps and any(every and step % every == 0 for every in
                                                                           (cfg.eval_every, cfg.eval_generate_every)))
                pending_eval = eval_due and (stopping or not evaluate(step))
                stopping = world.any(stops.requested)  # also a request that came during the evaluation
                stop = eval_failed[0] if eval_failed else None
                if bad_streak >= cfg.max_bad_steps:
                    stop = diverged(step, bad_streak, run_dir)
                if stop or stopping or step == total_steps or (cfg.save_every and step % cfg.save_every == 0):
                    report.saved(save(step, checkpoint.capture_rng(), pending_eval))
                if stop:
                    break
        if not stop and (eval_failed or stopping):
            stop = eval_failed[0] if eval_failed else stopped(stops.signum, step, total_steps, run_dir)

        # --- finish: evaluate, save, report ------------------------------------------------------
        if evaluator and not stop and not logged_eval(log, step):
            if not evaluate(step):
                stop = eval_failed[0] if eval_failed else stopped(stops.signum, step, total_steps, run_dir)
        summary = summarise(log, run_dir, precision, stop, skipped_steps, step)
        if not world.is_main:
            return summary
        checkpoint.save_adapter(model, tokenizer, run_dir)
        summary.displacement = guard.message
        summary.data = {"train": as_list(cfg.data), "rows": loaded.rows, "pairs": len(train_tok), "format": loaded.format,
                        "eval": as_list(cfg.eval_data) if cfg.eval_data else [], "eval_pairs": len(eval_tok)}
        files.write_json(run_dir / "summary.json", asdict(summary))
        if not plot_run(log.records, run_dir / "plot.png", f"{cfg.loss} on {', '.join(Path(d).name for d in as_list(cfg.data))} ({source})"):
            report.note("plot.png skipped: matplotlib is not installed (pip install 'infopo[plot]')")
        write_run_documents(run_dir)  # README.md (the model card, over peft's template) and report.md
        return summary


def write_settings(run_dir: Path, resolved: dict) -> None:
    files.write_text(run_dir / "config.toml", f"# infopo {__version__}; rerun with: infopo train --preset "
                                              f"{run_dir / 'config.toml'} --output NEW_DIR\n" + to_toml(resolved))


def _remove_if_unstarted(run_dir: Path, error: BaseException | None) -> bool:
    """A fresh run that failed with an error before its first step leaves no folder behind (a stop request, which
    tells the user how to start it again, keeps it). Never swallows the error."""
    metrics = run_dir / "metrics.jsonl"
    trained = metrics.is_file() and any(r.get("kind") == "train" for r in read_records(metrics))
    if isinstance(error, Exception) and not trained and not checkpoint.complete_checkpoints(run_dir):
        files.remove_tree(run_dir)
    return False


@dataclass(frozen=True)
class Stop:
    status: str
    exit_code: int
    message: str


def logged_eval(log: MetricsLog, step: int) -> bool:
    return any(r["step"] == step for r in log.of_kind("eval"))


def not_started(run_dir: Path, precision, signum: int | None) -> RunSummary:
    stop = Stop("stopped", 128 + (signum or 2), f"stopped by {NAMES.get(signum, 'a signal')} before the first step; "
                                                 f"start it again with: {resume_hint(run_dir)}")
    return RunSummary(str(run_dir), stop.status, 0, 0.0, 0.0, peak_memory_gib(precision.device), precision.device,
                      precision.dtype_name, stop.exit_code, stop.message)


def stopped(signum: int | None, step: int, total: int, run_dir: Path) -> Stop:
    return Stop("stopped", 128 + (signum or 2), f"stopped by {NAMES.get(signum, 'a signal')} after step {step}/{total}; "
                                                 f"continue with: {resume_hint(run_dir)}")


def out_of_memory(cfg: TrainConfig, step: int, micro_batches: list[list[TokenizedPair]], device: str, run_dir: Path,
                  saved: bool) -> Stop:
    longest = max(p.length for b in micro_batches for p in b)
    where = f"out of {'GPU ' if device == 'cuda' else ''}memory at step {step} (micro-batches of {cfg.batch_size} pairs, longest pair {longest} tokens)"
    kept = f"the state before step {step} is saved" if saved else "the newest checkpoint is kept"
    if cfg.batch_size == 1:  # recomputing more (it changes no gradient) may be the way on
        more = "offload" if cfg.gradient_checkpointing == "on" and device == "cuda" else "on"
        recompute = "" if cfg.gradient_checkpointing in ("offload", more) else (
            f", or continue with: {resume_hint(run_dir)} --gradient-checkpointing {more}")
        return Stop("out of memory", 3, f"{where}: lower --max-length ({cfg.max_length}) in a new run{recompute}; "
                                        f"{kept} in {run_dir}")
    smaller = next(b for b in range(cfg.batch_size // 2, 0, -1) if cfg.batch_size % b == 0)
    return Stop("out of memory", 3,
                f"{where}: lower --batch-size and raise --grad-accum by the same factor (the global batch stays "
                f"{cfg.batch_size * cfg.grad_accum}), or lower --max-length ({cfg.max_length}) in a new run; {kept}; "
                f"continue with: {resume_hint(run_dir)} --batch-size {smaller} "
                f"--grad-accum {cfg.batch_size * cfg.grad_accum // smaller}")


def eval_out_of_memory(cfg: TrainConfig, step: int, device: str, run_dir: Path) -> Stop:
    smaller = max(1, cfg.eval_batch_size // 2)
    kept = f"the state at step {step} is saved" if step else "nothing was trained yet"
    return Stop("out of memory", 3, f"out of {'GPU ' if device == 'cuda' else ''}memory evaluating at step {step} "
                                    f"(batches of {cfg.eval_batch_size} held-out pairs): lower --eval-batch-size; {kept}; "
                                    f"continue with: {resume_hint(run_dir)} --eval-batch-size {smaller}")


def diverged(step: int, streak: int, run_dir: Path) -> Stop:
    return Stop("diverged", 4, f"{streak} steps in a row (up to step {step}) had a non-finite loss or gradient and were "
                               f"skipped; stopped with the weights of step {step - streak} (saved): lower --lr, or check the "
                               f"data; continue anyway with: {resume_hint(run_dir)} --max-bad-steps N")


def summarise(log: MetricsLog, run_dir: Path, precision, stop: Stop | None, skipped_steps: int, step: int) -> RunSummary:
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


def precomputed_reference(model: torch.nn.Module, pairs: list[TokenizedPair], cfg: TrainConfig, source: str,
                          precision, pad_id: int, share_prompt: bool, init_sha256: str | None,
                          report: Reporter, world: distributed.World = distributed.World()) -> ReferenceTable:
    """The reference's log-probs of every training pair, from the cache or one no-grad pass (train/reference_cache.py);
    several processes each compute their share of the pairs, and every process gets the whole table."""
    settings = {"load_in_4bit": cfg.load_in_4bit, "dtype": precision.dtype_name, "attn": attention_kernel(model) or cfg.attn_implementation,
                "share_prompt": share_prompt, "init_adapter": init_sha256, "max_length": cfg.max_length,
                "max_prompt_length": cfg.max_prompt_length,
                **({"backend": cfg.backend} if cfg.backend != "transformers" else {})}  # other kernels, other rounding
    identity = reference_cache.model_identity(source)
    key = reference_cache.cache_key(identity, settings, pairs) if identity is not None else None
    started = time.perf_counter()
    table = reference_cache.load_cached(key, len(pairs)) if world.is_main else None
    cached = world.broadcast(table is not None)
    if cached:
        table = world.broadcast_tensor(table, (len(pairs), 2), torch.float32)
    else:
        mine = world.shard(pairs)
        with report.task("reference log-probs", len(mine)) as advance:
            part = reference_cache.compute(model, mine, cfg.eval_batch_size, pad_id, share_prompt, precision.device, advance)
        table = world.gather_rows(part, len(pairs))
        if world.is_main:
            reference_cache.store(key, table)
    report.note(f"reference log-probs of {len(pairs)} pairs " + ("read from the cache" if cached else
                f"computed once ({time.perf_counter() - started:.0f}s)" + (", cached for later runs on this base and data"
                if key else "; not cached: the base's files were not found to key them")))
    return reference_cache.ReferenceTable(pairs, table)


def accumulate_gradients(model: torch.nn.Module, micro_batches: list[list[TokenizedPair]], spec: LossSpec,
                         loss_params: dict[str, float], pad_id: int, device: str, share_prompt: bool = False,
                         scaler: torch.amp.GradScaler | None = None, reference: ReferenceTable | None = None,
                         n_pairs: int | None = None) -> tuple[PairMetrics, int]:
    """Forward and backward over the micro-batches of one optimizer step; returns metrics and tokens read.
    With `reference` (precomputed log-probs) the step runs no reference forward. `n_pairs`: the pairs of the
    global batch, when these micro-batches are one process's share of it (default: these micro-batches' pairs)."""
    n_pairs = n_pairs or sum(len(pairs) for pairs in micro_batches)
    metrics, tokens = PairMetrics(), 0
    for pairs in micro_batches:
        batch = collate(pairs, pad_id, share_prompt).to(device)
        cached = reference(pairs).to(device) if reference is not None else None
        logps = pair_logps(model, batch, spec.needs(loss_params), reference=cached)
        out = registry.compute(spec, logps, loss_params)
        # Sum over pairs / pairs in the global batch: the same loss and gradient however the global
        # batch is split into micro-batches (a mean per micro-batch would weight small ones more).
        loss = out.losses.sum() / n_pairs
        (scaler.scale(loss) if scaler else loss).backward()
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
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
