"""What an export writes, claimed before any model loads: a user's file or folder is never replaced without
--overwrite, a place no file can go is said at once, and --overwrite never swaps away the folder the export
reads from or the one the user stands in. Standard library only."""

from __future__ import annotations

import os
from pathlib import Path

from infopo_cli import files
from infopo_cli.errors import ConfigError, OutputError
from infopo_cli.export.modelfile import modelfile_path


def claim_gguf(out: Path, overwrite: bool, flag: str = "--gguf") -> Path:
    """Claim OUT.gguf and its OUT.Modelfile; returns the Modelfile's path."""
    if not out.name or out.is_dir():
        raise OutputError(f"{flag} {out}: a folder; name the file to write, e.g. {out / 'model.gguf'}")
    if out.suffix.lower() != ".gguf":  # also keeps --overwrite off a run's own adapter_model.safetensors or config.toml
        raise ConfigError(f"{flag} {out}: name the file NAME.gguf (llama.cpp and Ollama go by the extension)")
    modelfile = modelfile_path(out)
    for path in (out, modelfile):
        if path.is_dir():
            raise OutputError(f"{path} is a folder; choose another name for {flag} (nothing was written)")
        files.claim_target(path, overwrite)
    files.check_writable(out, flag)
    return modelfile


def claim_folder(out: Path, adapter: Path, overwrite: bool) -> None:
    """Claim the --merged folder: a missing or empty one, or with --overwrite a folder that holds neither the
    adapter being exported nor the current folder (--overwrite replaces the whole folder)."""
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"--merged {out}: a file is there; --merged writes a folder (nothing was written)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out} already exists and is not empty; choose another folder or pass --overwrite "
                              "(nothing was written)")
        for held, what in ((adapter, "the adapter being exported"), (Path.cwd(), "the current folder")):
            if held.resolve().is_relative_to(out.resolve()):
                raise OutputError(f"--merged {out} holds {what} ({held}), which --overwrite would delete; choose "
                                  "another folder (nothing was written)")
    files.check_writable(out, "--merged")
