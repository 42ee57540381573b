"""Held-out evaluation: the training metrics on pairs the model never trains on."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from infopo_cli.data.batching import PreferenceBatch
from infopo_cli.train.logps import pair_logps
from infopo_cli.losses.registry import LossSpec, compute
from infopo_cli.train.checkpoint import capture_rng, restore_rng
from infopo_cli.train.metrics import PairMetrics


class Evaluator:
    """Evaluates the policy on fixed batches; the reference log-probs are computed once and cached."""

    def __init__(self, batches: list[PreferenceBatch], spec: LossSpec, params: dict, device: str,
                 counted: int | None = None) -> None:
        """`counted`: only the first so many batches count (the others keep a rank of a sharded run in step)."""
        self.batches, self.spec, self.params, self.device = batches, spec, params, device
        self.counted = len(batches) if counted is None else counted
        self.reference: list[Tensor] | None = None

    @torch.no_grad()
    def __call__(self, model: nn.Module, policy_is_reference: bool = False,
                 should_stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
        """`policy_is_reference`: a fresh LoRA adds exactly zero, so one pass serves as both.

        Returns None when `should_stop()` turns true between batches (a stop was requested: the run
        saves its checkpoint now rather than after a long evaluation). The RNG states are left as they
        were, so an evaluation never changes what the training steps after it draw.
        """
        totals = self.totals(model, policy_is_reference, should_stop)
        return totals.means(prefix="eval/") if totals is not None else None

    @torch.no_grad()  # the recipe calls this directly: without it every held-out batch's graph stays alive
    def totals(self, model: nn.Module, policy_is_reference: bool = False,
               should_stop: Callable[[], bool] = lambda: False) -> PairMetrics | None:
        """The sums behind `__call__`'s means (a multi-process run adds up each rank's share of the batches)."""
        was_training, rng = model.training, capture_rng()
        model.eval()
        try:
            return self._evaluate(model, policy_is_reference, should_stop)
        finally:
            restore_rng(rng)
            model.train(was_training)

    def _evaluate(self, model: nn.Module, policy_is_reference: bool, should_stop: Callable[[], bool]) -> PairMetrics | None:
        metrics, reference = PairMetrics(), []
        for i, batch in enumerate(self.batches):
            if should_stop():
                return None
            batch = batch.to(self.device)
            cached = self.reference[i] if self.reference is not None else None
            logps = pair_logps(model, batch, self.spec.needs(self.params), reference=cached,
                               policy_is_reference=policy_is_reference)
            if logps.ref_chosen is not None:
                reference.append(torch.cat([logps.ref_chosen, logps.ref_rejected]))
            if i < self.counted:
                metrics.add(compute(self.spec, logps, self.params), logps)
        self.reference = reference or None
        return metrics
