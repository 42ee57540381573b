"""The likelihood-displacement guard: DPO's known failure, which InfoPO's objective avoids.

DPO only rewards the gap between the answers, so it can widen the margin by pushing the rejected answer down
faster than the chosen one while the chosen answer falls too: the model grows less likely to say what it was
taught to prefer. The guard looks for that pattern in a run's metrics records:

- with held-out evaluations: `eval/logps/chosen` has fallen more than HELD_OUT_DROP nats below its step-0 value
  while `eval/rewards/margins` is above its step-0 value;
- without them: the smoothed training `rewards/chosen` (beta * log(pi / pi_ref) of the chosen answers) has fallen
  more than TRAIN_REWARD_DROP below its first-step value (0 with a reference) while the smoothed
  `rewards/margins` is above its first-step value.

Thresholds, chosen on the default preset (40 steps, --eval-every 10; benchmarks/likelihood_dynamics.py draws the
curves): DPO's held-out chosen log-prob falls about 3 nats by its first evaluation while InfoPO's stays within one
nat of its start, so HELD_OUT_DROP = 1 nat fires on DPO at once and leaves InfoPO alone (a fixed held-out set has no
sampling noise, and one nat less on a summed log-prob makes the chosen answer e (~2.7) times less likely). DPO's
smoothed training rewards/chosen passes -0.25 early while InfoPO's stays above it, hence TRAIN_REWARD_DROP = 0.25.
Training rewards are scaled by beta, so a much larger beta makes the training check more sensitive; the held-out
check is in nats, whatever beta is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

HELD_OUT_DROP = 1.0      # nats of the held-out chosen log-prob (summed over the answer) below step 0
TRAIN_REWARD_DROP = 0.25  # of the smoothed training rewards/chosen below its first step
SMOOTHING = 0.8          # EMA weight of the training curves (their batches differ: the raw values are noisy)
MIN_TRAIN_STEPS = 5      # the training check waits for this many steps, so the EMA has something to average


@dataclass(frozen=True)
class Displacement:
    """A likelihood displacement found: where, from which figures, and the chosen log-prob and margin then and at the
    start."""

    step: int
    source: str            # "held-out" (evaluations) or "training" (smoothed training rewards)
    chosen_start: float
    chosen_now: float
    margin_start: float
    margin_now: float
    loss: str | None = None

    @property
    def message(self) -> str:
        what = ("held-out chosen log-prob (eval/logps/chosen)" if self.source == "held-out"
                else "smoothed training rewards/chosen")
        tries = ", ".join(t for t in ("--loss infopo" if self.loss != "infopo" else "", "--sft-weight 0.1",
                                      "a lower --lr") if t)
        return (f"likelihood displacement: the {what} fell from {self.chosen_start:.2f} to {self.chosen_now:.2f} "
                f"({self.chosen_now - self.chosen_start:+.2f}) by step {self.step} while the margin grew from "
                f"{self.margin_start:.2f} to {self.margin_now:.2f}: the model prefers the chosen answers more but "
                f"is less likely to give them; try {tries}")


class Guard:
    """Fed each metrics record as it is written; `see` returns the warning once, the first time the pattern shows.

    Also a metrics sink (`log(record)`, see train/metrics.py) that hands that warning to `warn`.
    """

    def __init__(self, loss: str | None = None, held_out_drop: float = HELD_OUT_DROP,
                 train_drop: float = TRAIN_REWARD_DROP, records: Iterable[dict[str, Any]] = (),
                 warn: Callable[[str], None] | None = None) -> None:
        self.loss, self.held_out_drop, self.train_drop, self.warn = loss, held_out_drop, train_drop, warn
        self.found: Displacement | None = None
        self._eval_start: dict[str, Any] | None = None
        self._train_start: tuple[float, float] | None = None
        self._ema = _Ema(SMOOTHING), _Ema(SMOOTHING)
        self._train_steps = 0
        for record in records:  # a resumed run's earlier part: counted, and not announced again
            self.see(record)

    @property
    def message(self) -> str | None:
        return self.found.message if self.found else None

    def log(self, record: dict[str, Any]) -> None:
        """Look at one metrics record and warn once when it shows displacement."""
        if (message := self.see(record)) and self.warn:
            self.warn(message)

    def see(self, record: dict[str, Any]) -> str | None:
        """The warning for the first record that shows displacement; None before, and after it (it is said once)."""
        if self.found is not None:
            return None
        self.found = self._check(record)
        return self.found.message if self.found else None

    def _check(self, record: dict[str, Any]) -> Displacement | None:
        if record.get("kind") == "eval":
            chosen, margin = record.get("eval/logps/chosen"), record.get("eval/rewards/margins")
            if chosen is None or margin is None:  # non-finite values are logged as null
                return None
            if record.get("step") == 0:
                self._eval_start = record
                return None
            if self._eval_start is None:
                return None
            start_chosen, start_margin = self._eval_start["eval/logps/chosen"], self._eval_start["eval/rewards/margins"]
            if start_chosen - chosen > self.held_out_drop and margin > start_margin:
                return Displacement(record["step"], "held-out", start_chosen, chosen, start_margin, margin, self.loss)
            return None
        if record.get("kind") != "train" or self._eval_start is not None:  # held-out figures, where there are any, decide
            return None
        chosen, margin = record.get("rewards/chosen"), record.get("rewards/margins")
        if chosen is None or margin is None:
            return None
        if self._train_start is None:
            self._train_start = (chosen, margin)
        smooth_chosen, smooth_margin = self._ema[0].add(chosen), self._ema[1].add(margin)
        self._train_steps += 1
        if self._train_steps < MIN_TRAIN_STEPS:
            return None
        start_chosen, start_margin = self._train_start
        if start_chosen - smooth_chosen > self.train_drop and smooth_margin > start_margin:
            return Displacement(record["step"], "training", start_chosen, smooth_chosen, start_margin, smooth_margin,
                                self.loss)
        return None


def detect(records: list[dict[str, Any]], loss: str | None = None, held_out_drop: float = HELD_OUT_DROP,
           train_drop: float = TRAIN_REWARD_DROP) -> Displacement | None:
    """The first sign of likelihood displacement in a run's records, or None."""
    guard = Guard(loss, held_out_drop, train_drop)
    for record in records:
        guard.see(record)
    return guard.found


class _Ema:
    """Exponential moving average, bias-corrected as TensorBoard's smoothing is (the first value is not pulled to 0)."""

    def __init__(self, weight: float) -> None:
        self.weight, self.value, self.n = weight, 0.0, 0

    def add(self, x: float) -> float:
        self.n += 1
        self.value = self.weight * self.value + (1 - self.weight) * x
        return self.value / (1 - self.weight ** self.n)


def smooth(values: list[float | None], weight: float = SMOOTHING) -> list[float | None]:
    """A curve's EMA (gaps, the non-finite values logged as null, stay gaps)."""
    ema, out = _Ema(weight), []
    for x in values:
        out.append(None if x is None else ema.add(x))
    return out
