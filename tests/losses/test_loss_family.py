"""The whole loss family: hand-computed values at P, MI priors that reproduce named losses, gradients.

P (methods.md): log pi(y_w) = -10, log pi(y_l) = -15, log pi_ref(y_w) = -12, log pi_ref(y_l) = -14,
n_w = 5, n_l = 10; so delta_w = 2, delta_l = -1, u = 3, lbar_w = -2, lbar_l = -1.5.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from infopo_cli.losses import formulas as L
from infopo_cli.errors import ConfigError
from infopo_cli.losses.types import PairLogps
from infopo_cli.losses.registry import LOSSES, PRIORS, LossSpec, compute, resolve

t = lambda v: torch.tensor([v], dtype=torch.float64, requires_grad=True)  # noqa: E731

P = {"policy_chosen": -10.0, "policy_rejected": -15.0, "ref_chosen": -12.0, "ref_rejected": -14.0,
     "kl_chosen": 0.5, "kl_rejected": 1.5, "marginal_chosen_avg": -2.5, "marginal_rejected_avg": -1.6}
# every pair loss (unpaired-only ones: test_unpaired_losses.py), and the MI loss once per prior
EVERY_LOSS = [(name, prior) for name in LOSSES if "pairs" in LOSSES[name].data for prior in (PRIORS if name == "mi" else [None])]


def pair(values: dict[str, float], counts: tuple[int, int] = (5, 10), dtype: torch.dtype = torch.float64) -> PairLogps:
    """One pair whose per-pair quantities are all leaves that require grad."""
    return PairLogps(chosen_counts=torch.tensor([counts[0]]), rejected_counts=torch.tensor([counts[1]]),
                     **{k: torch.tensor([v], dtype=dtype, requires_grad=True) for k, v in values.items()})


def at_p(**kw: float) -> PairLogps:
    return pair({**P, **kw})


def loss_and_params(name: str, prior: str | None, **overrides: float) -> tuple[LossSpec, dict]:
    return resolve(name, {"prior": prior, **overrides} if prior else overrides)


@pytest.mark.parametrize("name, params, expected", [
    ("infopo", {}, -1.632121),            # -beta*delta_w + exp(beta*delta_l) = -2 + e^-1
    ("infopo", {"beta": 0.1}, 0.704837),  # -0.2 + e^-0.1
    ("dpo", {}, 0.554355),
    ("cdpo", {"label_smoothing": 0.1}, 0.584355),
    ("robust", {"label_smoothing": 0.1}, 0.516855),
    ("ipo", {}, 4.0),
    ("ipo", {"length_normalize": True}, 20.25),
    ("hinge", {}, 0.7),
    ("simpo", {"beta": 2.0, "gamma": 1.0}, 2.126928),
    ("orpo", {"beta": 0.1}, 2.104206),
    ("mi", {"prior": "reference"}, 0.554355),
    ("mi", {"prior": "rdpo", "rdpo_alpha": 0.1}, 0.798139),
    ("mi", {"prior": "tdpo1"}, 0.598139),
    ("mi", {"prior": "tdpo2", "tdpo_alpha": 0.5}, 0.575939),
    ("mi", {"prior": "simpo", "beta": 2.0, "gamma": 1.0}, 2.126928),
])
def test_value_at_p(name, params, expected):
    spec, q = resolve(name, params)
    assert float(compute(spec, at_p(), q).losses) == pytest.approx(expected, abs=1e-6)


def test_rmipo_value_and_gradients():
    """beta=2, lbar_w=-2, lbar_l=-1.5, mbar_w=-2.5, mbar_l=-1.6: dPMI=0.4, gamma=0.3+1.3e^-0.4, L=3.377559."""
    lw, ll, mw, ml = t(-2.0), t(-1.5), t(-2.5), t(-1.6)
    out = L.rmipo(lw, ll, mw, ml, beta=2.0)
    assert float(out.losses) == pytest.approx(3.377559, abs=1e-6)
    out.losses.sum().backward()
    assert float(lw.grad) == pytest.approx(-1.931739, abs=1e-6) and float(ll.grad) == pytest.approx(1.931739, abs=1e-6)
    assert mw.grad is None or float(mw.grad) == 0.0  # no gradient through the mutual information
    # the registry passes summed log-probs / n and the marginal averages: the same number at P
    spec, q = resolve("rmipo", {})
    assert float(compute(spec, at_p(), q).losses) == pytest.approx(3.377559, abs=1e-6)


def test_rmipo_limits_are_simpo_margins():
    lw, ll = torch.tensor([-2.0]), torch.tensor([-1.5])
    simpo = lambda ratio: L.simpo(lw, ll, torch.ones(1), torch.ones(1), beta=2.0, gamma=2.0 * ratio).losses  # noqa: E731
    contradicting = L.rmipo(lw, ll, torch.tensor([-1.0]), torch.tensor([-3.0]), beta=2.0).losses  # dPMI < 0
    agreeing = L.rmipo(lw, ll, torch.tensor([-60.0]), torch.tensor([-1.5]), beta=2.0).losses    # dPMI = 58
    torch.testing.assert_close(contradicting, simpo(1.6))
    torch.testing.assert_close(agreeing, simpo(0.3), atol=1e-6, rtol=0)


def test_rmipo_margin_is_non_increasing_and_continuous():
    gammas = [float(L.rmipo(torch.zeros(1), torch.zeros(1), torch.tensor([-d]), torch.zeros(1), beta=1.0).losses)
              for d in (-1.0, -1e-6, 0.0, 1e-6, 0.5, 2.0, 10.0)]
    assert all(a >= b - 1e-9 for a, b in zip(gammas, gammas[1:]))
    assert gammas[1] == pytest.approx(gammas[3], abs=1e-5)


def test_label_smoothing_half_is_symmetric():
    for z in (0.7, -0.7):
        lw = torch.tensor([z]) + 1.6  # x = lbar_w - lbar_l - gamma = z with dPMI <= 0
        a = L.rmipo(lw, torch.zeros(1), lw, -torch.ones(1), beta=1.0, label_smoothing=0.5).losses  # dPMI = -1
        assert float(a) == pytest.approx(math.log1p(math.exp(-0.7)) / 2 + math.log1p(math.exp(0.7)) / 2, abs=1e-6)


def test_mi_is_antisymmetric():
    """L(z) - L(-z) = -z: swapping chosen and rejected maps z to -z."""
    a, b, za, zb = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    forward, swapped = L.mi(a, b, za, zb, alpha=0.3).losses, L.mi(b, a, zb, za, alpha=0.3).losses
    z = 0.3 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    assert float(forward - swapped) == pytest.approx(-z, abs=1e-6)


@pytest.mark.parametrize("prior, named", [("reference", "dpo"), ("simpo", "simpo"), ("uniform", None)])
def test_mi_priors_reproduce_named_losses_and_their_gradients(prior, named):
    torch.manual_seed(1)
    base = {k: torch.randn(16, dtype=torch.float64) * 5 - 20 for k in
            ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")}
    counts = torch.randint(1, 40, (16,)), torch.randint(1, 40, (16,))

    def run(name, params):
        leaves = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in base.items()}
        p = PairLogps(chosen_counts=counts[0], rejected_counts=counts[1], **leaves)
        spec, q = resolve(name, params)
        out = compute(spec, p, q)
        out.losses.sum().backward()
        return out.losses.detach(), leaves["policy_chosen"].grad, leaves["policy_rejected"].grad

    beta = 2.0 if prior == "simpo" else 0.1
    got = run("mi", {"prior": prior, "beta": beta})
    if named:
        want = run(named, {"beta": beta})
    else:  # CPO's preference term: -log sigmoid(beta (log pi_w - log pi_l))
        pw, pl = (base[k].clone().requires_grad_() for k in ("policy_chosen", "policy_rejected"))
        loss = torch.nn.functional.softplus(-beta * (pw - pl))
        loss.sum().backward()
        want = (loss.detach(), pw.grad, pl.grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_tdpo2_stops_the_gradient_of_the_chosen_kl_only():
    p = at_p()
    spec, q = resolve("mi", {"prior": "tdpo2"})
    compute(spec, p, q).losses.sum().backward()
    assert p.kl_chosen.grad is None and float(p.kl_rejected.grad) != 0.0
    p = at_p()
    spec, q = resolve("mi", {"prior": "tdpo1"})
    compute(spec, p, q).losses.sum().backward()
    assert float(p.kl_chosen.grad) != 0.0


def g(loss_fn, pc, pr, rc=-12.0, rr=-14.0, **kw):
    a, b = t(pc), t(pr)
    loss_fn(a, b, torch.tensor([rc], dtype=torch.float64), torch.tensor([rr], dtype=torch.float64), **kw).losses.sum().backward()
    return float(a.grad), float(b.grad)


def test_dpo_chosen_push_vanishes_with_the_margin_infopo_does_not():
    """InfoPO's dL/dlog pi(y_w) is -beta at any margin and any chosen log-prob: the chosen likelihood is always pushed up;
    DPO's is -beta*sigmoid(-beta*u) -> 0 (paper Sec. 4.3)."""
    for chosen in (-60.0, -10.0, 40.0):  # whatever the chosen log-prob itself
        for margin in (-50.0, 0.0, 20.0, 80.0):
            assert g(L.infopo, chosen, chosen - 5.0 - margin, beta=0.5)[0] == pytest.approx(-0.5)
    dpo_push = [abs(g(L.dpo, -10.0, -15.0 - m, beta=0.5)[0]) for m in (0.0, 20.0, 80.0)]
    assert dpo_push[0] > dpo_push[1] > dpo_push[2] and dpo_push[2] < 1e-15


