"""The settings of one training run: defaults < preset < command-line flags.

Each field's help text is written once here; the CLI's `--help`, `infopo presets show` and the saved
`config.toml` all read it. Standard library only, so `infopo --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from infopo_cli.errors import ConfigError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
BUNDLED_TRAIN = "bundled:arith_train"
BUNDLED_EVAL = "bundled:arith_eval"
# Compute / export dtype names -> torch attribute names: the one table of dtypes (torch-free, for --help).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
OPTIMIZERS = ("auto", "adamw", "paged_adamw_8bit")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything `infopo train` needs; saved as `config.toml` in the run folder."""

    # --- model -----------------------------------------------------------------------------------
    model: str = _f(EMBEDDED_MODEL, "Base model: a local folder, a hub id, or 'embedded:smollm2-135m-instruct'.")
    load_in_4bit: bool = _f(True, "Load the base 4-bit NF4 (bitsandbytes, double quant). False: unquantised.")
    dtype: str = _f("auto", "Compute dtype: auto (bf16 where the hardware computes it fast, else fp32), bf16, fp16, fp32.")
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass (non-reentrant): less memory, ~30% more time.")
    attn_implementation: str = _f("auto", "Attention kernel: auto (transformers' choice for the model), sdpa, eager, flash_attention_2.")
    share_prompt: bool = _f(True, "Read each pair's prompt once (one row prompt+chosen+rejected, 4-D mask; sdpa/eager attention): same log-probs, fewer tokens.")
    # --- LoRA ------------------------------------------------------------------------------------
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] | str = _f(
        "all-linear", "Modules that get a LoRA adapter: 'all-linear' (every linear layer but the output) or a list of names.",
    )
    # --- data ------------------------------------------------------------------------------------
    data: str = _f(BUNDLED_TRAIN, "Training pairs: a JSONL file with prompt/chosen/rejected, or 'bundled:arith_train'.")
    eval_data: str | None = _f(BUNDLED_EVAL, "Held-out pairs for evaluation ('' to skip).")
    data_format: str = _f("auto", "Row format: auto (detected), explicit, conversational, implicit.")
    prompt_field: str = _f("prompt", "Name of the prompt column.")
    chosen_field: str = _f("chosen", "Name of the chosen-response column.")
    rejected_field: str = _f("rejected", "Name of the rejected-response column.")
    split: str = _f("train", "Split of a hub dataset or a save_to_disk folder.")
    eval_split: str | None = _f(None, "Split for --eval-data (default: the same as --split).")
    skip_invalid: bool = _f(False, "Drop invalid rows (and report how many) instead of stopping at the first.")
    max_length: int = _f(512, "Longest prompt+response in tokens; longer pairs are truncated.")
    max_prompt_length: int = _f(256, "Longest prompt kept when a pair must be truncated (cut from the left).")
    system_prompt: str | None = _f(None, "System message for the chat template (None: the template's own default).")
    # --- loss ------------------------------------------------------------------------------------
    loss: str = _f("infopo", "Preference loss (see `infopo losses`).")
    beta: float | None = _f(None, "Loss temperature beta (None: the loss's default; see `infopo losses`).")
    gamma: float | None = _f(None, "Target margin (simpo; mi with prior simpo).")
    label_smoothing: float | None = _f(None, "Assumed label-flip rate in [0, 0.5) (cdpo, robust, rmipo).")
    length_normalize: bool | None = _f(None, "Use per-token average log-probs instead of sums (infopo, ipo).")
    prior: str | None = _f(None, "Prior of the mi loss: reference (DPO), simpo, rdpo, tdpo1, tdpo2, uniform.")
    rdpo_alpha: float | None = _f(None, "Length coefficient of the rdpo prior (R-DPO's alpha).")
    tdpo_alpha: float | None = _f(None, "Weight of the rejected KL in the tdpo2 prior (TDPO's alpha).")
    gamma_min: float | None = _f(None, "Smallest margin of rmipo (0.3 in the released code).")
    gamma_max: float | None = _f(None, "Largest margin of rmipo (1.6 in the released code).")
    sft_weight: float | None = _f(None, "Add this weight x the NLL of the chosen response to any loss (0: off).")
    # --- optimisation ----------------------------------------------------------------------------
    lr: float = _f(2e-4, "Peak learning rate (AdamW).")
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps.")
    batch_size: int = _f(8, "Preference pairs per micro-batch (each pair is two sequences).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step (global batch = batch_size * grad_accum).")
    warmup_ratio: float = _f(0.1, "Fraction of steps with linear warm-up before the cosine decay.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value (0: no clipping).")
    optimizer: str = _f("auto", "auto (paged 8-bit AdamW on CUDA, AdamW elsewhere), adamw, paged_adamw_8bit.")
    seed: int = _f(42, "Seed for LoRA init, shuffling and dropout.")
    # --- evaluation, logging, saving -------------------------------------------------------------
    eval_every: int = _f(0, "Evaluate on the held-out pairs every N steps (0: only before and after training).")
    eval_batch_size: int = _f(16, "Pairs per evaluation batch.")
    save_every: int = _f(0, "Save a resumable checkpoint every N steps (0: only at the end and when stopped).")
    keep_checkpoints: int = _f(2, "Keep the newest K checkpoint-N folders, delete older ones (the final adapter is always kept).")
    max_bad_steps: int = _f(10, "Stop after this many optimizer steps in a row skipped for a NaN/inf loss or gradient.")
    output: str | None = _f(None, "Run folder (default: runs/<preset>-<time>). Never overwritten.")
    preset: str | None = _f(None, "The preset these settings came from (informational).")

    def validate(self) -> None:
        """Collect every problem and raise once, so a user fixes them in one go."""
        problems = []
        positive = ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length", "max_prompt_length",
                    "eval_batch_size")
        problems += [f"{n} must be > 0 (got {getattr(self, n)})" for n in positive if getattr(self, n) <= 0]
        if self.max_steps is not None and self.max_steps <= 0:
            problems.append(f"max_steps must be > 0 (got {self.max_steps})")
        if self.epochs <= 0:
            problems.append(f"epochs must be > 0 (got {self.epochs})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.max_prompt_length >= self.max_length:
            problems.append(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            problems.append(f"dtype must be one of auto, {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.beta is not None and self.beta <= 0:
            problems.append(f"beta must be > 0 (got {self.beta})")
        if not self.target_modules:
            problems.append("target_modules must name at least one module")
        if problems:
            raise ConfigError("; ".join(problems))

    def data_options(self, split: str | None = None):
        from infopo_cli.data.loading import DataOptions
        from infopo_cli.data.formats import Fields

        return DataOptions(self.data_format, Fields(self.prompt_field, self.chosen_field, self.rejected_field),
                           split or self.split, self.system_prompt, self.skip_invalid)

    def loss_overrides(self) -> dict[str, Any]:
        """The loss parameters set by preset or flags (None: the loss's default)."""
        return {k: getattr(self, k) for k in LOSS_PARAMS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LOSS_PARAMS = ("beta", "gamma", "label_smoothing", "length_normalize", "prior", "rdpo_alpha", "tdpo_alpha",
               "gamma_min", "gamma_max", "sft_weight")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def help_for(name: str) -> str:
    return FIELDS[name].metadata["help"]


def check_keys(keys: list[str], source: str) -> None:
    """An unknown key is an error with a 'did you mean' (a typo must not be silently ignored)."""
    for key in keys:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown setting '{key}'{hint}")


def merge(base: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """Return a copy of `base` with `overrides` applied (keys checked, types coerced)."""
    check_keys(list(overrides), source)
    values = base.to_dict()
    for key, value in overrides.items():
        values[key] = _coerce(key, value, source)
    return TrainConfig(**values)


def override(preset: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """`merge` for settings given on top of a preset. Switching to another loss drops the preset's loss
    settings (beta, gamma, ...) not also given: they were tuned for the preset's own loss."""
    if overrides.get("loss", preset.loss) != preset.loss:
        overrides = {**{k: None for k in LOSS_PARAMS}, **overrides}
    return merge(preset, overrides, source)


def _coerce(key: str, value: Any, source: str) -> Any:
    """TOML and flags give the right Python types already; catch the common mistakes with a clear line."""
    default = FIELDS[key].default
    if value is None:
        return None
    expected = type(default) if default not in (None, dataclasses.MISSING) else None
    if key == "target_modules":
        if value == "all-linear":
            return value
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: '{key}' must be a list of module names")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key in LOSS_PARAMS and key not in ("prior", "length_normalize") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected is not None and not isinstance(value, expected):
        raise ConfigError(f"{source}: '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_toml(values: dict[str, Any]) -> str:
    """A flat dict as TOML (strings, numbers, booleans, lists of strings); None becomes a comment."""
    lines = []
    for key, value in values.items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        elif isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, (int, float, str, list)):
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
