"""Data-parallel training on torch.distributed: two CPU processes (gloo) launched by torchrun train the adapter
one process trains on the same global batches; a 2-process run resumes on one process; SIGTERM saves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError
from infopo_cli.train.distributed import World
from infopo_cli.train.launch import without_nproc
from infopo_cli.train.resume import resumed_config

from conftest import (METRICS_ACROSS_PROCESSES, WEIGHTS_ACROSS_PROCESSES, first_difference, weight_differences,
                      write_pairs)

ANSWERS = ["--eval-generate-every", "4", "--eval-max-new-tokens", "3"]  # the held-out answers scored, too
TOLERANCE = 5e-5  # float32 sums in another order; the adapter itself moves by ~0.1 in these steps


def _flags(tiny_model: Path, data: Path, eval_data: Path | str, out: Path, steps: int = 4) -> list[str]:
    return ["train", "--model", str(tiny_model), "--data", str(data), "--eval-data", str(eval_data), "--dtype", "fp32",
            "--max-steps", str(steps), "--save-every", "2", "--keep-checkpoints", "2", "--lr", "1e-3", "--batch-size", "2",
            "--eval-batch-size", "4", "--output", str(out)]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600, **kw)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _largest_difference(a: Path, b: Path) -> float:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """One torchrun run on 2 gloo processes (global batch 2 x 1 x 2) and one single-process run of 2 x 2."""
    folder = tmp_path_factory.mktemp("ddp")
    data, eval_data = write_pairs(folder / "pairs.jsonl", 24), write_pairs(folder / "eval.jsonl", 11, seed=1)
    with_answers = [{**row, "answer": row["chosen"].split(" = ")[1].rstrip(".")}
                    for row in map(json.loads, eval_data.read_text().splitlines())]
    eval_data.write_text("".join(json.dumps(row) + "\n" for row in with_answers))
    two, one = folder / "out-2" / "run", folder / "out-1" / "run"
    launched = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "-m", "infopo_cli", *_flags(tiny_model, data, eval_data, two), *ANSWERS])
    _run([sys.executable, "-m", "infopo_cli", *_flags(tiny_model, data, eval_data, one), "--grad-accum", "2", *ANSWERS])
    return {"two": two, "one": one, "data": data, "eval": eval_data, "model": tiny_model, "log": launched.stdout}


def test_two_processes_train_the_adapter_of_one_process_on_the_same_global_batch(runs):
    assert "data-parallel over 2 processes (gloo)" in runs["log"]
    assert _largest_difference(runs["two"], runs["one"]) < TOLERANCE
    assert max(float(t.abs().max()) for t in _adapter(runs["two"]).values()) > 100 * TOLERANCE  # it did train
    # every step's metrics are the global batch's: the loss, the tokens read (each rank's share summed)
    two, one = _records(runs["two"]), _records(runs["one"])
    assert [(r["kind"], r["step"]) for r in two] == [(r["kind"], r["step"]) for r in one] == \
        [("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 4)]
    for a, b in zip(two, one):
        assert a.get("tokens") == b.get("tokens")
        for key in ("loss", "eval/loss", "eval/logps/chosen", "rewards/margins"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_two_processes_score_every_held_out_answer_once_in_the_held_out_order(runs):
    for step in (0, 4):
        scored = [json.loads(line) for line in (runs["two"] / "answers" / f"step-{step}.jsonl").read_text().splitlines()]
        assert [r["where"] for r in scored] == [f"{runs['eval']}:{i}" for i in range(1, 12)]  # 11: shares of 6 and 5
        logged = next(r for r in _records(runs["two"]) if r["kind"] == "eval" and r["step"] == step)
        assert logged["eval/answers/accuracy"] == pytest.approx(sum(r["right"] for r in scored) / 11)


def test_two_processes_write_one_set_of_outputs(runs):
    assert sorted(p.name for p in runs["two"].parent.iterdir()) == ["run"]  # one run folder, not one per process
    names = {p.name for p in runs["two"].iterdir()}
    assert {"adapter_model.safetensors", "config.toml", "summary.json", "checkpoint-2", "checkpoint-4"} <= names
    assert not [n for n in names if ".infopo-tmp-" in n]
    assert "nproc = 2" in (runs["two"] / "config.toml").read_text()
    assert runs["log"].count("infopo run: completed") == 1  # only rank 0 prints the run


@pytest.mark.parametrize("finished", [True, False])
def test_a_finished_process_waits_for_the_others_before_it_leaves_the_group(monkeypatch, finished):
    """Rank 1 finishes while rank 0 still writes the outputs: it waits at a barrier, then leaves; after an error it
    leaves at once (a barrier there would wait for a process that may never come)."""
    from infopo_cli.train import distributed

    calls: list[str] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.stop(World(1, 2), finished)
    assert calls == (["barrier", "destroy"] if finished else ["destroy"])
    calls.clear()
    distributed.stop(World(), finished)  # one process: no group to leave
    assert calls == []


@pytest.mark.parametrize("rank_count", [1, 2, 3, 4])
def test_each_process_trains_on_a_disjoint_share_that_covers_the_batch(rank_count):
    for batch in (list(range(8)), list(range(7)), list(range(1))):  # the last batch of an epoch may be short
        shares = [World(rank, rank_count).shard(batch) for rank in range(rank_count)]
        assert sorted(i for share in shares for i in share) == batch
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_two_process_checkpoint_resumes_on_one_process_to_the_same_adapter(runs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs["two"], copy)
    shutil.rmtree(copy / "checkpoint-4")  # as if it had stopped after step 2
    out = _run([sys.executable, "-m", "infopo_cli", "train", "--resume", str(copy), "--nproc", "1"])
    assert "2 -> 1 processes: --grad-accum 1 -> 2 keeps the global batch of 4 pairs" in out.stdout
    assert "resuming after step 2 of 4" in out.stdout
    assert _largest_difference(copy, runs["two"]) < TOLERANCE
    assert [(r["kind"], r["step"]) for r in _records(copy)] == [(r["kind"], r["step"]) for r in _records(runs["two"])]


def sigterm_after_step_2_saves(cmd: list[str], run_dir: Path) -> None:
    """`cmd` (an `infopo train --nproc N` run into `run_dir`) gets SIGTERM after its second step: it exits 143 with
    one line saying so, and its newest checkpoint holds every step it logged."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    for line in proc.stdout:  # one plain line per step when not on a terminal
        if line.startswith("step 2/"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout[-1500:] + stderr[-1500:]
    assert "stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
    saved = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert saved and saved[-1] >= 2
    assert len([r for r in _records(run_dir) if r["kind"] == "train"]) == saved[-1]


def test_sigterm_to_infopo_nproc_saves_a_checkpoint_on_rank_0(runs, tmp_path):
    """`infopo train --nproc 2` starts torch's launcher in-process; `kill` reaches every process through it."""
    run_dir = tmp_path / "run"
    sigterm_after_step_2_saves([sys.executable, "-m", "infopo_cli", *_flags(runs["model"], runs["data"], "", run_dir,
                                                                            steps=100000), "--nproc", "2"], run_dir)


def test_resume_on_another_process_count_keeps_the_global_batch(tmp_path):
    saved = TrainConfig(batch_size=2, grad_accum=1, nproc=4)
    notes: list[str] = []
    cfg = resumed_config(saved, {"nproc": 2}, tmp_path, notes.append)
    assert (cfg.batch_size, cfg.grad_accum, cfg.nproc) == (2, 2, 2) and "keeps the global batch of 8" in notes[0]
    assert resumed_config(saved, {"nproc": 1, "batch_size": 4, "grad_accum": 2}, tmp_path).grad_accum == 2
    with pytest.raises(ConfigError, match="cannot split evenly"):
        resumed_config(TrainConfig(batch_size=2, grad_accum=1, nproc=3), {"nproc": 2}, tmp_path)
    with pytest.raises(ConfigError, match="must stay 2 x 1 x 4 = 8"):
        resumed_config(saved, {"nproc": 2, "grad_accum": 1}, tmp_path)


def test_the_processes_do_not_launch_again():
    assert without_nproc(["train", "--nproc", "2", "--lr", "1e-3", "--nproc=3"]) == ["train", "--lr", "1e-3"]


OUT_OF_MEMORY_ON_RANK_1 = """\
import os

import torch

from infopo_cli.cli import main
from infopo_cli.train import recipe

real, calls = recipe.pair_logps, [0]


def patched(model, *args, **kwargs):  # rank 1's third training forward pass (its one micro-batch of step 3), once
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real(model, *args, **kwargs)


recipe.pair_logps = patched
main()
"""


def test_an_out_of_memory_in_one_process_makes_every_process_recompute_and_changes_no_weight(runs, tmp_path):
    """Rank 1 alone runs out of memory in step 3 of the `runs` run, made auto (which keeps the tiny model's layers
    whole, as the preset's off does): it runs the step again recomputing every layer, rank 0 does so too from then on,
    writes it to config.toml and says so, and the run is the one that never ran out."""
    from infopo_cli.presets import load_preset
    from infopo_cli.train.recipe import TIMING_KEYS

    script, run_dir = tmp_path / "out_of_memory_on_rank_1.py", tmp_path / "out" / "run"
    script.write_text(OUT_OF_MEMORY_ON_RANK_1)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
                *_flags(runs["model"], runs["data"], runs["eval"], run_dir), *ANSWERS, "--gradient-checkpointing", "auto"])
    said = " ".join(out.stdout.split())
    assert said.count("out of memory at step 3") == 1, said  # rank 1's own note is silenced: rank 0's, once
    assert ("out of memory at step 3 in another process, which ran the step again: every layer recomputed on every "
            "process from now on (--gradient-checkpointing on; config.toml says so for --resume)") in said
    assert "infopo run: completed" in said
    assert load_preset(str(run_dir / "config.toml")).gradient_checkpointing == "on"
    want, got = _adapter(runs["two"]), _adapter(run_dir)
    assert not weight_differences(want, got, WEIGHTS_ACROSS_PROCESSES), weight_differences(want, got)

    def untimed(folder: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in _records(folder)]
    assert not first_difference(untimed(runs["two"]), untimed(run_dir), METRICS_ACROSS_PROCESSES), \
        first_difference(untimed(runs["two"]), untimed(run_dir))
