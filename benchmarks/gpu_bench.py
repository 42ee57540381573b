"""The phases of `benchmarks/gpu.sh`: one GPU run that times infopo against TRL's DPOTrainer (and Unsloth's, when
its wheels were carried) on an 8B model under a 24 GiB cap.

    python benchmarks/gpu_bench.py smoke --work DIR --tokenizer TOKDIR [--require-cuda] [--require-trl]
    python benchmarks/gpu_bench.py prep --work DIR --size 8b|tiny --tokenizer TOKDIR --prompt 256 --response 768 --pairs 24
    python benchmarks/gpu_bench.py infopo --work DIR --cap-gib 24 --steps 10 --warmup 3
    python benchmarks/gpu_bench.py trl --work DIR --cap-gib 24 --steps 10 --warmup 3
    python benchmarks/gpu_bench.py unsloth --work DIR --cap-gib 24 --steps 10 --warmup 3
    python benchmarks/gpu_bench.py report --work DIR --out OUT
    python benchmarks/gpu_bench.py tokenizer --source TOKDIR --to DIR   (gpu_wheels.sh: the tokenizer the run carries)

Each phase is its own process (gpu.sh bounds each with `timeout` and passes its end as PHASE_DEADLINE) and leaves
DIR/<phase>.json; `report` turns them into the Markdown table. The model is a randomly initialised
Llama-3-8B-shaped checkpoint (the architecture of `shared/bench/mk_rand_ckpt.py`, written here again because
shared/ does not travel to the GPU machine) with the embedded SmolLM2 tokenizer (its 49,152 ids are all inside the
128,256-row embedding), its chat template removed so that every tool reads the same plain text: each pair is P
prompt tokens and R response tokens (R - 1 words and the EOS every tool appends), every word one token, checked in
`prep`. The loss values mean nothing; time and memory do.

infopo's side loads the 8B once and times, on that one model, infopo's own training step (`accumulate_gradients`
and `apply_update` of train/recipe.py, the loop of `infopo train`) with the `llama3-8b-qlora` preset: first every
layer recomputed (`--gradient-checkpointing on`, the main row, as TRL's), then the layers `auto` chooses under the
cap; its reference pre-pass (`precomputed_reference`, as `infopo train` runs it, the cache emptied first) is timed
apart; then the longest length at batch 1. TRL's side uses the settings of `shared/bench/anchor_trl.py` (NF4 with
double quantisation, bf16 compute, sdpa, LoRA r16/alpha 16/no dropout on the seven projections, gradient
checkpointing, sigmoid DPO beta 0.1, the reference as the adapter disabled and computed in every step, TRL's default
optimizer), Unsloth's those of `shared/bench/anchor_unsloth.py`, on the same pairs.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

GIB = 2**30
PRESET = "llama3-8b-qlora"
BATCH = 2  # pairs per step on every side
# The checkpoint shapes. 8b: shared/bench/mk_rand_ckpt.py's Llama-3-8B config, field for field. tiny: two layers
# (the smoke phase's offload runs on both) and the tokenizer's own vocabulary, for the CUDA smoke and the CPU dry run.
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "tiny": dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- shared helpers -------------------------------------------------------------------------------------------

def say(*parts) -> None:
    print(*parts, flush=True)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def deadline(seconds: float | None = None) -> float:
    """When this phase must be done: gpu.sh's PHASE_DEADLINE (epoch seconds) less a margin, or now + `seconds`."""
    ends = [float(os.environ["PHASE_DEADLINE"]) - 8] if os.environ.get("PHASE_DEADLINE") else []
    if seconds:
        ends.append(time.time() + seconds)
    return min(ends) if ends else float("inf")


def time_left(least: float = 10) -> float | None:
    """Seconds until this phase's deadline (at least `least`), for a subprocess's timeout; None: no deadline."""
    ends = deadline()
    return None if ends == float("inf") else max(least, ends - time.time())


