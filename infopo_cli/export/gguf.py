"""`infopo export --gguf`: a merged transformers model written as a GGUF file with the `gguf` library.

Architecture metadata, the tokenizer (tokens, types, merges, special ids, chat template) and the
tensors under llama.cpp's names and layouts: Llama-family q/k projections are permuted from the
half-split rotary layout of transformers to the interleaved one GGML uses (without it llama.cpp
produces garbage; measured). Supported: the `llama` architecture (Llama 2/3, Mistral, SmolLM2), `qwen2`,
`phi3`, `gemma2` and `gemma3` (text; rope scaling: Llama 3.1's `llama3`, Phi-3.5's `longrope`, Gemma 3's `linear`), with byte-level BPE (Llama 3, Qwen2, SmolLM2) or SentencePiece-style BPE tokenizers (Llama 2,
Mistral); other architectures are a clear error that points to the merged export.

Tensor types: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 and q4_0 are written by the `gguf` library itself; the
K-quants (q6_k, q5_k_m, q4_k_m, q3_k_m, q2_k), which it can only read, by llama.cpp's own quantiser from an
f16 intermediate, where llama-cpp-python is installed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infopo_cli.errors import ConfigError, ExportError
from infopo_cli.model.source import GGUF_MERGED_KEY, resolve_source
import ctypes
from infopo_cli import files


@dataclass(frozen=True)
class Quant:
    """A GGUF type of `--quant`: what the file says it is, its size per weight, and who writes its tensors."""

    file_type: int            # llama.cpp's LLAMA_FTYPE value, written into the file's metadata
    bytes_per_weight: float   # on average (K-quants: llama.cpp's mix); see expected_bytes
    tensor_type: str | None   # the gguf library's type for 2-D tensors; None: llama.cpp's quantiser writes it
    narrow_bytes: float = 2.0  # per weight of a matrix whose rows do not divide into the type's blocks

    @property
    def by_llama_cpp(self) -> bool:
        return self.tensor_type is None


# Blocks of 32 weights: q8_0 32 bytes + an f16 scale, q4_0 16 + scale, q4_1 16 + scale and minimum, q5_0/q5_1 add
# 4 bytes of high bits. K-quants (super-blocks of 256, mixed per tensor by llama.cpp): sizes of llama.cpp's own
# Llama-3-8B files (its quantize tool's table) over 8.03e9 weights.
QUANTS = {"f32": Quant(0, 4.0, "F32"), "f16": Quant(1, 2.0, "F16"), "bf16": Quant(32, 2.0, "BF16"),
          "q8_0": Quant(7, 34 / 32, "Q8_0"), "q5_1": Quant(9, 24 / 32, "Q5_1"), "q5_0": Quant(8, 22 / 32, "Q5_0"),
          "q4_1": Quant(3, 20 / 32, "Q4_1"), "q4_0": Quant(2, 18 / 32, "Q4_0"),
          "q6_k": Quant(18, 6.14 / 8.03, None, 34 / 32), "q5_k_m": Quant(17, 5.33 / 8.03, None, 24 / 32),
          "q4_k_m": Quant(15, 4.58 / 8.03, None, 22 / 32), "q3_k_m": Quant(12, 3.74 / 8.03, None, 18 / 32),
          "q2_k": Quant(10, 2.96 / 8.03, None, 18 / 32)}
# (narrow_bytes of the K-quants: llama.cpp's fallbacks for rows that are not a multiple of 256 weights: Q8_0 for
# Q6_K, Q5_1 for Q5_K, Q5_0 for Q4_K, IQ4_NL for Q3_K and Q2_K.)
# llama.cpp keeps the output projection of 4/5-bit files at a higher type (Q6_K, or Q8_0 where rows do not
# divide into 256): every logit goes through it. The gguf library has no Q6_K, so Q8_0.
HIGHER_OUTPUT = frozenset({"Q5_1", "Q5_0", "Q4_1", "Q4_0"})
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# llama.cpp picks its pre-tokenizer regex by this name; by model family (name fragments, lower case).
PRE_TOKENIZERS = (("smollm", "smollm"), ("llama-3", "llama-bpe"), ("llama3", "llama-bpe"), ("qwen2", "qwen2"),
                  ("qwen", "qwen2"))


@dataclass(frozen=True)
class Arch:
    """How an architecture is written: its GGUF name, and whether q/k rows are permuted for llama.cpp's rotary layout.
    """

    gguf_name: str
    permute_qk: bool   # transformers' rotary halves -> GGML's interleaved pairs (Llama family)


ARCHS = {"LlamaForCausalLM": Arch("llama", True), "MistralForCausalLM": Arch("llama", True),
         "Qwen2ForCausalLM": Arch("qwen2", False), "Phi3ForCausalLM": Arch("phi3", False),
         "Gemma2ForCausalLM": Arch("gemma2", False), "Gemma3ForCausalLM": Arch("gemma3", False)}
# llama.cpp's gemma3 fixes what the config states: every 6th layer global, the others sliding-window with rope base 1e4
GEMMA3_PATTERN, GEMMA3_SLIDING_THETA = 6, 10000.0


def expected_bytes(model, quant: str) -> int:
    """The GGUF's size for `model` (its weights may be on the meta device), from the rules `write_gguf` and
    llama.cpp's quantiser follow: vectors f32, the output projection at a higher type, narrow rows at the
    fallback type. Within ~5% of the files written for the default model (K-quants use llama.cpp's average mix)."""
    kind = QUANTS[quant]
    block = 256 if kind.by_llama_cpp else (1 if kind.tensor_type in ("F32", "F16", "BF16") else 32)
    tied = getattr(model.config, "tie_word_embeddings", False)
    output = model.get_input_embeddings().weight if tied else model.get_output_embeddings().weight
    total = 40 * model.config.vocab_size  # the tokenizer: tokens, types, scores, merges
    for param in {id(p): p for p in model.parameters()}.values():
        if param.dim() == 1:
            total += 4 * param.numel()
            continue
        per_weight = kind.bytes_per_weight
        if param is output and (kind.tensor_type in HIGHER_OUTPUT or kind.by_llama_cpp):
            per_weight = 34 / 32 if kind.tensor_type or param.shape[-1] % 256 else 210 / 256  # Q8_0, or Q6_K
        elif param.shape[-1] % block:
            per_weight = kind.narrow_bytes
        total += per_weight * param.numel()
    return int(total)


def size_table(base: str) -> list[tuple[str, str, bool, int]]:
    """(type, who writes it, whether this installation can, expected bytes) for every type, for the model `base`
    (built on the meta device from its config: nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_source(base), trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    can_quantise = _llama_cpp() is not None
    return [(name, "llama.cpp" if kind.by_llama_cpp else "gguf library", can_quantise or not kind.by_llama_cpp,
             expected_bytes(model, name)) for name, kind in QUANTS.items()]


def _gguf():
    import gguf

    return gguf


def arch_of(model) -> Arch:
    """The GGUF architecture of a transformers model; a model or rope scaling the writer does not handle is an
    ExportError."""
    return arch_for(type(model).__name__, model.config)


def arch_for(name: str, config) -> Arch:
    """`arch_of` from the model class's name (a config's `architectures[0]`) and its config."""
    if name not in ARCHS:
        raise ExportError(f"GGUF export supports {', '.join(sorted(ARCHS))}; {name} is not yet supported — "
                          "use --merged and llama.cpp's convert_hf_to_gguf.py")
    rope_type = rope_scaling(config).get("rope_type", "default")
    supported = {"llama": "llama3", "phi3": "longrope", "gemma3": "linear"}.get(ARCHS[name].gguf_name)
    if rope_type not in ("default", None, supported):
        raise ExportError(f"GGUF export of rope scaling '{rope_type}' is not yet supported — use --merged")
    if ARCHS[name].gguf_name == "gemma3":
        _check_gemma3(config)
    return ARCHS[name]


def _check_gemma3(config) -> None:
    """What llama.cpp's gemma3 takes as given, checked against this config: otherwise its answers would differ."""
    layers = config.num_hidden_layers
    wanted = ["full_attention" if i % GEMMA3_PATTERN == GEMMA3_PATTERN - 1 else "sliding_attention" for i in range(layers)]
    sliding = dict(getattr(config, "rope_parameters", None) or {}).get("sliding_attention") or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    problems = []
    if list(getattr(config, "layer_types", None) or wanted) != wanted:
        problems.append(f"its layers are not global every {GEMMA3_PATTERN}th and sliding-window otherwise")
    if float(sliding.get("rope_theta", GEMMA3_SLIDING_THETA)) != GEMMA3_SLIDING_THETA:
        problems.append(f"its sliding-window layers' rope base is {sliding['rope_theta']}, not {GEMMA3_SLIDING_THETA:g}")
    if (sliding.get("rope_type") or "default") != "default":
        problems.append(f"its sliding-window layers' rope is scaled ({sliding['rope_type']}; llama.cpp scales only "
                        "the global layers')")
    # llama.cpp scales queries by 1/sqrt(head_dim), but by 1/sqrt(hidden / heads) for the 27B model (62 layers)
    expected = config.hidden_size // config.num_attention_heads if layers == 62 else head_dim
    scalar = getattr(config, "query_pre_attn_scalar", expected)
    if scalar != expected:
        problems.append(f"its query scale 1/sqrt({scalar}) is not llama.cpp's 1/sqrt({expected}) for {layers} layers")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        problems.append("it caps its logits (llama.cpp's gemma3 does not)")
    if problems:
        raise ExportError(f"GGUF export of this Gemma 3 model: llama.cpp would read it otherwise ({'; '.join(problems)}) — "
                          "use --merged")


