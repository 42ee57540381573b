"""`infopo export --gguf-adapter`: the LoRA adapter alone as a llama.cpp adapter GGUF (`llama-cli -m BASE.gguf
--lora ADAPTER.gguf`, Ollama's `ADAPTER`), a few MiB beside a base the user already runs instead of a merged copy.

llama.cpp's layout (its src/llama-adapter.cpp): `general.type` "adapter", `general.architecture` the base's,
`adapter.type` "lora", `adapter.lora.alpha` as float32; per adapted weight W, named as in the base GGUF, `NAME.lora_a`
holds A as peft stores it (rank x in) and `NAME.lora_b` holds B (out x rank), and llama.cpp adds
(alpha / rank) * B A x. Where peft scales otherwise (rsLoRA's alpha / sqrt(rank), per-module rank or alpha
patterns) the difference is folded into B. Llama-family q/k rows are permuted in the base GGUF (export/gguf.py);
the permutation acts on W's output rows, so on B's rows.

Written only where it can be exact: LoRA on linear layers. Trained embeddings, `modules_to_save` copies and
DoRA have no place in the format and are refused (the merged `--gguf` export holds them).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infopo_cli.errors import ConfigError, ExportError
from infopo_cli.export.gguf import Arch, _gguf, _tensor, permute
from infopo_cli.model.source import read_gguf

LOSSLESS = ("f32", "f16", "bf16")  # adapter matrices are small; their rank rows do not divide into quant blocks
LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight")


@dataclass(frozen=True)
class AdapterTensor:
    """One adapted weight as llama.cpp reads it: the base tensor's GGUF name, A (rank x in) and B (out x rank)."""

    name: str
    a: np.ndarray
    b: np.ndarray


def lora_settings(adapter: Path) -> dict:
    """The adapter's adapter_config.json, refused in one line where llama.cpp's format cannot hold it."""
    settings = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if settings.get("use_dora"):
        raise ExportError(f"{adapter} is a DoRA adapter, which llama.cpp's LoRA format cannot hold: use --gguf (merged)")
    if not settings.get("lora_alpha"):
        raise ExportError(f"{adapter}/adapter_config.json: lora_alpha is {settings.get('lora_alpha')!r}; llama.cpp "
                          "scales by alpha / rank, so an adapter without one cannot be written")
    if settings.get("modules_to_save"):
        raise ExportError(f"{adapter} trains whole copies of {', '.join(settings['modules_to_save'])}, which a llama.cpp "
                          "adapter cannot hold: use --gguf (merged)")
    return settings


