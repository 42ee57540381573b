"""The numbers a run reports, under TRL's names, accumulated exactly over micro-batches."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from infopo_cli.losses.types import LossOutput, PairLogps


class PairMetrics:
    """Sums per-pair quantities over micro-batches; `means()` divides by the number of pairs."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.pairs = 0

    def add(self, out: LossOutput, logps: PairLogps) -> None:
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

    def means(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v / max(self.pairs, 1) for k, v in self.sums.items()}


class MetricsLog:
    """`metrics.jsonl`: one JSON object per step or evaluation, flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
