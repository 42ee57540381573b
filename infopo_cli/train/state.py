"""The counters a run carries from step to step, and what a checkpoint's training_state.pt holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from infopo_cli.train.schedule import WarmupCosine


@dataclass
class TrainState:
    """Where a run stands at a step boundary: with the optimizer, schedule, scaler and RNG, all a resume needs."""

    step: int = 0                # optimizer steps taken (skipped ones count)
    pairs_seen: int = 0          # the data position in pairs, which a different split of the global batch keeps
    skipped_steps: int = 0       # steps skipped for a non-finite loss or gradient
    bad_streak: int = 0          # of those, how many in a row up to `step`
    pending_eval: bool = False   # the evaluation due at `step` did not finish (a stop request or a lack of memory)

    def advance(self, pairs: int, finite: bool) -> None:
        """One step over a global batch of `pairs` pairs, taken (`finite`) or skipped."""
        self.step += 1
        self.pairs_seen += pairs
        self.skipped_steps += not finite
        self.bad_streak = 0 if finite else self.bad_streak + 1

    def state_dict(self, *, rng: dict[str, Any], train_pairs: int, global_batch: int, optimizer: torch.optim.Optimizer,
                   schedule: WarmupCosine, scaler: torch.amp.GradScaler, init_sha256: str | None,
                   data_sha256: str | None = None) -> dict[str, Any]:
        """training_state.pt: every key of checkpoint.STATE_KEYS, plus the global batch, the init adapter's hash and the
        training pairs' hash that a resume checks (train/resume.py). The key order is that of every checkpoint written
        so far."""
        return {"step": self.step, "pairs_seen": self.pairs_seen, "train_pairs": train_pairs, "global_batch": global_batch,
                "rng": rng, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "skipped_steps": self.skipped_steps, "bad_streak": self.bad_streak, "pending_eval": self.pending_eval,
                **({"init_adapter_sha256": init_sha256} if init_sha256 else {}),
                **({"data_sha256": data_sha256} if data_sha256 else {})}

    @classmethod
    def from_state(cls, saved: Mapping[str, Any]) -> TrainState:
        """The counters of a loaded training_state.pt (checkpoint.load_checkpoint has checked its keys)."""
        return cls(step=saved["step"], pairs_seen=saved["pairs_seen"], skipped_steps=saved["skipped_steps"],
                   bad_streak=saved["bad_streak"], pending_eval=saved["pending_eval"])
