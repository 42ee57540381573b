"""`--fsdp`: the frozen 4-bit base sharded over two CPU processes (gloo, FSDP2) trains the adapter one process trains
on the same global batches, each process holding half the base; a sharded checkpoint resumes on one process; SIGTERM
saves. Shares that differ in size (a short last batch, odd numbers of held-out batches and answers) exercise the
uncounted passes that keep the processes in step."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError
from infopo_cli.train.distributed import World

from conftest import write_pairs
from test_distributed import TOLERANCE, _adapter, _largest_difference, _records, _run, sigterm_after_step_2_saves

ANSWERS = ["--eval-generate-every", "3", "--eval-max-new-tokens", "4"]


def _flags(model: Path, data: Path, eval_data: Path | str, out: Path, *extra: str) -> list[str]:
    """23 pairs, global batches of 4: the sixth step has 3 (2 on rank 0, 1 on rank 1: one micro-batch more on rank 0);
    11 held-out pairs in batches of 4 (2 batches on rank 0, 1 on rank 1) and 11 answers (6 and 5)."""
    return ["train", "--model", str(model), "--data", str(data), "--eval-data", str(eval_data), "--dtype", "fp32",
            "--epochs", "1", "--save-every", "2", "--keep-checkpoints", "3", "--lr", "1e-3", "--batch-size", "1",
            "--eval-batch-size", "4", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fsdp")
    data, eval_data = write_pairs(folder / "pairs.jsonl", 23), write_pairs(folder / "eval.jsonl", 11, seed=1)
    rows = [{**row, "answer": row["chosen"].split(" = ")[1].rstrip(".")} for row in map(json.loads, eval_data.read_text().splitlines())]
    eval_data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = {"data": data, "eval": eval_data, "model": tiny_model}
    for name, extra in {"two": ["--nproc", "2", "--fsdp", "--grad-accum", "2"], "one": ["--grad-accum", "4"],
                        # the reference pass in every step, and every layer recomputed in the backward (its own gathers)
                        "two-online": ["--nproc", "2", "--fsdp", "--grad-accum", "2", "--reference", "online",
                                       "--gradient-checkpointing", "on", "--max-steps", "3"],
                        "one-online": ["--grad-accum", "4", "--reference", "online", "--max-steps", "3"]}.items():
        run_dir = folder / name / "run"
        done = _run([sys.executable, "-m", "infopo_cli", *_flags(tiny_model, data, eval_data, run_dir, *extra), *ANSWERS])
        out[name], out[f"{name}-log"] = run_dir, done.stdout
    return out


def _same_run(a: Path, b: Path) -> None:
    assert _largest_difference(a, b) < TOLERANCE
    assert max(float(t.abs().max()) for t in _adapter(a).values()) > 100 * TOLERANCE  # it did train
    ra, rb = _records(a), _records(b)
    assert [(r["kind"], r["step"]) for r in ra] == [(r["kind"], r["step"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x.get("tokens") == y.get("tokens")  # the uncounted passes read no counted token
        for key in ("loss", "eval/loss", "eval/logps/chosen", "rewards/margins", "eval/answers/accuracy"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=1e-5), key


def test_two_sharded_processes_train_the_adapter_of_one_process(runs):
    assert "sharded (FSDP2) data-parallel over 2 processes (gloo)" in runs["two-log"]
    _same_run(runs["two"], runs["one"])
    assert [r["step"] for r in _records(runs["two"]) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    for step in (0, 6):  # every held-out answer once, in order, the same replies as one process gives
        two, one = ((runs[k] / "answers" / f"step-{step}.jsonl").read_text() for k in ("two", "one"))
        assert two == one and len(two.splitlines()) == 11


def test_the_reference_pass_and_recomputation_run_sharded(runs):
    assert "every layer recomputes" in runs["two-online-log"]
    assert "reference log-probs" not in runs["two-online-log"]  # none precomputed: a reference pass in every step
    _same_run(runs["two-online"], runs["one-online"])


def test_each_process_holds_half_the_4bit_codes(runs):
    found = re.search(r"each process holds ([\d.]+), ([\d.]+) MiB of its ([\d.]+) MiB of 4-bit codes",
                      " ".join(runs["two-log"].split()))
    assert found, runs["two-log"]
    held = [float(found[1]), float(found[2])]
    whole = float(found[3])
    assert whole > 0 and all(abs(h - whole / 2) <= 0.01 * whole for h in held)  # half each, but for FSDP's padding


def test_a_sharded_checkpoint_resumes_on_one_process_to_the_same_adapter(runs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs["two"], copy)
    for late in ("checkpoint-6", "checkpoint-4"):
        shutil.rmtree(copy / late)  # as if it had stopped after step 2
    out = _run([sys.executable, "-m", "infopo_cli", "train", "--resume", str(copy), "--nproc", "1"])
    assert "resuming after step 2 of 6" in out.stdout
    assert "fsdp: one process, nothing to shard" in " ".join(out.stdout.split())
    assert _largest_difference(copy, runs["two"]) < TOLERANCE
    assert [(r["kind"], r["step"]) for r in _records(copy)] == [(r["kind"], r["step"]) for r in _records(runs["two"])]


def test_sigterm_to_a_sharded_run_saves_a_checkpoint_on_rank_0(runs, tmp_path):
    run_dir = tmp_path / "run"
    sigterm_after_step_2_saves([sys.executable, "-m", "infopo_cli", *_flags(runs["model"], runs["data"], "", run_dir,
                                                                            "--epochs", "1000"),
                                "--nproc", "2", "--fsdp", "--grad-accum", "2"], run_dir)


def test_ranks_keep_in_step_only_when_sharded(monkeypatch):
    plain, sharded = World(1, 2), World(1, 2, sharded=True)
    assert [World(r, 2).longest_share(11) for r in (0, 1)] == [6, 6] and World(0, 3).longest_share(1) == 1
    assert plain.lacking(5, 6) == 0 and sharded.lacking(5, 6) == 1 and sharded.lacking(0, 1) == 1
    asked: list[bool] = []
    monkeypatch.setattr(World, "any", lambda self, flag: asked.append(flag) or True)
    assert plain.agreed(lambda: False)() is False and asked == []  # each rank's own request
    assert sharded.agreed(lambda: False)() is True and asked == [False]  # any rank's


def test_processes_load_one_at_a_time(monkeypatch):
    """Rank r waits for the r before it, loads, then releases the ones after it: every rank passes `size` barriers."""
    events: list[str] = []
    monkeypatch.setattr(World, "barrier", lambda self: events.append("barrier"))
    for rank in range(3):
        events.clear()
        with World(rank, 3).one_at_a_time():
            events.append("load")
        assert events == ["barrier"] * rank + ["load"] + ["barrier"] * (3 - rank)


def test_fsdp_needs_the_transformers_backend():
    with pytest.raises(ConfigError, match="fsdp shards the transformers backend"):
        TrainConfig(fsdp=True, backend="unsloth").validate()


def test_decoding_goes_on_while_another_process_does(tiny_model):
    """A process whose rows all stopped keeps passing (its replies unchanged) while `any_going` says another goes on."""
    from infopo_cli.inference.generation import Sampling, generate
    from infopo_cli.model.stack import load_tokenizer
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), load_tokenizer(str(tiny_model))
    passes = []
    model.register_forward_pre_hook(lambda module, args: passes.append(1))
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]]
    ends = torch.full((model.config.vocab_size,), -1e9)
    ends[tokenizer.eos_token_id] = 0
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(ends)  # every reply ends at its first token
    alone = generate(model, tokenizer, prompts, Sampling(max_new_tokens=6))
    assert len(passes) == 1 and alone[0].stopped
    passes.clear()
    together = generate(model, tokenizer, prompts, Sampling(max_new_tokens=6), any_going=lambda going: True)
    assert len(passes) == 6 and together == alone


def test_a_sharded_run_exports_as_any_run(runs, tmp_path):
    """The merge happens on one CPU process from the saved adapter: the sharded run's merged weights are the
    one-process run's."""
    from safetensors.torch import load_file

    merged = {}
    for name in ("two", "one"):
        _run([sys.executable, "-m", "infopo_cli", "export", str(runs[name]), "--merged", str(tmp_path / name)])
        merged[name] = {k: v for f in sorted((tmp_path / name).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert merged["two"].keys() == merged["one"].keys() and merged["two"]
    assert max(float((merged["two"][k].float() - merged["one"][k].float()).abs().max()) for k in merged["two"]) < 1e-3


HELD_BYTES = """\
import dataclasses
import sys

from infopo_cli.config import TrainConfig
from infopo_cli.model import memory_plan, recompute, sharding, stack
from infopo_cli.model.architectures import find_architecture
from infopo_cli.model.precision import choose
from infopo_cli.train import distributed

world = dataclasses.replace(distributed.from_environment(), sharded=True)
cfg = TrainConfig(model=sys.argv[1], dtype=sys.argv[2], fsdp=True, nproc=world.size)
precision = choose(cfg.dtype)
distributed.start(world, "cpu")
mesh = sharding.device_mesh("cpu", world.size)
model = stack.attach_lora(stack.load_base(sys.argv[1], cfg, precision, sharded=True), cfg)
sharding.shard_base(model, mesh, "cpu")
held = sum(p.to_local().untyped_storage().nbytes() for p in model.parameters() if hasattr(p, "to_local"))
arch = find_architecture(sys.argv[1])[0]
planned = memory_plan.fsdp_shard_bytes(arch, recompute.training(cfg, "cpu", precision.dtype.itemsize), world.size)
print(f"rank {world.rank}: held {held} planned {planned} codes {sharding.held_bytes(model).codes_held}")
distributed.stop(world, True)
"""


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_plan_counts_the_bytes_each_sharded_process_holds(tiny_model, tmp_path, dtype):
    """`infopo plan --fsdp N`'s split parts are what FSDP2 leaves each process of the real 4-bit model (its padded
    shards), in either storage width."""
    script = tmp_path / "held.py"
    script.write_text(HELD_BYTES)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tiny_model), dtype], capture_output=True, text=True, timeout=300)
    found = re.findall(r"rank (\d): held (\d+) planned (\d+) codes (\d+)", out.stdout)
    assert len(found) == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert all(held == planned and int(codes) > 0 for _, held, planned, codes in found)


