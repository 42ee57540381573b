"""File safety: atomic and durable writes, folder replacement that never loses the old one, the clean-up
of what a crash left, one-line disk errors, and the run lock."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infopo_cli import files
from infopo_cli.errors import OutputError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def run_and_die(code: str) -> None:
    """Run `code` in a fresh interpreter that dies with os._exit: a crash, with no clean-up of any kind."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert out.returncode == 9, out.stderr


def make_folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights.bin").write_text(text)
    return path


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "Error" not in message, message
    return message


def fail_moving_into(target: Path, real):
    """os.replace / os.rename that fail for the new folder going in (not for the old one going back)."""
    def move(src, dst):
        if Path(dst) == target and "infopo-old" not in str(src):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)
    return move


def test_a_failed_rename_into_place_keeps_the_old_folder(tmp_path, monkeypatch):
    target = make_folder(tmp_path / "checkpoint-4", "old")
    monkeypatch.setattr(os, "replace", fail_moving_into(target, os.replace))
    monkeypatch.setattr(os, "rename", fail_moving_into(target, os.rename))
    with pytest.raises(OutputError) as err:
        with files.folder(target) as tmp:
            (tmp / "weights.bin").write_text("new")
    assert one_line_naming(err, target).startswith(f"cannot write {target}: Input/output error")
    assert (target / "weights.bin").read_text() == "old"
    assert os.listdir(tmp_path) == ["checkpoint-4"]  # no temporary left behind


def test_a_crash_while_replacing_a_folder_loses_nothing(tmp_path):
    """Killed at the moment the new folder would be renamed into place: the old one is still there or,
    moved aside, put back by clean_temporaries."""
    target = make_folder(tmp_path / "merged", "old")
    run_and_die(f"""
        import os
        from pathlib import Path
        from infopo_cli import files
        target = Path({str(target)!r})
        for name in ("replace", "rename"):
            real = getattr(os, name)
            def crash_on_target(src, dst, _real=real):
                if Path(dst) == target and "infopo-old" not in str(src):
                    os._exit(9)
                return _real(src, dst)
            setattr(os, name, crash_on_target)
        with files.folder(target) as tmp:
            (tmp / "weights.bin").write_text("new")
        """)
    repairs = files.clean_temporaries(tmp_path)
    assert (target / "weights.bin").read_text() == "old", repairs
    assert os.listdir(tmp_path) == ["merged"]
    assert any("restored" in line for line in repairs) and any("removed" in line for line in repairs)


def test_write_text_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda s, d: (events.append(("replace", Path(d))), real_replace(s, d))[1])
    files.write_json(path, {"steps": 4})
    assert json.loads(path.read_text()) == {"steps": 4}
    file_synced = events.index(("fsync", path.stat().st_ino))
    renamed = events.index(("replace", path))
    assert file_synced < renamed < events.index(("fsync", tmp_path.stat().st_ino))


