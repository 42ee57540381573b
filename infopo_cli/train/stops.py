"""Ordinary stops (Ctrl-C, `kill`, `docker stop`, SLURM preemption, `timeout`) end a run at a step boundary.

The first SIGINT or SIGTERM only sets a flag; the loop reads it between optimizer steps, saves a
checkpoint and exits 130 (SIGINT) or 143 (SIGTERM), as shells report a process those signals ended.
A second signal stops at once: the checkpoint being written, if any, is abandoned and the last
complete one stays as it was. Under torchrun a terminal's Ctrl-C reaches each process twice within
milliseconds (from the terminal and forwarded by the launcher): with `same_within` set, a second signal
that close to the first is the same request.

Every way a run ends early is a `Stop` (status, exit code, the line that says how to carry on), built here.
"""

from __future__ import annotations

import shlex
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from infopo_cli.errors import InfopoError

if TYPE_CHECKING:  # at run time this module is standard library only: the CLI imports it before torch
    from infopo_cli.config import TrainConfig
    from infopo_cli.data.tokenization import TokenizedPair

NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


def resume_hint(run_dir: object) -> str:
    return f"infopo train --resume {shlex.quote(str(run_dir))}"  # quoted: a folder with a space pastes as one


class StopNow(BaseException):
    """The second signal: leave at once (a BaseException, so no `except Exception` swallows it)."""

    def __init__(self, signum: int, run_dir: str) -> None:
        super().__init__(f"stopped at once by a second {NAMES.get(signum, signum)}; the newest complete checkpoint in "
                         f"{run_dir} is intact; continue with: {resume_hint(run_dir)}")
        self.signum, self.run_dir = signum, run_dir
        self.exit_code = 128 + signum


class StopRequests:
    """Context manager that turns SIGINT/SIGTERM into a request the training loop polls."""

    def __init__(self, run_dir: str, on_first: Callable[[int], None] = lambda signum: None, same_within: float = 0.0) -> None:
        self.signum: int | None = None
        self.run_dir, self.on_first, self.same_within = run_dir, on_first, same_within
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first_at < self.same_within:
                return
            raise StopNow(signum, self.run_dir)
        self.signum, self._first_at = signum, time.monotonic()
        self.on_first(signum)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class Stop:
    """Why a run ends before its last step: the summary's status, the process's exit code, the line for the user."""

    status: str
    exit_code: int
    message: str


def not_started(signum: int | None, run_dir: Path, step: int = 0) -> Stop:
    """A stop request that came in the set-up (the model's load, the reference pass) of a run at `step` (a resume's):
    nothing trained in this start, nothing saved."""
    by = f"stopped by {NAMES.get(signum, 'a signal')}"
    if step:
        return Stop("stopped", 128 + (signum or 2), f"{by} before training on from step {step}; its checkpoint is "
                                                     f"intact; continue with: {resume_hint(run_dir)}")
    return Stop("stopped", 128 + (signum or 2), f"{by} before the first step; start it again with: {resume_hint(run_dir)}")


def stopped(signum: int | None, step: int, total: int, run_dir: Path) -> Stop:
    """A stop request, read at the boundary after `step` (its checkpoint is saved)."""
    return Stop("stopped", 128 + (signum or 2), f"stopped by {NAMES.get(signum, 'a signal')} after step {step}/{total}; "
                                                 f"continue with: {resume_hint(run_dir)}")


def out_of_memory(cfg: TrainConfig, step: int, micro_batches: list[list[TokenizedPair]], device: str, run_dir: Path,
                  saved: bool) -> Stop:
    """Out of memory in training step `step`; `saved`: the state before it is on disk. Says how to continue."""
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


def eval_out_of_memory(cfg: TrainConfig, step: int, device: str, run_dir: Path, saved: bool = True) -> Stop:
    """Out of memory in the held-out evaluation at `step`; `saved`: the state at `step` is on disk."""
    smaller = max(1, cfg.eval_batch_size // 2)
    kept = ("nothing was trained yet" if not step else f"the state at step {step} is saved" if saved else
            "the newest checkpoint is kept")
    return Stop("out of memory", 3, f"out of {'GPU ' if device == 'cuda' else ''}memory evaluating at step {step} "
                                    f"(batches of {cfg.eval_batch_size} held-out pairs): lower --eval-batch-size; {kept}; "
                                    f"continue with: {resume_hint(run_dir)} --eval-batch-size {smaller}")


def diverged(step: int, streak: int, run_dir: Path) -> Stop:
    """`streak` non-finite steps in a row up to `step` (--max-bad-steps): the weights are those of the last good step."""
    return Stop("diverged", 4, f"{streak} steps in a row (up to step {step}) had a non-finite loss or gradient and were "
                               f"skipped; stopped with the weights of step {step - streak} (saved): lower --lr, or check the "
                               f"data; continue anyway with: {resume_hint(run_dir)} --max-bad-steps N")


class ShardedOutOfMemory(InfopoError):
    """Out of memory inside a pass of a sharded (--fsdp) run. The other processes wait in that pass's gathers for this
    one, so it cannot agree a stop with them at the step boundary as a data-parallel run does: it ends, with the
    out-of-memory exit code, and torchrun stops the others. The newest checkpoint is what a resume continues from."""

    exit_code = 3

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.message)
