"""The settings of one training run: defaults < preset < command-line flags.

Each field's help text is written once here; the CLI's `--help`, `infopo presets show` and the saved
`config.toml` all read it. Standard library only, so `infopo --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infopo_cli.errors import ConfigError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
BUNDLED_TRAIN = "bundled:arith_train"
BUNDLED_EVAL = "bundled:arith_eval"
# Compute / export dtype names -> torch attribute names: the one table of dtypes (torch-free, for --help).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
OPTIMIZERS = ("auto", "adamw", "paged_adamw_8bit")
CHECKPOINTING = ("auto", "on", "off", "offload")  # model/recompute.py decides what auto means for a run
BACKENDS = ("transformers", "unsloth")  # model/stack.py, model/unsloth_backend.py
PAIRINGS = ("best-worst", "best-vs-each", "adjacent", "all")  # data/scored.py (torch-free here, for --help)
# model/attention.py's matmul, and the kernels transformers ships (a hub kernel name would fetch and run code)
ATTENTION = ("auto", "matmul", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
TRACKERS = ("tensorboard", "wandb", "trackio")  # train/trackers.py; --report-to takes a comma list of these, or none


REFERENCES = ("precompute", "online")
# the largest seed torch.manual_seed takes (an unsigned 64-bit number): a larger one fails only once training starts
SEED_MAX = 2**64 - 1


def _f(default: Any, help: str, *, panel: str | None = None, flag: str | None = None, metavar: str | None = None,
       choices: tuple[str, ...] | None = None, repeat: bool = False, cli: bool = True) -> Any:
    """A setting with everything said about it once: its `help`, and as a command-line option (`cli`) its `--help`
    `panel`, its `flag` where it is not --name-with-dashes (a bool's is --name/--no-name), the `choices` its `metavar`
    lists, and whether it may be repeated (`repeat`: one value is a string, several a list)."""
    metadata = {"help": help, "panel": panel, "flag": flag, "metavar": metavar, "choices": choices, "repeat": repeat,
                "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything `infopo train` needs; saved as `config.toml` in the run folder."""

    # --- model -----------------------------------------------------------------------------------
    model: str = _f(EMBEDDED_MODEL, "Base model: a local folder, a hub id, or 'embedded:smollm2-135m-instruct'.",
                    panel="Model")
    backend: str = _f("transformers", "What loads the base and attaches the LoRA: transformers (+ peft) or unsloth "
                                      "(Unsloth's FastLanguageModel and kernels; pip install 'infopo[unsloth]').",
                      panel="Model", choices=BACKENDS)
    load_in_4bit: bool = _f(True, "Load the base 4-bit NF4 (bitsandbytes, double quant). False: unquantised.",
                            panel="Model", flag="--4bit/--no-4bit")
    dtype: str = _f("auto", "Compute dtype: auto (bf16 where the hardware computes it fast, else fp32), bf16, fp16, fp32.",
                    panel="Model")
    gradient_checkpointing: str = _f("auto", "Recompute activations in the backward pass: auto (from the memory plan: off where "
                                             "the run fits, else on for only as many layers as needed), on, off, offload (on, "
                                             "the saved layer inputs in pinned CPU memory; CUDA). true/false mean on/off.",
                                     panel="Model", choices=CHECKPOINTING)
    gpu_mem_margin: float | None = _f(None, "GPU memory in GiB that --gradient-checkpointing auto leaves free, for what its "
                                            "memory plan does not see (other processes, fragmentation); default max(10% of "
                                            "the card, 1.5 GiB).", panel="Model", metavar="GIB")
    attn_implementation: str = _f("auto", "Attention kernel: auto (matmul for 16-bit compute on a CPU, else transformers' "
                                  "choice for the model), matmul (two batched 16-bit products: ~2x sdpa on a CPU), sdpa or "
                                  "eager (a shared prompt's 4-D mask), flex_attention (its block mask; trains on CUDA only), "
                                  "flash_attention_2 (reads each prompt twice).",
                                  panel="Model", choices=ATTENTION, metavar="KERNEL")
    reference: str = _f("precompute", "Reference log-probs: precompute (one pass before training, cached on disk for later runs "
                                      "on the same base and data) or online (a reference forward in every step).",
                        panel="Model", choices=REFERENCES)
    share_prompt: bool = _f(True, "Read each pair's prompt once (one row prompt+chosen+rejected, 4-D mask; sdpa/eager attention): same log-probs, fewer tokens.",
                            panel="Model")
    # --- LoRA ------------------------------------------------------------------------------------
    lora_r: int = _f(16, "LoRA rank.", panel="Model")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).", panel="Model")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", panel="Model", cli=False)
    target_modules: list[str] | str = _f(
        "all-linear", "Modules that get a LoRA adapter: 'all-linear' (every linear layer but the output) or a list of names.",
        panel="Model",
    )
    init_adapter: str | None = _f(None, "Start from this LoRA adapter folder (e.g. an SFT adapter: adapter_config.json + weights): "
                                        "the policy trains it, the reference is the model with it, frozen. Its own r, alpha, "
                                        "dropout and target modules are used (set away from their defaults they must match), "
                                        "its base must be this model; keep it unchanged until the run ends (--resume checks).",
                                  panel="Model")
    # --- data ------------------------------------------------------------------------------------
    data: str | list[str] = _f(BUNDLED_TRAIN, "Training pairs: a file (.jsonl/.json/.csv/.parquet), a save_to_disk folder, "
                                              "a hub dataset or 'bundled:arith_train'. Repeat to mix several; "
                                              "SOURCE:0.3 makes it 30% of the mix (default: by size).",
                               panel="Data", repeat=True, metavar="SOURCE")
    # str, not str | None: TOML has no null, so a None here could not survive the run's config.toml.
    eval_data: str | list[str] = _f(BUNDLED_EVAL, "Held-out pairs for evaluation ('' to skip); repeat to mix, like --data.",
                                    panel="Data", repeat=True, metavar="SOURCE")
    data_format: str = _f("auto", "Row format: auto (detected per row), explicit, conversational, implicit; unpaired "
                                  "(a completion and a thumbs up/down label, KTO-style); scored (completions "
                                  "with ratings, UltraFeedback), ranked (answers with rank, Nectar), labelled (two answers "
                                  "and a label or votes, SHP), rated (pairs with chosen/rejected scores).",
                          panel="Data", flag="--format")
    pairs: str = _f("best-worst", "Scored/ranked rows -> pairs: best-worst, best-vs-each, adjacent (consecutive scores), all.",
                    panel="Data")
    min_score_gap: float = _f(0.0, "Drop pairs whose score (or rank) gap is below this; ties are never trained on.",
                              panel="Data")
    min_score_ratio: float = _f(1.0, "Labelled two-answer rows (SHP): drop when the votes' ratio is below this (SHP's authors use 2).",
                                panel="Data")
    prompt_field: str = _f("prompt", "Name of the prompt column.", panel="Data")
    chosen_field: str = _f("chosen", "Name of the chosen-response column.", panel="Data")
    rejected_field: str = _f("rejected", "Name of the rejected-response column.", panel="Data")
    completion_field: str = _f("completion", "Name of the completion column of unpaired (thumbs up/down) rows.", panel="Data")
    label_field: str = _f("label", "Name of the label column of unpaired rows (true/false, 1/0/-1, good/bad, up/down, ...).",
                          panel="Data")
    system_field: str = _f("system", "Name of the column holding a row's system message (Intel/orca_dpo_pairs' system); "
                                     "'' reads none.", panel="Data")
    unpair: bool = _f(False, "Split each preference pair into two unpaired rows: chosen desirable, rejected undesirable "
                             "(for kto and unpaired infopo comparisons).", panel="Data", flag="--unpair")
    split: str = _f("train", "Split of a hub dataset or a save_to_disk folder.", panel="Data")
    eval_split: str | None = _f(None, "Split for --eval-data (default: the same as --split).", panel="Data")
    skip_invalid: bool = _f(False, "Drop invalid rows (and report how many) instead of stopping at the first.",
                            panel="Data", flag="--skip-invalid")
    max_length: int | str = _f(512, "Longest prompt+response in tokens; longer pairs are truncated. auto: the length that "
                                    "keeps 99% of the training pairs whole.", panel="Data", metavar="N|auto")
    max_prompt_length: int = _f(256, "Longest prompt kept when a pair must be truncated (cut from the left).",
                                panel="Data")
    system_prompt: str | None = _f(None, "System message for the chat template (None: the template's own default).",
                                   panel="Data", flag="--system")
    # --- loss ------------------------------------------------------------------------------------
    loss: str = _f("infopo", "Preference loss (see `infopo losses`).", panel="Loss")
    beta: float | None = _f(None, "Loss temperature beta (None: the loss's default; see `infopo losses`).",
                            panel="Loss")
    gamma: float | None = _f(None, "Target margin (simpo; mi with prior simpo).", panel="Loss")
    label_smoothing: float | None = _f(None, "Assumed label-flip rate in [0, 0.5) (cdpo, robust, rmipo).", panel="Loss")
    length_normalize: bool | None = _f(None, "Use per-token average log-probs instead of sums (infopo, ipo).",
                                       panel="Loss")
    prior: str | None = _f(None, "Prior of the mi loss: reference (DPO), simpo, rdpo, tdpo1, tdpo2, uniform.",
                           panel="Loss")
    rdpo_alpha: float | None = _f(None, "Length coefficient of the rdpo prior (R-DPO's alpha).", panel="Loss")
    tdpo_alpha: float | None = _f(None, "Weight of the rejected KL in the tdpo2 prior (TDPO's alpha).", panel="Loss")
    gamma_min: float | None = _f(None, "Smallest margin of rmipo (0.3 in the released code).", panel="Loss")
    gamma_max: float | None = _f(None, "Largest margin of rmipo (1.6 in the released code).", panel="Loss")
    sft_weight: float | None = _f(None, "Add this weight x the NLL of the chosen response to any loss (0: off).",
                                  panel="Loss")
    desirable_weight: float | None = _f(None, "Unpaired rows: weight of a desirable row's term (kto: 1; infopo: "
                                              "rows / desirable rows, which balances any mix).", panel="Loss")
    undesirable_weight: float | None = _f(None, "Unpaired rows: weight of an undesirable row's term (kto: 1; infopo: "
                                                "rows / undesirable rows).", panel="Loss")
    # --- optimisation ----------------------------------------------------------------------------
    lr: float = _f(2e-4, "Peak learning rate (AdamW).", panel="Optimisation")
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps is set).", panel="Optimisation")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps.", panel="Optimisation")
    batch_size: int = _f(8, "Preference pairs per micro-batch (each pair is two sequences).", panel="Optimisation")
    grad_accum: int = _f(1, "Micro-batches per optimizer step (global batch = batch_size * grad_accum * nproc).",
                         panel="Optimisation")
    nproc: int = _f(1, "Processes (GPUs) to train on, data-parallel: infopo starts torchrun for N > 1 (under torchrun or "
                       "accelerate launch it is the launcher's world size).", panel="Optimisation")
    fsdp: bool = _f(False, "Shard the frozen base over the processes (FSDP2) instead of a whole copy on each: for a model "
                           "that does not fit one GPU (with --nproc N; infopo plan --fsdp N says how many).",
                    panel="Optimisation")
    warmup_ratio: float = _f(0.1, "Fraction of steps with linear warm-up before the cosine decay.",
                             panel="Optimisation", cli=False)
    weight_decay: float = _f(0.0, "AdamW weight decay.", panel="Optimisation", cli=False)
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value (0: no clipping).",
                              panel="Optimisation", cli=False)
    optimizer: str = _f("auto", "auto (paged 8-bit AdamW on CUDA, AdamW elsewhere), adamw, paged_adamw_8bit.",
                        panel="Optimisation")
    seed: int = _f(42, "Seed for LoRA init, shuffling and dropout.", panel="Optimisation")
    # --- evaluation, logging, saving -------------------------------------------------------------
    eval_every: int = _f(0, "Evaluate on the held-out pairs every N steps (0: only before and after training).",
                         panel="Output")
    eval_batch_size: int = _f(16, "Pairs per evaluation batch.", panel="Output")
    eval_generate_every: int = _f(0, "Also score the policy's greedy answers to held-out prompts that carry an answer, at the "
                                     "start, every N steps and at the end (eval/answers/accuracy; 0: off).",
                                  panel="Output")
    eval_max_new_tokens: int = _f(256, "Longest reply when answers are scored during training.", panel="Output")
    save_every: int = _f(0, "Save a resumable checkpoint every N steps (0: only at the end and when stopped).",
                         panel="Output")
    keep_checkpoints: int = _f(2, "Keep the newest K checkpoint-N folders, delete older ones (the final adapter is always kept).",
                               panel="Output")
    max_bad_steps: int = _f(10, "Stop after this many optimizer steps in a row skipped for a NaN/inf loss or gradient.",
                            panel="Optimisation")
    report_to: str = _f("none", "Also log the metrics to these trackers, a comma list: tensorboard (RUN/tensorboard/), wandb "
                                "(RUN/wandb/, offline unless WANDB_MODE or WANDB_API_KEY says otherwise), trackio (its local "
                                "store), or none. metrics.jsonl is always written.", panel="Output", metavar="TRACKERS")
    output: str | None = _f(None, "Run folder (default: runs/<preset>-<time>). Never overwritten.", panel="Output")
    preset: str | None = _f(None, "The preset these settings came from (informational).", cli=False)

    def __post_init__(self) -> None:
        self.gradient_checkpointing = _checkpointing(self.gradient_checkpointing)

    def validate(self) -> None:
        """Collect every problem and raise once, so a user fixes them in one go."""
        values = {name: _convert(HINTS[name], getattr(self, name)) for name in dict.fromkeys([*LIMITS, *FIELDS])}
        problems = [_type_problem(name, getattr(self, name)) if value is _REJECT else _limit_problem(name, value)
                    for name, value in values.items()]
        problems = [p for p in problems if p]
        if not any(value is _REJECT for value in values.values()):  # the combinations compare right-typed values
            if self.max_length != "auto" and self.max_prompt_length >= self.max_length:
                problems.append(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length}): "
                                "the prompt's share of each row (a preset sets both; give --max-prompt-length too)")
            if self.fsdp and self.backend == "unsloth":
                problems.append("fsdp shards the transformers backend's model; Unsloth's kernels run on one GPU "
                                "(use --backend transformers)")
            if self.gamma_min is not None and self.gamma_max is not None and self.gamma_min > self.gamma_max:
                problems.append(f"gamma_min ({self.gamma_min}) must be <= gamma_max ({self.gamma_max})")
        if problems:
            raise ConfigError("; ".join(problems))

    def loss_overrides(self) -> dict[str, Any]:
        """The loss parameters set by preset or flags (None: the loss's default)."""
        return {k: getattr(self, k) for k in LOSS_PARAMS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LOSS_PARAMS = ("beta", "gamma", "label_smoothing", "length_normalize", "prior", "rdpo_alpha", "tdpo_alpha",
               "gamma_min", "gamma_max", "sft_weight", "desirable_weight", "undesirable_weight")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def help_for(name: str) -> str:
    return FIELDS[name].metadata["help"]


# --- the command line: each setting as an option, described here (typer-free) for cli_options.py to build -----

@dataclass(frozen=True)
class CliOption:
    name: str                # the setting, and the command's parameter
    decls: tuple[str, ...]   # typer's declarations: ("--lr",), ("--4bit/--no-4bit",)
    type: Any                # what the command line parses: bool, int, float, str or list[str]
    help: str
    panel: str | None
    metavar: str | None


def _declaration(name: str) -> str:
    meta = FIELDS[name].metadata
    dashed = name.replace("_", "-")
    return meta["flag"] or (f"--{dashed}/--no-{dashed}" if _plain(HINTS[name]) is bool else f"--{dashed}")


def _plain(tp: Any) -> Any:
    """A setting's type on the command line: its annotation without None; a union of several (`int | str`, `list[str]
    | str`) is a string that `merge` reads (`--max-length auto`, `--target-modules q_proj,v_proj`)."""
    union = typing.get_origin(tp) in (types.UnionType, typing.Union)
    options = [t for t in typing.get_args(tp) if t is not type(None)] if union else [tp]
    return options[0] if len(options) == 1 else str


def flag(name: str) -> str:
    """The command-line flag of a setting, as messages name it: --format, --4bit, --lr."""
    return _declaration(name).split("/")[0]


def cli_option(name: str, **changes: Any) -> CliOption:
    """The option of setting `name`; `changes` (help, panel, type, metavar) are one command's own wording of it."""
    meta = FIELDS[name].metadata
    metavar = meta["metavar"] or ("|".join(meta["choices"]) if meta["choices"] else None)
    option = CliOption(name, (_declaration(name),), list[str] if meta["repeat"] else _plain(HINTS[name]), meta["help"],
                       meta["panel"], metavar)
    return dataclasses.replace(option, **changes)


PANELS = ("Data", "Model", "Loss", "Optimisation", "Output")  # the order `infopo train --help` shows them in
# what `infopo train` takes as flags, panel by panel
CLI_SETTINGS = tuple(sorted((name for name, f in FIELDS.items() if f.metadata["cli"]),
                            key=lambda name: PANELS.index(FIELDS[name].metadata["panel"])))


def from_flag(name: str, text: str) -> Any:
    """A value typed as its flag types it (`--sweep beta=0.1,0.3` gives each value as text); a bad one is one line."""
    tp = cli_option(name).type
    try:
        if tp is bool:
            return {"true": True, "false": False}[text.strip().lower()]
        return text if tp in (str, list[str]) else tp(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{flag(name)} {text}: must be {describe(tp)}") from None


def check_keys(keys: list[str], source: str) -> None:
    """An unknown key is an error with a 'did you mean' (a typo must not be silently ignored)."""
    for key in keys:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown setting '{key}'{hint}")


def merge(base: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """Return a copy of `base` with `overrides` applied: keys checked, types checked, each value's own limits
    checked, so a bad value is reported with `source` (the file or the command line) that gave it."""
    check_keys(list(overrides), source)
    values = base.to_dict()
    problems = []
    for key, value in overrides.items():
        try:
            values[key] = expand_home(_coerce(key, value)) if key in PATH_SETTINGS else _coerce(key, value)
        except ConfigError as err:
            problems.append(str(err))
            continue
        if problem := _limit_problem(key, values[key]):
            problems.append(problem)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return TrainConfig(**values)


# settings that name files or folders: a leading `~` is the user's home wherever the value comes from (a flag typed as
# --output=~/runs or quoted, a preset), never a folder named `~` (no hub id or bundled name starts with it)
PATH_SETTINGS = ("model", "init_adapter", "data", "eval_data", "output", "preset")


def expand_home(value: Any) -> Any:
    """A path's leading `~` or `~user` expanded (the shell leaves it as typed in `--out=~/x` and inside quotes); lists
    item by item; anything else as it is."""
    if isinstance(value, (list, tuple)):
        return [expand_home(v) for v in value]
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def override(preset: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """`merge` for settings given on top of a preset. Switching to another loss drops the preset's loss
    settings (beta, gamma, ...) not also given: they were tuned for the preset's own loss. Other training data drops
    the preset's bundled held-out set, unless --eval-data is given too: it is held out from the preset's own data, and
    a run on other data (another bundled task too) scored on it would report arithmetic as its held-out metrics."""
    if overrides.get("loss", preset.loss) != preset.loss:
        overrides = {**{k: None for k in LOSS_PARAMS}, **overrides}
    if "data" in overrides and "eval_data" not in overrides and _bundled(preset.eval_data) \
            and _named(overrides["data"]) != _named(preset.data):
        overrides = {**overrides, "eval_data": ""}
    return merge(preset, overrides, source)


def _named(sources: Any) -> list[str]:
    """The sources a data setting names, as a list."""
    return [s for s in (sources if isinstance(sources, (list, tuple)) else [sources]) if s]


def source_weight(text: str) -> tuple[str, str | None]:
    """A data source and the weight written after it: 'b.parquet:0.3' -> ('b.parquet', '0.3'), 'a.jsonl' -> ('a.jsonl',
    None). Only a number after the last colon is a weight, so 'bundled:arith_train' and 'C:\\data.jsonl' stay names
    (data/mixing.py checks the weight's range)."""
    spec, colon, tail = text.rpartition(":")
    if not (colon and spec):
        return text, None
    try:
        float(tail)
    except ValueError:
        return text, None
    return spec, tail


def _bundled(sources: Any) -> bool:
    """Whether every source named is bundled data (none named: no)."""
    named = _named(sources)
    return bool(named) and all(isinstance(s, str) and s.startswith("bundled:") for s in named)


# --- types: each setting's expected type comes from its annotation -----------------------------------

HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)
_REJECT = object()  # `_convert`'s answer for a value its type does not take
# (one thing, several things) in plain words, for messages a user reads
_WORDS: dict[type, tuple[str, str]] = {bool: ("true or false", "true/false values"),
                                       int: ("a whole number", "whole numbers"),
                                       float: ("a number", "numbers"), str: ("a string", "strings")}


def _convert(tp: Any, value: Any) -> Any:
    """`value` as type `tp` (an int for a float becomes a float), or `_REJECT`. bool is not taken as a number:
    `lora_r = true` is a mistake, not 1."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            if (converted := _convert(option, value)) is not _REJECT:
                return converted
        return _REJECT
    if tp is type(None):
        return None if value is None else _REJECT
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return _REJECT
        items = [_convert(item, v) for v in value]
        return _REJECT if any(v is _REJECT for v in items) else items
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _REJECT
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _REJECT
    return value if isinstance(value, tp) else _REJECT


def describe(tp: Any) -> str:
    """A type in plain words: 'a number', 'true or false', 'a list of strings or a string'. None is left out:
    TOML cannot write it and a flag left out means it."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe(option) for option in typing.get_args(tp) if option is not type(None))
    if origin is list:
        return f"a list of {_WORDS[typing.get_args(tp)[0]][1]}"
    return _WORDS[tp][0]


def show(value: Any) -> str:
    """A value as the user wrote it in TOML, with what it is: 'the string "0.1"', 'the number 8.0', 'true'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"the string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, (list, tuple)):
        return f"the list {json.dumps(value, ensure_ascii=False, default=str)}"
    if isinstance(value, dict):
        return f"the table {json.dumps(value, ensure_ascii=False, default=str)}"
    return str(value)  # a TOML date or time


def _type_problem(name: str, value: Any) -> str:
    return f"'{name}' must be {describe(HINTS[name])}, got {show(value)}"


def _checkpointing(value: Any) -> Any:
    """true/false, as config.toml files of runs before `auto` hold them (and `--gradient-checkpointing true`), mean
    on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return {"true": "on", "false": "off"}.get(value.strip().lower(), value.strip().lower()) if isinstance(value, str) else value


def _coerce(key: str, value: Any) -> Any:
    """`value` in the field's type; a wrong type is one line with what was expected and what was given
    (a non-empty string is truthy: `length_normalize = "false"` must not switch normalisation on)."""
    converted = _convert(HINTS[key], _checkpointing(value) if key == "gradient_checkpointing" else value)
    if converted is _REJECT:
        raise ConfigError(_type_problem(key, value))
    if key == "max_length" and isinstance(converted, str):  # a number as the command line gives it, or auto
        if converted.strip().isdigit():
            return int(converted)
        if converted != "auto":
            raise ConfigError(f"'max_length' must be a whole number or auto, got {show(value)}")
    if key == "target_modules" and isinstance(converted, str) and converted != "all-linear":
        converted = [v.strip() for v in converted.split(",") if v.strip()]  # "q_proj, v_proj" as on the command line
    return converted


# --- limits: what each number (or name) can be on its own; combinations are checked by validate() ----

_POSITIVE = (lambda v: v > 0, "be > 0")
_NOT_NEGATIVE = (lambda v: v >= 0, "be >= 0")
_FRACTION = (lambda v: 0 <= v < 1, "be in [0, 1)")
LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # counts and sizes; keep_checkpoints 0 would delete the checkpoint a resume needs, max_bad_steps 0 stops at once
    **dict.fromkeys(("lora_r", "lora_alpha", "max_prompt_length", "batch_size", "grad_accum", "nproc",
                     "eval_batch_size", "eval_max_new_tokens", "max_steps", "keep_checkpoints", "max_bad_steps", "epochs", "lr", "beta",
                     "desirable_weight", "undesirable_weight"),
                    _POSITIVE),
    # 0 means off (save_every, eval_every, max_grad_norm, sft_weight); a negative value has no meaning
    **dict.fromkeys(("save_every", "eval_every", "eval_generate_every", "seed", "weight_decay", "max_grad_norm", "sft_weight", "gamma",
                     "gamma_min", "gamma_max", "rdpo_alpha", "tdpo_alpha", "gpu_mem_margin"), _NOT_NEGATIVE),
    **dict.fromkeys(("warmup_ratio", "lora_dropout"), _FRACTION),
    # label_smoothing's [0, 0.5) is checked by the loss registry, which also sees the losses' defaults
    "dtype": (lambda v: v == "auto" or v in DTYPES, f"be one of auto, {', '.join(DTYPES)}"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"be one of {', '.join(OPTIMIZERS)}"),
    "gradient_checkpointing": (lambda v: v in CHECKPOINTING, f"be one of {', '.join(CHECKPOINTING)} (or true/false)"),
    "backend": (lambda v: v in BACKENDS, f"be one of {', '.join(BACKENDS)}"),
    "attn_implementation": (lambda v: v in ATTENTION, f"be one of {', '.join(ATTENTION)}"),
    "target_modules": (bool, "name at least one module"),
    "max_length": (lambda v: v == "auto" or (isinstance(v, int) and v > 0), "be > 0 or auto"),
    "reference": (lambda v: v in REFERENCES, "be precompute or online"),
    "pairs": (lambda v: v in PAIRINGS, f"be one of {', '.join(PAIRINGS)}"),
    "report_to": (lambda v: all(name in (*TRACKERS, "none") for name in tracker_names(v, known_only=False)),
                  f"be a comma list of {', '.join(TRACKERS)}, or none"),
    "min_score_gap": _NOT_NEGATIVE,
    "min_score_ratio": (lambda v: v >= 1, "be >= 1 (a ratio of the higher votes to the lower)"),
}


# upper bounds, beside LIMITS' lower ones: the largest value a library downstream takes
MOST: dict[str, tuple[int, str]] = {"seed": (SEED_MAX, "the largest seed torch takes")}


def tracker_names(report_to: str, known_only: bool = True) -> list[str]:
    """`--report-to`'s comma list as names, each once, in order; `none` (alone or in the list) adds nothing."""
    names = list(dict.fromkeys(n.strip().lower() for n in report_to.split(",") if n.strip()))
    return [n for n in names if n != "none" and (n in TRACKERS or not known_only)]


def _limit_problem(name: str, value: Any) -> str | None:
    """What is wrong with a value of the right type on its own, or None. nan fails every limit; inf is refused
    because no setting means anything at infinity (0, not inf, switches clipping off)."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be a finite number (got {value})"
    if name in ("model", "output") and isinstance(value, str) and not value.strip():  # not quietly the default
        return f"{name} {value!r} names no folder: omit it for the default"
    if name == "data" and isinstance(value, (list, tuple)) and not value:
        return "data is an empty list: name at least one source"
    if name in LIMITS and not LIMITS[name][0](value):
        return f"{name} must {LIMITS[name][1]} (got {value!r})"
    if name in MOST and value > MOST[name][0]:
        return f"{name} must be <= {MOST[name][0]}, {MOST[name][1]} (got {value!r})"
    return None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # shortest exact form; 'inf' and 'nan' are TOML too (json would write Infinity)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # JSON escapes ", \ and control characters the way TOML basic strings do, except DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} as TOML")


def to_toml(values: dict[str, Any]) -> str:
    """A flat dict as TOML that `presets.load_preset` reads back to the same values. TOML has no null, so None is
    written as a comment and reads back as the field's default: every field that may be None defaults to None."""
    lines = [f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
