"""Losses on unpaired feedback rows: InfoPO's separable NWJ terms and KTO, against hand computations and autograd,
and through the registry (which data each loss takes, the weights InfoPO sets from the data's mix)."""

from __future__ import annotations

import math

import pytest
import torch

from infopo_cli.errors import ConfigError
from infopo_cli.losses import registry
from infopo_cli.losses.formulas import infopo, infopo_unpaired, kto
from infopo_cli.losses.types import PairLogps
from infopo_cli.train.metrics import PairMetrics


def _t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def test_infopo_unpaired_terms_and_gradients():
    """desirable: -w_D beta delta (gradient -w_D beta); undesirable: w_U exp(beta delta) (gradient w_U beta exp)."""
    policy, ref = _t(-10.0, -15.0, grad=True), _t(-12.0, -14.0)
    good = torch.tensor([True, False])
    out = infopo_unpaired(policy, ref, good, beta=0.5, desirable_weight=2.0, undesirable_weight=3.0)
    assert out.losses.tolist() == pytest.approx([-2.0 * 0.5 * 2.0, 3.0 * math.exp(0.5 * -1.0)])
    out.losses.sum().backward()
    assert policy.grad.tolist() == pytest.approx([-2.0 * 0.5, 3.0 * 0.5 * math.exp(-0.5)])
    assert out.chosen_rewards.tolist() == pytest.approx([1.0, -0.5])  # beta * delta of each row


def test_infopo_unpaired_at_initialisation():
    same = _t(-7.0, -9.0, -3.0)
    out = infopo_unpaired(same, same.clone(), torch.tensor([True, False, False]), beta=0.25, desirable_weight=1.5,
                          undesirable_weight=0.75)
    assert out.losses.tolist() == pytest.approx([0.0, 0.75, 0.75])


def test_unpaired_split_of_pairs_gives_the_pair_loss_and_gradient():
    """Balanced split, weights N/n = 2, both rows of each pair in one batch: the mean over rows is the pair mean."""
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, dtype=torch.float64) * 3 - 20 for _ in range(4))
    pc_pair, pr_pair = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    infopo(pc_pair, pr_pair, rc, rr, beta=0.3).losses.mean().backward()
    rows = torch.cat([pc, pr]).requires_grad_()
    good = torch.tensor([True] * 5 + [False] * 5)
    unpaired = infopo_unpaired(rows, torch.cat([rc, rr]), good, beta=0.3, desirable_weight=2.0, undesirable_weight=2.0)
    pair_value = float(infopo(pc, pr, rc, rr, beta=0.3).losses.mean())
    assert float(unpaired.losses.mean()) == pytest.approx(pair_value)
    unpaired.losses.mean().backward()
    assert rows.grad[:5].tolist() == pytest.approx(pc_pair.grad.tolist())
    assert rows.grad[5:].tolist() == pytest.approx(pr_pair.grad.tolist())


