"""The model stack: a 4-bit NF4 base, a LoRA adapter as the policy, the same base as the reference.

The reference is the base with the adapter switched off (`reference_mode`), never a second copy of
the weights: on a 24 GB GPU an 8B model fits once, not twice. With --init-adapter the policy starts from
an existing LoRA and the reference is a frozen second copy of that LoRA on the same base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import pickle
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infopo_cli.model import allocator, attention, embedded, lora_layers, recompute as recomputation
from infopo_cli.model.recompute import Recompute
from infopo_cli.config import EMBEDDED_MODEL, FIELDS, TrainConfig, flag
from infopo_cli.errors import ConfigError, first_line
from infopo_cli.model.precision import Precision
from infopo_cli.model.source import ADAPTER_WEIGHTS, library_reading, loadable, resolve_source  # noqa: F401 (resolve_source: for callers)


def load_tokenizer(source: str):
    """The tokenizer of `source` (no remote code), with a pad token and right padding as training needs."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is the one users watch

    with library_reading(source):
        tokenizer = AutoTokenizer.from_pretrained(loadable(source), trust_remote_code=False)
    if tokenizer.pad_token_id is None:  # padding is masked out of every loss, any id will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "right"
    return tokenizer


_HUB_KERNEL_NOTE = "Failed to load CPU gemm_4bit_forward"


def import_bitsandbytes():
    """bitsandbytes, imported without the hub download its CPU backend tries at import.

    On a CPU with AVX512-bf16, bitsandbytes (0.50) asks the `kernels` package at import for a fused 4-bit kernel
    from the hub: a request to the hub on every run and, where the hub does not answer, a warning that tells the
    user to set trust_remote_code=True. infopo never calls that kernel (it keeps the trainable 4-bit layout, see
    `_keep_4bit_layout_trainable`, and de-quantises for generation) and bitsandbytes has no setting that skips the
    fetch, so while bitsandbytes imports, `kernels` is unimportable the way Python's import system provides (a None
    entry in sys.modules), and bitsandbytes' note that it fell back to its own kernel is filtered from its log.
    Called before anything imports bitsandbytes (peft does, on import).
    """
    if "bitsandbytes" not in sys.modules:
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
            lambda record: not str(record.msg).startswith(_HUB_KERNEL_NOTE))
        held = sys.modules.get("kernels")
        sys.modules["kernels"] = None  # type: ignore[assignment]
        try:
            import bitsandbytes  # noqa: F401
        finally:
            if held is None:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = held
    return sys.modules["bitsandbytes"]


def load_base(source: str, cfg: TrainConfig, precision: Precision, sharded: bool = False) -> nn.Module:
    """The frozen base, 4-bit NF4 with double quantisation unless `load_in_4bit` is off. `sharded` (--fsdp over
    several processes): loaded into host memory, to be sharded onto the device (model/sharding.py), with the 4-bit
    codes stored in the compute dtype so FSDP2 can split them."""
    import_bitsandbytes()  # before transformers' quantizer imports it
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    attention.register()  # `matmul` is ours: known to transformers before a model asks for it
    if precision.device == "cpu":
        allocator.keep_freed_memory()  # large tensors reuse the heap instead of faulting in fresh pages
    quantization = None
    if cfg.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision.dtype, **({"bnb_4bit_quant_storage": precision.dtype} if sharded else {}),
        )
    device = "cpu" if sharded else torch.cuda.current_device() if precision.device == "cuda" else precision.device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with library_reading(source):
            model = AutoModelForCausalLM.from_pretrained(
                loadable(source), trust_remote_code=False, quantization_config=quantization, dtype=precision.dtype,
                device_map={"": device},  # the rank's GPU
                **({} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}),
            )
    model.config.use_cache = False
    if cfg.attn_implementation == "auto" and attention.suits(precision.device, precision.dtype, model.config):
        model.set_attn_implementation(attention.NAME)  # about twice sdpa's speed there (model/attention.py)
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
def dequantised(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the 4-bit base layers on a CPU are plain Linear layers holding their de-quantised weights.

    On a CPU bitsandbytes de-quantises each 4-bit weight at every call (its fast CPU kernel is a hub download,
    and its in-place AVX512 layout breaks training, see above), which a generation loop of a few hundred
    one-token forwards pays a few hundred times. The weights are the ones each call would make, in the compute
    dtype; the copy (2 bytes per weight) lives only inside the block. On CUDA, where bitsandbytes has kernels
    and memory is short, nothing changes.
    """
    bnb = import_bitsandbytes()
    from bitsandbytes.functional import dequantize_4bit

    swapped = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, bnb.nn.Linear4bit) or child.weight.device.type != "cpu" or \
                        not isinstance(child.weight, bnb.nn.Params4bit):  # a shard (--fsdp): gathered at each call
                    continue
                weight = child.weight
                values = dequantize_4bit(weight.data, weight.quant_state).to(child.compute_dtype or torch.float32)
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight = nn.Parameter(values, requires_grad=False)
                plain.bias = child.bias
                setattr(parent, name, plain)
                swapped.append((parent, name, child))
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads transformers 5's deprecated `is_gradient_checkpointing`: a warning the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _enable_checkpointing(base: nn.Module, cfg: TrainConfig, recompute: Recompute | None) -> None:
    """`recompute`: what the run's memory plan chose (model/recompute.py); None: the setting as given."""
    recomputation.apply(base, recompute or recomputation.given(cfg.gradient_checkpointing))


def _linear(module: nn.Module) -> bool:
    """A layer LoRA can adapt: a linear layer (also bitsandbytes' 4-bit one, GPT-2's Conv1D) or an embedding."""
    return isinstance(module, nn.Linear | nn.Embedding) or "Linear" in type(module).__name__ or type(module).__name__ == "Conv1D"


def _layer_names(base: nn.Module) -> str:
    """The layer names a refusal suggests: the linear layers `_linear` accepts (the embedding is adaptable too, but
    not what anyone means by a target)."""
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                             if _linear(m) and not isinstance(m, nn.Embedding)}))