@pytest.mark.parametrize("rank", [1, 0])
def test_an_out_of_memory_in_a_sharded_pass_ends_the_run_and_rank_0_saves_the_state_before_it(runs, tmp_path, rank):
    """With sharded weights the other process waits inside the pass, so the run cannot agree to recompute more as a
    data-parallel run does: it ends (exit 3 from the process that ran out). Rank 0 holds the whole adapter, optimizer
    and its own RNG: where it ran out it saves the state before the step; elsewhere the newest checkpoint is kept."""
    from test_distributed import OUT_OF_MEMORY_ON_RANK_1

    script, run_dir = tmp_path / "out_of_memory.py", tmp_path / "run"
    script.write_text(OUT_OF_MEMORY_ON_RANK_1.replace('os.environ["RANK"] == "1"', f'os.environ["RANK"] == "{rank}"'))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), *_flags(runs["model"], runs["data"], "", run_dir, "--max-steps", "4"), "--fsdp",
                          "--grad-accum", "2", "--save-every", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    said = " ".join((out.stdout + out.stderr).split())
    assert out.returncode != 0 and "error: RuntimeError" not in said and "Connection closed" not in said, said[-3000:]  # (torchrun's
    # own traceback follows: this test runs it directly; `infopo train --nproc` runs it in-process and exits 3, below)
    # rank `rank`'s third training pass is step 2's second micro-batch: the state before step 2 is checkpoint-1
    assert "out of memory at step 2" in said and "resume" in said, said[-3000:]
    assert ("the state before step 2 is saved" if rank == 0 else "the newest checkpoint is kept") in said
    # rank 0, left waiting in the pass, says why it stops (unless torchrun ends it first)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("error:", "rank 1: error:"))]
    assert len(errors) == 1 and "out of memory at step 2" in errors[0], errors  # the one that ran out, alone
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [r["step"] for r in _records(run_dir) if r["kind"] == "train"] == [1]


