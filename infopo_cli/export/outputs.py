"""What an export writes, claimed before any model loads: a user's file or folder is never replaced without
--overwrite, a place no file can go is said at once, and --overwrite never swaps away the folder the export
reads from or the one the user stands in. Standard library only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from infopo_cli import files
from infopo_cli.errors import ConfigError, OutputError
from infopo_cli.export.modelfile import modelfile_path


def local_model(model: str) -> Path | None:
    """The file or folder a model name is here (None: a hub id or the embedded default)."""
    path = Path(model).expanduser()
    return path if os.path.lexists(path) else None


def claim_gguf(out: Path, overwrite: bool, flag: str = "--gguf", reads: Sequence[Path] = ()) -> Path:
    """Claim OUT.gguf and its OUT.Modelfile; returns the Modelfile's path. `reads`: the files the export reads (the
    base model's GGUF), which --overwrite must not replace."""
    if not out.name or out.is_dir():
        raise OutputError(f"{flag} {out}: a folder; name the file to write, e.g. {out / 'model.gguf'}")
    if out.suffix.lower() != ".gguf":  # also keeps --overwrite off a run's own adapter_model.safetensors or config.toml
        raise ConfigError(f"{flag} {out}: name the file NAME.gguf (llama.cpp and Ollama go by the extension)")
    modelfile = modelfile_path(out)
    for source in reads:
        if os.path.lexists(out) and out.resolve() == source.resolve():
            raise OutputError(f"{flag} {out} is the base model this export reads; choose another file (nothing was "
                              "written)")
    for path in (out, modelfile):
        if path.is_dir():
            raise OutputError(f"{path} is a folder; choose another name for {flag} (nothing was written)")
        files.claim_target(path, overwrite)
    files.check_writable(out, flag)
    return modelfile


def claim_folder(out: Path, adapter: Path, overwrite: bool, base: str | None = None) -> None:
    """Claim the --merged folder: a missing or empty one, or with --overwrite a folder that holds neither the
    adapter being exported, the base model it is merged into, nor the current folder (--overwrite replaces the whole
    folder)."""
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"--merged {out}: a file is there; --merged writes a folder (nothing was written)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out} already exists and is not empty; choose another folder or pass --overwrite "
                              "(nothing was written)")
        held_base = local_model(base) if base else None
        for held, what in ((adapter, "the adapter being exported"), (Path.cwd(), "the current folder"),
                           *([(held_base, "the base model the adapter is merged into")] if held_base else [])):
            if held.resolve().is_relative_to(out.resolve()):
                raise OutputError(f"--merged {out} holds {what} ({held}), which --overwrite would delete; choose "
                                  "another folder (nothing was written)")
    files.check_writable(out, "--merged")
