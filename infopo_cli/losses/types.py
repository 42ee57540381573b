"""The types every loss reads and writes: what a loss needs computed, the per-pair log-probs, the result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the settings side of the losses imports no torch
    from torch import Tensor


@dataclass(frozen=True)
class Needs:
    """What a loss needs besides the policy's log-probs; everything not needed is never computed."""

    reference: bool = False  # log-probs with the adapter disabled (one no-grad forward)
    kl: bool = False         # per-token KL to the reference over the whole vocabulary (TDPO)
    marginal: bool = False   # the policy's log-probs of each response without its prompt (RMiPO)
    mismatched: bool = False  # unpaired rows: log-probs of another row's completion after each prompt (KTO's z0)


@dataclass
class PairLogps:
    """Per-pair quantities of a batch, chosen and rejected split apart. All tensors are (B,).

    Unpaired feedback rows (`desirable` set): the chosen fields hold each row's completion, the rejected fields
    another row's completion read after this row's prompt (KTO's mismatched pairs; zero tokens when not needed).
    """

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
    desirable: Tensor | None = None  # unpaired rows: (B,) bool, True for a thumbs-up completion; None for pairs


@dataclass
class LossOutput:
    """What a loss returns: the per-pair losses and the detached chosen and rejected rewards.

    On unpaired rows both reward fields hold each row's own reward (the metrics split them by label)."""

    losses: Tensor            # (B,) per-pair (or per-row) loss; the training loss is their mean over the global batch
    chosen_rewards: Tensor    # (B,) detached
    rejected_rewards: Tensor  # (B,) detached
    kl: Tensor | None = None  # KTO: the reference point z0 of the micro-batch (detached scalar)
