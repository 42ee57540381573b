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
import os
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from infopo_cli import files
from infopo_cli.errors import ConfigError, OutputError, first_line

MANIFEST = "infopo-bundle.json"
COMPLETE = ".complete"  # in a cache entry: unpacked whole
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


class _Hashing(io.RawIOBase):
    """A file read through: the SHA-256 and size of exactly the bytes the archive took."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n)
        self.sha.update(chunk)
        self.size += len(chunk)
        return chunk


def write_bundle(run: Path, out: Path, checkpoint: Path | None = None) -> dict:
    """Pack `run` (and `checkpoint`) into `out`, the manifest last: each file's hash is of the very bytes archived, so
    a file that grows meanwhile (a run resumed while it is bundled) still gives a bundle that reads back. Links are
    followed: a bundle holds plain files. The file appears whole or not at all. Returns the manifest."""
    names = bundle_files(run, checkpoint)
    if "adapter_model.safetensors" not in names:
        raise ConfigError(f"{run} has no adapter yet (adapter_model.safetensors): bundle a finished run")
    files.check_free_space(out.parent, sum((run / name).stat().st_size for name in names))
    listed: dict[str, dict] = {}
    with files.replacing(out) as tmp:
        if out.name.lower().endswith(".zip"):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                for name in names:
                    with _changed_while_bundled(run, name), (run / name).open("rb") as source:
                        info = zipfile.ZipInfo(name, time.localtime(os.fstat(source.fileno()).st_mtime)[:6])
                        info.external_attr, info.compress_type = 0o100644 << 16, zipfile.ZIP_DEFLATED
                        with archive.open(info, "w", force_zip64=True) as sink:
                            reader = _Hashing(source)
                            while chunk := reader.read(CHUNK):
                                sink.write(chunk)
                    listed[name] = {"sha256": reader.sha.hexdigest(), "bytes": reader.size}
                archive.writestr(MANIFEST, _encoded(_manifest(run, checkpoint, listed)))
        else:
            mode = "w:gz" if out.name.lower().endswith((".tar.gz", ".tgz")) else "w"
            with tarfile.open(tmp, mode) as archive:
                for name in names:
                    with _changed_while_bundled(run, name), (run / name).open("rb") as source:
                        info = tarfile.TarInfo(name)
                        info.size, info.mtime, info.mode = os.fstat(source.fileno()).st_size, int(time.time()), 0o644
                        reader = _Hashing(source)  # tar copies exactly info.size bytes
                        archive.addfile(info, reader)
                    listed[name] = {"sha256": reader.sha.hexdigest(), "bytes": reader.size}
                data = _encoded(_manifest(run, checkpoint, listed))
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                archive.addfile(info, io.BytesIO(data))
    return _manifest(run, checkpoint, listed)


@contextmanager
def _changed_while_bundled(run: Path, name: str) -> Iterator[None]:
    """A run file that vanishes or shrinks while it is archived (a resumed run rotating its checkpoints): one line."""
    try:
        yield
    except (OSError, tarfile.TarError) as err:
        if isinstance(err, OSError) and err.errno is not None and err.errno in files.DISK_ERRNOS:
            raise  # a full disk is the output's problem: `replacing` words it
        why = (err.strerror or err) if isinstance(err, OSError) else err
        raise ConfigError(f"{run / name} changed while it was bundled ({why}); bundle again once the run is not being "
                          "written") from None


def _manifest(run: Path, checkpoint: Path | None, listed: dict[str, dict]) -> dict:
    return {"format": FORMAT, "run": run.resolve().name, "checkpoint": checkpoint.name if checkpoint else None,
            "files": listed}


def _encoded(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


@dataclass(frozen=True)
class _Member:
    name: str
    regular: bool
    open: object  # () -> binary stream


# what a damaged or unusual archive raises while it is read (zlib.error for a broken deflate stream, RuntimeError for
# an encrypted zip entry, NotImplementedError for an unknown compression method)
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, NotImplementedError,
                  ValueError, OSError)


def _unreadable(path: Path, err: BaseException) -> BundleError:
    text = first_line(err, "damaged").rstrip(":")  # tarfile's "could not be opened successfully:" lists methods below
    return BundleError(f"{path}: not a readable bundle ({text})")


@contextmanager
def _members(path: Path) -> Iterator[list[_Member]]:
    """The archive's entries as (name, is a regular file, opener); an archive that cannot be opened is a BundleError
    (errors while reading a member are the reader's to word: `_read`)."""
    if not path.is_file():
        raise BundleError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        archive = zipfile.ZipFile(path) if path.name.lower().endswith(".zip") else tarfile.open(path, "r:*")
        if isinstance(archive, zipfile.ZipFile):
            members = [_Member(info.filename, not info.is_dir() and (info.external_attr >> 16) & 0o170000 in (0, 0o100000),
                               lambda info=info: archive.open(info)) for info in archive.infolist()]
        else:
            members = [_Member(info.name, info.isreg(), lambda info=info: archive.extractfile(info))
                       for info in archive.getmembers()]
    except ARCHIVE_ERRORS as err:
        raise _unreadable(path, err) from None
    with archive:
        yield members


def _read(path: Path, stream: IO[bytes], n: int) -> bytes:
    try:
        return stream.read(n)
    except ARCHIVE_ERRORS as err:
        raise _unreadable(path, err) from None


def _safe_name(name: str) -> bool:
    """A plain relative POSIX path: no absolute path, `..`, `.`, backslash or drive colon; as the writer writes it."""
    parts = name.split("/")
    return all(part not in ("", ".", "..") for part in parts) and "\\" not in name and ":" not in name


def read_manifest(path: Path) -> dict:
    """The bundle's manifest, checked for shape (its files are checked when unpacked)."""
    with _members(path) as members:
        first = next((m for m in members if m.name == MANIFEST and m.regular), None)
        if first is None:
            raise BundleError(f"{path}: not an infopo bundle (no {MANIFEST}; write one with `infopo export RUN --bundle`)")
        try:
            opened = first.open()
        except ARCHIVE_ERRORS as err:
            raise _unreadable(path, err) from None
        try:
            manifest = json.loads(_read(path, opened, CHUNK))
        except (ValueError, UnicodeDecodeError):
            raise BundleError(f"{path}: its {MANIFEST} is not valid JSON") from None
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or type(manifest.get("format")) is not int or manifest["format"] != FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format') if isinstance(manifest, dict) else '?'} "
                          f"(this infopo reads format {FORMAT})")
    if not isinstance(listed, dict) or not all(
            isinstance(name, str) and _safe_name(name) and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and type(entry.get("bytes")) is int and entry["bytes"] >= 0 for name, entry in listed.items()):
        raise BundleError(f"{path}: its {MANIFEST} lists files in a shape infopo does not write (refused)")
    if not isinstance(manifest.get("run"), str) or not _safe_name(manifest["run"]) or "/" in manifest["run"] \
            or manifest["run"].startswith("."):
        raise BundleError(f"{path}: its {MANIFEST} names no run")
    return manifest