def cap_memory(cap_gib: float | None) -> dict:
    """Cap this process's CUDA allocator at `cap_gib` (a 24 GB card on a larger one); returns what was set.
    infopo's `auto` plans against the cap too (model/recompute.py reads the per-process fraction)."""
    import torch

    if not torch.cuda.is_available():
        return {"cap_gib": None, "device": "cpu"}
    free, total = torch.cuda.mem_get_info()
    info = {"device": torch.cuda.get_device_name(), "card_total_gib": round(total / GIB, 2),
            "card_free_gib": round(free / GIB, 2)}
    if cap_gib:
        fraction = min(1.0, cap_gib * GIB / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        info.update(cap_gib=cap_gib, fraction=round(fraction, 4))
    return info


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """torch.cuda.max_memory_allocated since the last reset_peak; on a CPU the process's peak RSS (never reset)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_kind() -> str:
    import torch

    return "max_memory_allocated" if torch.cuda.is_available() else "peak RSS"


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def steady(times: list[float], warmup: int) -> dict:
    kept = times[warmup:] or times[-1:]
    return {"step_s": statistics.median(kept) if kept else None, "step_s_mean": statistics.mean(kept) if kept else None,
            "steps_timed": len(kept), "all_step_s": [round(t, 4) for t in times]}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate", "unsloth", "infopo"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def fake_oom(n: int) -> None:
    """The dry run has no memory cap: FAKE_OOM_ABOVE=N makes longer tries fail as out of memory, so the search's
    both branches run on a CPU too."""
    limit = os.environ.get("FAKE_OOM_ABOVE")
    if limit and n > int(limit):
        import torch

        raise torch.OutOfMemoryError(f"simulated: {n} > FAKE_OOM_ABOVE={limit} (dry run)")


def probe(n: int, step) -> tuple[bool, float | None, str]:
    """One try of the fit search at length `n`: (it fits, its peak GiB on a GPU, why not)."""
    import torch

    reset_peak()
    try:
        fake_oom(n)
        step()
        return True, peak_gib() if torch.cuda.is_available() else None, ""
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        return False, None, "out of memory"


def fit_search(try_length, args, start: int, known: int, save) -> dict:
    """The longest length (a multiple of --fit-grid) that trains one step: up from `start` by doubling until a try
    fails, then halving the gap, until the phase's time is up. `known` fits already (the main rows' length)."""
    grid, upper, ends = args.fit_grid, args.fit_upper, deadline()
    snap = lambda n: max(grid, min(upper, n // grid * grid))  # noqa: E731
    fit, fail, tries = None, None, []
    n = snap(start)
    last_time, last_n = None, None

    def result() -> dict:
        return {"longest": fit, "first_failing": fail, "tries": tries, "grid": grid, "upper": upper}

    while not (fit is not None and fail is not None and fail - fit <= grid):
        if last_time is not None and time.time() + 1.5 * last_time * max(1.0, n / last_n) + 5 > ends:
            say(f"fit: stopping, the next try ({n} tokens) would not end in time")
            break
        if time.time() > ends:
            break
        t0 = time.perf_counter()
        ok, peak, why = try_length(n)
        seconds = time.perf_counter() - t0
        tries.append({"length": n, "fits": ok, "seconds": round(seconds, 1), "peak_gib": peak, "why": why})
        say(f"fit: length {n} at batch 1: {'fits' if ok else why} ({seconds:.1f}s" + (f", peak {peak:.2f} GiB)" if peak else ")"))
        last_time, last_n = seconds, n
        if ok:
            fit = n
        else:
            fail = n
        save(result())
        if ok and n >= upper:
            break
        if fail is None:
            n = snap(n * 2)
        else:
            low = fit if fit is not None else (known if known < fail else 0)
            if low == 0 and fail <= grid:
                break
            n = snap((low + fail) // 2)
            if n <= low or n >= fail:
                break
    save(result())
    say("fit result: " + json.dumps({k: result()[k] for k in ("longest", "first_failing")}))
    return result()


# --- tokenizer, checkpoint and pairs ----------------------------------------------------------------------------

def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer files of `source` into `target`, without a chat template (every tool then reads plain text) and
    with the class name every transformers 5 spells the same way."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=1))
    (target / "chat_template.jinja").unlink(missing_ok=True)


def single_token_words(tok, limit: int = 4000) -> list[tuple[str, int]]:
    """Vocabulary entries that are one space-prefixed lowercase word: ' word' encodes to that one id."""
    words = []
    for piece, token_id in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if piece.startswith("Ġ") and piece[1:].isascii() and piece[1:].isalpha() and piece[1:].islower() and 3 <= len(piece) <= 9:
            word = piece[1:]
            if tok(" " + word, add_special_tokens=False)["input_ids"] == [token_id]:
                words.append((word, token_id))
                if len(words) >= limit:
                    break
    if len(words) < 100:
        raise SystemExit(f"the tokenizer has only {len(words)} single-token words; cannot make exact-length pairs")
    return words


def text_of(rng: random.Random, words: list[tuple[str, int]], n: int) -> str:
    return "".join(" " + rng.choice(words)[0] for _ in range(n))


def make_pairs(tok, n: int, prompt: int, response: int, seed: int = 0) -> list[dict]:
    """`n` pairs of `prompt` + `response` tokens as every tool reads them (the response's last token is the EOS)."""
    words, rng = single_token_words(tok), random.Random(seed)
    return [{"prompt": text_of(rng, words, prompt), "chosen": text_of(rng, words, response - 1),
             "rejected": text_of(rng, words, response - 1)} for _ in range(n)]


def write_pairs(path: Path, pairs: list[dict]) -> None:
    with path.open("w") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair) + "\n")


