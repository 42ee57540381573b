"""An `auto` run that runs out of memory in a step runs the step again with every layer recomputed, exactly
(train/memory_fallback.py), and gives up with the usual out-of-memory stop only after a second one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infopo_cli.config import TrainConfig
from infopo_cli.model import recompute as recomputation
from infopo_cli.presets import load_preset
from infopo_cli.train import checkpoint, recipe
from infopo_cli.train.recipe import TIMING_KEYS

from conftest import weight_differences


def cfg_for(tiny_model, pairs_file, output, **kw) -> TrainConfig:
    """LoRA dropout, so a retried step must replay the same RNG; two micro-batches a step (forward passes 2k-1, 2k)."""
    values = dict(model=str(tiny_model), data=str(pairs_file), eval_data="", output=str(output), dtype="fp32", lora_r=4,
                  lora_alpha=8, lora_dropout=0.1, max_steps=5, batch_size=2, grad_accum=2, lr=1e-2, max_length=128,
                  max_prompt_length=64)
    return TrainConfig(**{**values, **kw})


class Notes(recipe.Reporter):
    def __init__(self, console=None) -> None:
        super().__init__(console)
        self.lines: list[str] = []

    def note(self, message: str) -> None:
        self.lines.append(message)
        super().note(message)


def out_of_memory_at(monkeypatch, calls: set[int]) -> list[list[bool]]:
    """The recipe's training forward passes numbered in `calls` (1-based) raise CUDA's out-of-memory error; returns
    the list of which decoder layers recompute at each pass."""
    real, count, recomputing = recipe.pair_logps, [0], []

    def patched(model, *args, **kwargs):
        count[0] += 1
        recomputing.append(flags(model))
        if count[0] in calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(recipe, "pair_logps", patched)
    return recomputing


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def flags(model: torch.nn.Module) -> list[bool]:
    return [layer.gradient_checkpointing for layer in recomputation.decoder_layers(model)]


def test_an_out_of_memory_step_runs_again_recomputing_every_layer_and_the_run_is_unchanged(tiny_model, pairs_file,
                                                                                          tmp_path, monkeypatch):
    straight = recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / "straight"))
    # the second micro-batch of step 3: the first one's dropout masks drawn and its gradients accumulated
    recomputing = out_of_memory_at(monkeypatch, {6})
    notes = Notes()
    run_dir = tmp_path / "run"
    summary = recipe.train(cfg_for(tiny_model, pairs_file, run_dir), notes)
    assert summary.status == "completed" and summary.exit_code == 0 and summary.steps == 5
    said = [line for line in notes.lines if "out of memory" in line]
    assert said == ["out of memory at step 3: running the step again with every layer recomputed "
                    "(--gradient-checkpointing on from now on; config.toml says so for --resume)"]
    # auto kept both layers whole (the tiny model fits the free RAM); from the retry on both recompute
    assert recomputing == [[False, False]] * 6 + [[True, True]] * 6  # steps 3 (again), 4 and 5
    assert load_preset(str(run_dir / "config.toml")).gradient_checkpointing == "on"
    # the same steps, losses and weights as the run that never ran out: recomputation changes no gradient
    assert records(run_dir) == records(Path(straight.output))
    want, got = (load_file(str(folder / "adapter_model.safetensors")) for folder in (Path(straight.output), run_dir))
    assert not weight_differences(want, got), weight_differences(want, got)


def test_a_second_out_of_memory_in_the_step_stops_with_exit_3_and_the_resume_command(tiny_model, pairs_file,
                                                                                     tmp_path, monkeypatch):
    out_of_memory_at(monkeypatch, {5, 6})  # step 3, and the first micro-batch of its second try
    notes = Notes()
    run_dir = tmp_path / "run"
    summary = recipe.train(cfg_for(tiny_model, pairs_file, run_dir), notes)
    assert summary.status == "out of memory" and summary.exit_code == 3 and summary.steps == 2
    assert sum("running the step again" in line for line in notes.lines) == 1  # one retry a step
    assert "memory at step 3" in summary.message
    assert f"continue with: infopo train --resume {run_dir} --batch-size 1 --grad-accum 4" in summary.message
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["checkpoint-2"]
    assert load_preset(str(run_dir / "config.toml")).gradient_checkpointing == "on"  # the resume goes on recomputing


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_given_setting_is_not_retried(tiny_model, pairs_file, tmp_path, monkeypatch, mode):
    out_of_memory_at(monkeypatch, {3})  # step 2
    notes = Notes()
    summary = recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / "run", gradient_checkpointing=mode, max_steps=2), notes)
    assert summary.status == "out of memory" and summary.exit_code == 3 and summary.steps == 1
    assert not any("running the step again" in line for line in notes.lines)


def test_recompute_more_goes_to_every_layer_then_offload_only_on_a_gpu(tiny_model):
    from infopo_cli.model import stack
    from infopo_cli.model.precision import Precision

    cfg = TrainConfig(dtype="fp32", lora_r=4, lora_alpha=8)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, Precision("cpu", torch.float32, "test")), cfg,
                              recomputation.Recompute(1))
    assert flags(model) == [True, False]
    more = recomputation.recompute_more(model, recomputation.Recompute(1))
    assert more is not None and more.layers is None and not more.offload and flags(model) == [True, True]
    # every layer recomputes already, and a CPU has nothing to offload to
    assert recomputation.recompute_more(model, more) is None
    assert recomputation.recompute_more(model, recomputation.Recompute(2)) is None


class OtherProcess:
    """The collectives of a 2-process run as this process sees them: `answers` are what `World.any` returns."""

    active = True

    def __init__(self, *answers: bool) -> None:
        self.answers, self.asked = list(answers), []

    def any(self, flag: bool) -> bool:
        self.asked.append(flag)
        return self.answers.pop(0)


def test_where_another_process_ran_its_step_again_this_one_recomputes_as_much_without_a_rerun(tiny_model):
    from infopo_cli.model import stack
    from infopo_cli.model.precision import Precision
    from infopo_cli.train.distributed import World
    from infopo_cli.train.memory_fallback import Fallback

    cfg = TrainConfig(dtype="fp32", lora_r=4, lora_alpha=8)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, Precision("cpu", torch.float32, "test")), cfg,
                              recomputation.Recompute(0))
    said, recorded = [], []
    fallback = Fallback(model, [], recomputation.Recompute(0), said.append, recorded.append)
    fallback.agree(World(), 1)  # one process: no collective, nothing to agree on
    quiet = OtherProcess(False)
    fallback.agree(quiet, 1)  # no process ran out: one collective, nothing changes
    assert quiet.asked == [False] and flags(model) == [False, False] and fallback.mode is None
    other = OtherProcess(True, False)  # another process ran its step again, recomputing every layer (not offloaded)
    fallback.agree(other, 2)
    assert other.asked == [False, False] and flags(model) == [True, True] and fallback.mode == "on"
    assert recorded == ["on"] and said == [
        "out of memory at step 2 in another process, which ran the step again: every layer recomputed on every process "
        "from now on (--gradient-checkpointing on; config.toml says so for --resume)"]
    again = OtherProcess(True, False)  # it did so once more, where this process already recomputes every layer
    fallback.agree(again, 3)
    assert len(again.asked) == 2 and recorded == ["on"] and len(said) == 1
    # a given setting is never retried: nothing to agree on, so no collective in any step
    Fallback(model, [], None, said.append, recorded.append).agree(OtherProcess(), 4)


def test_recompute_as_brings_a_model_to_a_setting_and_leaves_one_that_does_as_much(tiny_model):
    from infopo_cli.model import stack
    from infopo_cli.model.precision import Precision

    cfg = TrainConfig(dtype="fp32", lora_r=4, lora_alpha=8)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, Precision("cpu", torch.float32, "test")), cfg,
                              recomputation.Recompute(1))
    on = recomputation.recompute_as(model, recomputation.Recompute(1), "on")
    assert (on.layers, on.offload, on.message) == (None, False, "every layer recomputed") and flags(model) == [True, True]
    # offload needs a GPU: on a CPU every layer recomputes, nothing is copied
    assert recomputation.recompute_as(model, on, "offload") == on and flags(model) == [True, True]
