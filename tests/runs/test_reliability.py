"""A run survives every ordinary stop and carries on exactly: signals, SIGKILL, OOM, NaN, full disk, bad files.

The subprocess tests run the real `infopo train` command. To stop it at a known point they start it
through a small wrapper that pauses one training forward pass (after writing a marker file) so the test
can send its signal from outside while the step is in progress, until the test says it has (a "go" file, or a few
seconds); the wrapper changes nothing else.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from infopo_cli.config import TrainConfig
from infopo_cli.errors import CheckpointError, ConfigError, OutputError
from infopo_cli.presets import load_preset
from infopo_cli.train import checkpoint, recipe
from infopo_cli.train.recipe import TIMING_KEYS
from infopo_cli.train.resume import resumed_config

from conftest import (METRICS_ACROSS_PROCESSES, WEIGHTS_ACROSS_PROCESSES, at_forward, ctrl_c, first_difference,
                      weight_differences)

# One forward pass of the policy per micro-batch: with grad_accum 2, calls 2k-1 and 2k make step k.
PAUSING = """
import os, sys, time, pathlib
from infopo_cli.train import recipe
real, calls = recipe.pair_logps, [0]
def pausing(*args, **kwargs):
    calls[0] += 1
    out = real(*args, **kwargs)
    if calls[0] == int(os.environ["PAUSE_AT_CALL"]):
        marker = pathlib.Path(os.environ["PAUSE_MARKER"])
        marker.write_text("paused")
        go, until = marker.with_name("go"), time.monotonic() + float(os.environ.get("PAUSE_SECONDS", "4"))
        while not go.exists() and time.monotonic() < until:  # the test writes go once its signal is sent
            time.sleep(0.02)
    return out
