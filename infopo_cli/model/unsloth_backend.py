"""`--backend unsloth`: the base and its LoRA from Unsloth's FastLanguageModel instead of transformers + peft.

Only the model comes from Unsloth: infopo's data, losses, reference (the same base with the adapter disabled),
checkpoints and exports stay as they are, and the adapter is peft's POLICY ("default"), saved and merged like any
other. On a CUDA GPU Unsloth patches the model with its kernels, and `use_gradient_checkpointing="unsloth"` offloads
checkpointed activations to CPU memory. Without a GPU, Unsloth (2026.10 and later) falls back to stock transformers +
peft + bitsandbytes on the CPU; versions or settings without that fallback raise on import, which becomes one line.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn

from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError, ModelError, first_line
from infopo_cli.model.precision import Precision
from infopo_cli.model.stack import (POLICY, _keep_4bit_layout_trainable, _layer_names, import_bitsandbytes,
                                    library_reading, loadable, quiet_peft)

INSTALL = "pip install 'infopo[unsloth]'"
MASKS_DROPPED = "infopo_drops_attention_masks"  # set on a model whose forward ignores 4-D masks (train/logps.py)


def _version(package: str = "unsloth") -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def check(cfg: TrainConfig) -> None:
    """Unsloth imports and can run this configuration, or one line saying why not: before any data or model
    loads, and before transformers is imported (Unsloth patches it on import, so it must come first)."""
    if importlib.util.find_spec("unsloth") is None:
        raise ConfigError(f"--backend unsloth needs the unsloth package: {INSTALL}")
    cuda = torch.cuda.is_available()
    if cfg.init_adapter:
        raise ConfigError("--init-adapter is not supported with --backend unsloth yet: use --backend transformers")
    if cfg.dtype == "fp16" and not cuda:  # Unsloth's CPU fallback silently computes in bf16 or fp32 instead
        raise ConfigError("--backend unsloth computes in fp16 only on a CUDA GPU: use --dtype bf16 or fp32 on this CPU")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no usage ping to the hub from from_pretrained

    import_bitsandbytes()  # unsloth imports it (imports no transformers itself)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import unsloth  # noqa: F401  (prints its banner: the device it found and what it supports there)
    except Exception as err:  # Unsloth raises NotImplementedError, RuntimeError or ImportError on import
        first = first_line(err)
        if not cuda and (isinstance(err, NotImplementedError) or any(w in first.lower() for w in ("gpu", "accelerator", "cuda"))):
            raise ConfigError(f"--backend unsloth needs a CUDA GPU here: unsloth {_version()} found none and has no CPU "
                              f"fallback in this setup ({first}); use --backend transformers") from None
        if problem := _torchvision_problem():
            raise ConfigError(f"--backend unsloth: unsloth {_version()} does not import because {problem}") from None
        raise ConfigError(f"--backend unsloth: unsloth {_version()} does not import ({first}); reinstall it with "
                          f"{INSTALL}") from None


def _torchvision_problem() -> str | None:
    """pip brings unsloth's torchvision from PyPI, a CUDA build whose operators do not load against a CPU torch
    (transformers then fails to import its Trainer); infopo trains text models and needs no torchvision."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as err:
        return (f"torchvision {_version('torchvision')} does not load with torch {torch.__version__} "
                f"({first_line(err)}): pip uninstall torchvision, or install the build that matches torch")
    return None


def without_dropout(cfg: TrainConfig, note: Callable[[str], None]) -> TrainConfig:
    """`cfg` with `lora_dropout` 0: Unsloth patches its fused LoRA kernels (most of its speed) only into layers
    without dropout. Applied before config.toml is written, so the run records the dropout it trains with and a
    resume is exact."""
    if not cfg.lora_dropout:
        return cfg
    note(f"--backend unsloth trains with lora_dropout 0 (not {cfg.lora_dropout:g}): its fused LoRA kernels run only "
         "without dropout")
    return dataclasses.replace(cfg, lora_dropout=0.0)


def checkpointing_mode(cfg: TrainConfig) -> str | bool:
    """Unsloth's `use_gradient_checkpointing` for `--gradient-checkpointing`: off is off; on, offload and auto are
    "unsloth" (its own default: on CUDA the checkpointed activations go to CPU memory, on CPU it recomputes).
    infopo's memory plan, which picks layers for the transformers backend, does not apply to Unsloth's models."""
    return False if cfg.gradient_checkpointing in ("off", False) else "unsloth"


def _linear_names(base: nn.Module) -> list[str]:
    """peft's 'all-linear' spelt out as layer names (Unsloth's get_peft_model takes names): every linear layer of
    the decoder, so never the output layer."""
    decoder = base.get_decoder()
    return sorted({name.rsplit(".", 1)[-1] for name, module in decoder.named_modules()
                   if isinstance(module, nn.Linear) or "Linear" in type(module).__name__})


def load_model(source: str, cfg: TrainConfig, precision: Precision) -> nn.Module:
    """The frozen base (4-bit NF4 unless `load_in_4bit` is off) with a fresh LoRA adapter as the policy, both made
    by FastLanguageModel. `check(cfg)` ran first. Infopo keeps its own tokenizer (its token cache is keyed by it)."""

    import_bitsandbytes()  # before unsloth imports it
    from unsloth import FastLanguageModel

    checkpointing = checkpointing_mode(cfg)
    device_map = {"": torch.cuda.current_device()} if precision.device == "cuda" else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with library_reading(source):
            base, _ = FastLanguageModel.from_pretrained(
                model_name=loadable(source), trust_remote_code=False, max_seq_length=cfg.max_length,
                dtype=precision.dtype, load_in_4bit=cfg.load_in_4bit, device_map=device_map,
                use_gradient_checkpointing=checkpointing,
                **({} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}),
            )
    # Unsloth may change what was asked for (its CPU fallback loads 16-bit weights where bitsandbytes' 4-bit
    # check fails): a run must be what its config.toml and its reference cache key say.
    quantized = any(type(m).__name__ == "Linear4bit" for m in base.modules())
    if cfg.load_in_4bit and not quantized:
        raise ModelError("unsloth loaded the base unquantised (its 4-bit check failed on this machine): "
                         "use --no-4bit, or --backend transformers")
    dtype = base.get_input_embeddings().weight.dtype
    if dtype != precision.dtype:
        raise ModelError(f"unsloth loaded the base in {dtype}, not {precision.dtype}: choose --dtype to match")
    base.config.use_cache = False
    _keep_4bit_layout_trainable(base)
    targets = _linear_names(base) if cfg.target_modules == "all-linear" else cfg.target_modules
    try:
        with warnings.catch_warnings(), quiet_peft():
            warnings.simplefilter("ignore")
            model = FastLanguageModel.get_peft_model(
                base, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                target_modules=targets if isinstance(targets, str) else list(targets),
                use_gradient_checkpointing=checkpointing, random_state=cfg.seed, max_seq_length=cfg.max_length,
            )
    except (ValueError, AssertionError):
        raise ConfigError(f"target_modules {cfg.target_modules} do not match this model's layers "
                          f"(it has: {_layer_names(base)})") from None
    if POLICY not in getattr(model, "peft_config", {}):
        raise ModelError(f"unsloth {_version()} named the LoRA adapter {list(getattr(model, 'peft_config', {}))}, "
                         f"not '{POLICY}': infopo cannot save or export it")
    if precision.device == "cuda":
        # Unsloth's CUDA forward drops the attention mask in training (right padding only pads), so the
        # shared-prompt layout's 4-D mask would be ignored: such a model reads chosen and rejected as two rows.
        setattr(model, MASKS_DROPPED, True)
    return model
