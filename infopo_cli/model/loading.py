"""The model stack: a 4-bit NF4 base, a LoRA adapter as the policy, the same base as the reference.

The reference is the base with the adapter switched off (`reference_mode`), never a second copy of
the weights: on a 24 GB GPU an 8B model fits once, not twice.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from infopo_cli.model import embedded
from infopo_cli.config import EMBEDDED_MODEL, TrainConfig
from infopo_cli.errors import ConfigError, ModelError
from infopo_cli.model.precision import Precision


def resolve_source(model: str, log=print) -> str:
    """A local folder or hub id is used as is; the embedded default is converted once, then cached."""
    if model == EMBEDDED_MODEL:
        return str(embedded.ensure_converted(log))
    if model.startswith("embedded:"):
        raise ConfigError(f"unknown embedded model '{model}'; the embedded default is '{EMBEDDED_MODEL}'")
    if model.lower().endswith(".gguf") and Path(model).expanduser().is_file():
        return str(embedded.gguf_folder(Path(model).expanduser(), log))
    return model


def _load_error(source: str, err: Exception) -> ModelError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not Path(source).exists() and "/" in source:
        return ModelError(f"cannot load model '{source}' (not a local folder; hub unreachable or gated?): {first}")
    return ModelError(f"cannot load model '{source}': {first}")


def load_tokenizer(source: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is the one users watch

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None
    if tokenizer.pad_token_id is None:  # padding is masked out of every loss, any id will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "right"
    return tokenizer


def load_base(source: str, cfg: TrainConfig, precision: Precision) -> nn.Module:
    """The frozen base, 4-bit NF4 with double quantisation unless `load_in_4bit` is off."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = None
    if cfg.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision.dtype,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, quantization_config=quantization, dtype=precision.dtype,
                device_map={"": precision.device},
                **({} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}),
            )
        except (OSError, ValueError, ImportError) as err:
            raise _load_error(source, err) from None
    model.config.use_cache = False
    _keep_4bit_layout_trainable(model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _keep_4bit_layout_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference on the first eval-mode forward.

    bitsandbytes (0.50) converts a Linear4bit's weight in place to an AVX512-bf16 layout the first time it
    runs in eval mode without grad. That layout's kernel has no autograd, so every later training step
    silently back-propagates wrong input gradients through the base layers (torch only warns). Held-out
    evaluation runs in eval mode between training steps, so the conversion must never happen.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads transformers 5's deprecated `is_gradient_checkpointing`: a warning the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def attach_lora(base: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap the base with a fresh LoRA adapter (the policy) and turn on gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so the frozen 4-bit
        # base is used as is (no fp32 up-cast of every non-quantised weight).
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
                      bias="none", task_type="CAUSAL_LM")
    try:
        with quiet_peft():
            return get_peft_model(base, lora)
    except ValueError:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear) or "Linear" in type(m).__name__})
        raise ConfigError(f"target_modules {cfg.target_modules} do not match this model's layers "
                          f"(it has: {', '.join(names)})") from None


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The reference policy: the same base with the LoRA adapter disabled, under no-grad."""
    with model.disable_adapter(), torch.no_grad():
        yield model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the number of values they store."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if param.dtype == torch.uint8 else 1)  # two NF4 values per byte
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