recipe.pair_logps = pausing
sys.argv = ["infopo", *sys.argv[1:]]
from infopo_cli.cli import main
main()
"""


def preset_file(folder: Path, tiny_model: Path, data: Path, **extra) -> Path:
    """Dropout > 0 and accumulation 2, so RNG state and mid-step stops matter; eval and save every 2 steps."""
    values = {"model": str(tiny_model), "data": str(data), "eval_data": str(data), "dtype": "fp32", "lora_r": 4,
              "lora_alpha": 8, "lora_dropout": 0.1, "max_steps": 6, "batch_size": 2, "grad_accum": 2, "lr": 1e-2,
              "eval_every": 2, "save_every": 2, "eval_batch_size": 8, "max_length": 128, "max_prompt_length": 64, **extra}
    path = folder / "preset.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def infopo_cmd(*args: str, pause_at_call: int | None = None) -> list[str]:
    if pause_at_call is None:
        return [sys.executable, "-m", "infopo_cli", *args]
    return [sys.executable, "-c", PAUSING, *args]


def run_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", **extra}


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def metrics(folder: Path) -> list[dict]:
    """metrics.jsonl without wall-clock timings, the only values that differ between identical runs."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted run: the yardstick every stopped-and-resumed run must equal (to the bounds a new process is held
    to: conftest.WEIGHTS_ACROSS_PROCESSES)."""
    from conftest import write_pairs

    folder = tmp_path_factory.mktemp("straight")
    preset = preset_file(folder, tiny_model, write_pairs(folder / "pairs.jsonl", 24))
    out = subprocess.run(infopo_cmd("train", "--preset", str(preset), "--output", str(folder / "run")),
                         capture_output=True, text=True, env=run_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return preset, folder / "run"


@pytest.mark.parametrize("sig, pause_at_call, code", [
    (signal.SIGKILL, 5, -signal.SIGKILL),   # killed during step 3, after checkpoint-2
    (signal.SIGINT, 5, 130),                # Ctrl-C between the two micro-batches of step 3
    (signal.SIGTERM, 7, 143),               # `kill` between the two micro-batches of step 4
], ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_stopped_and_resumed_equals_an_uninterrupted_run(straight, tmp_path, sig, pause_at_call, code):
    preset, reference = straight
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    proc = subprocess.Popen(infopo_cmd("train", "--preset", str(preset), "--output", str(run_dir), pause_at_call=pause_at_call),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env(PAUSE_AT_CALL=str(pause_at_call), PAUSE_MARKER=str(marker)))
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    (tmp_path / "go").write_text("")  # delivered: the paused step goes on (a handler runs before the wrapper's next look)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-2000:]
    if sig != signal.SIGKILL:  # stopped at the step boundary: a checkpoint of that step and the way back
        step = (pause_at_call + 1) // 2
        assert (run_dir / f"checkpoint-{step}" / "training_state.pt").is_file()
        assert f"infopo train --resume {run_dir}" in stderr
    resumed = subprocess.run(infopo_cmd("train", "--resume", str(run_dir)), capture_output=True, text=True,
                             env=run_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    differences = weight_differences(adapter(reference), adapter(run_dir), WEIGHTS_ACROSS_PROCESSES)
    parted = first_difference(metrics(reference), metrics(run_dir), METRICS_ACROSS_PROCESSES)
    assert not differences, (f"{differences}; {parted or first_difference(metrics(reference), metrics(run_dir))}\n"
                             f"stopped run:\n{stderr[-1500:]}\nresumed run:\n{resumed.stderr[-1500:]}")
    assert not parted, parted
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6 and summary["eval_before"] and summary["eval_after"]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # --keep-checkpoints 2
    assert not list(run_dir.glob(".*infopo-tmp*")) and not (run_dir / ".infopo.lock").exists()


def test_a_second_signal_stops_at_once_and_the_last_checkpoint_still_resumes_exactly(straight, tmp_path):
    preset, reference = straight
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    proc = subprocess.Popen(infopo_cmd("train", "--preset", str(preset), "--output", str(run_dir), pause_at_call=5),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env(PAUSE_AT_CALL="5", PAUSE_MARKER=str(marker), PAUSE_SECONDS="30"))
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # long before the paused step could finish
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "stopped at once" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["checkpoint-2"]
    resumed = subprocess.run(infopo_cmd("train", "--resume", str(run_dir)), capture_output=True, text=True,
                             env=run_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    differences = weight_differences(adapter(reference), adapter(run_dir), WEIGHTS_ACROSS_PROCESSES)
    assert not differences, differences
    parted = first_difference(metrics(reference), metrics(run_dir), METRICS_ACROSS_PROCESSES)
    assert not parted, parted


# --- in-process: the same recipe, with the failure injected at a known step ------------------------------

def cfg_for(tiny_model, pairs_file, output, **kw) -> TrainConfig:
    values = dict(model=str(tiny_model), data=str(pairs_file), eval_data="", output=str(output), dtype="fp32",
                  lora_r=4, lora_alpha=8, max_steps=6, batch_size=2, grad_accum=2, lr=1e-2, max_length=128,
                  max_prompt_length=64)
    values.update(kw)
    return TrainConfig(**values)


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if r["kind"] == "train"]


def _skips_one_batch_too_few(real):
    """`shuffled_batches` whose first batch comes twice: a resume skipping the steps done lands one batch early."""
    def batches(*args, **kwargs):
        stream = real(*args, **kwargs)
        first = next(stream)
        yield first
        yield first
        yield from stream
    return batches


LOST = {  # what a resume could lose, and how to make it lose it
    "rng state": lambda mp: mp.setattr(checkpoint, "restore_rng", lambda state: None),
    "optimizer state": lambda mp: mp.setattr(torch.optim.Optimizer, "load_state_dict", lambda self, state: None),
    "place in the data": lambda mp: mp.setattr(recipe, "shuffled_batches", _skips_one_batch_too_few(recipe.shuffled_batches)),
}


@pytest.fixture(scope="module")
def in_process(tiny_model, tmp_path_factory) -> tuple[Path, Path, Path]:
    """An uninterrupted run and one stopped by Ctrl-C during step 3, with LoRA dropout, in this process (the reference
    online, so a resume that reads other pairs than it should still finds their reference)."""
    from conftest import write_pairs

    folder = tmp_path_factory.mktemp("in-process")
    pairs = write_pairs(folder / "pairs.jsonl", 24)
    straight = Path(recipe.train(cfg_for(tiny_model, pairs, folder / "straight", lora_dropout=0.1, reference="online")).output)
    with pytest.MonkeyPatch.context() as mp:
        at_forward(mp, 6, ctrl_c)
        assert recipe.train(cfg_for(tiny_model, pairs, folder / "stopped", lora_dropout=0.1, reference="online")).steps == 3
    return folder, straight, folder / "stopped"


def resumed_copy(stopped: Path, into: Path) -> Path:
    run_dir = into / "run"
    shutil.copytree(stopped, run_dir)
    assert recipe.train(load_preset(str(run_dir / "config.toml")), resume=run_dir).status == "completed"
    return run_dir


def test_in_one_process_a_resume_is_the_uninterrupted_run_bit_for_bit(in_process, tmp_path):
    _, straight, stopped = in_process
    run_dir = resumed_copy(stopped, tmp_path)
    assert not weight_differences(adapter(straight), adapter(run_dir)), weight_differences(adapter(straight), adapter(run_dir))
    assert metrics(run_dir) == metrics(straight), first_difference(metrics(straight), metrics(run_dir))


def test_a_resume_stopped_while_it_loads_keeps_its_checkpoint_and_says_where_it_is(in_process, tmp_path, monkeypatch):
    _, straight, stopped = in_process
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    real = recipe._load_model
    monkeypatch.setattr(recipe, "_load_model", lambda *a, **k: (ctrl_c(), real(*a, **k))[1])
    summary = recipe.train(load_preset(str(run_dir / "config.toml")), resume=run_dir)
    assert (summary.status, summary.steps, summary.exit_code) == ("stopped", 3, 130)
    assert summary.message == (f"stopped by SIGINT (Ctrl-C) before training on from step 3; its checkpoint is intact; "
                               f"continue with: infopo train --resume {run_dir}")
    monkeypatch.setattr(recipe, "_load_model", real)
    assert recipe.train(load_preset(str(run_dir / "config.toml")), resume=run_dir).status == "completed"
    assert not weight_differences(adapter(straight), adapter(run_dir))


@pytest.mark.parametrize("lost", LOST)
def test_the_bounds_a_new_process_is_held_to_still_catch_a_resume_that_loses(in_process, tmp_path, monkeypatch, lost):
    """The looser bounds of a resume in a new process (conftest) are no blind spot: each way to lose a resume lands
    at least ten times outside them."""
    _, straight, stopped = in_process
    LOST[lost](monkeypatch)
    run_dir = resumed_copy(stopped, tmp_path)
    assert weight_differences(adapter(straight), adapter(run_dir), atol=10 * WEIGHTS_ACROSS_PROCESSES)
    assert first_difference(metrics(straight), metrics(run_dir), 10 * METRICS_ACROSS_PROCESSES)


def test_a_stop_in_the_reference_pass_keeps_what_it_computed_and_the_run_starts_again_exactly(tiny_model, pairs_file,
                                                                                                tmp_path, monkeypatch,
                                                                                                capsys):
    """Ctrl-C in the one reference pass before the first step (an hour on a large set) ends the run there, not after
    the pass and a step; the batches it finished are cached, and the next start computes only the rest and trains as
    an uninterrupted run does."""
    from infopo_cli.train import reference_cache

    def run(name: str, **kw):
        monkeypatch.setenv("INFOPO_HOME", str(tmp_path / f"home-{name}"))  # each its own reference cache
        return recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / name, reference="precompute", eval_batch_size=2),
                            **kw)

    assert run("straight").status == "completed"
    real, calls = reference_cache.batch_logps, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # the signal lands in the third batch: two are written, the third still is
            ctrl_c()
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_cache, "batch_logps", interrupted)
    capsys.readouterr()
    stopped = run("run")
    assert (stopped.status, stopped.steps, stopped.exit_code) == ("stopped", 0, 130)
    assert "before the first step; start it again with: infopo train --resume" in stopped.message
    pairs = sum(1 for line in pairs_file.read_text().splitlines() if line.strip())
    said = " ".join(capsys.readouterr().out.split())
    assert f"reference log-probs: stopped after 6 of the {pairs} pairs to compute, those cached" in said
    assert calls[0] == 3 and not checkpoint.latest_checkpoint(tmp_path / "run")
    (entry,) = (tmp_path / "home-run" / "cache" / "reference").glob("*.pt")
    assert int(torch.load(entry, weights_only=True)["filled"].sum()) == 3 * 2  # the three batches of 2 pairs
    calls[0] = -10**6  # counts on, far from 3: no second signal
    assert run("run", resume=tmp_path / "run").status == "completed"
    calls[0] += 10**6
    assert calls[0] == -(-(pairs - 6) // 2)  # only the batches not cached
    assert not weight_differences(adapter(tmp_path / "straight"), adapter(tmp_path / "run"))
    assert metrics(tmp_path / "run") == metrics(tmp_path / "straight"), first_difference(
        metrics(tmp_path / "straight"), metrics(tmp_path / "run"))

    # a resume (at step 3, its reference cache gone) stopped in its reference pass keeps its checkpoint
    monkeypatch.setattr(reference_cache, "batch_logps", real)
    with monkeypatch.context() as mp:
        at_forward(mp, 6, ctrl_c)
        assert run("resumed").steps == 3
    shutil.rmtree(tmp_path / "home-resumed" / "cache" / "reference")
    calls[0] = 0
    monkeypatch.setattr(reference_cache, "batch_logps", interrupted)
    again = run("resumed", resume=tmp_path / "resumed")
    assert (again.status, again.steps, again.exit_code) == ("stopped", 3, 130)
    assert again.message == (f"stopped by SIGINT (Ctrl-C) before training on from step 3; its checkpoint is intact; "
                             f"continue with: infopo train --resume {tmp_path / 'resumed'}")
    assert again.seconds > 0  # the steps it has, counted from its log: not "3 steps in 0 s"
    assert checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path / "resumed")) == 3
    calls[0] = -10**6
    assert run("resumed", resume=tmp_path / "resumed").status == "completed"
    assert not weight_differences(adapter(tmp_path / "straight"), adapter(tmp_path / "resumed"))


def test_a_resume_that_extends_the_run_keeps_the_learning_rate_continuous(tiny_model, pairs_file, tmp_path, monkeypatch):
    """Stopped at step 3 of 6 and resumed with --max-steps 12: the rate goes on from where it was, then decays to 0."""
    straight = recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / "straight"))
    at_forward(monkeypatch, 6, ctrl_c)  # during step 3
    cfg = cfg_for(tiny_model, pairs_file, tmp_path / "run")
    stopped = recipe.train(cfg)
    assert stopped.status == "stopped" and stopped.exit_code == 130 and stopped.steps == 3
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    resumed = recipe.train(resumed_config(load_preset(str(run_dir / "config.toml")), {"max_steps": 12}, run_dir), resume=run_dir)
    assert resumed.status == "completed" and resumed.steps == 12
    planned = [r["lr"] for r in train_records(Path(straight.output))]
    lrs = [r["lr"] for r in train_records(run_dir)]
    assert lrs[:4] == planned[:4]  # steps 1-3 as planned, and step 4 at the rate the 6-step schedule had there
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # then one smooth decay...
    biggest_planned_change = max(abs(a - b) for a, b in zip(planned, planned[1:]))
    assert max(abs(a - b) for a, b in zip(lrs, lrs[1:])) <= biggest_planned_change  # ...never a jump
    assert lrs[-1] < 0.1 * lrs[3]  # ...to (almost) zero at the new last step


def test_keep_checkpoints_prunes_older_ones_and_keeps_the_adapter(tiny_model, pairs_file, tmp_path):
    summary = recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / "run", save_every=1, keep_checkpoints=2, max_steps=5))
    assert summary.status == "completed"
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_a_locked_run_folder_is_refused_and_a_stale_lock_is_taken_over(tiny_model, pairs_file, tmp_path):
    from infopo_cli.files import RunLock

    run_dir = tmp_path / "run"
    recipe.train(cfg_for(tiny_model, pairs_file, run_dir, max_steps=2, save_every=1))
    cfg = resumed_config(load_preset(str(run_dir / "config.toml")), {}, run_dir)  # a finished run: resuming only finishes it
    with RunLock(run_dir), pytest.raises(OutputError, match="in use by another infopo run"):
        recipe.train(cfg, resume=run_dir)
    # a run killed with SIGKILL leaves its lock behind
    dead = subprocess.run([sys.executable, "-c", "import os, signal, sys; from infopo_cli.files import RunLock; "
                           "RunLock(sys.argv[1]).acquire(); print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)",
                           str(run_dir)], capture_output=True, text=True)
    assert dead.returncode == -signal.SIGKILL and (run_dir / ".infopo.lock").is_file()
    lines = []

    class Recording(recipe.Reporter):
        def lock(self, took_over):
            lines.append(took_over)

    assert recipe.train(cfg, Recording(), resume=run_dir).steps == 2
    assert lines and lines[0] and dead.stdout.strip() in lines[0]


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_after_max_bad_steps(tiny_model, pairs_file, tmp_path, monkeypatch):
    real = recipe.registry.compute
    bad_from = [3]  # steps >= this one get a NaN loss
    calls = [0]

    def poisoned(spec, logps, params):
        calls[0] += 1
        out = real(spec, logps, params)
        if (calls[0] + 1) // 2 >= bad_from[0]:
            out.losses = out.losses * float("nan")
        return out

    monkeypatch.setattr(recipe.registry, "compute", poisoned)
    summary = recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / "run", max_bad_steps=3, save_every=2, keep_checkpoints=3))
    assert summary.status == "diverged" and summary.exit_code == 4 and summary.steps == 5
    assert "3 steps in a row" in summary.message and "weights of step 2" in summary.message
    records = train_records(tmp_path / "run")
    assert [r["skipped"] for r in records] == [False, False, True, True, True]
    assert records[-1]["skipped_steps"] == 3 and records[-1]["loss"] is None  # NaN is written as null
    # skipped steps never touch the weights: the stop's checkpoint holds the weights of step 2
    two, five = (load_file(str(tmp_path / "run" / f"checkpoint-{n}" / "adapter_model.safetensors")) for n in (2, 5))
    assert all(torch.equal(two[k], five[k]) for k in two)


def test_out_of_memory_saves_the_state_before_the_step_and_a_smaller_split_resumes(tiny_model, pairs_file, tmp_path, monkeypatch):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    at_forward(monkeypatch, 5, oom)  # step 3
    run_dir = tmp_path / "run"
    # a given setting (auto would run the step again first: tests/runs/test_memory_fallback.py)
    summary = recipe.train(cfg_for(tiny_model, pairs_file, run_dir, gradient_checkpointing="on"))
    assert summary.status == "out of memory" and summary.exit_code == 3
    assert "memory at step 3" in summary.message and "longest pair" in summary.message
    assert "--batch-size 1 --grad-accum 4" in summary.message
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["checkpoint-2"]
    monkeypatch.undo()
    cfg = resumed_config(load_preset(str(run_dir / "config.toml")), {"batch_size": 1, "grad_accum": 4}, run_dir)
    assert recipe.train(cfg, resume=run_dir).status == "completed"
    straight = recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / "straight"))
    want, got = adapter(Path(straight.output)), adapter(run_dir)
    for key in want:  # the same global batches, split in four instead of two: equal up to float rounding
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)


def test_out_of_memory_while_evaluating_saves_the_step_and_the_evaluation_runs_on_resume(tiny_model, pairs_file, tmp_path, monkeypatch):
    calls = []

    class Failing(recipe.Evaluator):
        def totals(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the evaluation at step 2 (the first one is at step 0)
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().totals(*args, **kwargs)

    monkeypatch.setattr(recipe, "Evaluator", Failing)
    run_dir = tmp_path / "run"
    summary = recipe.train(cfg_for(tiny_model, pairs_file, run_dir, eval_data=str(pairs_file), eval_every=2))
    assert summary.status == "out of memory" and summary.exit_code == 3 and summary.steps == 2
    assert "evaluating at step 2" in summary.message and "--eval-batch-size 8" in summary.message
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["checkpoint-2"]
    monkeypatch.undo()
    cfg = resumed_config(load_preset(str(run_dir / "config.toml")), {"eval_batch_size": 8}, run_dir)
    assert recipe.train(cfg, resume=run_dir).status == "completed"
    assert [r["step"] for r in metrics(run_dir) if r["kind"] == "eval"] == [0, 2, 4, 6]


def fail_second_checkpoint_save(monkeypatch, error: Exception) -> None:
    """torch.save raises `error` when the run saves its second checkpoint (the reference cache's write passes)."""
    real, saves = torch.save, []

    def failing(obj, path, *args, **kwargs):
        if "cache" not in Path(path).parts:
            saves.append(path)
            if len(saves) == 2:
                raise error
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing)


