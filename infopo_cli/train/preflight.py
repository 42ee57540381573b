"""Everything about a training run that can be checked without a model: settings, loss, kernel, trackers,
backend, data and the output folder.

`infopo train` runs these before it claims its run folder, so a mistake costs no model load and leaves nothing
on disk; `infopo train --dry-run` runs them alone ("check my command before I wait for a model").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infopo_cli import files
from infopo_cli.config import TrainConfig
from infopo_cli.data.loading import DataOptions, Loaded, PreferencePair, balance, data_kind, feedback_counts, unit as data_unit, unpair
from infopo_cli.data.mixing import as_list, load_mix
from infopo_cli.data.overlap import eval_overlap_note
from infopo_cli.errors import ConfigError
from infopo_cli.losses import registry
from infopo_cli.losses.registry import LossSpec
from infopo_cli.model import stack, unsloth_backend
from infopo_cli.model.source import check_not_merged_in, check_source
from infopo_cli.model.precision import choose
from infopo_cli.train import trackers


@dataclass
class Checked:
    """A run's settings with the loss resolved and its data read and validated."""

    cfg: TrainConfig
    spec: LossSpec
    loss_params: dict[str, Any]
    loaded: Loaded
    eval_pairs: list[PreferencePair]


def check_settings(cfg: TrainConfig) -> tuple[TrainConfig, LossSpec, dict[str, Any]]:
    """The settings alone: types and limits, trackers and backend installed, the kernel on
    this device, the loss and its flags, an init adapter's own LoRA settings. Returns the config an init adapter completes."""
    cfg.validate()
    trackers.check_available(trackers.parse(cfg.report_to))  # a missing tracker library: one line
    if cfg.backend == "unsloth":  # likewise a missing unsloth, or one that needs CUDA here; imports it before transformers
        unsloth_backend.check(cfg)
    if cfg.attn_implementation == "flex_attention" and choose(cfg.dtype).device == "cpu":
        raise ConfigError("--attn-implementation flex_attention trains on CUDA only (torch has no flex-attention "
                          "backward on a CPU): use auto or sdpa")
    spec, loss_params = registry.resolve(cfg.loss, cfg.loss_overrides())
    if cfg.init_adapter:  # cheap (one JSON file): its LoRA settings are checked against the run's here
        check_not_merged_in(cfg.model, Path(cfg.init_adapter).expanduser(), "--model")  # before the name check: the precise reason
        cfg = stack.adopt_init_adapter(cfg)
    return cfg, spec, loss_params


def load_data(cfg: TrainConfig, spec: LossSpec, loss_params: dict[str, Any]
              ) -> tuple[Loaded, list[PreferencePair], dict[str, Any]]:
    """The training mix and the held-out pairs, every row checked, in the shape the loss trains on, and the loss's
    parameters for that data; held-out pairs that are also trained on are a warning among the mix's notes."""
    loaded = load_mix(cfg.data, DataOptions.from_config(cfg), cfg.seed)
    eval_options = DataOptions.from_config(cfg, cfg.eval_split)
    eval_pairs = load_mix(cfg.eval_data, eval_options, cfg.seed).pairs if cfg.eval_data else []
    if note := eval_overlap_note(loaded.pairs, eval_pairs):
        loaded.notes.append(note)
    eval_pairs, loss_params = _shape_for_loss(cfg, spec, loss_params, loaded, eval_pairs)
    return loaded, eval_pairs, loss_params


def _shape_for_loss(cfg: TrainConfig, spec: LossSpec, loss_params: dict[str, Any], loaded: Loaded,
                    eval_pairs: list[PreferencePair]) -> tuple[list[PreferencePair], dict[str, Any]]:
    """`fit_to_loss` on the training mix (its rows replaced, its notes extended) and the held-out set in the same
    shape."""
    loaded.pairs, loss_params, info, notes = fit_to_loss(cfg, spec, loss_params, loaded.pairs)
    loaded.info += info
    loaded.notes += notes
    kind = data_kind(loaded.pairs)
    if eval_pairs and data_kind(eval_pairs) != kind:
        if kind == "pairs":
            raise ConfigError("--eval-data holds unpaired rows (completion + label) but the training data is pairs")
        eval_pairs = unpair(eval_pairs)
    return eval_pairs, loss_params


