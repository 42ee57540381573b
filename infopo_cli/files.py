"""File safety in one place: where infopo keeps its files, claiming outputs without overwriting anything,
free-space checks, writes that a reader sees whole or not at all (and that survive a power cut), the
clean-up of what a crash left behind, and the lock that keeps two runs out of one folder.

Temporaries are hidden siblings of their target, named `.{target}.infopo-tmp-{pid}-{host}-{random}`
(and `.{target}.infopo-old-...` for a folder moved aside while its replacement goes in), so that
`clean_temporaries` can tell them from the user's files and leave alone those of a writer still running.
Standard library only: the CLI imports this module before it knows whether it needs torch.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infopo_cli.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is only a record there
    fcntl = None

TMP_MARK = ".infopo-tmp-"
OLD_MARK = ".infopo-old-"
LOCK_NAME = ".infopo.lock"
# Raised inside a caller's block these can only mean the write failed (not, say, a missing input file),
# so they become an OutputError there too; infopo's own file operations map every OSError.
DISK_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EROFS,
                                    errno.EIO) if e is not None)


# ---------------------------------------------------------------- errors


class WriteError(OutputError):
    """`cannot write PATH: REASON`; `path` and `reason` are kept for callers that add what is intact."""

    def __init__(self, path: Path, reason: str, note: str = "") -> None:
        self.path, self.reason = path, reason
        super().__init__(f"cannot write {path}: {reason}{note}")


def _reason(err: OSError) -> str:
    return os.strerror(err.errno) if err.errno else (str(err) or "input/output error")


@contextmanager
def _writing(path: Path, disk_only: bool = False) -> Iterator[None]:
    """An OSError in the block becomes a one-line WriteError naming `path` (only disk errors, if `disk_only`)."""
    try:
        yield
    except OSError as err:
        if disk_only and err.errno not in DISK_ERRNOS:
            raise
        raise WriteError(path, _reason(err)) from None


# ---------------------------------------------------------------- permissions and durability


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # Read once, from /proc where it can: os.umask can only be read by setting it, and another thread
    # creating a file in that instant would get the temporary value.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def usual_permissions(path: Path | str) -> None:
    """mkstemp/mkdtemp create owner-only files (0600/0700); give what the user's umask gives a new file.

    Otherwise an exported GGUF could not be read by an Ollama service running as another user.
    """
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def _usual_permissions_tree(root: Path | str) -> None:
    """`usual_permissions` for `root` and, for a folder, everything in it: libraries write files there as mkstemp does
    (safetensors saves through an owner-only temporary of its own), which a plain open() would not."""
    usual_permissions(root)
    for here, folders, names in os.walk(root):
        for name in folders + names:
            if not os.path.islink(os.path.join(here, name)):  # chmod would change the link's target
                usual_permissions(os.path.join(here, name))


def _fsync_path(path: Path | str) -> None:
    """Flush a file or folder to the disk. A folder's fsync makes the names in it (a rename) durable."""
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open a folder for fsync; NTFS journals renames itself
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # some file systems do not sync folders; nothing more can be done there
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for here, _, names in os.walk(root, topdown=False):
        for name in names:
            if not os.path.islink(os.path.join(here, name)):
                _fsync_path(os.path.join(here, name))
        _fsync_path(here)


# ---------------------------------------------------------------- temporaries


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    # Short, and free of '-' and '.', so that temporary names stay parseable whatever the host is called.
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _sibling_prefix(target: Path, mark: str) -> str:
    return f".{target.name}{mark}{os.getpid()}-{_host_tag()}-"


def temp_prefix(target: Path) -> str:
    """The name prefix (for mkstemp/mkdtemp, in `target`'s folder) of a temporary that clean_temporaries
    removes once this process is gone."""
    return _sibling_prefix(target, TMP_MARK)


