"""The numbers a run reports, under TRL's names, accumulated exactly over micro-batches."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from infopo_cli import files
from infopo_cli.errors import OutputError
from infopo_cli.losses.types import LossOutput, PairLogps
from infopo_cli.reporting.runs import read_records


class PairMetrics:
    """Sums per-pair quantities over micro-batches; `means()` divides by the number of pairs.

    Unpaired rows (TRL's KTO names): rewards/ and logps/chosen are means over the desirable rows, /rejected over the
    undesirable ones, margins their difference, rewards/accuracies the share of rows whose reward has the label's
    sign, and kl KTO's reference point; `pairs` counts rows.
    """

    KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "logps/accuracies", "count/chosen", "count/rejected", "kl")
    UNPAIRED = ("count/chosen", "count/rejected")  # present only for unpaired rows: the per-label denominators

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.pairs = 0

    def add(self, out: LossOutput, logps: PairLogps) -> None:
        """Add one micro-batch's loss, rewards and log-probs to the sums."""
        if logps.desirable is not None:
            return self._add_rows(out, logps)
        margins = out.chosen_rewards - out.rejected_rewards
        self.sums["loss"] += float(out.losses.detach().sum())
        self.sums["rewards/chosen"] += float(out.chosen_rewards.sum())
        self.sums["rewards/rejected"] += float(out.rejected_rewards.sum())
        self.sums["rewards/margins"] += float(margins.sum())
        self.sums["rewards/accuracies"] += float((margins > 0).float().sum())
        self.sums["logps/chosen"] += float(logps.policy_chosen.detach().sum())
        self.sums["logps/rejected"] += float(logps.policy_rejected.detach().sum())
        # The policy's own preference: does it give the chosen response the higher likelihood?
        self.sums["logps/accuracies"] += float((logps.policy_chosen > logps.policy_rejected).float().sum())
        self.pairs += int(out.losses.shape[0])

    def _add_rows(self, out: LossOutput, logps: PairLogps) -> None:
        good = logps.desirable
        rewards, policy = out.chosen_rewards, logps.policy_chosen.detach()
        self.sums["loss"] += float(out.losses.detach().sum())
        for side, rows in (("chosen", good), ("rejected", ~good)):
            self.sums[f"rewards/{side}"] += float(rewards[rows].sum())
            self.sums[f"logps/{side}"] += float(policy[rows].sum())
            self.sums[f"count/{side}"] += float(rows.sum())
        self.sums["rewards/accuracies"] += float(torch.where(good, rewards > 0, rewards < 0).float().sum())
        if out.kl is not None:
            self.sums["kl"] += float(out.kl) * len(good)
        self.pairs += len(good)

    def means(self, prefix: str = "") -> dict[str, float]:
        """Every sum divided by the number of pairs (of rows per label, for unpaired rows' per-label keys), keys
        prefixed with `prefix` ("eval/")."""
        if not self.sums.get("count/chosen", 0) + self.sums.get("count/rejected", 0):
            return {f"{prefix}{k}": v / max(self.pairs, 1) for k, v in self.sums.items() if k not in self.UNPAIRED}
        means = {}
        for key, value in self.sums.items():
            side = key.rpartition("/")[2]
            if key in self.UNPAIRED or key == "rewards/margins":
                continue
            count = self.sums[f"count/{side}"] if side in ("chosen", "rejected") else self.pairs
            means[f"{prefix}{key}"] = value / count if count else math.nan
        means[f"{prefix}rewards/margins"] = means[f"{prefix}rewards/chosen"] - means[f"{prefix}rewards/rejected"]
        return means


class Sink(Protocol):
    """Where metrics records go besides metrics.jsonl: an experiment tracker."""

    def log(self, record: dict) -> None: ...


class MetricsLog:
    """`metrics.jsonl`: one JSON object per step or evaluation, appended as it happens.

    A resumed run first cuts the file back to the checkpoint's step (dropping a line torn by a kill),
    so the log covers the whole run once. Non-finite values are written as null (valid JSON).
    Each record written is also passed to every sink's `log(record)` (the --report-to trackers).
    `writes=False` (ranks other than 0 of a multi-process run): the same records in memory, the file untouched.
    """

    def __init__(self, path: Path, resume_step: int | None = None, sinks: Sequence[Sink] = (), writes: bool = True) -> None:
        self.path, self.writes = path, writes
        self.sinks = list(sinks)
        self.records: list[dict] = []
        if resume_step is not None and path.is_file():
            self.records = [r for r in read_records(path) if r.get("step", 0) <= resume_step]
            if writes:
                files.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        """Append `record` (non-finite values as null) and pass it to every sink."""
        record = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        self.records.append(record)
        if not self.writes:
            return
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from None
        for sink in self.sinks:
            sink.log(record)

    def of_kind(self, kind: str) -> list[dict]:
        """The records written so far of one kind ("train", "eval", ...)."""
        return [r for r in self.records if r.get("kind") == kind]
