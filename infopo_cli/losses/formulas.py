"""Preference losses as pure functions of per-sequence log-probabilities.

Inputs are tensors of shape (B,): summed response log-probs `log pi(y|x)` of the chosen (w) and
rejected (l) responses under the policy and, where used, the reference; response lengths n; and for
RMiPO the policy's average log-prob of each response without its prompt. Each function returns
per-pair losses plus the detached implicit rewards TRL users know (`rewards/chosen`,
`rewards/rejected`). No model or tokenizer in here: each function can be checked by hand.

Notation (docstrings): delta = log pi(y|x) - log pi_ref(y|x), u = delta_w - delta_l, lbar = log pi / n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from infopo_cli.losses.types import LossOutput


def _out(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> LossOutput:
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def _exp_linear_above(z: Tensor, cap: float) -> Tensor:
    """exp(z) for z <= cap, continued by its tangent line above cap.

    Value and slope stay finite (exp overflows float32 at 88.7), and unlike a clamp the gradient does
    not vanish, so a rejected response far above the reference is still pushed down.
    """
    capped = z.clamp(max=cap)
    return torch.exp(capped) * (1.0 + (z - capped))


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, stable at both ends (Maechler 2012)."""
    a = a.clamp(max=-1e-6)
    return torch.where(a > -0.693, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


# --- the mutual-information family --------------------------------------------------------------

def infopo(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
           chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None, *,
           beta: float = 1.0, length_normalize: bool = False, max_exponent: float = 50.0) -> LossOutput:
    """InfoPO: mutual-information maximisation with the NWJ bound (Xiao et al., arXiv 2505.08507, NAACL 2025).

    Per pair the paper's loss is  -log pi(y_w|x) + pi(y_l|x) / pi_ref(y_l|x)  (its NWJ objective with the
    critic f = 1 + log(pi/pi_ref)). We use the tempered critic f = 1 + beta*log(pi/pi_ref):

        L = -beta * delta_w + exp(beta * delta_l)

    With beta = 1 this is the paper's loss up to the constant log pi_ref(y_w|x), so gradients are the
    same; the log-ratio form makes L = 1 at initialisation. dL/dlog pi(y_w) = -beta whatever the margin
    (the chosen likelihood is always pushed up), and dL/dlog pi(y_l) = beta*exp(beta*delta_l), which
    decays to 0 as the rejected response falls below the reference (bounded rejected-side gradient).
    Above `max_exponent` the exponential continues linearly so float32 cannot overflow.
    `length_normalize` uses delta / n (SimPO-style average log-probs) instead of sums.

    beta: 1.0 is the paper's form; 0.1-1 are sensible. Shapes: all inputs (B,), outputs (B,).
    """
    delta_w, delta_l = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if length_normalize:
        delta_w, delta_l = delta_w / chosen_lengths, delta_l / rejected_lengths
    losses = -beta * delta_w + _exp_linear_above(beta * delta_l, max_exponent)
    return _out(losses, beta * delta_w, beta * delta_l)


def infopo_unpaired(policy: Tensor, ref: Tensor, desirable: Tensor, lengths: Tensor | None = None, *,
                    beta: float = 1.0, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                    length_normalize: bool = False, max_exponent: float = 50.0) -> LossOutput:
    """InfoPO on unpaired feedback: each row contributes its own term of the NWJ bound (arXiv 2505.08507).

    The pair loss  -beta*delta_w + exp(beta*delta_l)  is a sum of a term for a preferred reply and one for a
    dispreferred reply, the two expectations of the NWJ bound. Estimated from separate samples:

        desirable row:    w_D * (-beta * delta)
        undesirable row:  w_U * exp(beta * delta)

    and the training loss is the mean over rows. With w_D = N / n_D and w_U = N / n_U (N rows, n_D desirable,
    n_U undesirable: the default, set from the training data) that mean estimates E_D[-beta*delta] +
    E_U[exp(beta*delta)] whatever the mix; on a balanced split of pairs (w = 2) a batch holding both rows of each
    pair gives exactly the pair loss's mean and gradient. Value at initialisation: 0 per desirable row, w_U per
    undesirable row. The exponential continues linearly above `max_exponent`, as in `infopo`.
    Shapes: all (B,), `desirable` bool; outputs (B,) (both reward fields hold each row's beta * delta).
    """
    delta = policy - ref
    if length_normalize:
        delta = delta / lengths
    losses = torch.where(desirable, -desirable_weight * beta * delta,
                         undesirable_weight * _exp_linear_above(beta * delta, max_exponent))
    return _out(losses, beta * delta, beta * delta)


def kto(policy: Tensor, ref: Tensor, desirable: Tensor, policy_mismatched: Tensor, ref_mismatched: Tensor, *,
        beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    """KTO (Ethayarajh et al., arXiv 2402.01306, Sec. 4.1): a prospect-theoretic value of each reply against a
    reference point, from unpaired desirable/undesirable rows.

        r    = log pi(y|x) - log pi_ref(y|x)
        z0   = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])   y'_i: another row's completion
        L    = lambda_D * (1 - sigmoid(beta * (r - z0)))   desirable
               lambda_U * (1 - sigmoid(beta * (z0 - r)))   undesirable

    i.e. E[lambda_y - v(x, y)]. z0 estimates KL(pi || pi_ref) from mismatched prompt/completion pairs of the
    micro-batch and, as in the paper, no gradient flows through it. At initialisation (r = z0 = 0) every row's loss
    is lambda / 2. The paper suggests lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
    Shapes: all (B,), `desirable` bool; outputs (B,) plus the scalar z0 as `kl`.
    """
    z0 = (policy_mismatched - ref_mismatched).detach().mean().clamp(min=0)
    r = policy - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return LossOutput(losses, (beta * r).detach(), (beta * r).detach(), z0)


def rmipo(policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, marginal_chosen_avg: Tensor,
          marginal_rejected_avg: Tensor, *, beta: float = 2.0, gamma_min: float = 0.3, gamma_max: float = 1.6,
          label_smoothing: float = 0.0) -> LossOutput:
    """RMiPO: intrinsic mutual information modulates the preference margin (Liao et al., arXiv 2604.24804).

    As in the released code (liavonpenn/rmipo @ d21db9b), reference-free:
        PMI = lbar(y|x) - lbar(y)            the policy's average log-prob with and without the prompt
        dPMI = stopgrad(PMI_w - PMI_l)
        gamma = gamma_min + (gamma_max - gamma_min) * exp(-max(0, dPMI))                      (R1)
        L = -(1-eps) logsig(beta (lbar_w - lbar_l - gamma)) - eps logsig(-beta (lbar_w - lbar_l - gamma))  (R2)
    i.e. SimPO whose target margin shrinks for pairs whose chosen answer is already much more
    prompt-specific, and is largest where the PMI ordering contradicts the label. No gradient flows
    through PMI. (An older variant shipped as bytecode in the same repository uses 0.5*tanh(dPMI) in the
    opposite direction; we follow the published source.)

    beta: 2.0 (the released configs); gamma_min/gamma_max: 0.3/1.6 (hard-coded there).
    """
    dpmi = ((policy_chosen_avg - marginal_chosen_avg) - (policy_rejected_avg - marginal_rejected_avg)).detach()
    gamma = gamma_min + (gamma_max - gamma_min) * torch.exp(-dpmi.clamp(min=0))
    logits = beta * (policy_chosen_avg - policy_rejected_avg - gamma)
    losses = (1 - label_smoothing) * F.softplus(-logits) + label_smoothing * F.softplus(logits)
    return _out(losses, beta * policy_chosen_avg, beta * policy_rejected_avg)


def mi(policy_chosen: Tensor, policy_rejected: Tensor, prior_chosen: Tensor, prior_rejected: Tensor, *,
       alpha: float) -> LossOutput:
    """The unified MI objective of "Many of your DPOs are secretly one" (Tutunov et al., arXiv 2501.01544, Eq. M1).

        L = -log sigmoid( alpha * [log pi(y_w|x) - log zeta(y_w)] - alpha * [log pi(y_l|x) - log zeta(y_l)] )

    zeta is a prior over responses standing where DPO has pi_ref; `priors.py` builds log zeta for the
    named priors (reference -> DPO, simpo -> SimPO, rdpo -> R-DPO, tdpo1/tdpo2 -> TDPO, uniform -> CPO's
    preference term). Gradients flow through the prior where it depends on the policy (SimPO, TDPO1).
    alpha plays DPO's beta.
    """
    chosen, rejected = alpha * (policy_chosen - prior_chosen), alpha * (policy_rejected - prior_rejected)
    return _out(F.softplus(-(chosen - rejected)), chosen, rejected)


# --- the DPO family -------------------------------------------------------------------------------

def _sigmoid_family(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                    beta: float) -> tuple[Tensor, Tensor, Tensor]:
    delta_w, delta_l = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    return beta * (delta_w - delta_l), beta * delta_w, beta * delta_l


def dpo(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
        beta: float = 0.1) -> LossOutput:
    """DPO with the Bradley-Terry (sigmoid) likelihood (Rafailov et al., arXiv 2305.18290, Eq. 7).

        L = -log sigmoid(beta * u),  computed as softplus(-beta*u) for stability.

    beta: 0.1 is standard; 0.01-0.5 seen in practice.
    """
    z, rw, rl = _sigmoid_family(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return _out(F.softplus(-z), rw, rl)


def cdpo(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
         beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Conservative DPO (Mitchell, "A note on DPO with noisy preferences", ericmitchell.ai/cdpo.pdf).

        L = -(1-eps) log sigmoid(beta u) - eps log sigmoid(-beta u)

    eps in (0, 0.5): the assumed rate of flipped labels; 0.1 is the suggested start.
    """
    z, rw, rl = _sigmoid_family(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return _out((1 - label_smoothing) * F.softplus(-z) + label_smoothing * F.softplus(z), rw, rl)


def robust(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
           beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO (Chowdhury et al., arXiv 2403.00409, Eq. 9): unbiased under label-flip rate eps.

        L = [-(1-eps) log sigmoid(beta u) + eps log sigmoid(-beta u)] / (1 - 2 eps),  eps in [0, 0.5)
    """
    z, rw, rl = _sigmoid_family(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    losses = ((1 - label_smoothing) * F.softplus(-z) - label_smoothing * F.softplus(z)) / (1 - 2 * label_smoothing)
    return _out(losses, rw, rl)


def ipo(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
        chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None, *,
        beta: float = 0.1, length_normalize: bool = False) -> LossOutput:
    """IPO (Azar et al., arXiv 2310.12036, Eq. 17): a squared loss that does not saturate.

        L = (u - 1 / (2 tau))^2,  tau = beta

    Summed log-ratios as in the paper; `length_normalize` uses delta/n as TRL does.
    """
    delta_w, delta_l = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if length_normalize:
        delta_w, delta_l = delta_w / chosen_lengths, delta_l / rejected_lengths
    return _out((delta_w - delta_l - 1 / (2 * beta)) ** 2, beta * delta_w, beta * delta_l)


def hinge(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
          beta: float = 0.1) -> LossOutput:
    """Hinge loss of SLiC/RSO (Liu et al., arXiv 2309.06657, Eq. 11): L = max(0, 1 - beta u); 1/beta is the margin."""
    z, rw, rl = _sigmoid_family(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return _out(torch.relu(1 - z), rw, rl)


def simpo(policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *,
          beta: float = 2.0, gamma: float = 1.0) -> LossOutput:
    """SimPO (Meng et al., arXiv 2405.14734, Eq. 6): reference-free, length-normalised, with a target margin.

        L = -log sigmoid(beta * (lbar_w - lbar_l) - gamma)

    beta: 2-10; gamma: beta * (gamma/beta ratio), the paper grid-searches the ratio over [0, 1]
    (defaults beta 2, gamma 1 = ratio 0.5, its recommended start).
    """
    avg_w, avg_l = policy_chosen / chosen_lengths, policy_rejected / rejected_lengths
    return _out(F.softplus(-(beta * (avg_w - avg_l) - gamma)), beta * avg_w, beta * avg_l)


def orpo(policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *,
         beta: float = 0.1) -> LossOutput:
    """ORPO (Hong et al., arXiv 2403.07691, Eqs. 6-7): SFT on the chosen answer plus an odds-ratio term.

        L = -lbar_w - lambda * log sigmoid(logodds(lbar_w) - logodds(lbar_l)),  logodds(a) = a - log(1 - e^a)

    reference-free; lambda = beta (0.1 in the paper's and TRL's defaults).
    """
    avg_w, avg_l = policy_chosen / chosen_lengths, policy_rejected / rejected_lengths
    log_odds = (avg_w - _log1mexp(avg_w)) - (avg_l - _log1mexp(avg_l))
    return _out(-avg_w + beta * F.softplus(-log_odds), beta * avg_w, beta * avg_l)
