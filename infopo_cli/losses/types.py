"""The types every loss reads and writes: what a loss needs computed, the per-pair log-probs, the result."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Needs:
    """What a loss needs besides the policy's log-probs; everything not needed is never computed."""

    reference: bool = False  # log-probs with the adapter disabled (one no-grad forward)
    kl: bool = False         # per-token KL to the reference over the whole vocabulary (TDPO)
    marginal: bool = False   # the policy's log-probs of each response without its prompt (RMiPO)


@dataclass
class PairLogps:
    """Per-pair quantities of a batch, chosen and rejected split apart. All tensors are (B,)."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_counts: Tensor
    rejected_counts: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    kl_chosen: Tensor | None = None
    kl_rejected: Tensor | None = None
    marginal_chosen_avg: Tensor | None = None
    marginal_rejected_avg: Tensor | None = None



@dataclass
class LossOutput:
    """What a loss returns: the per-pair losses and the detached chosen and rejected rewards."""

    losses: Tensor            # (B,) per-pair loss; the training loss is their mean over the global batch
    chosen_rewards: Tensor    # (B,) detached
    rejected_rewards: Tensor  # (B,) detached