def make_checkpoint(size: str, target: Path, tokenizer: Path, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    marker = target / ".complete"
    if marker.is_file() and (stamp := read_json(marker)) and stamp.get("size") == size:
        say(f"checkpoint {size} already at {target} (from an earlier run on this machine)")
        return {**stamp, "reused": True}
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    shape = {**SHAPES[size]}
    shape["vocab_size"] = shape["vocab_size"] or len(AutoTokenizer.from_pretrained(tokenizer))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    made = time.perf_counter() - started
    model.save_pretrained(target, max_shard_size="4GB")
    del model
    free_memory()
    copy_tokenizer(tokenizer, target)
    stamp = {"size": size, "params": params, "init_s": round(made, 1),
             "written_s": round(time.perf_counter() - started, 1), "path": str(target),
             "bytes": sum(p.stat().st_size for p in target.iterdir())}
    write_json(marker, stamp)
    say(f"checkpoint {size}: {params / 1e9:.2f}B parameters, random on {device} in {made:.0f}s, written to {target} "
        f"in {stamp['written_s']:.0f}s ({stamp['bytes'] / 1e9:.1f} GB)")
    return stamp


def tokenizer_folder(given: str | None) -> Path:
    """The tokenizer to build checkpoints with: the one given, else the embedded default's (converted once by infopo)."""
    if given:
        return Path(given)
    from infopo_cli.model.embedded import ensure_converted

    return ensure_converted(log=say)


def cmd_tokenizer(args) -> None:
    source = tokenizer_folder(args.source)
    copy_tokenizer(source, Path(args.to))
    say(f"tokenizer of {source} -> {args.to} (chat template removed)")


def cmd_prep(args) -> None:
    import torch
    from transformers import AutoTokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = make_checkpoint(args.size, work / "ckpt", tokenizer_folder(args.tokenizer), device)
    tok = AutoTokenizer.from_pretrained(work / "ckpt")
    pairs = make_pairs(tok, args.pairs, args.prompt, args.response)
    write_pairs(work / "pairs.jsonl", pairs)
    # the exact lengths each tool will read: infopo tokenises prompt and reply apart (+ EOS id), TRL prompt+reply+EOS text
    first = pairs[0]
    ids = lambda text, special=False: tok(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    check = {"prompt": len(ids(first["prompt"], True)), "chosen": len(ids(first["chosen"])) + 1,
             "trl_prompt_chosen": len(ids(first["prompt"] + first["chosen"] + tok.eos_token))}
    exact = check == {"prompt": args.prompt, "chosen": args.response, "trl_prompt_chosen": args.prompt + args.response}
    say(f"{args.pairs} pairs of {args.prompt} prompt + {args.response} response tokens -> {work / 'pairs.jsonl'}; "
        f"tokens as read: {check} ({'exact' if exact else 'NOT the intended lengths'})")
    write_json(work / "prep.json", {"checkpoint": ckpt, "pairs": args.pairs, "prompt": args.prompt, "response": args.response,
                                    "length_check": check, "exact": exact, "device": device, "versions": versions()})


# --- smoke: every stack of the run on a tiny model, in seconds, before minutes go into the 8B ----------------------

class SmokeFailure(Exception):
    pass


def infopo_cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "infopo_cli", *args]


def start_doctor(work: Path) -> subprocess.Popen | None:
    """`infopo doctor --preset llama3-8b-qlora` in the background, where this infopo has the command."""
    try:
        known = subprocess.run(infopo_cli_command("doctor", "--help"), capture_output=True, text=True, timeout=30, cwd=work)
    except subprocess.TimeoutExpired:
        return None
    if known.returncode:
        say("infopo doctor: not in this version of infopo (skipped)")
        return None
    return subprocess.Popen(infopo_cli_command("doctor", "--preset", PRESET), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=work, env={**os.environ, "COLUMNS": "160"})


def finish_doctor(doctor: subprocess.Popen | None) -> dict:
    if doctor is None:
        return {"available": False}
    try:
        text, _ = doctor.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        doctor.kill()
        return {"available": True, "rc": None, "note": "did not answer in time"}
    say(f"--- infopo doctor (rc {doctor.returncode}; informational, never fails the smoke)\n{text.rstrip()}")
    return {"available": True, "rc": doctor.returncode}


def train_args(work: Path, ckpt: Path, output: str, *extra: str) -> list[str]:
    """`infopo train` on the tiny model: NF4, the prompt shared, 2 steps of 2 pairs, into work/`output`."""
    return ["train", "--model", str(ckpt), "--data", str(work / "pairs.jsonl"), "--eval-data", "", "--batch-size", "2",
            "--grad-accum", "1", "--max-steps", "2", "--max-length", "128", "--max-prompt-length", "48",
            "--share-prompt", "--output", str(work / output), *extra]


def shown(args: list[str]) -> str:
    return "$ infopo " + " ".join(a or '""' for a in args)


def finished_run(what: str, returncode: int | None, text: str, run: Path, cuda: bool) -> tuple[dict, list[float]]:
    """The summary and the 2 losses of a smoke `infopo train` run in `run`, or a SmokeFailure that says what went wrong."""
    summary = read_json(run / "summary.json") or {}
    if returncode or summary.get("status") != "completed":
        last = text.strip().splitlines()[-1] if text.strip() else f"exit {returncode}"
        raise SmokeFailure(f"{what}: exit {returncode}, status {summary.get('status')}: {last}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r.get("loss") for r in records if r.get("kind") == "train"]
    if len(losses) != 2 or any(not isinstance(x, float) or x != x for x in losses):
        raise SmokeFailure(f"{what} logged the losses {losses}, not 2 finite ones")
    if cuda and summary.get("device") != "cuda":
        raise SmokeFailure(f"{what} ran on {summary.get('device')}, not on the GPU")
    return summary, losses


def smoke_infopo(work: Path, ckpt: Path, cuda: bool) -> dict:
    """`infopo train` itself (the CLI, in its own process) on the tiny model: NF4, the prompt shared, offloaded
    checkpointing on its two layers, 2 steps, the paged 8-bit AdamW on CUDA."""
    args = train_args(work, ckpt, "run", "--gradient-checkpointing", "offload")
    shutil.rmtree(work / "run", ignore_errors=True)
    say(shown(args))
    proc = subprocess.run(infopo_cli_command(*args), capture_output=True, text=True, cwd=work, timeout=time_left(),
                          env={**os.environ, "COLUMNS": "200"})
    text = proc.stdout + proc.stderr
    say(text.rstrip())
    summary, losses = finished_run("infopo train on the tiny model", proc.returncode, text, work / "run", cuda)
    line = re.search(r"gradient checkpointing offload: [^\n]+", text)
    warnings = []
    if "prompts are read twice" in text:
        warnings.append("the prompt was not shared")
    if cuda and not (line and "CPU memory" in line.group(0)):
        warnings.append("the offload line does not say the saved inputs went to CPU memory")
    for warning in warnings:
        say(f"smoke warning: {warning}")
    return {"status": "ok", "device": summary.get("device"), "dtype": summary.get("dtype"), "losses": losses,
            "checkpointing": line.group(0) if line else None, "warnings": warnings}


FLEX_ARGS = ("--attn-implementation", "flex_attention", "--gradient-checkpointing", "on", "--loss", "simpo")


def start_flex(work: Path, ckpt: Path, cuda: bool) -> subprocess.Popen | None:
    """`infopo train --attn-implementation flex_attention` on the tiny model with the prompt shared: the compiled
    block mask and flex attention's triton kernels on the GPU. In the background, beside the other smoke runs, as its
    compiles take most of the smoke's minute; SimPO needs no reference, so only the training graphs compile. CUDA
    only: torch has no flex-attention backward on a CPU."""
    if not cuda:
        say("smoke: flex attention skipped: CUDA only (torch has no flex-attention backward on a CPU)")
        return None
    args = train_args(work, ckpt, "flex", *FLEX_ARGS)
    shutil.rmtree(work / "flex", ignore_errors=True)
    say(shown(args) + "   (in the background)")
    with (work / "flex.log").open("w") as log:  # a file, not a pipe: nothing blocks while the other runs go on
        return subprocess.Popen(infopo_cli_command(*args), stdout=log, stderr=subprocess.STDOUT, text=True, cwd=work,
                                env={**os.environ, "COLUMNS": "200"})


def finish_flex(work: Path, flex: subprocess.Popen | None, cuda: bool) -> dict:
    """The flex-attention run's result. Not fatal: the 8B rows run on sdpa, so a failure here is reported (a smoke
    warning in the table) and the measurement goes on."""
    if flex is None:
        return {"status": "skipped (CUDA only)"}
    late = False
    try:
        flex.wait(timeout=time_left(least=1))
    except subprocess.TimeoutExpired:
        late = True
        flex.kill()
        flex.wait()
    text = (work / "flex.log").read_text(errors="replace")
    say(f"--- infopo train --attn-implementation flex_attention (rc {flex.returncode})\n{text.rstrip()}")
    try:
        if late:
            raise SmokeFailure("infopo train with flex attention did not finish within the smoke phase's time")
        summary, losses = finished_run("infopo train with flex attention", flex.returncode, text, work / "flex", cuda)
    except SmokeFailure as err:
        say(f"smoke warning: {err}")
        return {"status": "failed", "error": str(err)}
    return {"status": "ok", "device": summary.get("device"), "losses": losses}


def smoke_trl(work: Path, ckpt: Path, required: bool, step: bool) -> dict:
    """TRL's DPOTrainer built as the TRL phase builds it on the tiny NF4 model, and with `step` one step of it."""
    if importlib.util.find_spec("trl") is None:
        if required:
            raise SmokeFailure("trl is not importable: carry its wheel (benchmarks/gpu_wheels.sh)")
        say("smoke: trl is not installed here: TRL's DPOTrainer not built (allowed in the dry run)")
        return {"status": "not installed"}
    rows = [json.loads(line) for line in (work / "pairs.jsonl").open()]
    model, tok, dtype, _ = trl_model(ckpt)
    try:
        trainer = trl_trainer(model, tok, dtype, rows, work, max_length=128, steps=1, batch=BATCH)
        if step:
            trainer.train()
    except Exception as err:  # noqa: BLE001  (an API change between versions: the point of the smoke)
        raise SmokeFailure(f"TRL's DPOTrainer on the tiny model: {one_line(err)}") from err
    import trl

    return {"status": "ok" if step else "built", "trl": trl.__version__}


def cmd_smoke(args) -> None:
    top = Path(args.work)
    work = top / "smoke"
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"status": "failed"}
    doctor = flex = None
    try:
        import torch

        cuda = torch.cuda.is_available()
        device = f"{torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})" if cuda else "cpu"
        say(f"smoke: torch {torch.__version__} (CUDA {torch.version.cuda}), device {device}; {json.dumps(versions())}")
        out.update(device=device, versions=versions())
        if args.require_cuda and not cuda:
            raise SmokeFailure(f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})")
        doctor = start_doctor(work) if args.doctor else None
        from transformers import AutoTokenizer

        make_checkpoint("tiny", work / "ckpt", tokenizer_folder(args.tokenizer), "cuda" if cuda else "cpu")
        write_pairs(work / "pairs.jsonl", make_pairs(AutoTokenizer.from_pretrained(work / "ckpt"), 8, 24, 40))
        flex = start_flex(work, work / "ckpt", cuda)
        out["infopo"] = smoke_infopo(work, work / "ckpt", cuda)
        out["trl"] = smoke_trl(work, work / "ckpt", args.require_trl, args.trl_step)
        out["flex"] = finish_flex(work, flex, cuda)
        out["doctor"] = finish_doctor(doctor) if args.doctor else {"available": None}
        out["status"] = "ok"
    except SmokeFailure as err:
        out["error"] = str(err)
    except Exception as err:  # noqa: BLE001  (an import or CUDA error of the image: reported in one line)
        out["error"] = one_line(err)
    finally:
        for child in (doctor, flex):  # a failure came first: they must not hold the phase's output
            if child is not None and child.poll() is None:
                child.kill()
    write_json(top / "smoke.json", out)
    if out["status"] != "ok":
        say(f"SMOKE FAILED: {out['error']}")
        sys.exit(1)
    say("smoke: ok (" + "; ".join(f"{k} {v.get('status')}" for k, v in out.items() if isinstance(v, dict) and "status" in v) + ")")


