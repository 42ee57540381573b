"""Training throughput of a preset, side by side with TRL's DPOTrainer as the anchor.

    python benchmarks/train_throughput.py [--steps 8] [--loss infopo] [--dtype auto]
    python benchmarks/train_throughput.py --preset llama3-8b-qlora --model CKPT --synthetic 256:768 \
        --cap-gib 24 --steps 5 [--grad-accum 1]

Both sides get the same model (4-bit NF4 + LoRA on all seven projections, gradient checkpointing as the
preset sets it), the same pairs, batch size, accumulation, max length and compute dtype, and run in separate processes so each
peak memory is its own: peak RSS on a CPU, peak allocated GPU memory (torch) on CUDA. By default that is
the embedded SmolLM2-135M-Instruct on the bundled pairs; `--synthetic P:R` replaces the pairs with
prompts of P tokens and responses of R tokens of random words (the shape `shared/bench/anchor_trl.py`
times), and `--cap-gib` caps the GPU memory each side may take (a 24 GB card). Prints seconds per
optimizer step (median after the warm-up steps), pairs/s, tokens/s and peak memory. The anchor runs only
when `trl` is installed. tokens/s is pairs/s times the pair's tokens in the usual two-row layout (prompt twice),
the same yardstick on both sides (infopo reads each prompt once, so it processes fewer tokens than that).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def settings(args: argparse.Namespace):
    """The resolved TrainConfig both sides use: the preset, then the flags of this script."""
    from infopo_cli.config import override
    from infopo_cli.presets import load_preset

    cfg = load_preset(args.preset)
    overrides = {"max_steps": args.steps, "loss": args.loss, "dtype": args.dtype, "eval_data": "", "save_every": 0,
                 "share_prompt": not args.no_share_prompt, "reference": args.reference,
                 **{k: v for k, v in (("model", args.model), ("batch_size", args.batch_size),
                                      ("grad_accum", args.grad_accum), ("data", args.data),
                                      ("gradient_checkpointing", args.gradient_checkpointing)) if v is not None}}
    return override(cfg, overrides, "benchmark")


def synthetic_pairs(tokenizer_source: str, n: int, prompt_tokens: int, response_tokens: int, path: Path) -> None:
    """Random-word pairs of fixed token lengths: throughput depends on shape, not on meaning."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_source)
    rng = random.Random(0)
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))  # noqa: E731

    def text(length: int) -> str:  # every word is at least one token, so `length` words suffice
        ids = tok(" ".join(word() for _ in range(length)), add_special_tokens=False).input_ids[:length]
        return tok.decode(ids)

    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(prompt_tokens), "chosen": text(response_tokens),
                                "rejected": text(response_tokens)}) + "\n")


def tokens_per_pair(cfg, tokenizer) -> float:
    """Mean tokens of a pair in the usual two-row layout (prompt twice, both answers, no padding): the
    same yardstick for both tools, whatever layout each one runs."""
    from infopo_cli.data.loading import read_pairs
    from infopo_cli.data.tokenization import encode_pair

    encoded = [encode_pair(tokenizer, p, cfg.max_length, cfg.max_prompt_length) for p in read_pairs(cfg.data)[:64]]
    return statistics.mean(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in encoded)


def peak_gib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cap_gpu_memory(cap_gib: float | None) -> None:
    import torch

    if cap_gib and torch.cuda.is_available():
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))