@pytest.mark.parametrize("where", ["write_text", "replacing", "folder"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_version(where, tmp_path, monkeypatch):
    path = tmp_path / "out"
    if where == "folder":
        make_folder(path, "old")
        with pytest.raises(OutputError) as err, files.folder(path) as tmp:
            (tmp / "weights.bin").write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what the library writing into it raises
        kept = (path / "weights.bin").read_text()
    else:
        path.write_text("old")
        if where == "write_text":  # the kernel reports a full disk at write or at fsync
            monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(ENOSPC))
            with pytest.raises(OutputError) as err:
                files.write_text(path, "new")
        else:
            with pytest.raises(OutputError) as err, files.replacing(path) as tmp:
                tmp.write_text("partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        kept = path.read_text()
    assert one_line_naming(err, path) == f"cannot write {path}: No space left on device"
    assert kept == "old" and os.listdir(tmp_path) == ["out"]


def test_other_errors_inside_a_block_are_the_callers(tmp_path):
    """A missing input file read inside the block is not a write error: it propagates unchanged."""
    with pytest.raises(FileNotFoundError), files.folder(tmp_path / "out"):
        (tmp_path / "missing").read_text()
    assert os.listdir(tmp_path) == []


def test_replacing_gives_a_sibling_with_the_suffix_and_usual_permissions(tmp_path):
    path = tmp_path / "plot.png"
    with files.replacing(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.png.infopo-tmp-")
        tmp.write_bytes(b"png")
    assert path.read_bytes() == b"png" and os.listdir(tmp_path) == ["plot.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_clean_temporaries_removes_what_a_killed_writer_left_and_spares_a_live_one(tmp_path):
    (tmp_path / "model.gguf").write_text("old")
    make_folder(tmp_path / "checkpoint-2", "old")
    run_and_die(f"""
        import os
        from pathlib import Path
        from infopo_cli import files
        folder = Path({str(tmp_path)!r})
        with files.replacing(folder / "model.gguf") as tmp, files.folder(folder / "checkpoint-2") as new:
            tmp.write_text("half a GGUF")
            (new / "weights.bin").write_text("half")
            os._exit(9)
        """)
    assert len(os.listdir(tmp_path)) == 4
    (tmp_path / ".notes.txt").write_text("the user's")  # hidden, but not ours
    with files.replacing(tmp_path / "other.gguf") as live:  # this process is still writing it
        live.write_text("in progress")
        assert len(files.clean_temporaries(tmp_path)) == 2
        assert live.exists()
    assert sorted(os.listdir(tmp_path)) == [".notes.txt", "checkpoint-2", "model.gguf", "other.gguf"]
    assert (tmp_path / "model.gguf").read_text() == "old" and files.clean_temporaries(tmp_path) == []
    assert files.clean_temporaries(tmp_path / "missing") == []


def test_an_old_folder_whose_replacement_is_in_place_is_removed(tmp_path):
    """Killed after the new folder went in but before the old one was deleted."""
    target = tmp_path / "merged"
    run_and_die(f"""
        import os, shutil
        from pathlib import Path
        from infopo_cli import files
        target = Path({str(target)!r})
        target.mkdir()
        shutil.rmtree = lambda *a, **k: os._exit(9)
        with files.folder(target) as tmp:
            (tmp / "weights.bin").write_text("new")
        """)
    assert len(os.listdir(tmp_path)) == 2
    assert files.clean_temporaries(tmp_path)[0].startswith("removed")
    assert os.listdir(tmp_path) == ["merged"] and (target / "weights.bin").read_text() == "new"


def write_lock(folder: Path, **record) -> Path:
    """The record a run leaves in its lock file; nobody holds the lock itself."""
    folder.mkdir(exist_ok=True)
    path = folder / files.LOCK_NAME
    path.write_text(json.dumps({"hostname": socket.gethostname(), "command": "infopo train",
                                "started": "2025-01-01 10:00:00", **record}))
    return path


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    with files.RunLock(tmp_path / "run") as lock:
        assert lock.took_over is None and (tmp_path / "run" / ".infopo.lock").is_file()
        holder = json.loads((tmp_path / "run" / ".infopo.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["hostname"] == socket.gethostname()
        with pytest.raises(OutputError) as err:
            files.RunLock(tmp_path / "run").acquire()
        message = one_line_naming(err, tmp_path / "run")
        assert message.startswith(f"{tmp_path / 'run'} is in use by another infopo run (pid {os.getpid()} on "
                                  f"{socket.gethostname()}, started {holder['started']}: ")
        assert message.endswith("); wait for it to finish or stop it")
    assert not (tmp_path / "run" / ".infopo.lock").exists()  # released
    with files.RunLock(tmp_path / "run"):  # and free again
        pass


@pytest.mark.skipif(files.fcntl is None, reason="flock exists on POSIX systems only")
def test_a_run_in_another_process_holds_the_lock_until_it_dies_however_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from infopo_cli.files import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"in use by another infopo run \\(pid {holder.pid} on "):
            files.RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no chance to release
        holder.wait()
    with files.RunLock(tmp_path) as lock:  # the kernel dropped the flock; the record it left is taken over
        assert lock.took_over == (f"took over the lock of pid {holder.pid} on {socket.gethostname()}, "
                                  "which ended without releasing it")
        assert json.loads((tmp_path / ".infopo.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".infopo.lock").exists()


def test_a_record_left_by_a_run_on_another_machine_is_taken_over_and_named(tmp_path):
    """A SLURM job requeued on another node, a container replaced after a kill: nobody holds the flock."""
    write_lock(tmp_path, pid=4242, hostname="gpu-node-7")
    with files.RunLock(tmp_path) as lock:
        assert lock.took_over == "took over the lock of pid 4242 on gpu-node-7, which ended without releasing it"


def test_a_torn_lock_file_is_taken_over(tmp_path):
    path = tmp_path / files.LOCK_NAME
    path.write_text('{"pid": 12')
    with files.RunLock(tmp_path) as lock:
        assert lock.took_over == f"took over the unreadable lock file {path}"


def test_release_leaves_a_lock_file_that_is_no_longer_ours(tmp_path):
    lock = files.RunLock(tmp_path).acquire()
    (tmp_path / files.LOCK_NAME).unlink()
    path = write_lock(tmp_path, pid=1, command="theirs")  # another run's lock file in its place
    lock.release()
    assert json.loads(path.read_text())["command"] == "theirs"


def test_a_run_folder_holding_only_its_lock_can_be_claimed(tmp_path):
    with files.RunLock(tmp_path / "run"):
        files.claim_output_dir(tmp_path / "run")
        (tmp_path / "run" / "config.toml").write_text("")
        with pytest.raises(OutputError, match="not empty"):
            files.claim_output_dir(tmp_path / "run")


def test_remove_tree_never_leaves_a_partial_folder_under_its_name(tmp_path):
    checkpoint = make_folder(tmp_path / "checkpoint-2", "old")
    run_and_die(f"""
        import os, shutil
        from infopo_cli import files
        shutil.rmtree = lambda *a, **k: os._exit(9)  # killed half-way through deleting
        files.remove_tree({str(checkpoint)!r})
        """)
    assert not checkpoint.exists() and len(os.listdir(tmp_path)) == 1
    assert files.clean_temporaries(tmp_path)[0].startswith("removed") and os.listdir(tmp_path) == []


def test_move_into_place_replaces_a_file_and_names_the_target_when_it_cannot(tmp_path, monkeypatch):
    src, dst = tmp_path / ".weights.tmp", tmp_path / "weights.bin"
    src.write_text("new")
    dst.write_text("old")
    files.move_into_place(src, dst)
    assert dst.read_text() == "new" and not src.exists()
    src.write_text("newer")
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(errno.EACCES, "x")))
    with pytest.raises(files.WriteError) as err:
        files.move_into_place(src, dst)
    assert (err.value.path, err.value.reason) == (dst, "Permission denied") and dst.read_text() == "new"