# --- infopo: one load, the rows, the reference pass, the longest length -----------------------------------------

def run_plan(ckpt: Path, batch: int, length: int, prompt: int, gpu_mem: float, mode: str) -> dict:
    """`infopo plan` (the CLI, in this process) and the numbers its table gives."""
    from typer.testing import CliRunner

    from infopo_cli.cli import app

    args = ["plan", "--preset", PRESET, "--model", str(ckpt), "--max-length", str(length), "--prompt-length", str(prompt),
            "--batch-size", str(batch), "--gpu-mem", f"{gpu_mem:g}", "--gradient-checkpointing", mode]
    started = time.perf_counter()
    done = CliRunner().invoke(app, args, env={"COLUMNS": "220", "TERM": "dumb"})
    text = done.output
    shown = [a for a in args if a not in ("--model", str(ckpt))]  # the checkpoint's path says nothing
    result = {"command": "infopo " + " ".join(shown), "rc": done.exit_code, "seconds": round(time.perf_counter() - started, 1),
              "text": text}
    if done.exit_code:
        result["error"] = text.strip().splitlines()[-1] if text.strip() else one_line(done.exception)
        return result
    peak = re.search(r"peak allocated\W+([\d.]+)", text)
    result["peak_allocated_gib"] = float(peak.group(1)) if peak else None
    chosen = re.search(r"predicted peak GPU memory, gradient checkpointing \w+: (.*?)\n\s*[┏+]", text, re.S)
    result["chosen"] = " ".join(chosen.group(1).split()) if chosen else None
    longest = re.search(r"with checkpointing: largest --batch-size at --max-length \d+: (\w+); longest --max-length at "
                        r"--batch-size \d+: (\w+)", text)
    if longest:
        result["longest_length_ckpt"] = int(longest.group(2)) if longest.group(2).isdigit() else None
    return result


def plans(work: Path, length: int, prompt: int, gpu_mem: float) -> dict:
    """The predictions the run is measured against: batch 2 recomputing every layer (the main row) and as `auto`
    chooses (the extra row), and the longest length at batch 1. Never fails the phase."""
    out: dict = {"available": True}
    for key, batch, mode in (("on", BATCH, "on"), ("auto", BATCH, "auto"), ("batch1", 1, "on")):
        try:
            out[key] = run_plan(work / "ckpt", batch, length, prompt, gpu_mem, mode)
        except Exception as err:  # noqa: BLE001
            out[key] = {"error": one_line(err)}
        if "No such command" in out[key].get("text", ""):
            return {"available": False}
    (work / "plan.txt").write_text("\n\n".join(f"$ {part.get('command')}\n{part.pop('text', '')}" for part in out.values()
                                              if isinstance(part, dict)))
    say("plan: " + json.dumps({k: {f: v.get(f) for f in ("peak_allocated_gib", "chosen", "longest_length_ckpt", "error")}
                              for k, v in out.items() if isinstance(v, dict)}))
    return out