def run_infopo(args: argparse.Namespace) -> dict:
    from rich.console import Console

    from infopo_cli.model.stack import load_tokenizer, resolve_source
    from infopo_cli.train.progress import Reporter
    from infopo_cli.train.recipe import train

    cap_gpu_memory(args.cap_gib)
    out = Path(tempfile.mkdtemp()) / "run"
    cfg = settings(args)
    cfg.output = str(out)
    summary = train(cfg, Reporter(Console(file=open(os.devnull, "w"))))
    records = [json.loads(line) for line in (out / "metrics.jsonl").open() if '"train"' in line]
    steady = records[args.warmup:]
    step_s = statistics.median(r["step_seconds"] for r in steady)
    pairs_per_s = cfg.batch_size * cfg.grad_accum / step_s
    per_pair = tokens_per_pair(cfg, load_tokenizer(resolve_source(cfg.model, log=lambda _: None)))
    return {"tool": f"infopo ({cfg.loss}{'' if cfg.share_prompt else ', 2 rows'}, reference {cfg.reference})", "step_s": step_s, "pairs_per_s": pairs_per_s,
            "tokens_per_s": pairs_per_s * per_pair, "peak_gib": summary.peak_memory_gib, "dtype": summary.dtype,
            "device": summary.device, "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from infopo_cli.data.loading import read_pairs
    from infopo_cli.model.stack import _keep_4bit_layout_trainable, load_tokenizer, resolve_source
    from infopo_cli.model.precision import choose

    cap_gpu_memory(args.cap_gib)
    cfg = settings(args)
    precision = choose(cfg.dtype)
    source = resolve_source(cfg.model, log=lambda _: None)
    tok = load_tokenizer(source)
    pairs = read_pairs(cfg.data)
    rows = [{"prompt": [{"role": "user", "content": p.prompt}], "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=precision.dtype)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, dtype=precision.dtype,
                                                 device_map={"": precision.device})
    _keep_4bit_layout_trainable(model)  # same (correct) kernels on both sides
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    cuda = precision.device == "cuda"
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize() if cuda else None
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize() if cuda else None
            times.append(time.perf_counter() - self.t)

    dpo = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg.batch_size,
                    gradient_accumulation_steps=cfg.grad_accum, max_steps=args.steps, learning_rate=cfg.lr, beta=0.1,
                    loss_type=["sigmoid"], gradient_checkpointing=cfg.gradient_checkpointing in ("on", "offload"),
                    gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=precision.dtype == torch.bfloat16,
                    use_cpu=not cuda, max_length=cfg.max_length, logging_steps=1, report_to=[], save_strategy="no",
                    dataloader_num_workers=0, **({"optim": "paged_adamw_8bit"} if cuda else {}))
    trainer = DPOTrainer(model=model, args=dpo, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora, callbacks=[Timer()])
    trainer.train()
    step_s = statistics.median(times[args.warmup:])
    pairs_per_s = cfg.batch_size * cfg.grad_accum / step_s
    return {"tool": "TRL DPOTrainer (sigmoid)", "step_s": step_s, "pairs_per_s": pairs_per_s,
            "tokens_per_s": pairs_per_s * tokens_per_pair(cfg, tok), "peak_gib": peak_gib(precision.device),
            "dtype": precision.dtype_name, "device": precision.device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--model", help="overrides the preset's model (a folder or hub id)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--loss", default="infopo")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, help="pairs per micro-batch (default: the preset's)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (default: the preset's)")
    parser.add_argument("--synthetic", metavar="P:R", help="random-word pairs: P prompt and R response tokens")
    parser.add_argument("--cap-gib", type=float, help="GPU memory cap per side (e.g. 24 for a 24 GB card)")
    parser.add_argument("--no-anchor", action="store_true", help="time infopo only")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        help="on both sides (default: as the preset sets it)")
    parser.add_argument("--no-share-prompt", action="store_true", help="infopo reads each prompt twice, as TRL does")
    parser.add_argument("--reference", choices=["precompute", "online"], default="precompute",
                        help="infopo's reference log-probs: one cached pass before training (default) or a forward per step")
    parser.add_argument("--data", help=argparse.SUPPRESS)  # set for the child processes
    parser.add_argument("--only", choices=["infopo", "trl"], help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--steps must be larger than --warmup")
    if args.only:
        result = run_infopo(args) if args.only == "infopo" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    cfg = settings(args)
    child_args = sys.argv[1:]
    if args.synthetic:
        from infopo_cli.model.stack import resolve_source

        prompt_tokens, response_tokens = (int(x) for x in args.synthetic.split(":"))
        data = Path(tempfile.mkdtemp()) / "synthetic.jsonl"
        pairs = cfg.batch_size * cfg.grad_accum * (args.steps + 1)
        synthetic_pairs(resolve_source(cfg.model, log=print), pairs, prompt_tokens, response_tokens, data)
        child_args += ["--data", str(data)]
    sides = ["infopo"]
    if not args.no_anchor:
        try:
            import trl

            print(f"anchor: TRL {trl.__version__}")
            sides.append("trl")
        except ImportError:
            print("anchor skipped: `pip install trl` to time TRL's DPOTrainer on the same model and data")
    results = []
    for side in sides:
        proc = subprocess.run([sys.executable, __file__, *child_args, "--only", side], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{side} failed:\n{proc.stderr[-3000:]}")
            continue
        results.append(json.loads(lines[-1][7:]))
    if not results:
        sys.exit(1)
    device = results[0]["device"]
    where = (f"{os.cpu_count()} CPU threads" if device == "cpu" else
             f"CUDA{f', capped at {args.cap_gib:g} GiB' if args.cap_gib else ''}")
    print(f"\n{cfg.model}, NF4 + LoRA r{cfg.lora_r}, batch {cfg.batch_size} x accum {cfg.grad_accum} pairs, "
          f"gradient checkpointing {cfg.gradient_checkpointing}, "
          f"max_length {cfg.max_length}, {args.steps} steps ({args.warmup} warm-up), {where}"
          + (f", synthetic {args.synthetic}" if args.synthetic else ""))
    memory = "peak RSS GiB" if device == "cpu" else "peak GPU GiB"
    print(f"{'tool':28} {'dtype':6} {'s/step':>8} {'pairs/s':>8} {'tokens/s':>9} {memory:>13}")
    for r in results:
        print(f"{r['tool']:28} {r['dtype']:6} {r['step_s']:8.2f} {r['pairs_per_s']:8.2f} {r['tokens_per_s']:9.0f} "
              f"{r['peak_gib']:13.2f}")
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