def test_the_launcher_exits_with_the_reason_a_process_gave_not_with_the_one_it_ended(monkeypatch, capsys):
    """Rank 1 ran out of memory (exit 3); torchrun then ended rank 0 (-15): `infopo train --nproc 2` exits 3."""
    from types import SimpleNamespace

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from infopo_cli.train import launch

    def failed(codes: dict[int, int]):
        def run(args):
            err = ChildFailedError.__new__(ChildFailedError)
            err.failures = {rank: SimpleNamespace(exitcode=code) for rank, code in codes.items()}
            raise err
        return run

    for codes, want, printed in (({0: -15, 1: 3}, 3, ""), ({0: 143, 1: 143}, 143, ""), ({0: -15, 1: 1}, 1, "process 1"),
                                 ({0: 1, 1: -15}, 1, "process 0"), ({0: -9}, 1, "process 0")):
        monkeypatch.setattr(torchrun, "run", failed(codes))
        assert launch.launch(2, ["train"]) == want, codes
        assert printed in capsys.readouterr().err


PLANNED = """\
from infopo_cli.cli import main
from infopo_cli.train import recipe

real = recipe.recomputation.for_run


def planned(cfg, *args, **kwargs):
    print(f"PLANNED nproc={cfg.nproc} fsdp={cfg.fsdp} shards={recipe.recomputation.training(cfg, 'cpu', 4).fsdp}", flush=True)
    return real(cfg, *args, **kwargs)


recipe.recomputation.for_run = planned
main()
"""


def test_each_sharded_process_plans_its_memory_with_the_base_split_over_all(runs, tmp_path):
    """torchrun's processes are started without --nproc: the plan must count the world they find, or a run that fits
    N cards is refused for not fitting one."""
    script = tmp_path / "planned.py"
    script.write_text(PLANNED)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
                *_flags(runs["model"], runs["data"], "", tmp_path / "run", "--max-steps", "1"), "--fsdp"])
    assert out.stdout.count("PLANNED nproc=2 fsdp=True shards=2") == 2, out.stdout


def test_4bit_values_are_counted_whatever_dtype_stores_them(tiny_model):
    from infopo_cli.model import stack
    from infopo_cli.model.precision import choose

    counts = {sharded: stack.count_parameters(stack.load_base(str(tiny_model), TrainConfig(model=str(tiny_model), dtype="bf16"),
                                                              choose("bf16"), sharded=sharded)) for sharded in (False, True)}
    assert counts[False] == counts[True] and counts[False][1] > 100_000  # uint8 codes, or the same codes in bf16