def cmd_infopo(args) -> None:
    """infopo's rows on one loaded 8B: the step of `infopo train` timed with every layer recomputed, then as `auto`
    chooses; the reference pre-pass timed apart; then the longest length at batch 1 on the same model."""
    work = Path(args.work)
    info = cap_memory(args.cap_gib)
    prep = read_json(work / "prep.json")
    length = prep["prompt"] + prep["response"]
    out: dict = {"cap": info, "rows": []}
    plan = plans(work, length, prep["prompt"], args.cap_gib)
    write_json(work / "plan.json", plan)

    import torch

    from infopo_cli import presets
    from infopo_cli.config import override
    from infopo_cli.data.batching import shuffled_batches
    from infopo_cli.data.token_cache import tokenize_cached
    from infopo_cli.data.tokenization import TokenizedPair
    from infopo_cli.model import recompute as recomputation, stack
    from infopo_cli.model.precision import choose
    from infopo_cli.train import preflight, recipe, reference_cache
    from infopo_cli.train.logps import takes_custom_masks
    from infopo_cli.train.progress import Reporter

    source = str(work / "ckpt")
    cfg = override(presets.load_preset(PRESET), {"model": source, "data": str(work / "pairs.jsonl"), "eval_data": "",
                                          "batch_size": BATCH, "grad_accum": 1, "max_length": length,
                                          "gradient_checkpointing": "on"}, "benchmark")
    cfg, spec, loss_params = preflight.check_settings(cfg)
    loaded, _, loss_params = preflight.load_data(cfg, spec, loss_params)
    precision = choose(cfg.dtype)
    cuda = precision.device == "cuda"
    tokenizer = stack.load_tokenizer(source)
    pad = tokenizer.pad_token_id
    train_tok = tokenize_cached(loaded.pairs, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.skip_invalid).pairs
    # what `auto` chooses, as `infopo train` does it: before the model loads, against the (capped) free memory
    auto = recomputation.for_run(replace(cfg, gradient_checkpointing="auto"), source, train_tok, [], precision.device,
                                 precision.dtype.itemsize, cfg.share_prompt)
    say(f"infopo: {json.dumps(info)}; {precision.device} {precision.dtype_name}; {len(train_tok)} pairs; auto: {auto.message}")

    started = time.perf_counter()
    model = stack.attach_lora(stack.load_base(source, cfg, precision), cfg, recomputation.Recompute(None))
    sync()
    out["load_s"] = round(time.perf_counter() - started, 1)
    out["load_peak_gib"] = peak_gib() if cuda else None
    layers = recomputation.decoder_layers(model)
    share = cfg.share_prompt and takes_custom_masks(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    out.update(layers=len(layers), share_prompt=share, pairs=len(train_tok), dtype=precision.dtype_name,
               device=info.get("device"), memory_kind=memory_kind())
    say(f"infopo: model loaded once in {out['load_s']}s ({len(layers)} layers; prompts {'shared' if share else 'read twice'})")

    # the reference pre-pass as `infopo train` runs it (the cache key, one no-grad pass, the store), its cache emptied
    t0 = time.perf_counter()
    reference_cache.model_identity(source)
    out["reference_key_s"] = round(time.perf_counter() - t0, 3)
    shutil.rmtree(reference_cache.cache_path("x").parent, ignore_errors=True)
    reset_peak()
    sync()
    t0 = time.perf_counter()
    reference = recipe.precomputed_reference(model, train_tok, cfg, source, precision, pad, share, None, Reporter())
    sync()
    out["reference_pass_s"] = round(time.perf_counter() - t0, 2)
    out["reference_pass_peak_gib"] = peak_gib()
    write_json(work / "infopo.json", out)

    def recompute_first(n: int | None) -> None:
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = n is None or i < n

    def time_row(tag: str, recompute: int | None, setting: str) -> dict:
        recompute_first(recompute)
        row = {"tag": tag, "checkpointing": setting, "recomputed_layers": len(layers) if recompute is None else recompute}
        optimizer = recipe.make_optimizer(cfg, trainable, precision.device)
        scaler = torch.amp.GradScaler(precision.device, enabled=precision.dtype == torch.float16)
        batches = shuffled_batches(train_tok, BATCH, cfg.seed)
        free_memory()
        reset_peak()
        times, positions = [], None
        model.train()
        try:
            for step in range(args.steps):
                if step >= args.warmup + 2 and time.time() + 2 * times[-1] > deadline():
                    row["note"] = f"stopped after {step} steps: the phase's time was running out"
                    break
                pairs = next(batches)
                sync()
                t_step = time.perf_counter()
                metrics, positions = recipe.accumulate_gradients(model, [pairs], spec, loss_params, pad, precision.device,
                                                                 share, scaler, reference, n_pairs=len(pairs))
                recipe.apply_update(optimizer, scaler, trainable, cfg.max_grad_norm, cfg.lr, metrics.sums["loss"])
                sync()
                times.append(time.perf_counter() - t_step)
            row["status"] = "completed"
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            row.update(status="out of memory", error=one_line(err))
            say(f"infopo {tag}: out of memory after {len(times)} steps")
        row.update(steady(times, args.warmup))
        row.update(steps=len(times), steps_peak_gib=peak_gib(), positions_per_step=positions)
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        free_memory()
        say(f"infopo {tag}: " + json.dumps({k: row.get(k) for k in ("status", "step_s", "steps_peak_gib", "steps", "checkpointing")}))
        return row

    out["rows"].append(time_row("on", None, "on: every layer recomputes"))
    write_json(work / "infopo.json", out)
    auto_setting = "auto: " + auto.message.split(": ", 1)[-1]
    out["rows"].append(time_row("auto", auto.layers, auto_setting))
    write_json(work / "infopo.json", out)

    # the longest length at batch 1, every layer recomputed: the reference of the pair, then one step, per length
    recompute_first(None)
    optimizer = recipe.make_optimizer(cfg, trainable, precision.device)
    scaler = torch.amp.GradScaler(precision.device, enabled=False)
    eos, rng, words = tokenizer.eos_token_id, random.Random(2), [i for _, i in single_token_words(tokenizer)]
    ids = lambda n: [rng.choice(words) for _ in range(n)]  # noqa: E731

    def try_length(n: int) -> tuple[bool, float | None, str]:
        prompt = max(1, round(prep["prompt"] / length * n))
        pair = TokenizedPair(ids(prompt), ids(n - prompt - 1) + [eos], ids(n - prompt - 1) + [eos])

        def step() -> None:
            table = reference_cache.compute(model, [pair], 1, pad, share, precision.device)
            lookup = reference_cache.ReferenceTable([pair], table)
            metrics, _ = recipe.accumulate_gradients(model, [[pair]], spec, loss_params, pad, precision.device, share,
                                                     scaler, lookup)
            recipe.apply_update(optimizer, scaler, trainable, cfg.max_grad_norm, cfg.lr, metrics.sums["loss"])

        try:
            return probe(n, step)
        finally:
            optimizer.zero_grad(set_to_none=True)
            free_memory()

    predicted = (plan.get("batch1") or {}).get("longest_length_ckpt")
    out["fit"] = fit_search(try_length, args, start=args.fit_start or predicted or 4096, known=length,
                            save=lambda fit: write_json(work / "infopo.json", {**out, "fit": fit}))
    write_json(work / "infopo.json", out)


# --- TRL's DPOTrainer (and Unsloth's, which patches it) ------------------------------------------------------------

def step_timer(times: list[float]):
    """A TrainerCallback that appends each step's seconds (the GPU synchronised at both ends) to `times`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            times.append(time.perf_counter() - self.t)

    return StepTimer()


def dpo_config(work: Path, dtype, max_length: int, steps: int, batch: int, **extra):
    """shared/bench's DPOConfig: sigmoid, beta 0.1, lr 5e-6, one step per batch, no saving or logging elsewhere."""
    import torch
    from trl import DPOConfig

    return DPOConfig(output_dir=tempfile.mkdtemp(dir=work), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     max_steps=steps, learning_rate=5e-6, bf16=dtype == torch.bfloat16, max_length=max_length,
                     logging_steps=1, report_to=[], save_strategy="no", beta=0.1, dataloader_num_workers=0,
                     disable_tqdm=True, use_cpu=not torch.cuda.is_available(), **extra)


def trl_model(ckpt: Path):
    """anchor_trl.py's base: NF4 with double quantisation, bf16 compute (on a CPU, infopo's choice), sdpa."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    if cuda:
        dtype = torch.bfloat16
    else:  # the dry run: infopo's own choice for this CPU
        from infopo_cli.model.precision import choose

        dtype = choose("auto").dtype
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.pad_token = tok.pad_token or tok.eos_token
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                               bnb_4bit_use_double_quant=True)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0 if cuda else "cpu"}, attn_implementation="sdpa")
    sync()
    load_s = time.perf_counter() - started
    if not cuda:  # bitsandbytes' CPU inference layout has no autograd (see infopo_cli/model/stack.py); GPU untouched
        from infopo_cli.model.stack import _keep_4bit_layout_trainable

        _keep_4bit_layout_trainable(model)
    return model, tok, dtype, load_s


def trl_trainer(model, tok, dtype, rows: list[dict], work: Path, max_length: int, steps: int, batch: int, callbacks=()):
    """TRL's DPOTrainer with anchor_trl.py's settings: a fresh LoRA r16/alpha 16 on the seven projections, gradient
    checkpointing, the reference (the adapter disabled) computed in every step."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOTrainer

    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    cfg = dpo_config(work, dtype, max_length, steps, batch, gradient_checkpointing=True, loss_type=["sigmoid"],
                     precompute_ref_log_probs=False)
    return DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora,
                      callbacks=list(callbacks))


