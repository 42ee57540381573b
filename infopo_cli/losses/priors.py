"""Priors of the unified MI objective (arXiv 2501.01544, Sec. 3): each gives log zeta(y) for the chosen and
rejected response, and the choice of prior recovers a named loss (DPO, SimPO, R-DPO, TDPO, CPO)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infopo_cli.losses.types import Needs, PairLogps

if TYPE_CHECKING:
    from torch import Tensor

REF = Needs(reference=True)


def lengths(p: PairLogps) -> tuple[Tensor, Tensor]:
    """The chosen and rejected responses' token counts, at least 1 (the length priors divide by them)."""
    return p.chosen_counts.clamp(min=1), p.rejected_counts.clamp(min=1)


# --- priors of the MI objective (arXiv 2501.01544): log zeta(y) for chosen and rejected ---------------

def _prior_reference(p: PairLogps, q: dict) -> tuple[Tensor, Tensor]:
    return p.ref_chosen, p.ref_rejected                                          # -> DPO


def _prior_simpo(p: PairLogps, q: dict) -> tuple[Tensor, Tensor]:
    # (1 - 1/n) log pi(y) + c, with c_w - c_l = gamma / alpha; depends on the policy and is NOT detached,
    # so that the gradients are SimPO's and not n times larger.
    n_w, n_l = lengths(p)
    # written as l - l/n so the division happens in the log-probs' dtype
    return (p.policy_chosen - p.policy_chosen / n_w + q["gamma"] / q["beta"],
            p.policy_rejected - p.policy_rejected / n_l)                        # -> SimPO


def _prior_rdpo(p: PairLogps, q: dict) -> tuple[Tensor, Tensor]:
    shift = q["rdpo_alpha"] / q["beta"]
    return p.ref_chosen - shift * p.chosen_counts, p.ref_rejected - shift * p.rejected_counts  # -> R-DPO


def _prior_tdpo1(p: PairLogps, q: dict) -> tuple[Tensor, Tensor]:
    return p.ref_chosen - p.kl_chosen, p.ref_rejected - p.kl_rejected           # -> TDPO1


def _prior_tdpo2(p: PairLogps, q: dict) -> tuple[Tensor, Tensor]:
    a = q["tdpo_alpha"]  # stop-gradient on the chosen KL only, as in TDPO2
    return p.ref_chosen - a * p.kl_chosen.detach(), p.ref_rejected - a * p.kl_rejected  # -> TDPO2


def _prior_uniform(p: PairLogps, q: dict) -> tuple[Tensor, Tensor]:
    zero = p.policy_chosen.new_zeros(p.policy_chosen.shape)
    return zero, zero                                                            # -> CPO's preference term


@dataclass(frozen=True)
class Prior:
    """One prior of the MI objective: its log zeta for both responses, the passes it needs, and the loss it recovers."""

    log_zeta: Callable[[PairLogps, dict], tuple[Tensor, Tensor]]
    needs: Needs
    recovers: str


PRIORS: dict[str, Prior] = {
    "reference": Prior(_prior_reference, REF, "DPO (arXiv 2305.18290)"),
    "simpo": Prior(_prior_simpo, Needs(), "SimPO (arXiv 2405.14734)"),
    "rdpo": Prior(_prior_rdpo, REF, "R-DPO (arXiv 2403.19159)"),
    "tdpo1": Prior(_prior_tdpo1, Needs(reference=True, kl=True), "TDPO1 (arXiv 2404.11999)"),
    "tdpo2": Prior(_prior_tdpo2, Needs(reference=True, kl=True), "TDPO2 (arXiv 2404.11999)"),
    "uniform": Prior(_prior_uniform, Needs(), "CPO's preference term without its NLL (arXiv 2401.08417)"),
}