def check_target(into: Path) -> None:
    """Where a bundle will be unpacked: a new folder (checked before anything is read or written)."""
    if os.path.lexists(into):
        raise OutputError(f"{into} already exists; move it away or resume it directly (nothing was unpacked)")
    files.check_writable(into, "unpacking into")


def unpack(path: Path, into: Path) -> Path:
    """Check every file of the bundle `path` against its manifest while writing it under `into` (a new folder);
    returns `into`. Any mismatch removes what was written and raises a BundleError naming the file."""
    manifest = read_manifest(path)
    listed = manifest["files"]
    check_target(into)
    _make_folder(into.parent)
    files.check_free_space(into.parent, sum(entry["bytes"] for entry in listed.values()))
    with files.staging(into.parent) as scratch:
        seen: set[str] = set()
        with _members(path) as members:
            for member in members:
                if member.name == MANIFEST or (member.name.endswith("/") and not member.regular):
                    continue  # the manifest itself; a folder entry of a zip
                if member.name not in listed or not member.regular or member.name in seen:
                    raise BundleError(f"{path}: {member.name} is not a file its manifest lists (refused; nothing was kept)")
                _copy_checked(path, member, listed[member.name], scratch / member.name)
                seen.add(member.name)
        if missing := sorted(set(listed) - seen):
            raise BundleError(f"{path}: {missing[0]} is listed in its manifest but missing (refused; nothing was kept)")
        files.move_into_place(scratch, into)  # whole at once, with the usual permissions
    return into


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {folder}: {err.strerror or err}") from None


@contextmanager
def _writes(target: Path) -> Iterator[IO[bytes]]:
    try:
        sink = target.open("wb")
    except OSError as err:
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
    with sink:
        yield sink


def _copy_checked(path: Path, member: _Member, entry: dict, target: Path) -> None:
    """One member written to `target` while its size and hash are checked against the manifest's `entry`."""
    _make_folder(target.parent)
    try:
        source = member.open()
    except ARCHIVE_ERRORS as err:
        raise _unreadable(path, err) from None
    sha, size = hashlib.sha256(), 0
    with source, _writes(target) as sink:
        while chunk := _read(path, source, CHUNK):
            size += len(chunk)
            if size > entry["bytes"]:
                break
            sha.update(chunk)
            try:
                sink.write(chunk)
            except OSError as err:
                raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
    if size != entry["bytes"] or sha.hexdigest() != entry["sha256"]:
        raise BundleError(f"{path}: {member.name} does not match its manifest (changed or damaged; refused, nothing "
                          "was kept)")


def cached(path: Path) -> Path:
    """The bundle unpacked once into infopo's cache (keyed by the bundle's own hash), for reading (`generate`). Each
    reader unpacks into a folder of its own and renames it into place, so two first readers never meet half a copy."""
    manifest = read_manifest(path)
    with path.open("rb") as fh:
        key, _ = _digest(fh)
    folder = files.infopo_home() / "bundles" / key[:16]
    run = folder / manifest["run"]
    if (folder / COMPLETE).is_file():
        return run
    _make_folder(folder.parent)
    with files.staging(folder.parent) as scratch:
        unpack(path, scratch / "entry" / manifest["run"])
        (scratch / "entry" / COMPLETE).write_text("")
        for _ in range(3):  # another reader may win (its copy is complete), or a crashed one left a partial folder
            try:
                os.rename(scratch / "entry", folder)
                return run
            except OSError:
                if (folder / COMPLETE).is_file():
                    return run
                try:
                    files.remove_tree(folder)  # a partial entry: moved aside first, so no reader sees it half gone
                except OutputError:
                    pass  # another reader removed it first
        raise OutputError(f"cannot place the unpacked bundle at {folder}; remove that folder and try again")