def test_kto_reference_point_by_hand():
    """z0 = max(0, mean of the mismatched log-ratios), detached; the loss is lambda (1 - sigmoid(beta (r - z0)))."""
    policy, ref = _t(-10.0, -15.0, grad=True), _t(-12.0, -14.0)
    mismatched_policy, mismatched_ref = _t(-30.0, -41.0, grad=True), _t(-31.0, -39.0)
    good = torch.tensor([True, False])
    out = kto(policy, ref, good, mismatched_policy, mismatched_ref, beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    z0 = max(0.0, ((-30 + 31) + (-41 + 39)) / 2)  # mean(1, -2) = -0.5 -> 0
    assert float(out.kl) == z0 == 0.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out.losses.tolist() == pytest.approx([1 - sig(0.1 * 2.0), 1.5 * (1 - sig(0.1 * 1.0))])
    # a positive estimate shifts both terms; no gradient reaches the mismatched log-probs
    out = kto(policy, ref, good, _t(-28.0, -38.0, grad=True), _t(-31.0, -39.0), beta=0.1)
    z0 = ((-28 + 31) + (-38 + 39)) / 2  # 2
    assert float(out.kl) == pytest.approx(z0)
    assert out.losses.tolist() == pytest.approx([1 - sig(0.1 * (2.0 - z0)), 1 - sig(0.1 * (z0 + 1.0))])
    out.losses.sum().backward()
    s_good, s_bad = sig(0.1 * (2.0 - z0)), sig(0.1 * (z0 + 1.0))
    assert policy.grad.tolist() == pytest.approx([-0.1 * s_good * (1 - s_good), 0.1 * s_bad * (1 - s_bad)])


def test_kto_at_initialisation_is_half_lambda_and_directions():
    same = _t(-5.0, -6.0)
    out = kto(same, same.clone(), torch.tensor([True, False]), same.clone(), same.clone(), beta=0.1,
              desirable_weight=1.0, undesirable_weight=1.33)
    assert out.losses.tolist() == pytest.approx([0.5, 0.665])
    policy = _t(-5.0, -6.0, grad=True)
    kto(policy, same.clone(), torch.tensor([True, False]), same.clone(), same.clone()).losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # desirable pushed up, undesirable pushed down


def _rows(good: list[bool]) -> PairLogps:
    n = len(good)
    return PairLogps(_t(*[-10.0 - i for i in range(n)]), torch.zeros(n, dtype=torch.float64), torch.full((n,), 4),
                     torch.zeros(n, dtype=torch.long), _t(*[-11.0 - i for i in range(n)]),
                     torch.zeros(n, dtype=torch.float64), desirable=torch.tensor(good))


def test_registry_data_kinds_and_weights():
    infopo_spec, params = registry.resolve("infopo", {})
    assert registry.for_data(infopo_spec, params, "unpaired", 30, 10) == {**params, "desirable_weight": 40 / 30,
                                                                          "undesirable_weight": 4.0}
    assert registry.for_data(infopo_spec, {**params, "desirable_weight": 1.0}, "unpaired", 30, 10)["desirable_weight"] == 1.0
    with pytest.raises(ConfigError, match="unpaired rows only"):
        registry.for_data(infopo_spec, {**params, "undesirable_weight": 2.0}, "pairs")
    with pytest.raises(ConfigError, match="cannot train on unpaired"):
        registry.for_data(registry.LOSSES["dpo"], registry.resolve("dpo", {})[1], "unpaired", 3, 3)
    kto_spec, kto_params = registry.resolve("kto", {})
    with pytest.raises(ConfigError, match="--unpair"):
        registry.for_data(kto_spec, kto_params, "pairs")
    with pytest.raises(ConfigError, match="no undesirable rows"):
        registry.for_data(kto_spec, kto_params, "unpaired", 5, 0)
    with pytest.raises(ConfigError, match="does not apply"):
        registry.resolve("dpo", {"desirable_weight": 1.0})
    assert kto_spec.needs(kto_params).mismatched and kto_spec.needs(kto_params).reference


def test_sft_weight_on_unpaired_rows_reads_desirable_completions_only():
    spec, params = registry.resolve("infopo", {"sft_weight": 1.0})
    params = registry.for_data(spec, params, "unpaired", 1, 1)
    logps = _rows([True, False])
    plain = registry.compute(spec, logps, {**params, "sft_weight": 0.0})
    with_sft = registry.compute(spec, logps, params)
    assert (with_sft.losses - plain.losses).tolist() == pytest.approx([2 * 10.0 / 4, 0.0])  # desirable_weight 2


def test_metrics_split_unpaired_rows_by_label():
    spec, params = registry.resolve("kto", {})
    logps = _rows([True, False, True])
    logps.policy_rejected, logps.ref_rejected = _t(-20.0, -20.0, -20.0), _t(-21.0, -21.0, -21.0)
    out = registry.compute(spec, logps, params)
    metrics = PairMetrics()
    metrics.add(out, logps)
    means = metrics.means("eval/")
    assert means["eval/logps/chosen"] == pytest.approx((-10.0 - 12.0) / 2)
    assert means["eval/logps/rejected"] == pytest.approx(-11.0)
    assert means["eval/rewards/chosen"] == pytest.approx(0.1)  # every row's delta is 1
    assert means["eval/rewards/margins"] == pytest.approx(0.0)
    assert means["eval/kl"] == pytest.approx(1.0)
    assert means["eval/rewards/accuracies"] == pytest.approx(2 / 3)  # the undesirable row's reward is above 0
    assert "eval/logps/accuracies" not in means and "eval/count/chosen" not in means


@pytest.mark.parametrize("delta", [-1e4, -80.0, 0.0, 80.0, 1e4])
def test_unpaired_losses_stay_finite_on_extreme_inputs(delta):
    policy = torch.tensor([delta, delta], requires_grad=True)
    ref, good = torch.zeros(2), torch.tensor([True, False])
    for out in (infopo_unpaired(policy, ref, good, beta=1.0), kto(policy, ref, good, policy * 2, ref, beta=0.1)):
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()
        policy.grad = None