def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tiny_model, pairs_file, tmp_path, monkeypatch):
    fail_second_checkpoint_save(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    run_dir = tmp_path / "run"
    with pytest.raises(OutputError) as err:
        recipe.train(cfg_for(tiny_model, pairs_file, run_dir, save_every=2))
    message = str(err.value)
    assert "checkpoint-4" in message and "No space left on device" in message and "checkpoint-2 is intact" in message
    assert "\n" not in message
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["checkpoint-2"]
    assert not [p for p in run_dir.iterdir() if "infopo-tmp" in p.name] and not (run_dir / ".infopo.lock").exists()
    monkeypatch.undo()
    assert recipe.train(resumed_config(load_preset(str(run_dir / "config.toml")), {}, run_dir), resume=run_dir).steps == 6


def test_torch_s_own_full_disk_error_is_one_line_too(tiny_model, pairs_file, tmp_path, monkeypatch):
    """torch.save reports a full disk as a cryptic RuntimeError ('enforce fail ... unexpected pos'), seen with a
    200 KB tmpfs; with the disk nearly full that becomes the same one line as an OSError would."""
    from collections import namedtuple

    fail_second_checkpoint_save(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10, 10, 0))
    with pytest.raises(OutputError) as err:
        recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / "run", save_every=2))
    assert str(err.value).startswith(f"cannot write {tmp_path / 'run' / 'checkpoint-4'}: No space left on device")
    assert str(err.value).endswith("checkpoint-2 is intact")


