"""A run packed to share: `infopo export RUN --bundle OUT.tar` (or .tar.gz, .zip), and read back by `infopo generate
BUNDLE` and `infopo train --resume BUNDLE`.

A bundle holds what another person needs to use the run (adapter, tokenizer, config.toml, model card, metrics,
report, plot, scored answers) and, on request, its latest checkpoint to continue it, with `infopo-bundle.json`: every
file's size and SHA-256. Reading is strict, because a bundle comes from someone else: only regular files the
manifest lists, under relative paths without `..`, each exactly its listed size and hash, all present. Anything
else refuses the whole bundle in one line, and nothing of it is kept. Standard library only.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from infopo_cli import files
from infopo_cli.errors import ConfigError, OutputError

MANIFEST = "infopo-bundle.json"
FORMAT = 1
SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "config.toml", "README.md",
             "report.md", "metrics.jsonl", "summary.json", "plot.png")
CHUNK = 1 << 20


class BundleError(ConfigError):
    """A bundle that cannot be read as it claims to be (exit 2, one line)."""


def is_bundle(path: str | Path) -> bool:
    """Whether `path` names a bundle file (by its suffix; it need not exist)."""
    return str(path).lower().endswith(SUFFIXES)


def bundle_files(run: Path, checkpoint: Path | None = None) -> list[str]:
    """The run's files a bundle holds, relative to the run folder: RUN_FILES that exist, answers/*.jsonl, and every
    file of `checkpoint` (a checkpoint-N folder of the run) when given."""
    found = [name for name in RUN_FILES if (run / name).is_file()]
    found += sorted(str(p.relative_to(run)) for p in (run / "answers").glob("*.jsonl") if p.is_file())
    if checkpoint is not None:
        found += sorted(str(p.relative_to(run)) for p in checkpoint.rglob("*") if p.is_file())
    return found


def _digest(stream: IO[bytes]) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        sha.update(chunk)
        size += len(chunk)
    return sha.hexdigest(), size


def write_bundle(run: Path, out: Path, checkpoint: Path | None = None) -> dict:
    """Pack `run` (and `checkpoint`) into `out`, the manifest first; the file appears whole or not at all. Returns
    the manifest."""
    names = bundle_files(run, checkpoint)
    if "adapter_model.safetensors" not in names:
        raise ConfigError(f"{run} has no adapter yet (adapter_model.safetensors): bundle a finished run")
    listed = {}
    for name in names:
        with (run / name).open("rb") as fh:
            sha, size = _digest(fh)
        listed[name] = {"sha256": sha, "bytes": size}
    manifest = {"format": FORMAT, "run": run.resolve().name, "checkpoint": checkpoint.name if checkpoint else None,
                "files": listed}
    files.check_free_space(out.parent, sum(entry["bytes"] for entry in listed.values()))
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    with files.replacing(out) as tmp:
        if out.name.lower().endswith(".zip"):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(MANIFEST, data)
                for name in names:
                    archive.write(run / name, name)
        else:
            mode = "w:gz" if out.name.lower().endswith((".tar.gz", ".tgz")) else "w"
            with tarfile.open(tmp, mode) as archive:
                info = tarfile.TarInfo(MANIFEST)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
                for name in names:
                    archive.add(run / name, name, recursive=False)
    return manifest


@dataclass(frozen=True)
class _Member:
    name: str
    regular: bool
    open: object  # () -> binary stream


@contextmanager
def _members(path: Path) -> Iterator[list[_Member]]:
    """The archive's entries as (name, is a regular file, opener); an unreadable archive is a BundleError."""
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                yield [_Member(info.filename, not info.is_dir() and (info.external_attr >> 16) & 0o170000 in (0, 0o100000),
                               lambda info=info: archive.open(info)) for info in archive.infolist()]
        else:
            with tarfile.open(path, "r:*") as archive:
                yield [_Member(info.name, info.isreg(), lambda info=info: archive.extractfile(info))
                       for info in archive.getmembers()]
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise BundleError(f"{path}: not a readable bundle ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def _safe_name(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


def read_manifest(path: Path) -> dict:
    """The bundle's manifest, checked for shape (its files are checked when unpacked)."""
    if not path.is_file():
        raise BundleError(f"{path}: no such file")
    with _members(path) as members:
        first = next((m for m in members if m.name == MANIFEST and m.regular), None)
        if first is None:
            raise BundleError(f"{path}: not an infopo bundle (no {MANIFEST}; write one with `infopo export RUN --bundle`)")
        try:
            manifest = json.loads(first.open().read(CHUNK))
        except (ValueError, UnicodeDecodeError):
            raise BundleError(f"{path}: its {MANIFEST} is not valid JSON") from None
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != FORMAT if isinstance(manifest, dict) else True:
        raise BundleError(f"{path}: bundle format {manifest.get('format') if isinstance(manifest, dict) else '?'} "
                          f"(this infopo reads format {FORMAT})")
    if not isinstance(listed, dict) or not all(
            isinstance(name, str) and _safe_name(name) and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0 for name, entry in listed.items()):
        raise BundleError(f"{path}: its {MANIFEST} lists files in a shape infopo does not write (refused)")
    if not isinstance(manifest.get("run"), str) or not _safe_name(manifest["run"]) or "/" in manifest["run"]:
        raise BundleError(f"{path}: its {MANIFEST} names no run")
    return manifest


def unpack(path: Path, into: Path) -> Path:
    """Check every file of the bundle `path` against its manifest while writing it under `into` (a new folder);
    returns `into`. Any mismatch removes what was written and raises a BundleError naming the file."""
    manifest = read_manifest(path)
    listed = manifest["files"]
    if into.exists():
        raise OutputError(f"{into} already exists; move it away or resume it directly (nothing was unpacked)")
    into.parent.mkdir(parents=True, exist_ok=True)
    with files.staging(into.parent) as scratch:
        seen: set[str] = set()
        with _members(path) as members:
            for member in members:
                if member.name == MANIFEST:
                    continue
                if member.name.endswith("/") and not member.regular:
                    continue  # a folder entry of a zip
                if member.name not in listed or not member.regular or member.name in seen:
                    raise BundleError(f"{path}: {member.name} is not a file its manifest lists (refused; nothing was kept)")
                target = scratch / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                sha, size = hashlib.sha256(), 0
                with member.open() as source, target.open("wb") as sink:
                    while chunk := source.read(CHUNK):
                        size += len(chunk)
                        if size > listed[member.name]["bytes"]:
                            break
                        sha.update(chunk)
                        sink.write(chunk)
                if size != listed[member.name]["bytes"] or sha.hexdigest() != listed[member.name]["sha256"]:
                    raise BundleError(f"{path}: {member.name} does not match its manifest (changed or damaged; refused, "
                                      "nothing was kept)")
                seen.add(member.name)
        if missing := sorted(set(listed) - seen):
            raise BundleError(f"{path}: {missing[0]} is listed in its manifest but missing (refused; nothing was kept)")
        scratch.rename(into)  # whole at once: a reader never sees half a run
    return into


def cached(path: Path) -> Path:
    """The bundle unpacked once into infopo's cache (keyed by the bundle's own hash), for reading (`generate`)."""
    with path.open("rb") as fh:
        key, _ = _digest(fh)
    folder = files.infopo_home() / "bundles" / key[:16]
    run = folder / read_manifest(path)["run"]
    if (run / "adapter_config.json").is_file() and (folder / ".complete").is_file():
        return run
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    unpack(path, run)
    (folder / ".complete").write_text("")
    return run
