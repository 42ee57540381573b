"""Losses against hand-computed values at the standard point P of methods.md, and their gradients.

P: log pi(y_w) = -10, log pi(y_l) = -15, log pi_ref(y_w) = -12, log pi_ref(y_l) = -14,
so delta_w = 2, delta_l = -1, u = delta_w - delta_l = 3.
"""

from __future__ import annotations

import math

import pytest
import torch

from infopo_cli.losses.formulas import dpo, infopo


def point(**overrides):
    values = {"pc": -10.0, "pr": -15.0, "rc": -12.0, "rr": -14.0, **overrides}
    return [torch.tensor([values[k]], dtype=torch.float64, requires_grad=k in ("pc", "pr")) for k in ("pc", "pr", "rc", "rr")]


def grads(fn, **kw):
    pc, pr, rc, rr = point(**{k: v for k, v in kw.items() if k in ("pc", "pr", "rc", "rr")})
    out = fn(pc, pr, rc, rr, **{k: v for k, v in kw.items() if k not in ("pc", "pr", "rc", "rr")})
    out.losses.sum().backward()
    return out, float(pc.grad), float(pr.grad)


def test_infopo_equals_paper_form_up_to_reference_constant():
    """Paper (S1): -log pi(y_w) + pi(y_l)/pi_ref(y_l) = 10.367879 at P; ours differs by -log pi_ref(y_w) = 12."""
    ours = float(infopo(*point(), beta=1.0).losses)
    assert ours - (-12.0) == pytest.approx(10.367879, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
def test_infopo_is_one_at_initialisation(beta):
    same = [torch.tensor([-7.0]), torch.tensor([-9.0]), torch.tensor([-7.0]), torch.tensor([-9.0])]
    assert float(infopo(*same, beta=beta).losses) == pytest.approx(1.0)


def test_infopo_rejected_gradient_is_bounded_and_decays():
    _, _, g_l = grads(infopo, beta=1.0)
    assert g_l == pytest.approx(math.exp(-1.0), abs=1e-6)  # beta * exp(beta * delta_l) = 0.367879
    previous = float("inf")
    for delta in [0.0, -1.0, -5.0, -10.0, -20.0]:
        _, _, g = grads(infopo, pr=-14.0 + delta, beta=1.0)
        assert 0 < g < previous
        previous = g
    assert previous < 1e-6


def test_infopo_is_separable():
    _, g1, _ = grads(infopo, pr=-30.0, rr=-3.0)
    _, g2, _ = grads(infopo, pr=-1.0, rr=-40.0)
    assert g1 == g2 == pytest.approx(-1.0)


def test_infopo_stays_finite_far_above_the_reference():
    """exp(100) overflows float32; the tangent continuation keeps value and gradient finite and non-zero."""
    pc, pr, rc, rr = (torch.tensor([v], requires_grad=True) for v in (-10.0, -14.0 + 100.0, -12.0, -14.0))
    out = infopo(pc, pr, rc, rr, beta=1.0)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pr.grad).all() and float(pr.grad) > 0


def test_dpo_value_and_chosen_gradient_at_p():
    """L = softplus(-beta*u) with u = 3; dL/dlog pi(y_w) = -beta*sigmoid(-beta*u) = -0.042556 at beta=0.1."""
    out, g_w, g_l = grads(dpo, beta=0.1)
    assert float(out.losses) == pytest.approx(math.log1p(math.exp(-0.3)), abs=1e-9)
    assert g_w == pytest.approx(-0.042556, abs=1e-6)
    assert g_l == pytest.approx(0.042556, abs=1e-6)


def test_dpo_is_ln2_at_initialisation():
    same = [torch.tensor([-7.0]), torch.tensor([-9.0]), torch.tensor([-7.0]), torch.tensor([-9.0])]
    assert float(dpo(*same).losses) == pytest.approx(math.log(2))


