"""Where a model comes from, checked before anything loads it: local first, the hub only for a hub id and only when
it answers, no Python code from a model folder, and a GGUF file that parses.

transformers imports a folder's own `modeling_*.py` when its config asks for it (`auto_map`) and the caller allows
it, and asks on stdin when the caller says nothing. infopo says `trust_remote_code=False` on every load, and
`check_no_remote_code` refuses such a folder in one line before transformers is even asked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from infopo_cli import files, hub
from infopo_cli.config import EMBEDDED_MODEL
from infopo_cli.errors import ConfigError, InfopoError, ModelError, first_line
from infopo_cli.model import embedded

NEVER = "infopo never runs code from a model folder"
MERGED_MARK = "infopo_merged.json"  # in a merged export: which adapter it holds, so that adapter is not applied again
# the same JSON, as metadata of a GGUF `infopo export --gguf` writes (llama.cpp's quantiser keeps a file's metadata)
GGUF_MERGED_KEY = "infopo.merged"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves, newest format first


@contextlib.contextmanager
def library_reading(name: str) -> Iterator[None]:
    """A library (transformers, peft, safetensors) reading a user's model files: whatever it raises there (a truncated
    weights file, `"vocab_size": "many"`, a config that is a list) is those files' fault, so it becomes one line naming
    them, exit 2; infopo's own errors pass as they are."""
    try:
        yield
    except InfopoError:
        raise
    except Exception as err:
        if "trust_remote_code" in str(err):  # a backstop: check_no_remote_code refuses such a folder before this
            raise ModelError(f"{name}: it asks to run its own Python code; {NEVER}") from None
        raise ModelError(f"cannot load model '{name}': {first_line(err)}") from None


def resolve_source(model: str, log: Callable[[str], None] = print) -> str:
    """The folder (or hub id) to load `model` from. The embedded default and a .gguf file are converted once, then
    cached; a local folder is checked and used as is; a path that does not exist is refused at once, never tried on
    the hub; a hub id goes to the hub only when the hub answers, else to its copy in the hub cache."""
    if model == EMBEDDED_MODEL:
        return str(embedded.ensure_converted(log))
    if model.startswith("embedded:"):
        raise ConfigError(f"unknown embedded model '{model}'; the embedded default is '{EMBEDDED_MODEL}'")
    with embedded.one_reader_per_file():  # the check and the conversion of a .gguf parse it once
        local = _checked_local(model)
        if local is None:
            return _from_hub(model)
        return str(embedded.gguf_folder(local, log)) if local.is_file() else str(local)


def check_source(model: str) -> None:
    """`resolve_source`'s checks of a local model, without converting or loading anything (for --dry-run and the
    checks before a run folder is claimed); the embedded default and a hub id are left to the load."""
    if not model.startswith("embedded:"):
        _checked_local(model)