def _parse_temporary(name: str) -> tuple[str, str, int, str] | None:
    """(mark, target name, writer's pid, writer's host tag) of one of our temporaries, else None."""
    for mark in (TMP_MARK, OLD_MARK):
        at = name.rfind(mark)
        if name.startswith(".") and at > 1:
            pid, host, *_ = name[at + len(mark):].split("-", 2) + ["", ""]
            if pid.isdigit() and host:
                return mark, name[1:at], int(pid), host
    return None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine; True where that cannot be checked."""
    if pid <= 0 or os.name != "posix":
        return True  # on Windows os.kill(pid, 0) would terminate the process rather than probe it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def _writer_gone(pid: int, host: str) -> bool:
    return host == _host_tag() and pid != os.getpid() and not _pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clean_temporaries(directory: Path | str) -> list[str]:
    """Remove the temporaries that crashed infopo writes left in `directory`; returns one line per repair.

    Only those whose writer is no longer running on this machine are touched. A folder that was moved
    aside for its replacement and whose target is now missing (a crash between the two renames) is put
    back rather than deleted.
    """
    directory = Path(directory)
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    done = []
    for name in names:
        parsed = _parse_temporary(name)
        if parsed is None or not _writer_gone(parsed[2], parsed[3]):
            continue
        path, target = directory / name, directory / parsed[1]
        try:
            if parsed[0] == OLD_MARK and not os.path.lexists(target):
                os.rename(path, target)
                done.append(f"restored {target}, which an interrupted replace had moved aside")
            else:
                _remove(path)
                done.append(f"removed {path}, left by an interrupted write")
        except OSError:
            continue  # left for the next clean-up; the write about to happen does not depend on it
    return done


# ---------------------------------------------------------------- atomic writes


@contextmanager
def replacing(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a library to write (GGUF writer, savefig, torch.save);
    when the block succeeds the file is synced and renamed over `path`, whole.

    The temporary keeps `path`'s suffix (savefig picks the format by it). On an exception `path` is
    untouched and the temporary removed; disk errors become an OutputError naming `path`.
    """
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=path.suffix, dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with _writing(path, disk_only=True):
            yield tmp
        move_into_place(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def move_into_place(src: Path | str, dst: Path | str) -> None:
    """Give a finished file (or folder) `src` the usual permissions, sync it and rename it over `dst` in one
    step (same file system), durably: a reader sees the old or the new. For a folder onto a missing or
    empty one; `folder()` replaces a whole folder.
    """
    src, dst = Path(src), Path(dst)
    with _writing(dst):
        _usual_permissions_tree(src)
        if src.is_dir():
            _fsync_tree(src)
        else:
            _fsync_path(src)
        os.replace(src, dst)
        _fsync_path(dst.parent)


def remove_tree(path: Path | str) -> None:
    """Delete a folder so that a crash half-way leaves no partial folder under its name: it is renamed to a
    temporary name first (which clean_temporaries finishes removing)."""
    path = Path(path)
    doomed = path.parent / f"{temp_prefix(path)}{secrets.token_hex(4)}"
    with _writing(path):
        os.rename(path, doomed)
        _fsync_path(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB pieces (an adapter or a weights shard need not fit in memory)."""
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        while piece := stream.read(1 << 20):
            sha.update(piece)
    return sha.hexdigest()


def write_bytes(path: Path | str, data: bytes) -> None:
    """Atomic and durable: a reader, even after a power cut, sees the old file or the new one, never a torn one."""
    with replacing(path) as tmp:
        with _writing(Path(path)), open(tmp, "wb") as fh:
            fh.write(data)


def write_text(path: Path | str, text: str) -> None:
    """`write_bytes` of `text` in UTF-8: a reader sees the old file or the new one, whole."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: Any) -> None:
    """`obj` as indented JSON, written like `write_text`."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def folder(target: Path | str, replace: bool = True) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; when the block succeeds it replaces `target` whole.

    The new folder is synced, an existing `target` renamed aside, the new one renamed into place, and
    only then the old one removed: at every instant one complete version exists under `target` or, after
    a crash between the renames, beside it, where `clean_temporaries` puts it back. An exception inside
    the block leaves `target` as it was and no temporary folder behind. With `replace=False` a `target`
    that appeared meanwhile (a concurrent writer of the same content) is kept and an OutputError raised.
    """
    target = Path(target)
    with _writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        with _writing(target, disk_only=True):
            yield tmp
        with _writing(target):
            _usual_permissions_tree(tmp)
            _fsync_tree(tmp)
            if replace:
                _swap_in(tmp, target)
            else:
                os.rename(tmp, target)  # fails on an existing non-empty folder, so theirs is never touched
                _fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, target: Path) -> None:
    old = None
    if os.path.lexists(target):  # callers decide beforehand whether replacing is allowed
        old = target.parent / f"{_sibling_prefix(target, OLD_MARK)}{secrets.token_hex(4)}"
        os.rename(target, old)
    try:
        os.replace(new, target)
    except BaseException as err:  # Ctrl-C included: put the old one back now rather than at the next clean-up
        if old is not None:
            try:
                os.rename(old, target)
            except OSError:
                if isinstance(err, OSError):
                    raise WriteError(target, _reason(err), f"; the previous version is kept as {old}, and the "
                                     "next infopo command in this folder puts it back") from None
        raise
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by the next clean_temporaries


# ---------------------------------------------------------------- the run lock


def _read_lock(path: Path) -> dict | None:
    """The record in a lock file; None when it is missing, empty, unreadable or torn."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


class RunLock:
    """`with RunLock(folder) as lock:` keeps other infopo runs from writing `folder` meanwhile.

    The lock is an advisory `flock` on `folder/.infopo.lock`. The kernel drops it however its holder ends
    (SIGKILL and crashes included), also for a run in another container on the same volume, so a dead
    run's lock never blocks anyone; no pid guessing. The file holds its holder's pid, host, command and
    start time, for the message. A record left by a run that ended without releasing is taken over and
    `took_over` says whose it was, for the caller to print. Where `flock` does not exist (Windows) the
    lock is only the record.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.took_over: str | None = None
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(),
                           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()

    def _who(self) -> str:
        holder = _read_lock(self.path) or {}
        who = f"pid {holder.get('pid', '?')} on {holder.get('hostname', '?')}, started {holder.get('started', '?')}"
        command = str(holder.get("command") or "")
        return who + (f": {command[:77] + '...' if len(command) > 80 else command}" if command else "")

    def _in_use(self) -> OutputError:
        return OutputError(f"{self.folder} is in use by another infopo run ({self._who()}); wait for it to finish or "
                           "stop it")

    def acquire(self) -> RunLock:
        """Take the folder's lock or raise at once (another run holds it); a lock file left by a dead run is taken over.
        """
        with _writing(self.path):
            self.folder.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._in_use() from None
                try:
                    same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:  # its holder released (removed) it between our open and our lock: again
                    os.close(fd)
                    continue
                size = os.fstat(fd).st_size  # a record here is one a run left when it ended without releasing
                left = _read_lock(self.path) if size else None
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._record(), 0)
                os.fsync(fd)
                self._fd = fd
                if left is not None:
                    self.took_over = (f"took over the lock of pid {left['pid']} on {left.get('hostname', '?')}, "
                                      "which ended without releasing it")
                elif size:
                    self.took_over = f"took over the unreadable lock file {self.path}"
                return self

    def holder(self) -> str | None:
        """Who holds this folder's lock now (another run training it), in words; None when no one does. Takes nothing."""
        if fcntl is None or not self.path.is_file():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return self._who()
        finally:
            os.close(fd)

    def release(self) -> None:
        """Drop the lock and remove its file if it is still ours; releasing twice does nothing."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:  # remove it only while it is still ours
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None


# ---------------------------------------------------------------- locations and claims


def infopo_home() -> Path:
    """Where infopo keeps its caches: $INFOPO_HOME, else ~/.cache/infopo."""
    return Path(os.environ.get("INFOPO_HOME") or Path.home() / ".cache" / "infopo")


def anchor_home() -> None:
    """A relative $INFOPO_HOME made absolute, as seen from the current folder: called before the process changes
    folder (`--resume` from another one), so the caches stay where the user pointed."""
    home = os.environ.get("INFOPO_HOME")
    if home and not Path(home).is_absolute():
        os.environ["INFOPO_HOME"] = str(Path(home).resolve())


def check_output_dir(path: Path) -> None:
    """A run folder must be new or empty (but for a lock: take the lock before or after claiming it)."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a folder; choose another --output (nothing was overwritten)")
    if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
        raise OutputError(f"{path} already exists and is not empty; choose another --output (nothing was overwritten)")


