"""What `infopo train --resume RUN` may change: the run's length and how it saves, nothing that alters the maths.

Flags that repeat the run's own settings are accepted (so the original command plus `--resume` works);
a flag that disagrees is refused with one line saying why. `--batch-size`, `--grad-accum` and the number of
processes may change when the global batch (their product) stays the same: the data order and each step's
gradient are those of the global batch, and a smaller micro-batch is the way out of an out-of-memory stop.
A run resumed on another number of processes (`--nproc`, or torchrun's) keeps its global batch by changing
`--grad-accum` itself, and says so.

The checkpoint itself is checked too (`check_length` before the model loads, `accepted_schedule` once it is read):
one that this run cannot continue exactly is refused with one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infopo_cli import files
from infopo_cli.config import TrainConfig, flag as _flag, merge
from infopo_cli.presets import relative_paths, started_paths
from infopo_cli.data.mixing import absolute, as_list
from infopo_cli.errors import CheckpointError, ConfigError
from infopo_cli.train.schedule import WarmupCosine

# the length of the run, and where and how often it saves or evaluates: the adapter stays the same
MAY_CHANGE = ("max_steps", "epochs", "save_every", "keep_checkpoints", "eval_every", "eval_batch_size", "max_bad_steps",
              "report_to", "reference", "eval_generate_every", "eval_max_new_tokens",
              "gradient_checkpointing", "gpu_mem_margin",  # recomputation gives the same gradients (tests/model/test_memory_plan.py)
              "fsdp")  # where the weights live, not what they compute (tests/runs/test_fsdp.py)


def enter_start_folder(run_dir: Path, saved: TrainConfig, flags: dict[str, Any],
                       note: Callable[[str], None] = lambda message: None) -> tuple[Path, dict[str, Any]]:
    """A run resumed from another folder goes on from the folder it started in where that holds its relative paths
    (data, held-out data, model): the working folder changes to it (the flags' own paths made absolute first), so
    every relative path of config.toml reads what it read, and config.toml, rewritten, keeps them as typed. Returns
    the run folder (as config.toml spells it) and the flags to use. A run folder copied elsewhere, or paths that only
    this folder holds: nothing changes (presets.started_paths)."""
    start, there = started_paths(run_dir, saved)
    here = [path for path in there if Path(path).exists()]
    if start is None or not there or any(Path(path).exists() and path not in there for path in relative_paths(saved)):
        return run_dir, flags
    flags = {key: absolute(value) if key in ("data", "eval_data") else
             str(Path(value).expanduser().resolve()) if key in ("output", "init_adapter", "preset") and value and
             Path(value).expanduser().exists() else value for key, value in flags.items()}
    files.anchor_home()  # a relative INFOPO_HOME means the folder the user typed it in
    os.chdir(start)
    note(f"{', '.join(there)}: read from {start}, where this run started" + (" (not from here)" if here else ""))
    return Path(saved.output), flags


def resumed_config(saved: TrainConfig, flags: dict[str, Any], run_dir: Path,
                   note: Callable[[str], None] = lambda message: None) -> TrainConfig:
    flags = dict(flags)
    preset = flags.pop("preset", None)
    if preset is not None and saved.preset not in (preset, Path(preset).stem) and \
            Path(preset).resolve() != (run_dir / "config.toml").resolve():
        raise ConfigError(f"--resume continues {run_dir} with its own preset ({saved.preset}); drop --preset {preset}")
    output = flags.pop("output", None)
    if output is not None and Path(output).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume writes into {run_dir} itself; drop --output {output}")
    if flags.get("dtype") == "auto":  # config.toml holds what auto chose for this run
        flags.pop("dtype")
    if flags.get("init_adapter") and saved.init_adapter and Path(flags["init_adapter"]).expanduser().resolve() == Path(saved.init_adapter):
        flags.pop("init_adapter")  # config.toml holds the folder as an absolute path
    for key in ("data", "eval_data"):  # the same files under another spelling (./d/a.jsonl, its absolute path)
        if key in flags and as_list(absolute(flags[key])) == as_list(absolute(getattr(saved, key))):
            flags.pop(key)
    cfg = merge(saved, {**flags, "output": str(run_dir)}, source="command line")
    # under torchrun/accelerate the launcher's world size; else --nproc, or as many processes as before
    cfg = merge(cfg, {"nproc": int(os.environ["WORLD_SIZE"]) if "LOCAL_RANK" in os.environ else flags.get("nproc", saved.nproc)},
                source="command line")
    saved_global = saved.batch_size * saved.grad_accum * saved.nproc
    if cfg.nproc != saved.nproc and "grad_accum" not in flags:
        accum = saved_global // (cfg.batch_size * cfg.nproc) if saved_global % (cfg.batch_size * cfg.nproc) == 0 else None
        if accum is None:
            raise ConfigError(f"{run_dir} trains on global batches of {saved_global} pairs, which {cfg.nproc} processes of "
                              f"--batch-size {cfg.batch_size} cannot split evenly; give --batch-size and --grad-accum with "
                              f"batch size x grad accum x {cfg.nproc} = {saved_global}")
        cfg = merge(cfg, {"grad_accum": accum}, source="command line")
        note(f"{saved.nproc} -> {cfg.nproc} processes: --grad-accum {saved.grad_accum} -> {accum} keeps the global batch "
             f"of {saved_global} pairs")
    for key in sorted(set(flags) - set(MAY_CHANGE) - {"batch_size", "grad_accum", "nproc"}):
        if getattr(cfg, key) != getattr(saved, key):
            raise ConfigError(f"{_flag(key)} {getattr(cfg, key)!r} differs from this run's {getattr(saved, key)!r}: --resume "
                              f"continues a run with its own settings (it may change {', '.join(map(_flag, MAY_CHANGE))}, "
                              "and --batch-size with --grad-accum at the same global batch)")
    if cfg.batch_size * cfg.grad_accum * cfg.nproc != saved_global:
        raise ConfigError(f"the global batch (--batch-size x --grad-accum x processes) must stay {saved.batch_size} x "
                          f"{saved.grad_accum} x {saved.nproc} = {saved_global} on --resume (got {cfg.batch_size} x "
                          f"{cfg.grad_accum} x {cfg.nproc})")
    if "max_steps" not in flags and cfg.epochs != saved.epochs:
        cfg = merge(cfg, {"max_steps": None}, source="command line")  # a new --epochs sets the length; the saved max_steps must not win
    return cfg


def check_length(run_dir: Path, at_step: int, max_steps: int | None) -> None:
    """A --max-steps below the checkpoint's step fails before a long model load."""
    if max_steps and max_steps < at_step:
        raise ConfigError(f"{run_dir} is at step {at_step}; --max-steps must be at least that")


def check_data(saved: dict[str, Any], folder: Path, train_pairs: int, data_sha256: str | None) -> None:
    """Refuses a checkpoint (its training_state.pt `saved`) whose training pairs were other than these: their number,
    and their hash (data/tokenization.py `pairs_digest`) where the checkpoint has one (earlier releases' have only the
    number). A swapped chosen and rejected, an edited reply or a reordered file all change the hash."""
    if saved["train_pairs"] != train_pairs:
        raise CheckpointError(f"{folder}: the training data changed since this checkpoint "
                              f"({saved['train_pairs']} pairs then, {train_pairs} now); start a new run")
    if data_sha256 and saved.get("data_sha256", data_sha256) != data_sha256:
        raise CheckpointError(f"{folder}: the training pairs changed since this checkpoint (as many, {train_pairs}, but "
                              "not the same tokens: the data, the tokenizer or its chat template changed, or how a newer "
                              "infopo reads the rows); put them back or start a new run")


def check_resumable(saved: dict[str, Any], folder: Path, run_dir: Path, global_batch: int, train_pairs: int,
                    total_steps: int, data_sha256: str | None = None) -> None:
    """Refuses the checkpoint in `folder` (its training_state.pt `saved`) where this run cannot continue it exactly:
    another global batch or other data, fewer steps than it took, or a run that finished with its rate at zero.
    Checked before the model loads, and again on the loaded checkpoint (`accepted_schedule`)."""
    start = saved["step"]
    if saved.get("global_batch", global_batch) != global_batch:
        raise CheckpointError(f"{folder}: its steps are global batches of {saved['global_batch']} pairs, this "
                              f"resume's of {global_batch} (--batch-size x --grad-accum x processes); keep "
                              f"{saved['global_batch']}")
    check_data(saved, folder, train_pairs, data_sha256)
    if total_steps < start:
        raise ConfigError(f"{run_dir} is at step {start}; --max-steps/--epochs must give at least that many "
                          f"steps (got {total_steps})")
    planned = WarmupCosine.from_state_dict(saved["schedule"])
    if start >= planned.total and total_steps > start:
        raise ConfigError(f"{run_dir} finished its {start} steps and its learning rate has decayed to zero, so "
                          "more steps would not train; start a new run (extend a run before it ends)")


def accepted_schedule(saved: dict[str, Any], folder: Path, run_dir: Path, init_adapter: str | None,
                      init_sha256: str | None, global_batch: int, train_pairs: int, total_steps: int,
                      data_sha256: str | None = None) -> WarmupCosine:
    """The learning-rate schedule the checkpoint in `folder` (its training_state.pt `saved`) continues on, resized to
    `total_steps`; refuses one whose init adapter changed, or that `check_resumable` refuses."""
    if saved.get("init_adapter_sha256") != init_sha256:
        raise CheckpointError(f"{init_adapter}: this run's init adapter changed since it started (its weights "
                              "are the reference); put the original back or start a new run")
    check_resumable(saved, folder, run_dir, global_batch, train_pairs, total_steps, data_sha256)
    return WarmupCosine.from_state_dict(saved["schedule"]).resized(saved["step"], total_steps)
