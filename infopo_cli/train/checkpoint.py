"""Write run artefacts so that nothing is half-written and nothing the user had is overwritten."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infopo_cli import files
from infopo_cli.errors import OutputError


def save_adapter(model: nn.Module, tokenizer, folder: Path) -> None:
    """peft adapter + tokenizer into `folder` (loads with PeftModel.from_pretrained(base, folder)).

    Saved into a hidden sibling folder first and moved file by file, so an interrupted save never
    leaves a truncated adapter under the final name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(folder: Path, model: nn.Module, tokenizer, optimizer, scheduler, step: int,
                    state: dict[str, Any]) -> Path:
    """A resumable checkpoint: adapter, optimizer, schedule, step and RNG, renamed into place whole."""
    target = folder / f"checkpoint-{step}"
    with files.folder(target) as tmp:
        save_adapter(model, tokenizer, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, **state},
                   tmp / "training_state.pt")
    return target


def latest_checkpoint(run_dir: Path) -> Path:
    found = sorted((int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit() and (p / "training_state.pt").is_file())
    if not found:
        raise OutputError(f"{run_dir} has no checkpoint-N folder to resume from (runs save one on Ctrl-C and with --save-every)")
    return found[-1][1]


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler) -> int:
    """Restore adapter weights, optimizer, schedule and RNG; returns the step the checkpoint was taken at."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    state = torch.load(folder / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():  # LoRA dropout on the GPU draws from these
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])
