"""Preference losses as pure functions of per-sequence log-probabilities.

Every loss takes tensors of shape (B,): the policy's and the reference's summed log-probs of the
chosen and rejected responses (`log pi(y|x)`, prompt tokens excluded), and returns per-pair losses
plus the detached implicit rewards TRL users know (`rewards/chosen`, `rewards/rejected`).
No model or tokenizer in here: each function can be checked by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossOutput:
    losses: Tensor            # (B,) per-pair loss; the training loss is their mean over the global batch
    chosen_rewards: Tensor    # (B,) detached
    rejected_rewards: Tensor  # (B,) detached


def _exp_linear_above(z: Tensor, cap: float) -> Tensor:
    """exp(z) for z <= cap, continued by its tangent line above cap.

    Value and slope stay finite (exp overflows float32 at 88.7), and unlike a clamp the gradient does
    not vanish, so a rejected response far above the reference is still pushed down.
    """
    capped = z.clamp(max=cap)
    return torch.exp(capped) * (1.0 + (z - capped))


def infopo(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
           *, beta: float = 1.0, max_exponent: float = 50.0) -> LossOutput:
    """InfoPO: mutual-information maximisation with the NWJ bound (Xiao et al., arXiv 2505.08507, NAACL 2025).

    Per pair the paper's loss is  -log pi(y_w|x) + pi(y_l|x) / pi_ref(y_l|x)  (its NWJ objective with the
    critic f = 1 + log(pi/pi_ref)). We use the tempered critic f = 1 + beta*log(pi/pi_ref):

        L = -beta * (log pi(y_w|x) - log pi_ref(y_w|x)) + exp(beta * (log pi(y_l|x) - log pi_ref(y_l|x)))

    With beta = 1 this is the paper's loss up to the constant log pi_ref(y_w|x), so gradients are the
    same; the log-ratio form makes L = 1 at initialisation. dL/dlog pi(y_w) = -beta whatever the margin
    (the chosen likelihood is always pushed up), and dL/dlog pi(y_l) = beta*exp(beta*delta_l), which
    decays to 0 as the rejected response falls below the reference (bounded rejected-side gradient).
    Above `max_exponent` the exponential continues linearly so float32 cannot overflow.

    beta: 1.0 is the paper's form; 0.1-1 are sensible. Shapes: all inputs (B,), outputs (B,).
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    losses = -beta * chosen_logratio + _exp_linear_above(beta * rejected_logratio, max_exponent)
    return LossOutput(losses, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach())


def dpo(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
        *, beta: float = 0.1) -> LossOutput:
    """DPO with the Bradley-Terry (sigmoid) likelihood (Rafailov et al., arXiv 2305.18290, Eq. 7).

        L = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

    computed as softplus(-beta*u) for stability. beta: 0.1 is standard; 0.01-0.5 seen in practice.
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    losses = F.softplus(-beta * (chosen_logratio - rejected_logratio))
    return LossOutput(losses, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach())


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., LossOutput]
    needs_reference: bool
    defaults: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    paper: str = ""


LOSSES: dict[str, LossSpec] = {
    "infopo": LossSpec(infopo, True, {"beta": 1.0},
                       "mutual-information (NWJ) objective; chosen likelihood never pushed down",
                       "arXiv 2505.08507"),
    "dpo": LossSpec(dpo, True, {"beta": 0.1}, "Bradley-Terry sigmoid loss on the log-ratio margin",
                    "arXiv 2305.18290"),
}