def timed_train(trainer, times: list[float], warmup: int) -> dict:
    """trainer.train() with the peak reset first (the weights are in it, the load's own peak is not): one row."""
    result: dict = {}
    reset_peak()
    started = time.perf_counter()
    try:
        trainer.train()
        result["status"] = "completed"
    except Exception as err:  # noqa: BLE001  (out of memory, or an API change: recorded, the phase goes on)
        result.update(status="out of memory" if is_oom(err) else "failed", error=one_line(err))
        say(f"training failed: {result['error']}")
    result["train_wall_s"] = round(time.perf_counter() - started, 1)
    result.update(steady(times, warmup))
    result.update(steps=len(times), peak_gib=peak_gib(), memory_kind=memory_kind())
    return result


def cmd_trl(args) -> None:
    work = Path(args.work)
    info = cap_memory(args.cap_gib)
    import trl

    say(f"TRL {trl.__version__}; {json.dumps(versions())}; {json.dumps(info)}")
    prep = read_json(work / "prep.json")
    length = prep["prompt"] + prep["response"]
    rows = [json.loads(line) for line in (work / "pairs.jsonl").open()]
    model, tok, dtype, load_s = trl_model(work / "ckpt")
    say(f"TRL side: NF4 load {load_s:.1f}s, peak {peak_gib():.2f} GiB")
    times: list[float] = []
    trainer = trl_trainer(model, tok, dtype, rows, work, length, args.steps, BATCH, [step_timer(times)])
    result = {"tool": f"TRL {trl.__version__} DPOTrainer", "load_s": round(load_s, 1), "versions": versions(), "cap": info,
              **timed_train(trainer, times, args.warmup)}
    out = {"main": result}
    write_json(work / "trl.json", out)
    say("TRL result: " + json.dumps({k: result.get(k) for k in ("status", "step_s", "peak_gib", "steps", "error")}))

    # --- the longest length at batch 1: the same loaded base, a fresh LoRA per try --------------------------------
    try:
        base = trainer.model.unload()
    except Exception as err:  # noqa: BLE001
        out["fit"] = {"error": f"cannot take the LoRA off for the fit: {one_line(err)}"}
        write_json(work / "trl.json", out)
        return
    del trainer
    free_memory()
    rng = random.Random(1)
    words = single_token_words(tok)

    def try_length(n: int) -> tuple[bool, float | None, str]:
        nonlocal base
        prompt = max(1, round(prep["prompt"] / length * n))
        rows = [{"prompt": text_of(rng, words, prompt), "chosen": text_of(rng, words, n - prompt - 1),
                 "rejected": text_of(rng, words, n - prompt - 1)}]
        tr = trl_trainer(base, tok, dtype, rows, work, n, 1, 1)
        try:
            return probe(n, tr.train)
        finally:
            base = tr.model.unload()
            tr.accelerator.free_memory()
            del tr
            free_memory()

    out["fit"] = fit_search(try_length, args, start=args.fit_start or 4096, known=length,
                            save=lambda fit: write_json(work / "trl.json", {**out, "fit": fit}))
    write_json(work / "trl.json", out)