def unmatched_targets(module_names: Iterator[str] | list[str], targets: list[str] | str) -> list[str]:
    """The names in --target-modules that match no module, as peft matches a list (the whole name, or its last
    dotted parts). peft raises only when none matches and silently drops the rest, so `q_proj,v_projj` would train
    q_proj alone."""
    if isinstance(targets, str):  # "all-linear" (a list otherwise: config.py splits any other string)
        return []
    names = list(module_names)
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_targets(base: nn.Module, targets: list[str] | str, label: str = "target_modules") -> None:
    """--target-modules against the base's modules: every name must match one (see `unmatched_targets`)."""
    modules = list(base.named_modules())
    if missing := unmatched_targets([n for n, _ in modules], targets):
        raise ConfigError(f"{label} {', '.join(missing)}: no such layer in this model (it has: {_layer_names(base)})")
    if blocks := unmatched_targets([n for n, m in modules if _linear(m)], targets):  # e.g. `mlp`: peft cannot adapt it
        raise ConfigError(f"{label} {', '.join(blocks)}: a block or norm, not a linear layer; LoRA adapts linear layers "
                          f"(this model's: {_layer_names(base)})")


def check_targets_before_loading(model: str, targets: list[str] | str, label: str = "target_modules") -> None:
    """`check_targets` on the model's architecture built on the meta device (no weights read), where its folder is
    already here (source.known_folder); a model that is not, or that transformers cannot build so, is checked when
    it loads."""
    from infopo_cli.model.source import known_folder

    folder = known_folder(model) if not isinstance(targets, str) else None
    if folder is None:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=False),
                                                        trust_remote_code=False)
    except Exception:  # an architecture this transformers cannot build bare: the load says what is wrong
        return
    check_targets(skeleton, targets, label)


def attach_lora(base: nn.Module, cfg: TrainConfig, recompute: Recompute | None = None) -> nn.Module:
    """Wrap the base with a fresh LoRA adapter (the policy) and turn on gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    check_targets(base, cfg.target_modules)
    _enable_checkpointing(base, cfg, recompute)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
                      bias="none", task_type="CAUSAL_LM")
    try:
        with quiet_peft():
            model = get_peft_model(base, lora)
    except ValueError:
        raise ConfigError(f"target_modules {_show(cfg.target_modules)} do not match this model's layers "
                          f"(it has: {_layer_names(base)})") from None
    lora_layers.adapt(model)  # 16-bit products, no float32 input copies, fused sums
    return model


# --- --init-adapter: the policy starts from an existing (SFT) LoRA; the reference is that LoRA, frozen -------

POLICY = "default"        # peft's name for the first adapter: the one trained, saved and exported
REFERENCE = "reference"   # a frozen second copy of the init adapter on the same base (never a second base)
_ADAPTER_SETTINGS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                     "target_modules": "target_modules"}  # TrainConfig field -> adapter_config.json key
_WEIGHTS = ADAPTER_WEIGHTS


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, list | tuple) else str(value)


def _modules(value: Any) -> frozenset[str]:
    return frozenset([value] if isinstance(value, str) else value)  # a regex or a set of names, compared as given


def _model_names(model: str) -> set[str]:
    """The names a base goes by: its folder or hub repo name; the embedded default's hub name too."""
    name = model.removeprefix("embedded:").rstrip("/").rsplit("/", 1)[-1].lower().removesuffix(".gguf")
    return {name, embedded.FOLDER_NAME.lower()} if model == EMBEDDED_MODEL else {name}


