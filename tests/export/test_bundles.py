"""`infopo export --bundle`: a run packed with a manifest of hashes, unpacked only when every file matches it, and
read back by `infopo generate BUNDLE` and `infopo train --resume BUNDLE`."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import tiny_cfg, write_pairs
from infopo_cli.bundles import MANIFEST, BundleError, read_manifest, unpack
from infopo_cli.errors import ConfigError, OutputError
from infopo_cli.export.bundle import export_bundle
from infopo_cli.inference.models import find_target
from infopo_cli.train import recipe


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """A finished 2-step run of the tiny model, with its checkpoints and scored-answer-free outputs."""
    folder = tmp_path_factory.mktemp("bundled")
    cfg = tiny_cfg(tiny_model, write_pairs(folder / "pairs.jsonl", 8), folder / "run", max_steps=2, eval_data="")
    recipe.train(cfg)
    return folder / "run"


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".zip"])
def test_round_trip_keeps_every_file(run, tmp_path, suffix):
    out = tmp_path / f"shared{suffix}"
    manifest = export_bundle(run, out, with_checkpoint=True)
    assert manifest["checkpoint"] == "checkpoint-2" and "checkpoint-2/training_state.pt" in manifest["files"]
    assert {"adapter_model.safetensors", "config.toml", "README.md", "metrics.jsonl"} <= set(manifest["files"])
    assert read_manifest(out) == manifest
    back = unpack(out, tmp_path / "back" / "run")
    for name in manifest["files"]:
        assert (back / name).read_bytes() == (run / name).read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        unpack(out, back)
    with pytest.raises(OutputError, match="already exists"):
        export_bundle(run, out)


def _rewrite_tar(source, target, change):
    """A copy of a tar bundle with `change(name, data) -> [(name, data), ...]` applied to each member."""
    with tarfile.open(source) as old, tarfile.open(target, "w") as new:
        for member in old.getmembers():
            for name, data in change(member.name, old.extractfile(member).read()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                new.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("tamper, message", [
    (lambda n, d: [(n, d[:-1] + bytes([d[-1] ^ 1]) if n == "config.toml" else d)], "config.toml does not match"),
    (lambda n, d: [(n, d)] + ([("extra.py", b"print('hi')")] if n == "config.toml" else []), "extra.py is not a file"),
    (lambda n, d: [] if n == "metrics.jsonl" else [(n, d)], "metrics.jsonl is listed in its manifest but missing"),
    (lambda n, d: [("../evil" if n == "config.toml" else n, d)], "../evil is not a file"),
])
def test_a_tampered_bundle_is_refused_and_leaves_nothing(run, tmp_path, tamper, message):
    good = tmp_path / "good.tar"
    export_bundle(run, good)
    bad = tmp_path / "bad.tar"
    _rewrite_tar(good, bad, tamper)
    with pytest.raises(BundleError, match=message.replace(".", r"\.")):
        unpack(bad, tmp_path / "out" / "run")
    assert not (tmp_path / "out" / "run").exists() and not list((tmp_path / "out").iterdir())
    assert not (tmp_path / "evil").exists()


def test_a_manifest_that_lists_an_unsafe_path_or_no_manifest_is_refused(run, tmp_path):
    good = tmp_path / "good.zip"
    export_bundle(run, good)
    manifest = read_manifest(good)
    manifest["files"]["/etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr(MANIFEST, json.dumps(manifest))
    with pytest.raises(BundleError, match="a shape infopo does not write"):
        read_manifest(bad)
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as archive:
        archive.add(run / "config.toml", "config.toml")
    with pytest.raises(BundleError, match="not an infopo bundle"):
        read_manifest(plain)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="not a readable bundle"):
        read_manifest(tmp_path / "junk.tar")


def test_generate_reads_a_bundle_as_its_run(run, tmp_path, monkeypatch):
    monkeypatch.setenv("INFOPO_HOME", str(tmp_path / "home"))
    out = tmp_path / "shared.tar.gz"
    export_bundle(run, out)
    target = find_target(str(out), log=lambda _: None)
    assert target.kind == "run" and (target.path / "adapter_model.safetensors").is_file()
    assert find_target(str(out), log=lambda _: None).path == target.path  # unpacked once, then read from the cache
    digest = hashlib.sha256((run / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert hashlib.sha256((target.path / "adapter_model.safetensors").read_bytes()).hexdigest() == digest


def test_train_resumes_a_bundle_with_its_checkpoint(tiny_model, tmp_path):
    """A run stopped at step 2 of 4 (its checkpoint-4 removed), shared with its checkpoint, continues elsewhere."""
    import shutil

    cfg = tiny_cfg(tiny_model, write_pairs(tmp_path / "pairs.jsonl", 8), tmp_path / "first" / "run", max_steps=4,
                   save_every=2, eval_data="")
    recipe.train(cfg)
    stopped = tmp_path / "first" / "run"
    shutil.rmtree(stopped / "checkpoint-4")
    with_checkpoint, without = tmp_path / "full.tar", tmp_path / "light.tar"
    assert export_bundle(stopped, with_checkpoint, with_checkpoint=True)["checkpoint"] == "checkpoint-2"
    export_bundle(stopped, without)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [sys.executable, "-m", "infopo_cli", "train", "--resume"]
    out = subprocess.run(command + [str(without)], capture_output=True, text=True, cwd=elsewhere)
    assert out.returncode == 2 and "holds no checkpoint" in out.stderr
    out = subprocess.run(command + [str(with_checkpoint)], capture_output=True, text=True, cwd=elsewhere)
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = elsewhere / "runs" / "run"
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert (resumed / "checkpoint-4").is_dir() and "resuming after step 2 of 4" in out.stdout
    with pytest.raises(ConfigError, match="name the file"):
        export_bundle(stopped, tmp_path / "shared.rar")


def test_linked_run_files_are_bundled_as_plain_files_and_unpacked_readable(run, tmp_path):
    import shutil

    linked = tmp_path / "linked"
    shutil.copytree(run, linked)
    (linked / "report.md").unlink()
    (linked / "report.md").symlink_to(run / "report.md")  # as DVC or git-annex leave a run folder
    out = tmp_path / "linked.tar"
    export_bundle(linked, out)
    back = unpack(out, tmp_path / "back" / "run")
    assert (back / "report.md").read_bytes() == (run / "report.md").read_bytes()
    assert not (back / "report.md").is_symlink() and back.stat().st_mode & 0o755 == 0o755  # not mkdtemp's 0700


def test_damaged_archives_and_bad_places_are_one_line(run, tmp_path):
    good = tmp_path / "good.tar.gz"
    export_bundle(run, good)
    data = bytearray(good.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # a broken deflate stream in the middle
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="broken.tar.gz"):
        unpack(broken, tmp_path / "out" / "run")
    with pytest.raises(BundleError, match="no such file"):
        read_manifest(tmp_path / "missing.tar")
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        unpack(good, tmp_path / "afile" / "run")


def test_a_partial_cache_entry_is_replaced(run, tmp_path, monkeypatch):
    from infopo_cli.bundles import cached

    monkeypatch.setenv("INFOPO_HOME", str(tmp_path / "home"))
    out = tmp_path / "shared.tar"
    export_bundle(run, out)
    first = cached(out)
    (first.parent / ".complete").unlink()  # as a reader that crashed half-way would leave it
    (first / "adapter_model.safetensors").unlink()
    again = cached(out)
    assert again == first and (again / "adapter_model.safetensors").is_file() and (again.parent / ".complete").is_file()


def test_resume_dry_run_refuses_what_the_run_would(run, tmp_path):
    out = tmp_path / "full.tar"
    export_bundle(run, out, with_checkpoint=True)
    (tmp_path / "runs" / "run").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "infopo_cli", "train", "--resume", str(out), "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "runs/run already exists" in done.stderr


def test_a_run_file_vanishing_while_bundled_is_one_line_and_leaves_no_bundle(run, tmp_path, monkeypatch):
    import shutil

    from infopo_cli import bundles

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    real = bundles._Hashing.read

    def vanish(self, n=-1):  # the checkpoint rotated away mid-read, as a resumed run does
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(bundles._Hashing, "read", vanish)
    with pytest.raises(ConfigError, match="changed while it was bundled"):
        export_bundle(copy, tmp_path / "x.tar")
    monkeypatch.setattr(bundles._Hashing, "read", real)
    assert not (tmp_path / "x.tar").exists()


def test_odd_run_names_and_unwritable_targets_are_refused(run, tmp_path):
    good = tmp_path / "good.zip"
    export_bundle(run, good)
    manifest = read_manifest(good)
    with zipfile.ZipFile(good) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != MANIFEST}
    bad = tmp_path / "dot.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(MANIFEST, json.dumps({**manifest, "run": ".complete"}))
    with pytest.raises(BundleError, match="names no run"):
        read_manifest(bad)
    (tmp_path / "afile").write_text("")
    from infopo_cli.bundles import check_target

    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_target(tmp_path / "afile" / "sub")
    with zipfile.ZipFile(good) as archive:
        assert all(info.external_attr >> 16 == 0o100644 for info in archive.infolist() if info.filename != MANIFEST)
