"""The learning-rate schedule: linear warm-up to the peak, then cosine decay to zero at the last step.

It is plain data, saved in every checkpoint, so a resumed run continues on the same curve. When a
resume changes the run's length (`--max-steps`, `--epochs`), the warm-up is kept and the decay is
re-drawn from the rate at the checkpoint to zero at the new last step: the rate never jumps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WarmupCosine:
    """The learning rate at every step: linear warm-up to `peak`, then cosine to zero at `total` (re-drawn from
    `restart` when a resume changed the length)."""

    peak: float
    warmup: int                     # steps of linear warm-up
    total: int                      # the rate reaches zero after this many steps
    restart: int = 0                # a length change at this step re-drew the decay...
    restart_factor: float | None = None  # ...starting from this fraction of the peak

    def factor(self, done: int) -> float:
        """Fraction of the peak rate for the optimizer step that follows `done` completed steps."""
        if self.restart_factor is not None and done >= self.restart:
            return self.restart_factor * _cosine((done - self.restart) / max(1, self.total - self.restart))
        if done < self.warmup:
            return (done + 1) / (self.warmup + 1)
        return _cosine((done - self.warmup) / max(1, self.total - self.warmup))

    def lr(self, done: int) -> float:
        """The learning rate of the step after `done` completed steps."""
        return self.peak * self.factor(done)

    def resized(self, done: int, total: int) -> WarmupCosine:
        """The same schedule for a run that now ends after `total` steps, continued after `done` steps."""
        if total == self.total:
            return self
        if done < self.warmup < total and self.restart_factor is None:  # still warming up: only the decay moves
            return dataclasses.replace(self, total=total)
        return dataclasses.replace(self, total=total, restart=done, restart_factor=self.factor(done))

    def state_dict(self) -> dict[str, Any]:
        """The schedule as plain values, for a checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> WarmupCosine:
        """The schedule a checkpoint saved."""
        return cls(**state)


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