def peft_scale(module: str, rank: int, settings: dict) -> float:
    """The factor peft multiplies B A by for `module`: alpha / rank, or alpha / sqrt(rank) with rsLoRA, where alpha may
    come from the per-module `alpha_pattern`."""
    # a pattern key is a regular expression for the end of the module's dotted name, as peft matches it
    try:
        alpha = next((value for key, value in (settings.get("alpha_pattern") or {}).items()
                      if re.match(rf"(.*\.)?({key})$", module)), settings["lora_alpha"])
    except re.error as err:
        raise ExportError(f"adapter_config.json: alpha_pattern holds a key that is no regular expression ({err})") from None
    return alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def adapter_tensors(state: dict, settings: dict, config, arch: Arch) -> list[AdapterTensor]:
    """peft's A/B matrices (`state`: adapter_model.safetensors) under the base GGUF's tensor names, B rescaled to
    llama.cpp's alpha / rank and permuted where the base's rows are."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name.upper()], config.num_hidden_layers)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise ExportError(f"adapter tensor {key} is not a LoRA A/B matrix of a linear layer (an embedding LoRA, a "
                              "trained bias or copy), which a llama.cpp adapter cannot hold: use --gguf (merged)")
        pairs.setdefault(match["module"], {})[match["side"]] = tensor.float().numpy()
    alpha, out = float(settings["lora_alpha"]), []
    for module, sides in sorted(pairs.items()):
        if set(sides) != {"A", "B"}:
            raise ExportError(f"adapter module {module} has lora_{'A' if 'B' in sides else 'B'} but not its partner")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportError(f"no GGUF tensor name for adapter module {module}")
        a, b = sides["A"], sides["B"]
        rank = a.shape[0]
        b = b * (peft_scale(module, rank, settings) / (alpha / rank))
        if arch.permute_qk and module.endswith(("q_proj", "k_proj")):
            b = permute(b, config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads)
        out.append(AdapterTensor(target, a, b))
    if not out:
        raise ExportError("the adapter holds no LoRA matrices")
    return out


def check_base(base_gguf: Path, tensors: list[AdapterTensor], arch: Arch) -> None:
    """The base GGUF must be of the adapter's architecture and hold every adapted tensor at its shape, or llama.cpp
    refuses the pair at load time ("maybe wrong base model?"): say so now, naming the first mismatch."""
    reader = read_gguf(base_gguf)
    field = reader.fields.get("general.architecture")
    found = str(field.contents()) if field is not None else "no architecture"
    if found != arch.gguf_name:
        raise ConfigError(f"--base-gguf {base_gguf} is a {found} model; this adapter was trained on a {arch.gguf_name} one")
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # GGML order: (in, out)
    for tensor in tensors:
        expected = [tensor.a.shape[1], tensor.b.shape[0]]
        if shapes.get(tensor.name) is None or shapes[tensor.name][:2] != expected:
            have = "has no such tensor" if tensor.name not in shapes else f"has it as {shapes[tensor.name]}"
            raise ConfigError(f"--base-gguf {base_gguf} does not fit this adapter: {tensor.name} should be "
                              f"{expected} (in, out) and the file {have}; pass the GGUF of the base the run trained on")


def write_adapter_gguf(tensors: list[AdapterTensor], alpha: float, arch: Arch, path: Path, quant: str,
                       name: str) -> None:
    """The adapter GGUF at `path`: llama.cpp's metadata, then A and B of every adapted weight in `quant` (one of
    LOSSLESS, checked by the caller before anything is read)."""
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(path), arch.gguf_name)
    writer.add_name(name)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for tensor in tensors:
        for suffix, matrix in ((".lora_a", tensor.a), (".lora_b", tensor.b)):
            array, raw = _tensor(gguf, np.ascontiguousarray(matrix, dtype=np.float32), quant)
            writer.add_tensor(tensor.name + suffix, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_back(path: Path, tensors: list[AdapterTensor], quant: str) -> None:
    """The written file read with the gguf library: every matrix there, at its shape, holding what was meant (to
    the type's rounding). llama.cpp cannot tell a lightly trained adapter's small change from its own noise, so the
    file itself is checked."""
    found = {t.name: t for t in read_gguf(path).tensors}
    tolerance = {"f32": 1e-7, "f16": 1e-3, "bf16": 1e-2}[quant]
    for tensor in tensors:
        for suffix, matrix in ((".lora_a", tensor.a), (".lora_b", tensor.b)):
            stored = found.get(tensor.name + suffix)
            data = None if stored is None else np.asarray(stored.data)
            if stored is not None and stored.tensor_type.name == "BF16":  # stored as raw 16-bit words
                data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            if data is None or data.shape != matrix.shape or not np.allclose(
                    data.astype(np.float32), matrix, rtol=tolerance, atol=tolerance * float(np.abs(matrix).max())):
                raise ExportError(f"the adapter GGUF written does not hold {tensor.name + suffix} as meant "
                                  "(an export bug: please report it)")


def adapter_file_bytes(adapter: Path, quant: str) -> int:
    """The adapter GGUF's tensor bytes in `quant` (metadata aside), from the adapter folder's safetensors header
    alone (every tensor there is a LoRA matrix the GGUF holds: `adapter_tensors` refuses any other)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "np") as weights:
        count = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return count * (4 if quant == "f32" else 2)