def test_rejected_gradient_in_probability_space():
    """As pi(y_l) -> 0, DPO's gradient in pi(y_l) grows without bound; InfoPO's stays 1/pi_ref(y_l).

    (paper Sec. 4.2-4.3; each loss in its standard form: InfoPO beta=1, DPO beta=0.1. DPO's is
    beta*sigmoid(-beta*u)/pi(y_l) ~ pi(y_l)^(beta-1).)
    """
    infopo, dpo = [], []
    for log_p in (-14.0, -30.0, -60.0):
        for fn, sink, kw in ((L.infopo, infopo, {"beta": 1.0}), (L.dpo, dpo, {"beta": 0.1})):
            prob = torch.tensor([math.exp(log_p)], dtype=torch.float64, requires_grad=True)
            fn(t(-10.0), torch.log(prob), torch.tensor([-12.0], dtype=torch.float64),
               torch.tensor([-14.0], dtype=torch.float64), **kw).losses.sum().backward()
            sink.append(float(prob.grad))
    assert infopo == pytest.approx([math.exp(14.0)] * 3, rel=1e-9)
    assert dpo[0] < dpo[1] < dpo[2] and dpo[2] > 1e3 * dpo[0]


finite = st.floats(min_value=-1e4, max_value=0.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(pc=finite, pr=finite, rc=finite, rr=finite, nw=st.integers(1, 4096), nl=st.integers(1, 4096),
       mw=finite, ml=finite, kw=st.floats(0, 1e3), kl=st.floats(0, 1e3))
def test_every_loss_is_finite_on_extreme_inputs(pc, pr, rc, rr, nw, nl, mw, ml, kw, kl):
    for name, prior in EVERY_LOSS:
        p = pair(dict(policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr, kl_chosen=kw,
                      kl_rejected=kl, marginal_chosen_avg=mw, marginal_rejected_avg=ml), (nw, nl), torch.float32)
        spec, q = loss_and_params(name, prior, sft_weight=0.5)
        out = compute(spec, p, q)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all(), (name, prior)
        assert all(torch.isfinite(v.grad).all() for v in vars(p).values()
                   if isinstance(v, torch.Tensor) and v.grad is not None), (name, prior)


# policy = reference and equal per-token log-probs (reference-free losses see no preference either); and P
NEUTRAL = dict(P, policy_chosen=-10.0, policy_rejected=-10.0, ref_chosen=-10.0, ref_rejected=-10.0, kl_chosen=0.0,
               kl_rejected=0.0, marginal_chosen_avg=-2.0, marginal_rejected_avg=-2.0)


LR = 1e-2


def descent_step(name: str, prior: str | None, values: dict[str, float],
                 counts: tuple[int, int]) -> tuple[PairLogps, tuple[float, float], tuple[float, float]]:
    """One gradient-descent step of the loss (its own defaults, no SFT term) on the policy log-probs of one pair:
    the pair with its gradients, and (chosen, rejected) before and after."""
    p = pair(values, counts)
    spec, q = loss_and_params(name, prior)
    compute(spec, p, q).losses.sum().backward()
    before = p.policy_chosen.item(), p.policy_rejected.item()
    return p, before, (before[0] - LR * p.policy_chosen.grad.item(), before[1] - LR * p.policy_rejected.grad.item())


@pytest.mark.parametrize("values, counts", [(NEUTRAL, (5, 5)), (P, (5, 10))], ids=["neutral", "P"])
@pytest.mark.parametrize("name, prior", EVERY_LOSS, ids=[f"{n}-{p}" if p else n for n, p in EVERY_LOSS])
def test_every_loss_pushes_chosen_up_and_rejected_down(name, prior, values, counts):
    """The direction of a preference loss: one descent step raises log pi(y_w), lowers log pi(y_l), so the margin
    grows. (P is below IPO's target margin 1/(2 beta) = 5 and inside the hinge's 1/beta = 10, so all losses agree.)"""
    p, (chosen, rejected), (chosen_after, rejected_after) = descent_step(name, prior, values, counts)
    assert chosen_after > chosen and rejected_after < rejected
    assert chosen_after - rejected_after > chosen - rejected
    # the RMiPO marginals only set its margin, and no other loss reads them
    assert all(m.grad is None or float(m.grad) == 0.0 for m in (p.marginal_chosen_avg, p.marginal_rejected_avg))


def test_past_the_target_margin_infopo_still_pushes_chosen_at_full_rate():
    """u = 80: IPO pulls the margin back to 1/(2 beta), the hinge stops, DPO's push on chosen has all but vanished;
    InfoPO still raises log pi(y_w) at rate beta (its push on log pi(y_l), beta*e^(beta*delta_l), is tiny but down)."""
    far = dict(P, policy_rejected=-95.0)

    def moved(name: str) -> tuple[float, float, float]:
        """How far one step moves chosen and rejected, and the rejected gradient (too small to move it in float64)."""
        p, before, after = descent_step(name, None, far, (5, 10))
        return after[0] - before[0], after[1] - before[1], p.policy_rejected.grad.item()

    chosen, _, rejected_grad = moved("infopo")
    assert chosen == pytest.approx(LR * LOSSES["infopo"].defaults["beta"]) and rejected_grad > 0
    chosen, rejected, _ = moved("ipo")
    assert chosen < 0 < rejected
    assert moved("hinge")[:2] == (0.0, 0.0)
    assert 0 < moved("dpo")[0] < 1e-6


def test_sft_weight_adds_the_chosen_nll():
    spec, q = resolve("dpo", {"sft_weight": 0.5})
    base = float(compute(*resolve("dpo", {})[:1], at_p(), resolve("dpo", {})[1]).losses)
    assert float(compute(spec, at_p(), q).losses) == pytest.approx(base + 0.5 * 2.0)  # NLL = -lbar_w = 2


def test_registry_rejects_unknown_losses_and_foreign_flags():
    with pytest.raises(ConfigError, match="unknown loss 'dpoo'"):
        resolve("dpoo", {})
    with pytest.raises(ConfigError, match="--gamma does not apply to loss 'dpo'"):
        resolve("dpo", {"gamma": 1.0})
    with pytest.raises(ConfigError, match="unknown prior 'sim' for loss 'mi'"):
        resolve("mi", {"prior": "sim"})


def test_reference_free_losses_declare_no_reference_pass():
    free = {name for name, spec in LOSSES.items() if spec.reference_free()}
    assert free == {"simpo", "orpo", "rmipo"}
    assert LOSSES["mi"].reference_free({"prior": "simpo"}) and not LOSSES["mi"].reference_free({"prior": "tdpo1"})
