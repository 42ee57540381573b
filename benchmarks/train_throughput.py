"""Training throughput of the default preset, side by side with TRL's DPOTrainer as the anchor.

    python benchmarks/train_throughput.py [--steps 8] [--loss infopo] [--dtype auto]

Both sides get the same model (the embedded SmolLM2-135M-Instruct, 4-bit NF4 + LoRA r=16 on all seven
projections, gradient checkpointing), the same bundled pairs, batch size and compute dtype, and run in
separate processes so each peak RSS is its own. Prints seconds per step (median after two warm-up
steps), pairs/s, tokens/s and peak RSS. The anchor runs only when `trl` is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 2


def run_infopo(steps: int, loss: str, dtype: str, batch_size: int) -> dict:
    from rich.console import Console

    from infopo_cli.config import merge
    from infopo_cli.presets import load
    from infopo_cli.train import train

    out = Path(tempfile.mkdtemp()) / "run"
    cfg = merge(load("smollm2-135m"), {"max_steps": steps, "loss": loss, "dtype": dtype, "eval_data": "",
                                        "batch_size": batch_size, "output": str(out)}, "benchmark")
    summary = train(cfg, Console(file=open(os.devnull, "w")))
    records = [json.loads(line) for line in (out / "metrics.jsonl").open() if '"train"' in line]
    step_s = statistics.median(r["step_seconds"] for r in records[WARMUP:])
    tokens = statistics.median(r["tokens_per_s"] * r["step_seconds"] for r in records[WARMUP:])  # per step
    return {"tool": f"infopo ({loss})", "step_s": step_s, "pairs_per_s": batch_size / step_s,
            "tokens_per_s": tokens / step_s, "peak_rss_gib": summary.peak_memory_gib, "dtype": summary.dtype}


def run_trl(steps: int, dtype: str, batch_size: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from infopo_cli.data import read_pairs
    from infopo_cli.embedded import ensure_converted
    from infopo_cli.model import _keep_4bit_layout_trainable
    from infopo_cli.precision import choose

    precision = choose(dtype)
    source = str(ensure_converted())
    tok = AutoTokenizer.from_pretrained(source)
    rows = [{"prompt": [{"role": "user", "content": p.prompt}], "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in read_pairs("bundled:arith_train")]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=precision.dtype)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, dtype=precision.dtype,
                                                 device_map={"": "cpu"})
    _keep_4bit_layout_trainable(model)  # same (correct) kernels on both sides
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, max_steps=steps,
                    learning_rate=2e-4, beta=0.1, loss_type=["sigmoid"], gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=precision.dtype == torch.bfloat16,
                    use_cpu=True, max_length=256, logging_steps=1, report_to=[], save_strategy="no",
                    dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora, callbacks=[Timer()])
    trainer.train()
    step_s = statistics.median(times[WARMUP:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"tool": "TRL DPOTrainer (sigmoid)", "step_s": step_s, "pairs_per_s": batch_size / step_s,
            "tokens_per_s": float("nan"), "peak_rss_gib": peak, "dtype": precision.dtype_name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--loss", default="infopo")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", choices=["infopo", "trl"], help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.only:
        fn = run_infopo if args.only == "infopo" else run_trl
        extra = (args.loss,) if args.only == "infopo" else ()
        print("RESULT " + json.dumps(fn(args.steps, *extra, args.dtype, args.batch_size) if args.only == "infopo"
                                     else fn(args.steps, args.dtype, args.batch_size)), flush=True)
        return
    sides = ["infopo"]
    try:
        import trl

        print(f"anchor: TRL {trl.__version__}")
        sides.append("trl")
    except ImportError:
        print("anchor skipped: `pip install trl` to time TRL's DPOTrainer on the same model and data")
    results = []
    for side in sides:
        proc = subprocess.run([sys.executable, __file__, "--only", side, "--steps", str(args.steps), "--loss", args.loss,
                               "--dtype", args.dtype, "--batch-size", str(args.batch_size)],
                              capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{side} failed:\n{proc.stderr[-3000:]}")
            continue
        results.append(json.loads(lines[-1][7:]))
    print(f"\nSmolLM2-135M-Instruct, NF4 + LoRA r16, batch {args.batch_size} pairs, {args.steps} steps, "
          f"{os.cpu_count()} CPU threads")
    print(f"{'tool':28} {'dtype':6} {'s/step':>8} {'pairs/s':>8} {'tokens/s':>9} {'peak RSS GiB':>13}")
    for r in results:
        print(f"{r['tool']:28} {r['dtype']:6} {r['step_s']:8.2f} {r['pairs_per_s']:8.2f} {r['tokens_per_s']:9.0f} "
              f"{r['peak_rss_gib']:13.2f}")


if __name__ == "__main__":
    main()