def rope_scaling(config) -> dict:
    """The model config's rope scaling parameters (transformers' new or old attribute), {} when there are none; for a
    model with parameters per layer type (Gemma 3), those of its global (full-attention) layers."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    return dict(params.get("full_attention") or {}) if "full_attention" in params else params


def llama3_rope_factors(config, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling, as llama.cpp reads them from `rope_freqs.weight`.

    Llama 3.1 keeps high frequencies (wavelength below original_context / high_freq_factor), divides low
    ones (wavelength above original_context / low_freq_factor) by `factor`, and interpolates in between.
    """
    params = rope_scaling(config)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    freqs = 1.0 / (_rope_theta(config) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelengths = 2 * np.pi / freqs
    smooth = (original / wavelengths - low) / (high - low)
    factors = np.where(wavelengths < original / high, 1.0,
                       np.where(wavelengths > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _rope_theta(config) -> float:
    return float(rope_scaling(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation: rows grouped (head, half, dim/2) -> (head, dim/2, half)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def pre_tokenizer(model_name: str) -> str:
    """llama.cpp's pre-tokenizer name for a model, guessed from its name; "default" when none matches."""
    lowered = model_name.lower()
    return next((pre for fragment, pre in PRE_TOKENIZERS if fragment in lowered), "default")


def add_tokenizer(writer, tokenizer, model_name: str) -> None:
    """Tokens, types, merges or scores, special ids and chat template, from the tokenizer's own files."""
    gguf = _gguf()
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    # byte-level BPE: Llama 3, Qwen2, SmolLM2 (transformers <= 5.17 reads such a GGUF's tokenizer with byte_fallback set)
    if model["type"] == "BPE" and (not model.get("byte_fallback") or '"ByteLevel"' in json.dumps(backend.get("pre_tokenizer"))):
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(model_name))
        if merges:
            writer.add_token_merges(merges)
        else:  # a bytes-only vocabulary: readers (transformers) then derive merges from scores, of which there are none
            writer.add_token_scores([0.0] * size)
    elif model["type"] == "BPE":  # SentencePiece-style BPE with byte fallback: Llama 2, Mistral, Phi-3
        for text, index in vocab.items():
            if BYTE_TOKEN.fullmatch(text):
                types[index] = gguf.TokenType.BYTE
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # SentencePiece BPE lists pieces in merge order and scores them by it: -index reproduces the ranks.
        writer.add_token_scores([-float(i) for i in range(size)])
        writer.add_add_space_prefix(_adds_space_prefix(backend))
    else:
        raise ExportError(f"GGUF export supports BPE tokenizers; this one is {model['type']} — use --merged")
    for index, added in tokenizer.added_tokens_decoder.items():
        if types[index] != gguf.TokenType.UNKNOWN:
            types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(bool(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _adds_space_prefix(backend: dict) -> bool:
    """SentencePiece's 'dummy prefix': a '▁' prepended by the normaliser or the Metaspace pre-tokenizer."""
    text = json.dumps([backend.get("normalizer"), backend.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"never"' not in text)


def _tensor(gguf, data: np.ndarray, quant: str, output: bool = False):
    """(array, raw dtype) as GGUF stores it; vectors stay f32, rows not divisible into blocks f16."""
    if data.ndim == 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    kind = QUANTS[quant].tensor_type
    kind = gguf.GGMLQuantizationType["Q8_0" if output and kind in HIGHER_OUTPUT else kind]
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        kind = gguf.GGMLQuantizationType.F16
    if kind == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), kind
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), kind
    return gguf.quants.quantize(data.astype(np.float32), kind), kind


def _llama_cpp():
    """llama-cpp-python, or None where it is not installed (or its library does not load)."""
    try:
        import llama_cpp
    except (ImportError, OSError):
        return None
    return llama_cpp


def check_quant(quant: str) -> None:
    """A one-line error for a type this installation cannot write, before any model is loaded."""
    if quant not in QUANTS:
        raise ConfigError(f"--quant must be one of {', '.join(QUANTS)} (got {quant!r}); --quant list shows their sizes")
    if QUANTS[quant].by_llama_cpp and _llama_cpp() is None:
        raise ConfigError(f"--quant {quant} needs llama.cpp's quantiser: pip install 'infopo[gguf-check]'")


# llama.cpp's warning for a tensor it cannot give the K-quant type (rows not a multiple of 256).
FALLBACK = re.compile(r"warning: (\S+)\s+- ncols\s+\d+ not divisible by (\d+).*falling back to\s+(\S+)")


def llama_cpp_quantize(source: Path, path: Path, quant: str) -> list[str]:
    """llama.cpp's own quantiser from `source` (an f16 GGUF) into `path`; returns its per-tensor fallbacks,
    one line per type it fell back to. Its log is captured instead of printed: a line per tensor."""
    llama_cpp = _llama_cpp()
    pieces: list[bytes] = []  # llama.cpp logs a line in several calls; levels differ between versions

    @llama_cpp.llama_log_callback
    def capture(_level: int, text: bytes, _user_data) -> None:
        pieces.append(text)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant].file_type
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        failed = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(path), ctypes.byref(params))
    finally:
        from llama_cpp import _logger  # llama-cpp-python's own log handler, as it installs it on import

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    lines = [line.strip() for line in b"".join(pieces).decode("utf-8", "replace").splitlines() if line.strip()]
    if failed:
        reason = (lines or ["no reason given"])[-1].split("failed to quantize: ")[-1]
        raise ExportError(f"llama.cpp could not quantise to {quant}: {reason}")
    fallbacks: dict[tuple[str, str], list[str]] = {}
    for line in lines:
        if match := FALLBACK.search(line):
            fallbacks.setdefault((match[3], match[2]), []).append(match[1])
    return [f"llama.cpp wrote {len(names)} tensors as {kind} instead of a K-quant: their rows are not a multiple of "
            f"{block} weights ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for (kind, block), names in fallbacks.items()]


def write_gguf(model, tokenizer, path: Path, quant: str, model_name: str, merged: dict | None = None) -> list[str]:
    """Write `model` (a merged transformers causal LM) and its tokenizer to `path`; returns notes for the user
    (tensors llama.cpp's quantiser kept at another type). `merged`: the adapter it holds (`source.merged_mark`),
    written as metadata so that adapter is not put on this file again.

    K-quants: an f16 GGUF in a temporary folder beside `path` (removed afterwards, also on failure), which
    llama.cpp's quantiser turns into `path`.
    """
    check_quant(quant)
    if QUANTS[quant].by_llama_cpp:
        with files.staging(Path(path).parent) as scratch:
            write_gguf(model, tokenizer, scratch / "f16.gguf", "f16", model_name, merged)
            return llama_cpp_quantize(scratch / "f16.gguf", Path(path), quant)
    gguf = _gguf()
    arch, config = arch_of(model), model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch.gguf_name)
    writer.add_name(model_name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch.gguf_name in ("phi3", "gemma2", "gemma3") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if arch.gguf_name in ("gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.gguf_name == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(QUANTS[quant].file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, model_name)
    if merged:
        writer.add_string(GGUF_MERGED_KEY, json.dumps(merged))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name.upper()], config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD if tied else gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    scaling = rope_scaling(config)
    if scaling.get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config, head_dim),
                          raw_dtype=gguf.GGMLQuantizationType.F32)
    if scaling.get("rope_type") == "linear":  # Gemma 3 4B and larger: positions of the global layers divided
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if scaling.get("rope_type") == "longrope":  # Phi-3.5: per-frequency factors for short and long contexts
        original = scaling.get("original_max_position_embeddings") or config.original_max_position_embeddings
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original))) if scale > 1 else 1.0)
        for kind, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            writer.add_tensor(gguf.TENSOR_NAMES[tensor] + ".weight", np.asarray(scaling[kind], dtype=np.float32),
                              raw_dtype=gguf.GGMLQuantizationType.F32)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses the token embeddings
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ExportError(f"no GGUF name for tensor {name}")
        data = tensor.detach().float().cpu().numpy()
        if arch.gguf_name in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            data = data + 1  # Gemma's RMSNorm scales by (1 + w); llama.cpp multiplies by the stored weight
        if arch.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = permute(data, config.num_attention_heads if "q_proj" in name else config.num_key_value_heads)
        array, raw = _tensor(gguf, data, quant, output=target == output)
        writer.add_tensor(target, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return []
