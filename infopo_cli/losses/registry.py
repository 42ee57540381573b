"""The loss registry: every loss by name, its paper, defaults and the forward passes it needs.

`formulas.py` holds the pure formulas and `priors.py` the MI priors; this module maps the per-pair quantities of a batch onto them,
adds the optional NLL term on the chosen response (`sft_weight`), and knows which extra forward
passes each loss needs, so that reference-free losses never run the reference pass.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from infopo_cli import presets
from infopo_cli.config import TrainConfig, flag
from infopo_cli.errors import ConfigError
from infopo_cli.losses.priors import PRIORS, REF, lengths as _lengths
from infopo_cli.losses.types import LossOutput, Needs, PairLogps

if TYPE_CHECKING:
    from torch import Tensor


class _Formulas:
    """formulas.py, imported at the first loss computed: reading and checking a loss's settings (`infopo plan`,
    `presets show`) imports no torch."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("infopo_cli.losses.formulas"), name)


L = _Formulas()


def _ref_args(p: PairLogps) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected


# --- the registry -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossSpec:
    """One loss of the registry: its name, one-line summary, paper, default parameters and formula."""

    name: str
    summary: str
    paper: str
    defaults: dict
    call: Callable[[PairLogps, dict], LossOutput]
    needs_fixed: Needs | None = None   # None: depends on the parameters (mi's prior)
    data: tuple[str, ...] = ("pairs",)  # the data it trains on: preference pairs, unpaired feedback rows

    def needs(self, params: dict) -> Needs:
        """The forward passes the loss needs with these parameters (mi's depend on its prior)."""
        return self.needs_fixed if self.needs_fixed is not None else PRIORS[params["prior"]].needs

    def reference_free(self, params: dict | None = None) -> bool:
        """Whether the loss, with `params` over its defaults, needs no reference model."""
        return not self.needs({**self.defaults, **(params or {})}).reference


def _infopo(p: PairLogps, q: dict) -> LossOutput:
    if p.desirable is None:
        return L.infopo(*_ref_args(p), *_lengths(p), beta=q["beta"], length_normalize=q["length_normalize"])
    return L.infopo_unpaired(p.policy_chosen, p.ref_chosen, p.desirable, _lengths(p)[0], beta=q["beta"],
                             desirable_weight=q["desirable_weight"], undesirable_weight=q["undesirable_weight"],
                             length_normalize=q["length_normalize"])


def _kto(p: PairLogps, q: dict) -> LossOutput:
    return L.kto(p.policy_chosen, p.ref_chosen, p.desirable, p.policy_rejected, p.ref_rejected, beta=q["beta"],
                 desirable_weight=q["desirable_weight"], undesirable_weight=q["undesirable_weight"])


def _mi(p: PairLogps, q: dict) -> LossOutput:
    zeta_w, zeta_l = PRIORS[q["prior"]].log_zeta(p, q)
    return L.mi(p.policy_chosen, p.policy_rejected, zeta_w, zeta_l, alpha=q["beta"])


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in [
    LossSpec("infopo", "NWJ mutual-information bound; chosen likelihood always pushed up; pairs or unpaired rows",
             "arXiv 2505.08507", {"beta": 1.0, "length_normalize": False}, _infopo, REF, ("pairs", "unpaired")),
    LossSpec("rmipo", "SimPO margin modulated per pair by prompt-response mutual information; reference-free",
             "arXiv 2604.24804", {"beta": 2.0, "gamma_min": 0.3, "gamma_max": 1.6, "label_smoothing": 0.0},
             lambda p, q: L.rmipo(p.policy_chosen / _lengths(p)[0], p.policy_rejected / _lengths(p)[1],
                                  p.marginal_chosen_avg, p.marginal_rejected_avg, beta=q["beta"],
                                  gamma_min=q["gamma_min"], gamma_max=q["gamma_max"],
                                  label_smoothing=q["label_smoothing"]), Needs(marginal=True)),
    LossSpec("mi", "one MI objective with a prior (--prior): reference=DPO, simpo, rdpo, tdpo1, tdpo2, uniform",
             "arXiv 2501.01544", {"beta": 0.1, "prior": "reference", "gamma": 1.0, "rdpo_alpha": 0.1, "tdpo_alpha": 0.5},
             _mi),
    LossSpec("dpo", "Bradley-Terry sigmoid loss on the log-ratio margin", "arXiv 2305.18290", {"beta": 0.1},
             lambda p, q: L.dpo(*_ref_args(p), beta=q["beta"]), REF),
    LossSpec("cdpo", "conservative DPO: label smoothing for noisy preferences", "ericmitchell.ai/cdpo.pdf",
             {"beta": 0.1, "label_smoothing": 0.1},
             lambda p, q: L.cdpo(*_ref_args(p), beta=q["beta"], label_smoothing=q["label_smoothing"]), REF),
    LossSpec("robust", "robust DPO: unbiased under a known label-flip rate", "arXiv 2403.00409",
             {"beta": 0.1, "label_smoothing": 0.1},
             lambda p, q: L.robust(*_ref_args(p), beta=q["beta"], label_smoothing=q["label_smoothing"]), REF),
    LossSpec("ipo", "squared loss towards a fixed margin 1/(2 beta); does not saturate", "arXiv 2310.12036",
             {"beta": 0.1, "length_normalize": False},
             lambda p, q: L.ipo(*_ref_args(p), *_lengths(p), beta=q["beta"], length_normalize=q["length_normalize"]), REF),
    LossSpec("hinge", "SLiC/RSO hinge on the log-ratio margin", "arXiv 2309.06657", {"beta": 0.1},
             lambda p, q: L.hinge(*_ref_args(p), beta=q["beta"]), REF),
    LossSpec("simpo", "reference-free, length-normalised, with a target margin gamma", "arXiv 2405.14734",
             {"beta": 2.0, "gamma": 1.0},
             lambda p, q: L.simpo(p.policy_chosen, p.policy_rejected, *_lengths(p), beta=q["beta"], gamma=q["gamma"]),
             Needs()),
    LossSpec("kto", "Kahneman-Tversky: thumbs-up/down rows against a KL reference point", "arXiv 2402.01306",
             {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}, _kto,
             Needs(reference=True, mismatched=True), ("unpaired",)),
    LossSpec("orpo", "odds-ratio preference term plus NLL on the chosen answer; reference-free", "arXiv 2403.07691",
             {"beta": 0.1}, lambda p, q: L.orpo(p.policy_chosen, p.policy_rejected, *_lengths(p), beta=q["beta"]),
             Needs()),
]}