def cmd_unsloth(args) -> None:
    """anchor_unsloth.py: Unsloth's FastLanguageModel (4-bit) and its LoRA r16/alpha 16, its offloaded checkpointing,
    PatchDPOTrainer, then TRL's DPOTrainer (the reference as the adapter disabled, in every step)."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    work = Path(args.work)
    info = cap_memory(args.cap_gib)
    import torch
    from unsloth import FastLanguageModel, PatchDPOTrainer

    PatchDPOTrainer()
    import trl
    import unsloth
    from datasets import Dataset
    from trl import DPOTrainer

    say(f"Unsloth {unsloth.__version__}, TRL {trl.__version__}; {json.dumps(versions())}; {json.dumps(info)}")
    prep = read_json(work / "prep.json")
    length = prep["prompt"] + prep["response"]
    rows = [json.loads(line) for line in (work / "pairs.jsonl").open()]
    started = time.perf_counter()
    model, tok = FastLanguageModel.from_pretrained(model_name=str(work / "ckpt"), max_seq_length=length, dtype=torch.bfloat16,
                                                   load_in_4bit=True, local_files_only=True)
    sync()
    load_s = time.perf_counter() - started
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none", target_modules=LORA_TARGETS,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    tok.pad_token = tok.pad_token or tok.eos_token
    times: list[float] = []
    trainer = DPOTrainer(model=model, ref_model=None, args=dpo_config(work, torch.bfloat16, length, args.steps, BATCH),
                         train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[step_timer(times)])
    result = {"tool": f"Unsloth {unsloth.__version__} + TRL {trl.__version__} DPOTrainer", "load_s": round(load_s, 1),
              "versions": versions(), "cap": info, **timed_train(trainer, times, args.warmup)}
    write_json(work / "unsloth.json", {"main": result})
    say("Unsloth result: " + json.dumps({k: result.get(k) for k in ("status", "step_s", "peak_gib", "steps", "error")}))


# --- the table -----------------------------------------------------------------------------------------------------

def fmt(value, spec=".2f", none="—"):
    return none if value is None else format(value, spec)


def fit_text(fit: dict | None) -> str:
    if not fit or "tries" not in fit:
        return (fit or {}).get("error", "not run")
    longest, fail = fit.get("longest"), fit.get("first_failing")
    if longest is None:
        return f"< {fail}" if fail else "not measured"
    if fail is None:
        return f"≥ {longest} (no failing length up to {fit['upper']})" if longest >= fit["upper"] else f"≥ {longest} (time up)"
    return f"{longest} ({fail} does not fit)" if fail - longest <= fit["grid"] else f"≥ {longest}, < {fail} (time up)"


def row_peak(infopo: dict, row: dict) -> float | None:
    """An infopo row's peak as `infopo train` would have it: its steps' or its reference pre-pass's, the higher."""
    peaks = [p for p in (row.get("steps_peak_gib"), infopo.get("reference_pass_peak_gib")) if p is not None]
    return max(peaks) if peaks else None


