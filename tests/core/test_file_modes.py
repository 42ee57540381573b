"""Files infopo writes get the permissions a plain open() gives (0666 & ~umask), also those a library wrote through an
owner-only temporary of its own (safetensors saves 0600): an export must be readable by a service running as another
user, as the run's other files are."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from infopo_cli import files

UMASK = 0o027  # unlike both 0600 (mkstemp) and 0644 (the usual umask): the mode must come from the umask


@pytest.fixture
def umask() -> Iterator[int]:
    old = os.umask(UMASK)
    files._umask.cache_clear()  # read once per process
    try:
        yield UMASK
    finally:
        os.umask(old)
        files._umask.cache_clear()


def modes(root: Path) -> dict[str, int]:
    """Every entry under `root` (and `root`) with its permission bits."""
    found = {".": root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = path.stat().st_mode & 0o777
    return found


def write_like_a_library(folder: Path) -> None:
    """A safetensors file as safetensors writes it (0600) and a subfolder as mkdtemp makes it (0700)."""
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    sub = Path(tempfile.mkdtemp(dir=folder))
    sub.rename(folder / "sub")
    fd = os.open(folder / "sub" / "owner-only.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


def test_a_folder_written_whole_gets_usual_permissions_for_everything_in_it(tmp_path, umask):
    with files.folder(tmp_path / "merged") as tmp:
        write_like_a_library(tmp)
    assert modes(tmp_path / "merged") == {".": 0o750, "model.safetensors": 0o640, "sub": 0o750,
                                          "sub/owner-only.bin": 0o640}


def test_a_staged_file_or_folder_moved_into_place_gets_usual_permissions(tmp_path, umask):
    with files.staging(tmp_path) as tmp:
        write_like_a_library(tmp)
        files.move_into_place(tmp / "model.safetensors", tmp_path / "model.safetensors")
        files.move_into_place(tmp / "sub", tmp_path / "sub")
    assert modes(tmp_path) == {".": tmp_path.stat().st_mode & 0o777, "model.safetensors": 0o640, "sub": 0o750,
                               "sub/owner-only.bin": 0o640}


class SavesSafetensors(torch.nn.Module):
    """What checkpoint.py asks of a model and tokenizer: save_pretrained into a folder, weights by safetensors."""

    def save_pretrained(self, folder, **kwargs) -> None:
        save_file({"lora_A": torch.zeros(2)}, str(Path(folder) / "adapter_model.safetensors"))
        (Path(folder) / "adapter_config.json").write_text("{}")


def test_a_checkpoint_and_the_runs_adapter_get_usual_permissions(tmp_path, umask):
    from infopo_cli.train import checkpoint

    model = SavesSafetensors()
    target = checkpoint.save_checkpoint(tmp_path, model, model, {"step": 3}, keep=2)
    checkpoint.save_adapter(model, model, tmp_path)
    assert modes(target) == {".": 0o750, "adapter_model.safetensors": 0o640, "adapter_config.json": 0o640,
                             "training_state.pt": 0o640}
    assert (tmp_path / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o640


def test_export_merged_writes_usual_permissions(tmp_path, tiny_model, umask):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from infopo_cli.config import TrainConfig, to_toml
    from infopo_cli.export.merged import export_merged, from_run

    run = tmp_path / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(run)
    (run / "config.toml").write_text(to_toml(TrainConfig(model=str(tiny_model)).to_dict()))
    out = export_merged(from_run(run), tmp_path / "merged", log=lambda _: None)
    found = modes(out)
    assert found.pop(".") == 0o750 and found["model.safetensors"] == 0o640
    assert set(found.values()) == {0o640}, found
