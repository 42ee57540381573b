"""Resumable checkpoints: everything a run needs to carry on exactly where it stopped.

A checkpoint is taken only at a step boundary (after an optimizer step, never inside one) and holds:
the adapter (safetensors), the optimizer, the learning-rate schedule, the gradient scaler (fp16), the
data position, the RNG states of Python, torch and CUDA captured at that same boundary, and the
counters of skipped steps. It is written into a temporary folder and renamed into place whole, so a
crash or a second Ctrl-C during the save leaves the previous checkpoint as it was. It loads with
`torch.load(weights_only=True)`: tensors and plain containers only, never pickled code.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from infopo_cli import files
from infopo_cli.errors import CheckpointError, OutputError, first_line
from infopo_cli.model.stack import POLICY, load_adapter_weights  # only the trained adapter: a frozen reference would land in reference/
from safetensors.torch import load_file

STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "checkpoint-"
STATE_KEYS = frozenset({"step", "pairs_seen", "train_pairs", "rng", "optimizer", "schedule", "scaler",
                        "skipped_steps", "bad_streak", "pending_eval"})
LOW_DISK = 64 * 2**20  # a failed write with less free space than this was the disk filling up


def capture_rng() -> dict[str, Any]:
    """The RNG states a step draws from (LoRA dropout on CPU or GPU; Python's for anything else)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the Python, torch and (where there is one) CUDA random states that `capture_rng` took."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # weights_only loads tuples back as lists in places
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _writing_weights(target: Path, run_dir: Path) -> Iterator[None]:
    """torch.save and safetensors report a full disk as their own errors (torch: a cryptic 'enforce fail');
    make any failed write one line that names `target`, the reason, and the newest checkpoint still intact."""
    try:
        yield
    except (OutputError, RuntimeError, SafetensorError) as err:
        if isinstance(err, OutputError):
            message = str(err)
        else:
            free, text = shutil.disk_usage(run_dir).free, " ".join(str(err).split())
            if free < LOW_DISK or "No space left" in text:
                reason = os.strerror(errno.ENOSPC)
            elif any(sign in text for sign in ("os error", "I/O error", "write", "unexpected pos")):
                reason = text[:200]
            else:
                raise  # not a failed write (a bug, or out of memory): not ours to rename
            message = f"cannot write {target}: {reason} ({free / 2**20:.0f} MiB free)"
        previous = complete_checkpoints(run_dir)
        raise OutputError(f"{message}; {previous[-1].name} is intact" if previous else message) from None


def save_adapter(model: nn.Module, tokenizer, folder: Path) -> None:
    """peft adapter + tokenizer into `folder` (loads with PeftModel.from_pretrained(base, folder)).

    The run folder itself cannot be renamed into place (it holds the log and the lock), so each file
    is replaced atomically, the weights last: the adapter's config is the same for every save of a run,
    so a reader sees the old weights or the new ones, never a torn file.
    """
    with _writing_weights(folder / WEIGHTS_FILE, folder), files.staging(folder) as tmp:
        model.save_pretrained(tmp, selected_adapters=[POLICY])
        tokenizer.save_pretrained(tmp)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == WEIGHTS_FILE):
            files.move_into_place(item, folder / item.name)


def save_checkpoint(run_dir: Path, model: nn.Module, tokenizer, state: dict[str, Any], keep: int) -> Path:
    """checkpoint-STEP/ with the adapter and `state`; then only the newest `keep` checkpoints are kept."""
    target = run_dir / f"{PREFIX}{state['step']}"
    with _writing_weights(target, run_dir), files.folder(target) as tmp:
        model.save_pretrained(tmp, selected_adapters=[POLICY])
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
    for old in complete_checkpoints(run_dir)[:-keep]:
        files.remove_tree(old)
    return target


def step_of(folder: Path) -> int:
    """The step of a checkpoint-N folder."""
    return int(folder.name[len(PREFIX):])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders that were renamed into place whole, oldest first."""
    found = [path for path in run_dir.glob(f"{PREFIX}*") if path.name[len(PREFIX):].isdigit()
             and (path / STATE_FILE).is_file() and (path / WEIGHTS_FILE).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; None for a run stopped before its first step (it starts over)."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's training_state.pt, checked to hold every key of STATE_KEYS (a resume reads it before the
    model loads, to refuse early)."""
    try:
        state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise CheckpointError(f"{folder}: cannot read the checkpoint: {STATE_FILE} holds more than tensors and plain "
                              "values, and infopo never runs code from a checkpoint") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{folder}: cannot read the checkpoint ({first_line(err, 'unreadable')})") from None
    missing_state = sorted(STATE_KEYS - set(state)) if isinstance(state, dict) else ["everything"]
    if missing_state:
        raise CheckpointError(f"{folder}: not a checkpoint this version of infopo can resume (it lacks "
                              f"{', '.join(missing_state)}); start a new run")
    return state


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore the adapter weights and optimizer; return the rest of the saved state (schedule, RNG, position).
    `state`: what `read_state(folder)` gave already (it holds the optimizer state: not read twice)."""
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{folder}: cannot read the checkpoint ({first_line(err, 'unreadable')})") from None
    state = read_state(folder) if state is None else state
    if problem := load_adapter_weights(model, weights):
        raise CheckpointError(f"{folder}: {problem}")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{folder}: the optimizer state does not match this run ({err})") from None
    return state