WEIGHTS = ("desirable_weight", "undesirable_weight")  # unpaired rows: each label's weight


def resolve(name: str, overrides: dict, source: str | None = None) -> tuple[LossSpec, dict]:
    """The loss and its parameters: defaults < given values. A parameter the loss does not take is an error, named as
    the flag it was given as, or, with `source` (a preset file), as that file's key."""
    if name not in LOSSES:
        raise ConfigError(f"{f'{source}: ' if source else ''}unknown loss '{name}'; available: {', '.join(LOSSES)} "
                          "(see `infopo losses`)")
    spell, where = (str, f"{source}: ") if source else (flag, "")
    spec = LOSSES[name]
    given = {k: v for k, v in overrides.items() if v is not None}
    takes = set(spec.defaults) | {"sft_weight"} | (set(WEIGHTS) if "unpaired" in spec.data else set())
    wrong = sorted(set(given) - takes)
    if wrong:
        raise ConfigError(f"{where}{', '.join(map(spell, wrong))} does not apply to loss '{name}' (it takes: "
                          f"{', '.join(map(spell, sorted(takes)))})")
    params = {**spec.defaults, "sft_weight": 0.0, **given}
    if name == "mi" and params["prior"] not in PRIORS:
        raise ConfigError(f"{where}unknown prior '{params['prior']}' for loss 'mi'; available: {', '.join(PRIORS)}")
    if "label_smoothing" in params and not 0 <= params["label_smoothing"] < 0.5:
        raise ConfigError(f"{where}{spell('label_smoothing')} must be in [0, 0.5) (got {params['label_smoothing']})")
    return spec, params


def load_preset(name: str) -> TrainConfig:
    """A preset with its loss settings checked against its own loss: a setting that loss does not take is a mistake in
    the file, named by file and key, not as a flag no one typed."""
    cfg = presets.load_preset(name)
    try:
        resolve(cfg.loss, cfg.loss_overrides())
    except ConfigError:  # blame the first file, from the root of its `extends` chain, whose own settings are wrong
        for ancestor in reversed(presets.lineage(name)):
            mine = presets.load_preset(ancestor)
            resolve(mine.loss, mine.loss_overrides(), source=str(presets.find(ancestor)))
        raise
    return cfg


def for_data(spec: LossSpec, params: dict, kind: str, desirable: int = 0, undesirable: int = 0) -> dict:
    """The loss's parameters for data of `kind` ("pairs" or "unpaired", with its label counts), or a ConfigError when
    the loss cannot train on it. InfoPO's unpaired weights default to N / n per label: its loss is then an unbiased
    estimate of the NWJ objective whatever the mix (formulas.infopo_unpaired)."""
    if kind not in spec.data:
        hint = ("; use --loss infopo or kto, or train on pairs" if kind == "unpaired" else
                "; pairs can be split into unpaired rows with --unpair")
        what = "unpaired feedback rows (completion + label)" if kind == "unpaired" else "preference pairs"
        raise ConfigError(f"loss '{spec.name}' cannot train on {what}{hint}")
    if kind == "pairs":
        if given := [w for w in WEIGHTS if params.get(w) is not None and w not in spec.defaults]:
            raise ConfigError(f"{', '.join(map(flag, given))} applies to unpaired rows only; this data is pairs")
        return {k: v for k, v in params.items() if k not in WEIGHTS or k in spec.defaults}
    if not desirable or not undesirable:
        missing = "undesirable" if desirable else "desirable"
        raise ConfigError(f"the unpaired data has no {missing} rows: '{spec.name}' needs both labels")
    total = desirable + undesirable
    return {"desirable_weight": total / desirable, "undesirable_weight": total / undesirable, **params}


def compute(spec: LossSpec, logps: PairLogps, params: dict) -> LossOutput:
    """The loss per pair, plus `sft_weight` x the token-mean NLL of the chosen response when asked for (on unpaired
    rows: of each desirable completion, times desirable_weight)."""
    out = spec.call(logps, params)
    if params.get("sft_weight"):
        nll = -logps.policy_chosen / logps.chosen_counts.clamp(min=1)
        if logps.desirable is not None:  # weighted like a desirable row's term: on --unpair'd pairs, the pair loss's
            nll = nll * logps.desirable * params.get("desirable_weight", 1.0)
        out = LossOutput(out.losses + params["sft_weight"] * nll, out.chosen_rewards, out.rejected_rewards, out.kl)
    return out