def fit_to_loss(cfg: TrainConfig, spec: LossSpec, loss_params: dict[str, Any], pairs: list[PreferencePair]
                ) -> tuple[list[PreferencePair], dict[str, Any], list[str], list[str]]:
    """The training rows in the shape the loss trains on: pairs split into unpaired rows where asked (--unpair) or
    where the loss takes only those (kto, as TRL's KTO does); the loss's parameters for that data
    (registry.for_data); and what to say about it (info lines, warnings). A loss that cannot train on the data is a
    ConfigError, before any model loads."""
    info, notes = [], []
    kind = data_kind(pairs)
    if kind == "pairs" and (cfg.unpair or "pairs" not in spec.data):
        if not cfg.unpair:
            info.append(f"{spec.name} trains on unpaired rows: each pair becomes two, its chosen reply desirable and its "
                        "rejected one undesirable (as --unpair does)")
        pairs, kind = unpair(pairs), "unpaired"
    desirable, undesirable = feedback_counts(pairs)
    loss_params = registry.for_data(spec, loss_params, kind, desirable, undesirable)
    if spec.needs(loss_params).mismatched and len({p.prompt for p in pairs}) < 2:
        raise ConfigError(f"{spec.name} estimates its reference point from completions read after other prompts, but "
                          f"every training row has the same prompt ({', '.join(as_list(cfg.data))})")
    if kind == "unpaired" and spec.name == "kto":
        weighted = loss_params["desirable_weight"] * desirable / (loss_params["undesirable_weight"] * undesirable)
        if not 1 <= weighted <= 4 / 3:
            notes.append(f"kto: desirable_weight x desirable rows / (undesirable_weight x undesirable rows) is "
                         f"{weighted:.2f}; the KTO paper advises 1 to 4/3 (set --desirable-weight or --undesirable-weight)")
    return pairs, loss_params, info, notes


def check_output(run_dir: Path) -> None:
    """A new run's folder: new or empty, in a place that can be written."""
    files.check_output_dir(run_dir)
    files.check_writable(run_dir, "--output")


def check(cfg: TrainConfig, output: Path, fresh: bool = True) -> Checked:
    """Every check of a run that needs no model, in the order a user would want to hear about them (a resumed run's
    own folder is not `fresh`: it holds the run)."""
    cfg, spec, loss_params = check_settings(cfg)
    if fresh:
        check_output(output)
    loaded, eval_pairs, loss_params = load_data(cfg, spec, loss_params)
    check_source(cfg.model)  # after the data: every row is checked whatever the model
    stack.check_targets_before_loading(  # a typo in a layer name: before the load
        cfg.model, cfg.target_modules,
        f"--init-adapter {cfg.init_adapter}: its target modules" if cfg.init_adapter else "target_modules")
    return Checked(cfg, spec, loss_params, loaded, eval_pairs)


def counted(loaded: Loaded) -> str:
    """What a run trains on, counted: "600 explicit pairs", or "1200 unpaired rows: 600 desirable, 600 undesirable
    (1.00 : 1)"."""
    if data_kind(loaded.pairs) == "pairs":
        return f"{len(loaded.pairs)} {loaded.format} pairs"
    return f"{len(loaded.pairs)} unpaired rows: {balance(*feedback_counts(loaded.pairs))}"


def describe(checked: Checked, output: Path, resuming: bool = False) -> list[str]:
    """What the run would do, for `--dry-run`: the lines a user checks before starting it."""
    cfg, loaded = checked.cfg, checked.loaded
    global_batch = cfg.batch_size * cfg.grad_accum * cfg.nproc
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(loaded.pairs) / global_batch)))
    params = ", ".join(f"{k}={v}" for k, v in checked.loss_params.items())
    unit = data_unit(loaded.pairs)
    lines = [f"preset {cfg.preset or '(none)'}; model {cfg.model} ({cfg.backend}, "
             f"{'4-bit NF4' if cfg.load_in_4bit else 'unquantised'}, dtype {cfg.dtype})",
             f"loss {cfg.loss} ({params})",
             f"data {', '.join(as_list(cfg.data))}: {counted(loaded)} from {loaded.rows} rows, {loaded.format} format"
             + (f", {len(loaded.skipped)} invalid rows skipped" if loaded.skipped else ""),
             f"held out: {len(checked.eval_pairs)} {unit} from {', '.join(as_list(cfg.eval_data))}" if cfg.eval_data else
             "held out: none (--eval-data FILE gives held-out metrics and the likelihood-displacement check)",
             f"{steps} optimizer step{'s' * (steps != 1)} of {global_batch} {unit} (lr {cfg.lr:g}, max_length "
             f"{cfg.max_length})",
             f"run folder {output}" + (" (resumed from its newest checkpoint)" if resuming else " (new)")]
    lines += [f"warning: {note}" for note in (batch_note(global_batch, len(loaded.pairs), unit),
                                              idle_eval_note(cfg, len(checked.eval_pairs))) if note]
    lines += [f"mix: {loaded.mix}"] if loaded.mix else []
    lines += loaded.info + [f"warning: {note}" for note in loaded.notes]
    return lines


def batch_note(global_batch: int, train: int, unit: str) -> str | None:
    """A warning where a step's global batch is larger than the training data (the run and its dry run say it)."""
    if global_batch <= train:
        return None
    return (f"a step's global batch of {global_batch} {unit} is more than the {train} training {unit}, so each step "
            "repeats some of them; lower --batch-size or --grad-accum")


def idle_eval_note(cfg: TrainConfig, held_out: int) -> str | None:
    """A warning where an evaluation setting is on (a flag, or the preset's) with nothing held out to evaluate."""
    given = [f"{key} {getattr(cfg, key)}" for key in ("eval_every", "eval_generate_every") if getattr(cfg, key)]
    if held_out or not given:
        return None
    return f"{' and '.join(given)}: nothing to evaluate without held-out data (--eval-data FILE)"