def _checked_local(model: str) -> Path | None:
    """The local file or folder `model` names, checked: a .gguf file that parses, or a folder with a config.json and
    no code of its own to run. None when it names nothing here and may be a hub id."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{model}: a file, not a model; pass a model folder (with config.json), a .gguf file or a "
                             "hub id")
        if not _parsed_before(path):
            read_gguf(path)
            _PARSED.add(_identity(path))
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{model}: no config.json in that folder, so not a transformers model folder")
        check_no_remote_code(path, model)
        return path
    check_local(model)
    return None


def known_folder(model: str) -> Path | None:
    """The transformers folder `model` would load from, where it is already here: a local folder, a GGUF's (or the
    embedded default's) earlier conversion, a hub id's cached snapshot. None otherwise; nothing is converted or
    downloaded (for checks of a model's layer names before it loads)."""
    if model == EMBEDDED_MODEL:
        folder: Path | None = files.infopo_home() / "models" / embedded.FOLDER_NAME
    elif model.startswith("embedded:"):
        return None
    else:
        path = Path(model).expanduser()
        if path.is_file():
            folder = embedded.gguf_target(path)
        elif path.is_dir():
            folder = path
        else:
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(model, "config.json")
            except ValueError:  # not a valid hub id either: the load says so
                cached = None
            folder = Path(cached).parent if isinstance(cached, str) else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def check_local(model: str) -> None:
    """A --model that can only be a path (hub.looks_like_path) must exist: one line at once, never a hub request.
    Cheap and torch-free, for checks that run before anything loads."""
    if not model.startswith("embedded:") and not Path(model).expanduser().exists() and hub.looks_like_path(model):
        raise ModelError(f"no such model folder or file: {model}")


def loadable(source: str) -> str:
    """`source` as a transformers load may take it: a folder (a model, or an adapter's tokenizer) checked for code it
    would run, anything else through `resolve_source` (a missing path refused, a hub id checked). Every loader calls
    this, so no load skips the checks, whoever resolved the source first."""
    if Path(source).is_dir():
        check_no_remote_code(source)
        return source
    return resolve_source(source, log=lambda _: None)


@functools.lru_cache(maxsize=16)
def _from_hub(repo: str) -> str:
    """A hub id: its config files fetched (and checked) first when the hub answers, else its cached snapshot folder.
    Once per process and repo: the tokenizer and the model of one run resolve the same id."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    problem = hub.hub_problem()
    if problem:
        cached = try_to_load_from_cache(repo, "config.json")
        if not isinstance(cached, str):
            raise ModelError(f"cannot load model '{repo}': not a local folder, not in the hub cache, and {problem}")
        folder = Path(cached).parent  # the snapshot the last download left: what transformers offline would read
        check_no_remote_code(folder, repo)
        return str(folder)
    try:
        folder = Path(hf_hub_download(repo, "config.json")).parent
        try:
            hf_hub_download(repo, "tokenizer_config.json")
        except EntryNotFoundError:
            pass  # a model without one: its tokenizer comes from elsewhere
    except GatedRepoError:
        raise ModelError(f"'{repo}' on the hub is gated: accept its terms on its hub page, then log in "
                         "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no model '{repo}' on the hub (or it is private: log in with `hf auth login`), and no local "
                         "folder of that name") from None
    except EntryNotFoundError:
        raise ModelError(f"'{repo}' on the hub has no config.json, so it is not a transformers model") from None
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model '{repo}' from the hub: {first_line(err)}") from None
    check_no_remote_code(folder, repo)
    return repo


def _settings(path: Path) -> dict[str, Any]:
    """A config file as a dict; {} when it is missing or unreadable (transformers then says what is wrong itself)."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def check_no_remote_code(folder: Path | str, name: str | None = None) -> None:
    """Refuse a model or tokenizer folder that transformers could load only by importing the folder's own Python
    code: an `auto_map` for a model type (or tokenizer class) transformers does not have, or an unknown model type
    with `*.py` files beside it. An `auto_map` next to a type transformers has (Phi-3's) is left alone: with
    trust_remote_code=False transformers loads its own class and imports nothing from the folder."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    folder = Path(folder)
    name = name or str(folder)
    config, tokenizer = _settings(folder / "config.json"), _settings(folder / "tokenizer_config.json")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        if config.get("auto_map"):
            raise ModelError(f"{name}: its config asks to run the folder's own Python code (auto_map); {NEVER}")
        code = sorted(p.name for p in folder.glob("*.py"))
        if model_type and code:
            raise ModelError(f"{name}: its config names a model type transformers does not have ('{model_type}') and "
                             f"the folder holds Python code ({code[0]}); {NEVER}")
    tokenizer_class = tokenizer.get("tokenizer_class")
    if tokenizer.get("auto_map") and not (isinstance(tokenizer_class, str) and tokenizer_class_from_name(tokenizer_class)):
        raise ModelError(f"{name}: its tokenizer_config.json asks to run the folder's own Python code (auto_map); "
                         f"{NEVER}")


_PARSED: set[tuple[str, int, int]] = set()  # .gguf files (as they are now) this process has parsed whole


def _identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _parsed_before(path: Path) -> bool:
    """Whether this .gguf, as it is now, parsed whole before: in this process (a run's early check, then its load) or
    when its cached conversion was made."""
    if _identity(path) in _PARSED:
        return True
    try:
        return (embedded.gguf_target(path) / "config.json").is_file()
    except OSError:  # an unreadable INFOPO_HOME: the load will say so; the check itself still runs
        return False


def read_gguf(path: Path):
    """The file's `gguf.GGUFReader` (header, metadata and tensor table parsed); a truncated or corrupt file is one
    line naming it, where transformers' own reader would stop with a bare `struct` error."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, struct.error, KeyError, IndexError, EOFError) as err:
        raise ModelError(f"{path}: not a readable GGUF file, truncated or corrupt ({first_line(err)})") from None


def adapter_weights(adapter: Path) -> Path | None:
    """The weights file of a peft adapter folder (safetensors, or the older .bin); None when it has neither."""
    return next((adapter / name for name in ADAPTER_WEIGHTS if (adapter / name).is_file()), None)


def adapter_digest(adapter: Path) -> str | None:
    """SHA-256 of an adapter's tensors (names, dtypes, shapes, values), whichever file holds them: the same weights
    re-saved (as peft's older .bin, or with other metadata) give the same digest. None: no weights, or unreadable."""
    import hashlib

    import torch

    if (weights := adapter_weights(adapter)) is None:
        return None
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(weights))
        else:
            tensors = torch.load(weights, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - any unreadable file: nothing to compare; loading it says why
        return None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        return None
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merged_mark(adapter: Path, base: str, related: Sequence[Path] = ()) -> dict[str, Any] | None:
    """What a merged export records of what it holds (MERGED_MARK; None: the adapter has no weights): the base (its
    full path where it is here), the adapter, and under `holds` every adapter whose change is in the weights: this
    one, the `related` ones (the adapter its run started from, the run's checkpoints) and whatever the base's own mark
    holds (a merge of a merge)."""
    if (weights := adapter_weights(adapter)) is None:
        return None
    holds = [{"adapter": str(folder.resolve()), "tensors_sha256": digest}
             for folder in (adapter, *related) if (digest := adapter_digest(folder))]
    inherited = held_adapters(base)
    holds += [entry for entry in inherited.get("holds", []) if isinstance(entry, dict)] if inherited else []
    here = Path(base).expanduser()
    return {"base": str(here.resolve()) if here.exists() else base, "adapter": str(adapter.resolve()),
            "adapter_sha256": files.sha256_file(weights), "holds": holds}


def mark_merged(folder: Path, adapter: Path, base: str, related: Sequence[Path] = ()) -> None:
    """Note in a merged export being written which adapters and base it holds (MERGED_MARK)."""
    if (mark := merged_mark(adapter, base, related)) is not None:
        files.write_json(folder / MERGED_MARK, mark)


def held_adapters(model: str) -> dict[str, Any] | None:
    """The merged mark of `model`: a merged export's MERGED_MARK, or the GGUF_MERGED_KEY of a GGUF that `infopo export
    --gguf` wrote (a GGUF is always the adapter merged into its base); None for any other model."""
    path = Path(model).expanduser()
    try:
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                return None
            field = read_gguf(path).fields.get(GGUF_MERGED_KEY)
            held = json.loads(str(field.contents())) if field is not None else None
        else:
            folder = known_folder(model)  # a local folder, or a merged export pushed to the hub, from its cached snapshot
            held = json.loads((folder / MERGED_MARK).read_text(encoding="utf-8")) if folder is not None else None
    except (OSError, ValueError, ModelError):  # no mark, or one that cannot be read: nothing to compare
        return None
    return held if isinstance(held, dict) else None


def check_not_merged_in(model: str, adapter: Path, flag: str) -> None:
    """Refuse to put `adapter` on `model` when `model` is an `infopo export --merged` (or `--gguf`) that already holds
    that very adapter (by its tensors; by its weights file for a mark of an earlier release): its change would count
    twice, and every answer and score would be of a model no one trained. A merged model with another adapter on top
    is a real use (a second round on an SFT merge) and passes."""
    held = held_adapters(model)
    adapter = Path(adapter).expanduser()
    if not held or (weights := adapter_weights(adapter)) is None:
        return
    digest = adapter_digest(adapter)
    entries = [entry for entry in held.get("holds", []) if isinstance(entry, dict)]
    if held.get("adapter_sha256") != files.sha256_file(weights) and not (
            digest and any(entry.get("tensors_sha256") == digest for entry in entries)):
        return
    raise ConfigError(f"{flag} {model} is a merged export that already holds the adapter {adapter}: putting it on "
                      f"again would apply it twice; pass the model it was trained on ({held.get('base', 'its base')}), "
                      f"or use {model} alone")