def claim_output_dir(path: Path) -> Path:
    """Create the run folder; refuse one that already holds anything (`check_output_dir`)."""
    check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder {path}: {_reason(err)}") from None
    return path


def claim_target(path: Path | str, overwrite: bool) -> None:
    """The one rule for a file or folder infopo writes outside a fresh run folder: an existing file, link or
    non-empty folder is refused unless `overwrite`. Call it before anything slow (a model load) starts."""
    claim_targets([path], overwrite)


def claim_targets(paths: list[Path | str], overwrite: bool) -> None:
    """`claim_target` for the several files one command writes (eval's .json, .jsonl and .md): all or none."""
    if overwrite:
        return
    for path in map(Path, paths):
        if os.path.lexists(path) and not (path.is_dir() and not path.is_symlink() and not any(path.iterdir())):
            raise OutputError(f"{path} already exists; choose another name or pass --overwrite (nothing was written)")


def check_writable(out: Path | str, flag: str) -> None:
    """The nearest existing folder above `out` must be one this process can create files in (checked before anything
    slow starts, so a typo in a path is not found after a model load)."""
    out = Path(out)
    existing = out.absolute().parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {out}: cannot write there, {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: cannot write in {existing} (permission denied)")


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse early when `folder` (or, before it is created, the nearest folder above it) lacks the room."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed_bytes * 1.05:
        raise OutputError(f"not enough disk space in {folder}: need about {needed_bytes / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB free")


@contextmanager
def staging(directory: Path | str) -> Iterator[Path]:
    """A temporary folder inside `directory` for a library that writes several files (save_pretrained);
    removed afterwards, and one left by a crash is a temporary `clean_temporaries` removes."""
    directory = Path(directory)
    with _writing(directory):
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(directory / "staging"), dir=directory))
    try:
        with _writing(directory, disk_only=True):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
