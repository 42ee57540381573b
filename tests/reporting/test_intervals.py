"""Intervals and the paired test of the answer benchmark, against values worked out by hand."""

from __future__ import annotations

import pytest

from infopo_cli.reporting.intervals import binomial_two_sided, mcnemar, mean_interval, sign_test, wilson


def test_wilson_against_hand_values():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)   # z^2 / (n + z^2): never below 0
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(7, 150) == pytest.approx((0.0228, 0.0932), abs=1e-4)  # the base model's 4.7% on 150 problems
    assert wilson(0, 0) == (0.0, 1.0)


def test_the_interval_of_a_mean_over_seeds():
    mean, low, high = mean_interval([17, 20, 14])  # sd 3, t(0.975, 2) = 4.3027: half-width 4.3027 * 3 / sqrt(3)
    assert mean == 17 and low == pytest.approx(17 - 7.4525, abs=1e-3) and high == pytest.approx(17 + 7.4525, abs=1e-3)
    assert mean_interval([0.2]) == (0.2, 0.2, 0.2)
    with pytest.raises(ValueError):
        mean_interval([])


def test_mcnemar_counts_the_discordant_problems_and_tests_them_exactly():
    first = [True] * 1 + [False] * 9 + [True] * 30 + [False] * 60
    second = [False] * 1 + [True] * 9 + [True] * 30 + [False] * 60
    paired = mcnemar(first, second)
    assert (paired.only_first, paired.only_second, paired.both, paired.neither) == (1, 9, 30, 60)
    assert paired.p_value == pytest.approx(2 * (1 + 10) / 1024) and paired.real  # 0.0215
    assert binomial_two_sided(5, 10) == 1.0 and binomial_two_sided(0, 0) == 1.0
    assert binomial_two_sided(0, 6) == pytest.approx(2 / 64)       # 6 to 0: real at 5%
    assert binomial_two_sided(0, 5) == pytest.approx(2 / 32)       # 5 to 0: not yet
    assert not mcnemar([True] * 5 + [False] * 5, [False] * 5 + [True] * 5).real
    with pytest.raises(ValueError, match="same problems"):
        mcnemar([True], [True, False])


def test_the_sign_test_over_seeds_counts_each_problem_once():
    # three seeds that agree problem by problem: 6 problems only the first gets right, 1 only the second, 3 ties
    seed = ([True] * 6 + [False] + [True, False, False], [False] * 6 + [True] + [True, False, False])
    paired = sign_test([seed[0]] * 3, [seed[1]] * 3)
    assert (paired.only_first, paired.only_second, paired.both, paired.neither) == (6, 1, 1, 2)
    assert paired.p_value == pytest.approx(2 * 8 / 2 ** 7)   # as one seed's McNemar: 0.125, not 3x the evidence
    assert paired.p_value == mcnemar(*seed).p_value and not paired.real
    # a problem the first gets on 2 of 3 seeds and the second on 1 counts for the first
    assert sign_test([[True], [True], [False]], [[True], [False], [False]]).only_first == 1
    with pytest.raises(ValueError, match="same problems"):
        sign_test([[True, False]], [[True]])