def init_adapter_config_digest(folder: str) -> str:
    """sha256 of the init adapter's adapter_config.json: its alpha and variants (rsLoRA, DoRA) change the model as
    much as its weights do ('' where it cannot be read)."""
    try:
        return hashlib.sha256((Path(folder) / "adapter_config.json").read_bytes()).hexdigest()
    except OSError:
        return ""


def _setting_problems(settings: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, what is wrong) for the LoRA settings of an adapter_config.json that peft would trip over with a
    TypeError once the model has loaded."""
    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    r, alpha, dropout = settings.get("r"), settings.get("lora_alpha"), settings.get("lora_dropout", 0.0)
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        yield "r", f"expected a whole number of at least 1, got {r!r}"
    if not (number(alpha) and alpha > 0):
        yield "lora_alpha", f"expected a number above 0, got {alpha!r}"
    if not (number(dropout) and 0 <= dropout < 1):
        yield "lora_dropout", f"expected a number from 0 to below 1, got {dropout!r}"
    modules = settings.get("target_modules")
    if not (isinstance(modules, str) or isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules)):
        yield "target_modules", f"expected a name, a pattern or a list of names, got {modules!r}"


def _read_init_adapter(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ConfigError(f"--init-adapter {folder}: " + ("a file, not an adapter folder" if folder.exists() else
                                                          "no such folder") + " (a peft adapter folder, as "
                          "save_pretrained writes it)")
    try:
        settings = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--init-adapter {folder}: no adapter_config.json there (a peft adapter folder, as "
                          "save_pretrained writes it)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"--init-adapter {folder}: cannot read adapter_config.json ({err})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--init-adapter {folder}/adapter_config.json: expected an object of settings, got "
                          f"{type(settings).__name__}")
    if wrong := next(_setting_problems(settings), None):
        raise ConfigError(f"--init-adapter {folder}/adapter_config.json: field {wrong[0]!r}: {wrong[1]}")
    if settings.get("peft_type") != "LORA":
        raise ConfigError(f"--init-adapter {folder}: a {settings.get('peft_type')} adapter; infopo trains LoRA adapters")
    if not any((folder / name).is_file() for name in _WEIGHTS):
        raise ConfigError(f"--init-adapter {folder}: no {' or '.join(_WEIGHTS)} next to its adapter_config.json")
    return settings


def adopt_init_adapter(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the init adapter's own LoRA settings and its folder as an absolute path (so a resume from
    anywhere finds it). A setting left at its default takes the adapter's value; one set to anything else
    must equal it: the adapter's tensors fix r and target modules, and its alpha and dropout are part of
    what it learnt. Cheap (one JSON file), so it runs before the run folder is written."""
    folder = Path(cfg.init_adapter).expanduser()
    settings = _read_init_adapter(folder)
    named = str(settings.get("base_model_name_or_path") or "")
    this = _model_names(cfg.model)
    if named and not any(a in b or b in a for a in _model_names(named) for b in this):
        raise ConfigError(f"--init-adapter {folder}: it was trained on '{named}', not on this run's model '{cfg.model}' "
                          "(if that is the same model, set base_model_name_or_path in its adapter_config.json)")
    adopted: dict[str, Any] = {"init_adapter": str(folder.resolve())}
    clashes = []
    for name, key in _ADAPTER_SETTINGS.items():
        theirs, ours = settings.get(key), getattr(cfg, name)
        if name == "lora_alpha" and isinstance(theirs, float) and theirs.is_integer():
            theirs = int(theirs)
        if name == "target_modules":
            theirs = theirs if isinstance(theirs, str) else sorted(theirs or [])  # peft saves a set: any order
            same = _modules(ours) == _modules(theirs)
        else:
            same = ours == theirs
        if not same and ours != FIELDS[name].default:
            clashes.append(f"{flag(name)} {_show(ours)} (the adapter's is {_show(theirs)})")
        adopted[name] = theirs
    if clashes:
        raise ConfigError(f"--init-adapter {folder}: its LoRA settings are fixed, but this run sets {'; '.join(clashes)}: "
                          "drop those settings or give the adapter's")
    return dataclasses.replace(cfg, **adopted)


