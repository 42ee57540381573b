"""The phases of `benchmarks/gpu.sh`: one GPU run that times infopo against TRL's DPOTrainer on an 8B model.

    python benchmarks/gpu_bench.py prep --work DIR --size 8b|tiny --tokenizer TOKDIR --prompt 256 --response 768 --pairs 20
    python benchmarks/gpu_bench.py plan --work DIR [--gpu-mem 24]
    python benchmarks/gpu_bench.py infopo --work DIR --cap-gib 24 --steps 10 --warmup 3
    python benchmarks/gpu_bench.py trl --work DIR --cap-gib 24 --steps 10 --warmup 3 --fit-seconds 75
    python benchmarks/gpu_bench.py infopo-fit --work DIR --cap-gib 24 --fit-seconds 90
    python benchmarks/gpu_bench.py report --work DIR --out OUT
    python benchmarks/gpu_bench.py tokenizer --source TOKDIR --to DIR   (gpu_wheels.sh: the tokenizer the run carries)

Each phase is its own process (gpu.sh bounds each with `timeout`) and leaves DIR/<phase>.json; `report` turns them
into the Markdown table. The model is a randomly initialised Llama-3-8B-shaped checkpoint (the architecture of
`shared/bench/mk_rand_ckpt.py`, written here again because shared/ does not travel to the GPU machine) with the
embedded SmolLM2 tokenizer (its 49,152 ids are all inside the 128,256-row embedding), its chat template removed so
that both tools read the same plain text: each pair is P prompt tokens and R response tokens (R - 1 words and the
EOS both tools append), every word one token, checked in `prep`. The loss values mean nothing; time and memory do.

TRL's side uses the settings of `shared/bench/anchor_trl.py` (NF4 with double quantisation, bf16 compute, sdpa,
LoRA r16/alpha 16/no dropout on the seven projections, gradient checkpointing, sigmoid DPO beta 0.1, the reference as
the adapter disabled and computed in every step, TRL's default optimizer), on the same pairs. infopo's side is
`infopo train --preset llama3-8b-qlora` with only the data, length, batch and steps given.
"""

from __future__ import annotations

import argparse
import gc
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
from pathlib import Path

GIB = 2**30
PRESET = "llama3-8b-qlora"
# The checkpoint shapes. 8b: shared/bench/mk_rand_ckpt.py's Llama-3-8B config, field for field.
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
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