def test_fp16_uses_a_gradient_scaler_and_counts_overflowed_steps(tiny_model, pairs_file, tmp_path, monkeypatch):
    real, calls = recipe.registry.compute, [0]

    def overflowing(spec, logps, params):  # step 2's first micro-batch gives an infinite loss
        calls[0] += 1
        out = real(spec, logps, params)
        if calls[0] == 3:
            out.losses = out.losses * float("inf")
        return out

    monkeypatch.setattr(recipe.registry, "compute", overflowing)
    summary = recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / "fp16", dtype="fp16", load_in_4bit=False, max_steps=3))
    records = train_records(tmp_path / "fp16")
    assert [r["skipped"] for r in records] == [False, True, False] and summary.skipped_steps == 1
    assert records[1]["grad_scale"] == records[0]["grad_scale"] / 2  # the scaler backed off after the overflow
    monkeypatch.undo()
    recipe.train(cfg_for(tiny_model, pairs_file, tmp_path / "fp32", max_steps=1))
    assert "grad_scale" not in train_records(tmp_path / "fp32")[0]  # bf16/fp32 need no scaling


@pytest.fixture
def checkpointed(tiny_model, pairs_file, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    recipe.train(cfg_for(tiny_model, pairs_file, run_dir, max_steps=2, save_every=1))
    return run_dir


def test_checkpoints_load_without_running_pickled_code(checkpointed, tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    state = checkpointed / "checkpoint-2" / "training_state.pt"
    torch.save({"step": 2, "payload": Payload()}, state)
    cfg = resumed_config(load_preset(str(checkpointed / "config.toml")), {"max_steps": 3}, checkpointed)
    with pytest.raises(CheckpointError, match="checkpoint-2: cannot read the checkpoint"):
        recipe.train(cfg, resume=checkpointed)
    assert not (tmp_path / "pwned").exists()


def test_an_adapter_that_does_not_match_is_one_line_naming_the_checkpoint(checkpointed):
    import shutil

    shutil.rmtree(checkpointed / "checkpoint-2")  # stopped after step 1 (a finished run's resume loads nothing)
    weights = checkpointed / "checkpoint-1" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first.replace("lora_A", "lora_Z")] = tensors.pop(first)
    save_file(tensors, str(weights))
    cfg = resumed_config(load_preset(str(checkpointed / "config.toml")), {}, checkpointed)
    with pytest.raises(CheckpointError) as err:
        recipe.train(cfg, resume=checkpointed)
    assert "checkpoint-1" in str(err.value) and "do not match" in str(err.value) and "\n" not in str(err.value)


def test_resume_refuses_to_extend_a_finished_run_or_to_train_on_changed_data(checkpointed, pairs_file, monkeypatch):
    from infopo_cli.model import stack

    real = stack.load_base
    monkeypatch.setattr(stack, "load_base", lambda *a, **k: 1 / 0)  # refused before the model loads
    cfg = resumed_config(load_preset(str(checkpointed / "config.toml")), {"max_steps": 5}, checkpointed)
    with pytest.raises(ConfigError, match="finished its 2 steps and its learning rate has decayed to zero"):
        recipe.train(cfg, resume=checkpointed)
    monkeypatch.setattr(stack, "load_base", real)
    pairs_file.write_text("".join(pairs_file.read_text().splitlines(keepends=True)[:-2]))  # two rows fewer
    with pytest.raises(CheckpointError, match=r"training data changed since this checkpoint \(24 pairs then, 22 now\)"):
        recipe.train(resumed_config(load_preset(str(checkpointed / "config.toml")), {}, checkpointed), resume=checkpointed)


def test_resume_refuses_the_same_number_of_other_pairs_before_the_model_loads(checkpointed, pairs_file, monkeypatch):
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    rows[3]["chosen"], rows[3]["rejected"] = rows[3]["rejected"], rows[3]["chosen"]  # one preference flipped
    original = pairs_file.read_text()
    pairs_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    from infopo_cli.model import stack

    loads, real = [], stack.load_base
    monkeypatch.setattr(stack, "load_base", lambda *a, **k: loads.append(1) or 1 / 0)
    cfg = resumed_config(load_preset(str(checkpointed / "config.toml")), {}, checkpointed)
    with pytest.raises(CheckpointError, match=r"checkpoint-2: the training pairs changed since this checkpoint \(as "
                                              r"many, 24, but not the same tokens: the data, the tokenizer"):
        recipe.train(cfg, resume=checkpointed)
    assert not loads
    # a checkpoint of an earlier release, without the hash, is checked by the number of pairs alone
    state = checkpointed / "checkpoint-2" / "training_state.pt"
    saved = torch.load(state, weights_only=True)
    assert len(saved.pop("data_sha256")) == 64
    torch.save(saved, state)
    monkeypatch.setattr(stack, "load_base", real)
    assert recipe.train(cfg, resume=checkpointed).status == "completed"  # the flipped pair: the same number
    pairs_file.write_text(original)


@pytest.mark.run
def test_a_checkpoint_of_an_earlier_release_resumes_with_the_pairs_it_trained_on(tiny_model, tmp_path, capsys):
    long = " ".join(["word"] * 300)
    rows = [{"prompt": f"Q{i}?", "chosen": f"{long} good", "rejected": f"{long} bad"} for i in range(2)]
    rows += [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(10)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_dir = tmp_path / "run"
    recipe.train(cfg_for(tiny_model, data, run_dir, max_steps=2, save_every=1, batch_size=4, grad_accum=1))
    assert "warning: 2 training pairs are the same once truncated" in " ".join(capsys.readouterr().out.split())
    # as the release before wrote it: no hash, and the 12 pairs counted (truncation's same pairs kept)
    state = run_dir / "checkpoint-1" / "training_state.pt"
    saved = torch.load(state, weights_only=True)
    saved.pop("data_sha256")
    torch.save({**saved, "train_pairs": 12}, state)
    shutil.rmtree(run_dir / "checkpoint-2")
    cfg = resumed_config(load_preset(str(run_dir / "config.toml")), {}, run_dir)
    assert recipe.train(cfg, resume=run_dir).status == "completed"
    assert "are the same once truncated" not in capsys.readouterr().out


def test_resume_refuses_settings_that_change_the_maths(tmp_path):
    saved = TrainConfig(batch_size=2, grad_accum=2, lr=2e-4, preset="smollm2-135m")
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--lr 0.001 differs from this run's 0.0002"):
        resumed_config(saved, {"lr": 1e-3}, run_dir)
    with pytest.raises(ConfigError, match=r"global batch .* must stay 2 x 2 x 1 = 4 .*got 1 x 2 x 1"):
        resumed_config(saved, {"batch_size": 1}, run_dir)
    with pytest.raises(ConfigError, match="own preset"):
        resumed_config(saved, {"preset": "llama3-8b-qlora"}, run_dir)
    assert resumed_config(saved, {"lr": 2e-4, "max_steps": 9, "batch_size": 1, "grad_accum": 4}, run_dir).max_steps == 9
    assert resumed_config(TrainConfig(max_steps=5), {"epochs": 3.0}, run_dir).max_steps is None  # --epochs now sets the length
    assert resumed_config(TrainConfig(max_steps=5), {"epochs": 1.0}, run_dir).max_steps == 5  # repeated: the length stays


def test_the_original_command_plus_resume_is_accepted(tmp_path):
    run_dir = tmp_path / "run"
    saved = TrainConfig(preset="mine", dtype="fp32", output=str(run_dir))  # config.toml holds what auto chose
    original = {"preset": str(tmp_path / "mine.toml"), "output": str(run_dir), "dtype": "auto", "lr": saved.lr,
                "target_modules": "all-linear"}
    assert resumed_config(saved, original, run_dir) == saved


def test_a_run_whose_every_row_fails_to_tokenise_stops_with_one_line_not_a_hang(tmp_path, pairs_file):
    from conftest import build_tiny_model

    from infopo_cli.errors import InfopoError

    model = build_tiny_model(tmp_path / "refusing", chat_template="{{ raise_exception('System role not supported') }}")
    with pytest.raises(InfopoError, match="no preference pairs .*24 invalid rows.*the chat template of .* rejects"):
        recipe.train(cfg_for(model, pairs_file, tmp_path / "run", skip_invalid=True))


def test_out_of_memory_in_the_first_evaluation_keeps_the_folder_and_says_what_to_do(tiny_model, pairs_file, tmp_path, monkeypatch):
    class Failing(recipe.Evaluator):
        def totals(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(recipe, "Evaluator", Failing)
    run_dir = tmp_path / "run"
    summary = recipe.train(cfg_for(tiny_model, pairs_file, run_dir, eval_data=str(pairs_file), eval_every=2))
    assert summary.status == "out of memory" and summary.exit_code == 3 and summary.steps == 0
    assert "evaluating at step 0" in summary.message and (run_dir / "config.toml").is_file()
    monkeypatch.undo()
    cfg = resumed_config(load_preset(str(run_dir / "config.toml")), {"eval_batch_size": 8}, run_dir)
    assert recipe.train(cfg, resume=run_dir).status == "completed"
    assert [r["step"] for r in metrics(run_dir) if r["kind"] == "eval"] == [0, 2, 4, 6]