def load_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor], adapter: str = POLICY) -> str | None:
    """Load `weights` into `adapter`; None when every tensor fits, else what is wrong, for the caller's one line
    (an init adapter, a checkpoint). peft itself reports a shape mismatch and leaves missing tensors as they were."""
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
    except RuntimeError as err:  # a shape mismatch: another model, r or target_modules
        return f"its tensors do not fit this model ({str(err).strip().splitlines()[-1].strip()})"
    expected = {n for n, _ in model.named_parameters() if f".{adapter}." in n}
    missing = [k for k in result.missing_keys if k in expected]
    if result.unexpected_keys or missing or not weights:
        example = (list(result.unexpected_keys) or missing or ["(no tensors)"])[0]
        return (f"its tensors do not match this run's adapter ({len(result.unexpected_keys)} unexpected, "
                f"{len(missing)} missing, e.g. {example})")
    return None


def load_init_adapter(base: nn.Module, cfg: TrainConfig, with_reference: bool,
                      recompute: Recompute | None = None) -> tuple[nn.Module, str]:
    """The policy = the init adapter (`cfg` from `adopt_init_adapter`), trainable; with `with_reference`, the
    same adapter again as the frozen REFERENCE. Returns the model and the sha256 of the weights file read,
    which a checkpoint keeps so a resume notices a changed reference."""
    from peft import LoraConfig, get_peft_model

    folder = Path(cfg.init_adapter)
    _read_init_adapter(folder)
    path = next(folder / name for name in _WEIGHTS if (folder / name).is_file())
    raw = path.read_bytes()  # hashed and loaded from the same bytes
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        weights = (load_safetensors(raw) if path.suffix == ".safetensors"
                   else torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ConfigError(f"--init-adapter {folder}: cannot read {path.name} ({first_line(err, 'unreadable')})") from None
    lora = LoraConfig.from_pretrained(str(folder))
    lora.inference_mode = False  # peft saves adapters with it on: they would load frozen
    _enable_checkpointing(base, cfg, recompute)
    try:
        with quiet_peft():
            model = get_peft_model(base, lora, adapter_name=POLICY)
            if with_reference:  # no dropout: the reference is a fixed function, also in a training-mode pass
                model.add_adapter(REFERENCE, dataclasses.replace(lora, inference_mode=True, lora_dropout=0.0))
    except ValueError:
        raise ConfigError(f"--init-adapter {folder}: its target modules {_show(sorted(_modules(lora.target_modules)))} "
                          f"do not match this model's layers (it has: {_layer_names(base)})") from None
    for adapter in (POLICY, REFERENCE) if with_reference else (POLICY,):
        if problem := load_adapter_weights(model, weights, adapter):
            raise ConfigError(f"--init-adapter {folder}: {problem}")
    lora_layers.adapt(model)
    return model, hashlib.sha256(raw).hexdigest()


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The reference policy under no-grad: the REFERENCE adapter when the run has one (--init-adapter),
    else the same base with the LoRA adapter disabled."""
    if REFERENCE not in getattr(model, "peft_config", {}):
        with model.disable_adapter(), torch.no_grad():
            yield model
        return
    # peft's set_adapter sets requires_grad on every adapter (on for the active one unless inference_mode,
    # off for the others): put back each flag as it was, so the policy stays trainable, the reference frozen.
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.set_adapter(REFERENCE, inference_mode=True)
    try:
        with torch.no_grad():
            yield model
    finally:
        model.set_adapter(POLICY)
        for param, was in flags:
            param.requires_grad_(was)


def holds_4bit_codes(module: nn.Module, name: str) -> bool:
    """Whether `module`'s parameter `name` is packed 4-bit codes (a bitsandbytes 4-bit layer's weight)."""
    return name == "weight" and "Linear4bit" in type(module).__name__


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the number of values they store (two a byte, whatever dtype holds
    them: uint8, or the compute dtype when sharded)."""
    trainable = total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            n = param.numel() * (2 * param.element_size() if holds_4bit_codes(module, name) else 1)
            total += n
            trainable += n if param.requires_grad else 0
    return trainable, total