def cap_memory(cap_gib: float | None) -> dict:
    """Cap this process's CUDA allocator at `cap_gib` (a 24 GB card on a larger one); returns what was set."""
    import torch

    if not (cap_gib and torch.cuda.is_available()):
        return {"cap_gib": None, "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()}
    free, total = torch.cuda.mem_get_info()
    fraction = min(1.0, cap_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"cap_gib": cap_gib, "fraction": round(fraction, 4), "card_total_gib": round(total / GIB, 2),
            "card_free_gib": round(free / GIB, 2), "device": torch.cuda.get_device_name()}


def probe(n: int, cuda: bool, step) -> tuple[bool, float | None, str]:
    """One probe of the fit search at length `n`: (it fits, its peak GiB on a GPU, why not)."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        fake_oom(n)
        step()
        return True, peak_gib() if cuda else None, ""
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        return False, None, "out of memory"


def peak_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GIB
    return None


def rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def steady(times: list[float], warmup: int) -> dict:
    kept = times[warmup:] or times[-1:]
    return {"step_s": statistics.median(kept) if kept else None, "step_s_mean": statistics.mean(kept) if kept else None,
            "steps_timed": len(kept), "all_step_s": [round(t, 4) for t in times]}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate", "infopo"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# --- tokenizer, checkpoint and pairs ----------------------------------------------------------------------------

def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer files of `source` into `target`, without a chat template (both tools then read plain text) and
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


def make_checkpoint(size: str, target: Path, tokenizer: Path, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    marker = target / ".complete"
    if marker.is_file() and (stamp := read_json(marker)) and stamp.get("size") == size:
        say(f"checkpoint {size} already at {target} (from an earlier run on this machine)")
        return {**stamp, "reused": True}
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[size])
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except TypeError:  # an older transformers: torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    made = time.perf_counter() - started
    model.save_pretrained(target, max_shard_size="4GB")
    del model
    free_memory()
    copy_tokenizer(tokenizer, target)
    stamp = {"size": size, "params_b": round(params / 1e9, 3), "init_s": round(made, 1),
             "written_s": round(time.perf_counter() - started, 1), "path": str(target),
             "bytes": sum(p.stat().st_size for p in target.iterdir())}
    write_json(marker, stamp)
    say(f"checkpoint {size}: {params / 1e9:.2f}B parameters, random on {device} in {made:.0f}s, written to {target} "
        f"in {stamp['written_s']:.0f}s ({stamp['bytes'] / 1e9:.1f} GB)")
    return stamp


def cmd_tokenizer(args) -> None:
    source = Path(args.source) if args.source else None
    if source is None:
        from infopo_cli.model.embedded import ensure_converted

        source = ensure_converted(log=say)
    copy_tokenizer(source, Path(args.to))
    say(f"tokenizer of {source} -> {args.to} (chat template removed)")


def cmd_prep(args) -> None:
    import torch
    from transformers import AutoTokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tokenizer:
        tokdir = Path(args.tokenizer)
    else:  # the dry run: the embedded default's tokenizer (converted once by infopo)
        from infopo_cli.model.embedded import ensure_converted

        tokdir = ensure_converted(log=say)
    ckpt = make_checkpoint(args.size, work / "ckpt", tokdir, device)
    tok = AutoTokenizer.from_pretrained(work / "ckpt")
    words = single_token_words(tok)
    rng = random.Random(0)
    prompt_n, response_n = args.prompt, args.response
    pairs = [{"prompt": text_of(rng, words, prompt_n), "chosen": text_of(rng, words, response_n - 1),
              "rejected": text_of(rng, words, response_n - 1)} for _ in range(args.pairs)]
    with (work / "pairs.jsonl").open("w") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair) + "\n")
    # the exact lengths each tool will read: infopo tokenises prompt and reply apart (+ EOS id), TRL prompt+reply+EOS text
    first = pairs[0]
    ids = lambda text, special=False: tok(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    check = {"prompt": len(ids(first["prompt"], True)), "chosen": len(ids(first["chosen"])) + 1,
             "trl_prompt_chosen": len(ids(first["prompt"] + first["chosen"] + tok.eos_token))}
    exact = check == {"prompt": prompt_n, "chosen": response_n, "trl_prompt_chosen": prompt_n + response_n}
    say(f"{args.pairs} pairs of {prompt_n} prompt + {response_n} response tokens -> {work / 'pairs.jsonl'}; "
        f"tokens as read: {check} ({'exact' if exact else 'NOT the intended lengths'})")
    write_json(work / "prep.json", {"checkpoint": ckpt, "pairs": args.pairs, "prompt": prompt_n, "response": response_n,
                                    "length_check": check, "exact": exact, "device": device, "words": len(words),
                                    "eos": tok.eos_token, "eos_id": tok.eos_token_id, "versions": versions()})


# --- infopo plan ------------------------------------------------------------------------------------------------

def infopo_command() -> list[str]:
    return [sys.executable, "-m", "infopo_cli"]


def run_plan(work: Path, batch: int, length: int, prompt: int, gpu_mem: float, mode: str | None = None) -> dict:
    args = [*infopo_command(), "plan", "--preset", PRESET, "--model", str(work / "ckpt"), "--max-length", str(length),
            "--prompt-length", str(prompt), "--batch-size", str(batch), "--gpu-mem", f"{gpu_mem:g}"]
    if mode:
        args += ["--gradient-checkpointing", mode]
    env = {**os.environ, "COLUMNS": "220", "TERM": "dumb"}
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=work, env=env, timeout=120)
    text = proc.stdout + proc.stderr
    shown = [a for a in args[4:] if a not in ("--model", str(work / "ckpt"))]  # the checkpoint's path says nothing
    result = {"command": "infopo plan " + " ".join(shown), "rc": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
              "text": text}
    if proc.returncode:
        result["error"] = text.strip().splitlines()[-1] if text.strip() else f"exit {proc.returncode}"
        return result
    peak = re.search(r"peak allocated\W+([\d.]+)", text)
    needed = re.search(r"needed on the GPU\W+([\d.]+)", text)
    result["peak_allocated_gib"] = float(peak.group(1)) if peak else None
    result["needed_gib"] = float(needed.group(1)) if needed else None
    result["modes"] = {}
    for name in ("auto", "on", "off", "offload"):
        row = re.search(rf"[│|]\s*{name}\s*[│|]\s*([^│|]+?)\s*[│|]\s*([\d.]+)\s*[│|]\s*([\d.]+)\s*[│|]\s*(yes|no)", text)
        if row:
            result["modes"][name] = {"recomputes": row.group(1), "peak_allocated_gib": float(row.group(2)),
                                     "needed_gib": float(row.group(3)), "fits": row.group(4) == "yes"}
    chosen = re.search(r"predicted peak GPU memory, gradient checkpointing \w+: (.*?)\n\s*[┏+]", text, re.S)
    result["chosen"] = " ".join(chosen.group(1).split()) if chosen else None
    longest = re.search(r"with checkpointing: largest --batch-size at --max-length \d+: (\w+); longest --max-length at "
                        r"--batch-size \d+: (\w+)", text)
    if longest:
        result["largest_batch_ckpt"] = longest.group(1)
        result["longest_length_ckpt"] = int(longest.group(2)) if longest.group(2).isdigit() else None
    return result


def cmd_plan(args) -> None:
    work = Path(args.work)
    prep = read_json(work / "prep.json") or {}
    prompt, response = prep.get("prompt", 256), prep.get("response", 768)
    length = prompt + response
    help_proc = subprocess.run([*infopo_command(), "plan", "--help"], capture_output=True, text=True, cwd=work)
    if help_proc.returncode:
        say("infopo plan is not available in this version of infopo: " + (help_proc.stderr.strip().splitlines() or ["?"])[-1])
        write_json(work / "plan.json", {"available": False})
        return
    out = {"available": True}
    # the main run: the preset's auto checkpointing at batch 2 (what `infopo train` chooses under the cap)
    out["run"] = run_plan(work, 2, length, prompt, args.gpu_mem)
    out["run_on"] = run_plan(work, 2, length, prompt, args.gpu_mem, mode="on")
    # the longest length at batch 1 (every layer recomputed; the prompt keeps its share of the length)
    out["batch1"] = run_plan(work, 1, length, prompt, args.gpu_mem, mode="on")
    for key in ("run", "run_on", "batch1"):
        part = out[key]
        say(f"--- infopo {part['command']}  (rc {part['rc']}, {part['seconds']}s)\n{part['text'].rstrip()}")
    (work / "plan.txt").write_text("\n\n".join(f"$ infopo {out[k]['command']}\n{out[k]['text']}" for k in ("run", "run_on", "batch1")))
    for part in out.values():
        if isinstance(part, dict):
            part.pop("text", None)
    write_json(work / "plan.json", out)
    say("plan: " + json.dumps({k: {f: v.get(f) for f in ("peak_allocated_gib", "needed_gib", "chosen", "longest_length_ckpt", "error")}
                              for k, v in out.items() if isinstance(v, dict)}))


# --- infopo train ------------------------------------------------------------------------------------------------

def cmd_capped(args) -> None:
    """`infopo ARGS` under the memory cap (the GPU run's infopo process); `--gradient-checkpointing auto` plans against
    the cap itself (model/checkpointing.py reads the per-process memory fraction)."""
    info = cap_memory(args.cap_gib)
    if info.get("cap_gib"):
        say(f"capped: CUDA allocator at {args.cap_gib:g} GiB of {info['card_total_gib']} GiB ({info['device']})")
    import infopo_cli

    say(f"infopo_cli from {Path(infopo_cli.__file__).parent}")
    sys.argv = ["infopo", *args.rest]
    from infopo_cli.cli import main

    main()


def train_once(work: Path, args, gradient_checkpointing: str | None, tag: str) -> dict:
    prep = read_json(work / "prep.json") or {}
    length = prep["prompt"] + prep["response"]
    run_dir = work / f"run-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    train_args = ["train", "--preset", PRESET, "--model", str(work / "ckpt"), "--data", str(work / "pairs.jsonl"),
                  "--eval-data", "", "--batch-size", "2", "--grad-accum", "1", "--max-steps", str(args.steps),
                  "--max-length", str(length), "--output", str(run_dir)]
    if gradient_checkpointing:
        train_args += ["--gradient-checkpointing", gradient_checkpointing]
    cmd = [sys.executable, __file__, "_capped", *(["--cap-gib", str(args.cap_gib)] if args.cap_gib else []), "--", *train_args]
    say("$ infopo " + " ".join(a if a else '""' for a in train_args))
    started = time.perf_counter()
    env = {**os.environ, "COLUMNS": "220"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        print(line, end="", flush=True)
    rc = proc.wait()
    wall = time.perf_counter() - started
    text = "".join(lines)
    result = {"tag": tag, "rc": rc, "wall_s": round(wall, 1), "gradient_checkpointing_flag": gradient_checkpointing or "preset (auto)",
              "command": "infopo " + " ".join(train_args)}
    for key, pattern in (("checkpointing", r"(gradient checkpointing \w+: [^\n]+)"),
                         ("reference", r"(reference log-probs of [^\n]+)"), ("load", r"(model \S+ loaded in [^\n]+)"),
                         ("device", r"(device \w+, compute dtype [^\n]+)"), ("infopo_cli", r"infopo_cli from ([^\n]+)")):
        found = re.search(pattern, text)
        result[key] = found.group(1).strip() if found else None
    ref_s = re.search(r"computed once \((\d+)s\)", text)
    result["reference_pass_s"] = int(ref_s.group(1)) if ref_s else None
    summary = read_json(run_dir / "summary.json") or {}
    records = []
    if (run_dir / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if '"train"' in line]
    result.update(steady([r["step_seconds"] for r in records], args.warmup))
    result.update({"status": summary.get("status"), "steps": len(records), "peak_gib": summary.get("peak_memory_gib"),
                   "memory_kind": "max_memory_allocated" if summary.get("device") == "cuda" else "peak RSS",
                   "dtype": summary.get("dtype"), "message": summary.get("message") or None,
                   "share_prompt_tokens_per_step": records[-1]["tokens"] if records else None})
    if rc and not summary:
        result["error"] = text.strip().splitlines()[-1] if text.strip() else f"exit {rc}"
    return result


def cmd_infopo(args) -> None:
    work = Path(args.work)
    out = {"runs": []}
    if os.environ.get("INFOPO_HOME"):  # time the reference pass every time (an earlier run's cache would skip it)
        shutil.rmtree(Path(os.environ["INFOPO_HOME"]) / "cache" / "reference", ignore_errors=True)
    first = train_once(work, args, None, "preset")
    out["runs"].append(first)
    write_json(work / "infopo.json", out)
    # the preset's auto may trust the plan too far on a card this size: then time the every-layer setting instead
    if first["rc"] == 3 or first.get("status") == "out of memory":  # ran out during the run (a refusal is exit 2)
        if deadline() - time.time() > 60:
            say("the preset's setting ran out of memory; timing --gradient-checkpointing on instead")
            out["runs"].append(train_once(work, args, "on", "on"))
        else:
            say("the preset's setting ran out of memory, and too little time is left to retry with checkpointing on")
    write_json(work / "infopo.json", out)
    for run in out["runs"]:
        say("infopo result: " + json.dumps({k: run.get(k) for k in ("tag", "rc", "status", "step_s", "peak_gib", "checkpointing",
                                                                     "reference", "wall_s")}))


# --- TRL's DPOTrainer --------------------------------------------------------------------------------------------

def trl_setup(cap_gib: float | None):
    info = cap_memory(cap_gib)
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    return info, torch, trl, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig


def cmd_trl(args) -> None:
    work = Path(args.work)
    info, torch, trl, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig = trl_setup(args.cap_gib)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    say(f"TRL {trl.__version__}; {json.dumps(versions())}; {json.dumps(info)}")
    prep = read_json(work / "prep.json")
    length = prep["prompt"] + prep["response"]
    ckpt = str(work / "ckpt")
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = [json.loads(line) for line in (work / "pairs.jsonl").open()]
    if cuda:
        dtype = torch.bfloat16
    else:  # the dry run: infopo's own choice for this CPU
        from infopo_cli.model.precision import choose

        dtype = choose("auto").dtype
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                               bnb_4bit_use_double_quant=True)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0 if cuda else "cpu"}, attn_implementation="sdpa")
    load_s = time.perf_counter() - started
    if not cuda:  # bitsandbytes' CPU inference layout has no autograd (see infopo_cli/model/loading.py); GPU untouched
        from infopo_cli.model.loading import _keep_4bit_layout_trainable

        _keep_4bit_layout_trainable(model)
    say(f"TRL side: NF4 load {load_s:.1f}s, allocated {torch.cuda.memory_allocated() / GIB if cuda else 0:.2f} GiB")
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    def config(max_length: int, steps: int, batch: int) -> DPOConfig:
        return DPOConfig(output_dir=tempfile.mkdtemp(dir=work), per_device_train_batch_size=batch,
                         gradient_accumulation_steps=1, max_steps=steps, learning_rate=5e-6, bf16=dtype == torch.bfloat16,
                         gradient_checkpointing=True, max_length=max_length, logging_steps=1, report_to=[],
                         save_strategy="no", loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=False,
                         dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda)

    trainer = DPOTrainer(model=model, args=config(length, args.steps, 2), train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=lora, callbacks=[Timer()])
    # the peak over the whole process, as infopo's summary counts it (the anchor resets it after the load: the same
    # number unless loading peaks higher than training)
    train_started = time.perf_counter()
    result = {"tool": f"TRL {trl.__version__} DPOTrainer", "load_s": round(load_s, 1), "versions": versions(), "cap": info}
    try:
        trainer.train()
        result["status"] = "completed"
    except Exception as err:  # noqa: BLE001  (out of memory, or an API change: recorded, the fit still tries)
        result["status"] = "out of memory" if is_oom(err) else "failed"
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        say(f"TRL main run failed: {result['error']}")
    result["train_wall_s"] = round(time.perf_counter() - train_started, 1)
    result.update(steady(times, args.warmup))
    result["peak_gib"] = peak_gib() if cuda else rss_gib()
    result["memory_kind"] = "max_memory_allocated" if cuda else "peak RSS"
    result["steps"] = len(times)
    out = {"main": result}
    write_json(work / "trl.json", out)
    say("TRL result: " + json.dumps({k: result.get(k) for k in ("status", "step_s", "peak_gib", "steps", "error")}))

    # --- the longest length at batch 1: the same loaded base, a fresh LoRA per try --------------------------------
    try:
        base = trainer.model.unload()
    except Exception as err:  # noqa: BLE001
        out["fit"] = {"error": f"cannot take the LoRA off for the fit: {err}"}
        write_json(work / "trl.json", out)
        return
    del trainer
    free_memory()
    rng = random.Random(1)
    words = single_token_words(tok)
    prompt_share = prep["prompt"] / length

    def try_length(n: int) -> tuple[bool, float | None, str]:
        nonlocal base
        prompt = max(1, round(prompt_share * n))
        rows = [{"prompt": text_of(rng, words, prompt), "chosen": text_of(rng, words, n - prompt - 1),
                 "rejected": text_of(rng, words, n - prompt - 1)}]
        tr = DPOTrainer(model=base, args=config(n, 1, 1), train_dataset=Dataset.from_list(rows), processing_class=tok,
                        peft_config=lora)
        try:
            return probe(n, cuda, tr.train)
        finally:
            base = tr.model.unload()
            tr.accelerator.free_memory()
            del tr
            free_memory()

    out["fit"] = fit_search(try_length, args, start=args.fit_start or 4096, known=length,
                            save=lambda fit: write_json(work / "trl.json", {**out, "fit": fit}))
    write_json(work / "trl.json", out)


# --- infopo's longest length: infopo's own step, in one process --------------------------------------------------

def cmd_infopo_fit(args) -> None:
    """The longest pair infopo trains at batch 1 under the cap: infopo's model stack and step (the reference
    precomputed, then forward, backward and the paged 8-bit AdamW update), every layer recomputed, one step per
    length, on one loaded model (`infopo train` would load the 8B once per length)."""
    work = Path(args.work)
    info = cap_memory(args.cap_gib)
    import torch

    from infopo_cli import presets
    from infopo_cli.config import override
    from infopo_cli.data.tokenization import TokenizedPair
    from infopo_cli.losses import registry
    from infopo_cli.model import loading
    from infopo_cli.model.checkpointing import Recompute
    from infopo_cli.model.precision import choose
    from infopo_cli.train import reference_cache
    from infopo_cli.train.logps import takes_custom_masks
    from infopo_cli.train.recipe import accumulate_gradients, apply_update, make_optimizer

    prep = read_json(work / "prep.json")
    length = prep["prompt"] + prep["response"]
    plan = read_json(work / "plan.json") or {}
    predicted = (plan.get("batch1") or {}).get("longest_length_ckpt")
    cfg = override(presets.load(PRESET), {"model": str(work / "ckpt"), "batch_size": 1, "grad_accum": 1,
                                          "gradient_checkpointing": "on", "eval_data": "", "max_length": length},
                   "benchmark")
    precision = choose(cfg.dtype)
    cuda = precision.device == "cuda"
    say(f"infopo fit: {json.dumps(info)}; {precision.device} {precision.dtype_name}; plan's longest at batch 1: {predicted}")
    started = time.perf_counter()
    tokenizer = loading.load_tokenizer(cfg.model)
    model = loading.attach_lora(loading.load_base(cfg.model, cfg, precision), cfg, Recompute(None))
    say(f"infopo fit: model loaded in {time.perf_counter() - started:.1f}s")
    spec, params = registry.resolve(cfg.loss, cfg.loss_overrides())
    share = cfg.share_prompt and takes_custom_masks(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable, precision.device)
    scaler = torch.amp.GradScaler(precision.device, enabled=False)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rng = random.Random(2)
    ids = lambda n: [rng.randrange(300, 49000) for _ in range(n)]  # noqa: E731
    prompt_share = prep["prompt"] / length
    model.train()

    def try_length(n: int) -> tuple[bool, float | None, str]:
        prompt = max(1, round(prompt_share * n))
        pair = TokenizedPair(ids(prompt), ids(n - prompt - 1) + [eos], ids(n - prompt - 1) + [eos])

        def step() -> None:
            table = reference_cache.compute(model, [pair], 1, pad, share, precision.device)
            reference = reference_cache.ReferenceTable([pair], table)
            metrics, _ = accumulate_gradients(model, [[pair]], spec, params, pad, precision.device, share, scaler, reference)
            apply_update(optimizer, scaler, trainable, cfg.max_grad_norm, cfg.lr, metrics.sums["loss"])

        try:
            return probe(n, cuda, step)
        finally:
            optimizer.zero_grad(set_to_none=True)
            free_memory()

    start = args.fit_start or predicted or 4096
    out = {"tool": "infopo", "plan_longest_ckpt": predicted, "share_prompt": share, "cap": info}
    out["fit"] = fit_search(try_length, args, start=start, known=length,
                            save=lambda fit: write_json(work / "infopo_fit.json", {**out, "fit": fit}))
    write_json(work / "infopo_fit.json", out)


def fake_oom(n: int) -> None:
    """The dry run has no memory cap: FAKE_OOM_ABOVE=N makes longer tries fail as out of memory, so the search's
    both branches run on a CPU too."""
    limit = os.environ.get("FAKE_OOM_ABOVE")
    if limit and n > int(limit):
        import torch

        raise torch.OutOfMemoryError(f"simulated: {n} > FAKE_OOM_ABOVE={limit} (dry run)")


def fit_search(try_length, args, start: int, known: int, save) -> dict:
    """The longest length (a multiple of --fit-grid) that trains one step: up from `start` by doubling until a try
    fails, then halving the gap, until the time is up. `known` fits already (the main run's length)."""
    grid, upper, ends = args.fit_grid, args.fit_upper, deadline(args.fit_seconds)
    snap = lambda n: max(grid, min(upper, n // grid * grid))  # noqa: E731
    fit, fail, tries = None, None, []
    n = snap(start)
    last_time, last_n = None, None
    while True:
        if fit is not None and fail is not None and fail - fit <= grid:
            break
        if last_time is not None and time.time() + 1.5 * last_time * max(1.0, n / last_n) + 5 > ends:
            say(f"fit: stopping, the next try ({n} tokens) would not end in time")
            break
        if time.time() > ends:
            break
        t0 = time.perf_counter()
        ok, peak, why = try_length(n)
        seconds = time.perf_counter() - t0
        tries.append({"length": n, "fits": ok, "seconds": round(seconds, 1), "peak_gib": peak, "why": why})
        say(f"fit: length {n} at batch 1: {'fits' if ok else why} ({seconds:.1f}s"
            + (f", peak {peak:.2f} GiB)" if peak else ")"))
        last_time, last_n = seconds, n
        if ok:
            fit = n
        else:
            fail = n
        save({"longest": fit, "first_failing": fail, "tries": tries, "grid": grid, "upper": upper})
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
    result = {"longest": fit, "first_failing": fail, "tries": tries, "grid": grid, "upper": upper}
    save(result)
    say("fit result: " + json.dumps({k: result[k] for k in ("longest", "first_failing")}))
    return result


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
        return f"≥ {longest} (no failing length found up to {fit['upper']})" if longest >= fit["upper"] else f"≥ {longest} (time up)"
    return f"{longest} ({fail} does not fit)" if fail - longest <= fit["grid"] else f"≥ {longest}, < {fail} (time up)"


def cmd_report(args) -> None:
    work, out_dir = Path(args.work), Path(args.out)
    prep = read_json(work / "prep.json") or {}
    plan = read_json(work / "plan.json") or {}
    infopo = read_json(work / "infopo.json") or {}
    trl = read_json(work / "trl.json") or {}
    infopo_fit = read_json(work / "infopo_fit.json") or {}
    phases = (work / "phases").read_text().split("\n") if (work / "phases").is_file() else []
    prompt, response = prep.get("prompt", 256), prep.get("response", 768)
    yardstick = 2 * (2 * prompt + 2 * response)  # 2 pairs, each two rows of prompt + response
    runs = infopo.get("runs") or []
    main = next((r for r in reversed(runs) if r.get("step_s")), runs[0] if runs else {})
    tmain = trl.get("main") or {}
    ckpt = prep.get("checkpoint") or {}
    device = (tmain.get("cap") or {}).get("device") or (infopo_fit.get("cap") or {}).get("device") or prep.get("device")
    vers = prep.get("versions") or {}
    cap = args.cap_gib
    lines = [f"## GPU benchmark ({'DRY RUN on CPU, tiny model: the numbers mean nothing' if args.dry_run else device})", ""]
    lines.append(f"Model: {ckpt.get('size', '?')} Llama-shaped random checkpoint ({ckpt.get('params_b', '?')}B parameters), "
                 f"NF4 + LoRA; pairs of {prompt} prompt + {response} response tokens, batch 2 pairs, "
                 f"{'no cap (CPU)' if args.dry_run else f'CUDA allocator capped at {cap:g} GiB'}; "
                 f"versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".")
    lines.append(f"tokens/s = {yardstick} tokens per step (2 pairs x two rows of prompt + response, the same yardstick "
                 "for both) / median s/step after the warm-up steps; peak = torch.cuda.max_memory_allocated over the "
                 "whole process (peak RSS on a CPU).")
    lines.append("")
    lines.append("| tool | settings | s/step | tokens/s | peak GiB | reference | longest length at batch 1 |")
    lines.append("|---|---|---|---|---|---|---|")

    def tps(step):
        return None if not step else yardstick / step

    for run in runs:
        checkpointing = (run.get("checkpointing") or f"gradient checkpointing {run.get('gradient_checkpointing_flag')}").split(" (")[0]
        settings = f"`--preset {PRESET}`, loss infopo, LoRA r16/α32/dropout 0.05, {checkpointing}"
        reference = ("precomputed: read from the cache" if "from the cache" in (run.get("reference") or "") else
                     f"precomputed: one pass, {fmt(run.get('reference_pass_s'), 'd', '?')} s before step 1")
        status = "" if run.get("status") == "completed" else f" ({run.get('status') or run.get('error') or 'failed'})"
        lines.append(f"| infopo{status} | {settings} | {fmt(run.get('step_s'), '.3f')} | {fmt(tps(run.get('step_s')), ',.0f')} | "
                     f"{fmt(run.get('peak_gib'))} | {reference} | "
                     f"{fit_text(infopo_fit.get('fit')) if run is main else ''} |")
    if not runs:
        lines.append(f"| infopo | not run | — | — | — | — | {fit_text(infopo_fit.get('fit'))} |")
    status = "" if tmain.get("status") == "completed" else f" ({tmain.get('status') or 'not run'})"
    lines.append(f"| {tmain.get('tool', 'TRL DPOTrainer')}{status} | anchor_trl.py's: sigmoid β 0.1, LoRA r16/α16, gradient "
                 f"checkpointing on, default optimizer | {fmt(tmain.get('step_s'), '.3f')} | {fmt(tps(tmain.get('step_s')), ',.0f')} | "
                 f"{fmt(tmain.get('peak_gib'))} | online: a forward in every step | {fit_text(trl.get('fit'))} |")
    lines.append("")
    if main.get("step_s") and tmain.get("step_s"):
        peaks = (f"; peak ratio {main['peak_gib'] / tmain['peak_gib']:.2f}" if main.get("peak_gib") and tmain.get("peak_gib")
                 else "")
        lines.append(f"infopo/TRL tokens-per-s ratio {tmain['step_s'] / main['step_s']:.2f} (target >= 2.0){peaks}.")
    if main.get("share_prompt_tokens_per_step"):
        lines.append(f"infopo read {main['share_prompt_tokens_per_step']} positions per step (each prompt once) against "
                     f"the yardstick's {yardstick}.")
    ifit, tfit = (infopo_fit.get("fit") or {}).get("longest"), (trl.get("fit") or {}).get("longest")
    if ifit and tfit:
        lines.append(f"longest length ratio infopo/TRL {ifit / tfit:.2f} (target >= 2.0; lower bounds where the time ran out).")
    lines.append("")
    # infopo plan against the measured peak
    if not plan:
        lines.append("`infopo plan`: not run.")
    elif not plan.get("available"):
        lines.append("`infopo plan`: not in this version of infopo (the phase is guarded and was skipped).")
    else:
        lines.append("| `infopo plan` | predicted peak allocated GiB | measured GiB | error |")
        lines.append("|---|---|---|---|")
        for run in runs:
            source = plan.get("run") if run.get("tag") == "preset" else plan.get("run_on")
            predicted = (source or {}).get("peak_allocated_gib")
            measured = run.get("peak_gib") if run.get("memory_kind") == "max_memory_allocated" else None
            error = f"{(predicted - measured) / measured:+.1%}" if predicted and measured else "—"
            lines.append(f"| {(source or {}).get('command', '?')} ({(source or {}).get('chosen') or run.get('checkpointing') or ''}) | "
                         f"{fmt(predicted)} | {fmt(measured)}{'' if measured or not run.get('peak_gib') else ' (RSS: not comparable)'} | {error} |")
        batch1 = plan.get("batch1") or {}
        positions = (read_json(work / "ckpt" / "config.json") or {}).get("max_position_embeddings")
        ceiling = " (the config's max_position_embeddings, the plan's ceiling)" if positions and batch1.get("longest_length_ckpt") == positions else ""
        lines.append(f"| longest --max-length at batch 1, every layer recomputed | {batch1.get('longest_length_ckpt') or batch1.get('error') or '—'} tokens{ceiling} | "
                     f"{fit_text(infopo_fit.get('fit'))} | |")
        if plan.get("run", {}).get("error"):
            lines.append(f"plan failed: {plan['run']['error']}")
    lines.append("")
    for run in runs:
        if run.get("checkpointing"):
            lines.append(f"infopo ({run['tag']}): {run['checkpointing']}")
        if run.get("message"):
            lines.append(f"infopo ({run['tag']}) stopped: {run['message'][:300]}")
        if run.get("error"):
            lines.append(f"infopo ({run['tag']}) error: {run['error'][:300]}")
    if tmain.get("error"):
        lines.append(f"TRL error: {tmain['error']}")
    if prep and not prep.get("exact", True):
        lines.append(f"WARNING: the pairs' token lengths are not the intended ones: {prep.get('length_check')}")
    lines.append("phases (rc, seconds): " + "; ".join(p for p in phases if p.strip()))
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text + "\n")
    write_json(out_dir / "results.json", {"prep": prep, "plan": plan, "infopo": infopo, "trl": trl, "infopo_fit": infopo_fit,
                                          "phases": phases})
    print("\n" + text, flush=True)


# --- command line --------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    def add(name, fn, **defaults):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("--work", default=defaults.get("work"))
        return p

    p = add("tokenizer", cmd_tokenizer)
    p.add_argument("--source")
    p.add_argument("--to", required=True)
    p = add("prep", cmd_prep)
    p.add_argument("--size", choices=sorted(SHAPES), default="8b")
    p.add_argument("--tokenizer")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--response", type=int, default=768)
    p.add_argument("--pairs", type=int, default=24)
    p = add("plan", cmd_plan)
    p.add_argument("--gpu-mem", type=float, default=24.0)
    for name, fn in (("infopo", cmd_infopo), ("trl", cmd_trl), ("infopo-fit", cmd_infopo_fit)):
        p = add(name, fn)
        p.add_argument("--cap-gib", type=float, default=24.0)
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--fit-seconds", type=float, default=75)
        p.add_argument("--fit-upper", type=int, default=32768)
        p.add_argument("--fit-grid", type=int, default=512)
        p.add_argument("--fit-start", type=int)
    p = add("report", cmd_report)
    p.add_argument("--out", required=True)
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("_capped")
    p.set_defaults(fn=cmd_capped)
    p.add_argument("--cap-gib", type=float)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.cmd == "_capped" and args.rest[:1] == ["--"]:
        args.rest = args.rest[1:]
    args.fn(args)


if __name__ == "__main__":
    main()
