"""How sure a measured accuracy is: intervals and a paired test, for answers scored right or wrong.

- `wilson`: the 95% interval of one run's accuracy, k right of n (Wilson's score interval, which stays inside [0, 1]
  and is sound at the small accuracies of a 135M model, where the normal approximation is not).
- `mean_interval`: the mean over seeds and the 95% interval of that mean (Student's t with n-1 degrees of freedom).
- `mcnemar`: two runs on the same problems: the problems only the first gets right (b) and only the second (c), and
  the exact two-sided p-value of McNemar's test (a binomial test of b against b + c at one half). A difference is
  called real when p < 0.05.

Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the normal distribution's 97.5% quantile
# Student's t 97.5% quantiles for 1..30 degrees of freedom; beyond that the normal quantile (at most 4% narrower)
T95 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
       2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
       2.0518, 2.0484, 2.0452, 2.0423)


def wilson(right: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of `right` out of `n` (0..1); (0, 1) for no problems."""
    if n <= 0:
        return 0.0, 1.0
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` (one per seed) and the 95% t interval of the mean; a single value has
    no spread to measure, so its interval is the value itself."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (T95[n - 2] if n - 1 <= len(T95) else Z95) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Paired:
    """Two runs scored on the same problems."""

    only_first: int    # problems the first run gets right and the second wrong (b)
    only_second: int   # and the other way round (c)
    both: int
    neither: int
    p_value: float     # exact two-sided McNemar

    @property
    def real(self) -> bool:
        """Whether the difference is unlikely to be chance (p < 0.05)."""
        return self.p_value < 0.05


def verdict(real: bool) -> str:
    """How a paired difference reads in a table or a sentence."""
    return "a real difference" if real else "within chance"


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> Paired:
    """McNemar's exact test on per-problem right/wrong of two runs over the same problems, in the same order."""
    if len(first) != len(second):
        raise ValueError(f"paired runs need the same problems: {len(first)} vs {len(second)}")
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    both = sum(1 for x, y in zip(first, second) if x and y)
    return Paired(b, c, both, len(first) - b - c - both, binomial_two_sided(min(b, c), b + c))


def sign_test(first: Sequence[Sequence[bool]], second: Sequence[Sequence[bool]]) -> Paired:
    """Two settings over several seeds on the same problems: `first[s][i]` is whether seed s of the first got problem i
    right. Each problem counts once, by how many seeds each gets it right (more for the first, more for the second,
    as many), and the exact two-sided sign test is over the problems that differ. Pooling McNemar over seeds instead
    would count a problem once per seed, as if seeds of one problem were independent problems, and overstate.
    `both`/`neither`: problems every seed of both settings gets right / wrong."""
    if len(first) != len(second) or any(len(a) != len(first[0]) for a in (*first, *second)):
        raise ValueError("a sign test over seeds needs each setting's seeds on the same problems")
    by_problem = [(sum(a[i] for a in first), sum(b[i] for b in second)) for i in range(len(first[0]) if first else 0)]
    more = sum(1 for x, y in by_problem if x > y)
    fewer = sum(1 for x, y in by_problem if y > x)
    both = sum(1 for x, y in by_problem if x == y == len(first))
    neither = sum(1 for x, y in by_problem if x == y == 0)
    return Paired(more, fewer, both, neither, binomial_two_sided(min(more, fewer), more + fewer))


def binomial_two_sided(k: int, n: int) -> float:
    """P(X <= k or X >= n - k) for X ~ Binomial(n, 1/2), k <= n/2: the exact two-sided p-value (1 when n = 0)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
