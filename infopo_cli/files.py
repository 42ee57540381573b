"""File safety in one place: where infopo keeps its files, claiming outputs without overwriting anything,
free-space checks, and writes that a reader sees whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infopo_cli.errors import OutputError


def usual_permissions(path: Path | str) -> None:
    """mkstemp/mkdtemp create owner-only files (0600/0700); give what the user's umask gives a new file.

    Otherwise an exported GGUF could not be read by an Ollama service running as another user.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def write_text(path: Path, text: str) -> None:
    """Atomic: a reader sees the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    usual_permissions(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def folder(target: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; when the block succeeds it replaces `target` whole.

    A crash or Ctrl-C inside the block leaves `target` as it was (and no temporary folder behind).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        usual_permissions(tmp)
        if target.exists():  # callers decide beforehand whether replacing is allowed
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def infopo_home() -> Path:
    return Path(os.environ.get("INFOPO_HOME") or Path.home() / ".cache" / "infopo")


def claim_output_dir(path: Path) -> Path:
    """Create the run folder; refuse one that already holds anything."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputError(f"{path} already exists and is not empty; choose another --output (nothing was overwritten)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder {path}: {err.strerror}") from None
    return path


def claim_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; choose another name or pass --overwrite (nothing was written)")


def check_free_space(folder: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 1.05:
        raise OutputError(f"not enough disk space in {folder}: need about {needed_bytes / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB free")