def cmd_report(args) -> None:
    work, out_dir = Path(args.work), Path(args.out)
    prep, plan = read_json(work / "prep.json") or {}, read_json(work / "plan.json") or {}
    smoke, infopo = read_json(work / "smoke.json") or {}, read_json(work / "infopo.json") or {}
    trl, unsloth = read_json(work / "trl.json") or {}, read_json(work / "unsloth.json") or {}
    phases = [p for p in (work / "phases").read_text().splitlines() if p.strip()] if (work / "phases").is_file() else []
    prompt, response = prep.get("prompt", 256), prep.get("response", 768)
    yardstick = BATCH * 2 * (prompt + response)  # 2 pairs, each two rows of prompt + response
    rows = {r["tag"]: r for r in infopo.get("rows", [])}
    tmain, umain = trl.get("main") or {}, unsloth.get("main") or {}
    ckpt, vers = prep.get("checkpoint") or {}, prep.get("versions") or {}
    cap = infopo.get("cap") or tmain.get("cap") or {}
    card = cap.get("device") or smoke.get("device") or prep.get("device") or "?"
    card += f", {cap['card_total_gib']} GiB" if cap.get("card_total_gib") else ""
    n_pairs, pre_s = infopo.get("pairs") or prep.get("pairs"), infopo.get("reference_pass_s")

    def tps(step: float | None, extra_per_step: float = 0.0) -> float | None:
        return yardstick / (step + extra_per_step) if step else None

    # infopo's pre-pass reads every pair once per run: over one epoch it adds pre_s * BATCH / n_pairs to each step
    per_step_reference = pre_s * BATCH / n_pairs if pre_s is not None and n_pairs else None
    title = f"DRY RUN on CPU, tiny model: the numbers mean nothing ({card})" if args.dry_run else card
    lines = [f"## GPU benchmark: {title}", ""]
    if not prep:
        lines.append("Model: not prepared (the run stopped before the prep phase ended).")
    else:
        params = ckpt.get("params") or 0
        size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
        lines.append(f"Model: {ckpt.get('size', '?')} Llama-shaped random checkpoint ({size} parameters), "
                     f"NF4 + LoRA; {n_pairs} pairs of {prompt} prompt + {response} response tokens, batch {BATCH} pairs; "
                     + (f"the CUDA allocator capped at {cap['cap_gib']:g} GiB" if cap.get("cap_gib") else "no cap (CPU)")
                     + "; versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".")
    if prep:
        lines.append(f"tokens/s = {yardstick} tokens per step (the yardstick of every row: {BATCH} pairs x two rows of prompt + "
                     "response) / median s/step after the warm-up steps. 'with the reference' adds infopo's reference "
                     f"pre-pass ({fmt(pre_s, '.1f')} s over the {n_pairs} pairs, once per run) shared out over one epoch's "
                     "steps; TRL's and Unsloth's reference forward is inside every step already. Peak = "
                     "torch.cuda.max_memory_allocated from after the load to the end of the row (infopo: the higher of its "
                     "steps and its pre-pass).")
    lines.append("")
    lines.append("| tool | gradient checkpointing | s/step | tokens/s | tokens/s with the reference | peak GiB | "
                 "longest length at batch 1 |")
    lines.append("|---|---|---|---|---|---|---|")

    def table_row(tool: str, status: str | None, setting: str, step: float | None, with_reference: float | None,
                  peak: float | None, fit: str) -> None:
        shown = "" if status == "completed" else f" ({status or 'not run'})"
        lines.append(f"| {tool}{shown} | {setting} | {fmt(step, '.3f')} | {fmt(tps(step), ',.0f')} | "
                     f"{fmt(tps(step, with_reference) if step and with_reference is not None else None, ',.0f')} | "
                     f"{fmt(peak)} | {fit} |")

    for tag in ("on", "auto"):
        row = rows.get(tag) or {}
        table_row(f"infopo `--preset {PRESET}`" + (" (main row)" if tag == "on" else ""), row.get("status"),
                  row.get("checkpointing") or tag, row.get("step_s"), per_step_reference, row_peak(infopo, row),
                  fit_text(infopo.get("fit")) if tag == "on" else "")
    table_row(tmain.get("tool", "TRL DPOTrainer"), tmain.get("status"), "on (gradient_checkpointing=True)",
              tmain.get("step_s"), 0.0, tmain.get("peak_gib"), fit_text(trl.get("fit")))
    if umain or args.unsloth:
        table_row(umain.get("tool", "Unsloth"), umain.get("status"), "Unsloth's (offloaded)", umain.get("step_s"), 0.0,
                  umain.get("peak_gib"), "—")
    else:
        lines.append("| Unsloth | not carried (UNSLOTH=1 benchmarks/gpu_wheels.sh) | — | — | — | — | — |")
    lines.append("")
    on = rows.get("on") or {}
    if on.get("step_s") and tmain.get("step_s"):
        with_ref = on["step_s"] + (per_step_reference or 0)
        peaks = (f"; peak ratio {row_peak(infopo, on) / tmain['peak_gib']:.2f} (both recompute every layer)"
                 if row_peak(infopo, on) and tmain.get("peak_gib") else "")
        lines.append(f"infopo (on) / TRL tokens/s: {tmain['step_s'] / on['step_s']:.2f} steps only, "
                     f"{tmain['step_s'] / with_ref:.2f} with the reference pre-pass (target >= 2.0){peaks}.")
    ifit, tfit = (infopo.get("fit") or {}).get("longest"), (trl.get("fit") or {}).get("longest")
    if ifit and tfit:
        lines.append(f"longest length at batch 1, infopo / TRL: {ifit / tfit:.2f} (target >= 2.0; lower bounds where the time ran out).")
    if infopo.get("load_s") is not None:
        lines.append(f"infopo: one model load ({infopo['load_s']} s) for both rows and the length search; prompts "
                     f"{'shared' if infopo.get('share_prompt') else 'read twice'} ({on.get('positions_per_step') or '?'} "
                     f"positions per step against the yardstick's {yardstick}); reference-cache key "
                     f"{fmt(infopo.get('reference_key_s'), '.3f')} s; reference pre-pass {fmt(pre_s, '.1f')} s, "
                     f"peak {fmt(infopo.get('reference_pass_peak_gib'))} GiB.")
    lines.append("")
    if not plan:
        lines.append("`infopo plan`: not run.")
    elif not plan.get("available"):
        lines.append("`infopo plan`: not in this version of infopo.")
    else:
        lines.append("| `infopo plan` | predicted | measured | error |")
        lines.append("|---|---|---|---|")
        for tag in ("on", "auto"):
            part, row = plan.get(tag) or {}, rows.get(tag) or {}
            predicted = part.get("peak_allocated_gib")
            measured = row_peak(infopo, row) if infopo.get("memory_kind") == "max_memory_allocated" else None
            error = f"{(predicted - measured) / measured:+.1%}" if predicted and measured else "—"
            lines.append(f"| {part.get('command', '?')}: peak allocated GiB{' (' + part['chosen'] + ')' if part.get('chosen') else ''}"
                         f"{' — ' + part['error'] if part.get('error') else ''} | {fmt(predicted)} | {fmt(measured)} | {error} |")
        batch1 = plan.get("batch1") or {}
        predicted = batch1.get("longest_length_ckpt") or batch1.get("error") or "—"
        lines.append(f"| {batch1.get('command', '?')}: longest --max-length | {predicted} | {fit_text(infopo.get('fit'))} | |")
    lines.append("")
    for label, data in (("smoke", smoke), ("infopo", infopo), ("TRL", tmain), ("Unsloth", umain)):
        if data.get("error"):
            lines.append(f"{label} error: {data['error']}")
    for tag, row in rows.items():
        if row.get("note") or row.get("error"):
            lines.append(f"infopo ({tag}): {row.get('note') or row.get('error')}")
    for warning in (smoke.get("infopo") or {}).get("warnings", []):
        lines.append(f"smoke warning: {warning}")
    if (smoke.get("flex") or {}).get("error"):
        lines.append(f"smoke warning: {smoke['flex']['error']}")
    if prep and not prep.get("exact", True):
        lines.append(f"WARNING: the pairs' token lengths are not the intended ones: {prep.get('length_check')}")
    lines.append("phases (rc, seconds): " + "; ".join(phases))
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text + "\n")
    write_json(out_dir / "results.json", {"prep": prep, "smoke": smoke, "plan": plan, "infopo": infopo, "trl": trl,
                                          "unsloth": unsloth, "phases": phases})
    print("\n" + text, flush=True)


# --- command line --------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    def add(name, fn):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("--work")
        return p

    p = add("tokenizer", cmd_tokenizer)
    p.add_argument("--source")
    p.add_argument("--to", required=True)
    p = add("smoke", cmd_smoke)
    p.add_argument("--tokenizer")
    p.add_argument("--require-cuda", action="store_true")
    p.add_argument("--require-trl", action="store_true")
    p.add_argument("--trl-step", action="store_true", help="train TRL's DPOTrainer one step, not only build it")
    p.add_argument("--doctor", action="store_true", help="also run `infopo doctor` (informational), where it exists")
    p = add("prep", cmd_prep)
    p.add_argument("--size", choices=sorted(SHAPES), default="8b")
    p.add_argument("--tokenizer")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--response", type=int, default=768)
    p.add_argument("--pairs", type=int, default=24)
    for name, fn in (("infopo", cmd_infopo), ("trl", cmd_trl), ("unsloth", cmd_unsloth)):
        p = add(name, fn)
        p.add_argument("--cap-gib", type=float, default=24.0)
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--fit-upper", type=int, default=32768)
        p.add_argument("--fit-grid", type=int, default=512)
        p.add_argument("--fit-start", type=int)
    p = add("report", cmd_report)
    p.add_argument("--out", required=True)
    p.add_argument("--unsloth", type=int, default=0, help="1: Unsloth's wheels were carried (its row was to run)")
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
