"""Ordinary stops (Ctrl-C, `kill`, `docker stop`, SLURM preemption, `timeout`) end a run at a step boundary.

The first SIGINT or SIGTERM only sets a flag; the loop reads it between optimizer steps, saves a
checkpoint and exits 130 (SIGINT) or 143 (SIGTERM), as shells report a process those signals ended.
A second signal stops at once: the checkpoint being written, if any, is abandoned and the last
complete one stays as it was. Under torchrun a terminal's Ctrl-C reaches each process twice within
milliseconds (from the terminal and forwarded by the launcher): with `same_within` set, a second signal
that close to the first is the same request.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


def resume_hint(run_dir: object) -> str:
    return f"infopo train --resume {run_dir}"


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
