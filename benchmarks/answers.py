"""Held-out answer accuracy over epochs, per loss: InfoPO against DPO, SimPO and RMiPO on the bundled data.

    python benchmarks/answers.py [--losses infopo,dpo,simpo,rmipo] [--seeds 42,1,7] [--epochs 3] [--out DIR]
                                 [--set LOSS:KEY=V,KEY=V ...] [--evals-per-epoch 4] [--max-pairs N] [--max-eval N]
                                 [--task word,columns,units [--split validation|test]]

Every (loss, seed) is an ordinary `infopo train` run of the default preset (embedded SmolLM2-135M-Instruct,
NF4 + LoRA, the bundled 600 training pairs and 150 held-out problems) in its own folder under OUT/runs/, trained
for --epochs with `--eval-generate-every` set to a quarter epoch (steps per epoch = pairs / global batch,
rounded up, as `infopo train` counts them): the policy's greedy answers to the held-out problems are scored at
step 0 (the base model), every quarter epoch and at the end. Runs go seed by seed, so a part of the benchmark
already compares every loss. Rerunning the same command skips the finished runs and continues a stopped one
exactly (`infopo train --resume`); `--seeds` and `--losses` run a part, and any part adds to the same OUT.

`--task columns` trains on a bundled benchmark task's train split and scores its validation split (`--split test`
to report; choose settings on validation only); `--task word,columns,units` does each in OUT/TASK and pools them in
OUT/answers.md. Each table ends problem by problem (from the runs' answers/step-N.jsonl): every run's accuracy with
its 95% Wilson interval, and the first of --losses against each other one on the same problems: McNemar's exact
test per seed, and over all seeds a sign test counting each problem once; a difference counts as real only where
p < 0.05 on the test split (on validation the step was chosen on those problems: exploratory). A task's replies may run to twice
its split's longest chosen reply in the model's tokens (`--set eval_max_new_tokens=N` to choose another).
`--set infopo:beta=0.5,lr=1e-5` changes a loss's settings (any `infopo train` setting, TOML values; without `LOSS:`
it applies to every loss); settings that differ from the preset are part of each run's folder name (a
--task's reply budget aside: a folder trained with another budget is refused, not reused),
so several settings live side by side in one OUT. `--max-pairs`/`--max-eval` train and score on the first
rows only (a smoke run). Writes (in OUT/TASK with several tasks) OUT/answers.png (accuracy against steps: the mean over seeds as a line, their
range as a band, one colour per loss) and OUT/answers.md (per loss, per seed, per evaluation point), prints
the table and the total time.

Cost, measured on a 2-core CPU with bf16 (2026-12-02): scoring the answers dominates. One evaluation is the
150 held-out pairs' log-probs and 150 greedy replies in batches of 64 with the default preset's 128-token budget
(about half the base model's replies never stop before it; a reply that stops leaves its batch): about 2 minutes.
A 3-epoch run has 13 of them next to ~14 minutes of training (225 steps): infopo seed 42 took 39.7 minutes
(13.6 of them training), so 4 losses x 3 seeds take about 8 hours. The base model's replies (step 0) are generated
once per task and budget and read from infopo's answers cache by every later run. Cheaper: `--max-eval 100`,
`--evals-per-epoch 2`, or `--set eval_max_new_tokens=96`. A --task's budget can be longer: on 100 columns problems
(292 new tokens, about half the replies stopping before it) one evaluation took 90-98 s (2026-12-05, 2-core Xeon).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "answers"
LOSSES = ("infopo", "dpo", "simpo", "rmipo")
SEEDS = (42, 1, 7)
ALL = "*"  # --set without LOSS: every loss
# what the benchmark itself decides for each run; a --set of these would break the plan
OWN = ("loss", "seed", "epochs", "max_steps", "eval_generate_every", "output", "preset")
# config.toml holds what `auto` and the defaults resolved to, and where the run lives: not compared
RESOLVED = ("output", "preset", "dtype")
NOT_RESULTS = ("save_every",)  # settings that leave the numbers as they are: a folder that differs only there is the same run


# ---------------------------------------------------------------- planning


def schedule(pairs: int, global_batch: int, epochs: float, evals_per_epoch: int = 4) -> tuple[int, int, int]:
    """(steps per epoch, total steps, steps between answer evaluations) for `pairs` training pairs: `infopo
    train`'s count (a last partial batch is a step), evaluated every quarter epoch by default, rounded to whole
    steps (the bundled data's 75 steps an epoch: every 19); `evals_per_epoch` 0: at the start and the end only."""
    per_epoch = math.ceil(pairs / global_batch)
    total = max(1, math.ceil(epochs * per_epoch))
    return per_epoch, total, max(1, round(per_epoch / evals_per_epoch)) if evals_per_epoch else total


def value(text: str) -> Any:
    """A --set value as TOML reads it (0.5, 1e-5, true, "x"); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_settings(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """['infopo:beta=0.5,lr=1e-5', 'eval_max_new_tokens=96'] -> {'infopo': {...}, '*': {...}}; later items win."""
    from infopo_cli.config import check_keys

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, colon, body = item.partition(":")
        if not colon or "=" in target:  # no LOSS: prefix
            target, body = ALL, item
        pairs = [part.partition("=") for part in body.split(",") if part.strip()]
        if not pairs or any(not equals or not key.strip() for key, equals, _ in pairs):
            raise SystemExit(f"error: --set {item}: write [LOSS:]KEY=V[,KEY=V] (e.g. --set infopo:beta=0.5,lr=1e-5)")
        settings = {key.strip().replace("-", "_"): value(v.strip()) for key, _, v in pairs}
        check_keys(list(settings), f"--set {item}")
        if own := sorted(set(settings) & set(OWN)):
            raise SystemExit(f"error: --set {item}: {', '.join(own)} is set by the benchmark itself "
                             "(--losses, --seeds, --epochs, --out)")
        out.setdefault(target.strip(), {}).update(settings)
    return out


def model_name(model: Any) -> str:
    """A --set model's name in folders and titles: a file's or folder's name (its path is noise)."""
    return Path(str(model)).name.removesuffix(".gguf") or str(model)


def tag(settings: dict[str, Any]) -> str:
    """'-beta0.5-lr1e-05' for a run's folder name."""
    def text(k: str, v: Any) -> str:
        v = model_name(v) if k == "model" else v
        return f"{v:g}" if isinstance(v, float) else re.sub(r"[^A-Za-z0-9.+-]", "_", str(v))

    return "".join(f"-{k.replace('_', '-')}{text(k, v)}" for k, v in sorted(settings.items()))


@dataclass(frozen=True)
class RunSpec:
    loss: str
    seed: int
    name: str                 # its folder under OUT/runs
    settings: dict[str, Any]  # the train settings on top of the preset (loss, seed, length, evaluation, --set)
    steps_per_epoch: int


def plan(preset: str, losses: Sequence[str], seeds: Sequence[int], epochs: float,
         overrides: dict[str, dict[str, Any]], data: dict[str, str] | None = None,
         suffix: str = "", evals_per_epoch: int = 4) -> list[RunSpec]:
    """One run per seed and loss, seed by seed; the length and evaluation interval come from each run's own
    pairs (or unpaired rows) and global batch. A loss name or setting `infopo train` would refuse is an error before any training."""
    from infopo_cli import presets
    from infopo_cli.config import override
    from infopo_cli.data.loading import DataOptions
    from infopo_cli.data.mixing import load_mix
    from infopo_cli.losses.registry import resolve
    from infopo_cli.train import preflight

    if unknown := sorted(set(overrides) - {ALL, *losses}):
        raise SystemExit(f"error: --set {unknown[0]}:...: {unknown[0]} is not among --losses {','.join(losses)}")
    base, counted = presets.load_preset(preset), {}
    specs = []
    for seed in seeds:
        for loss in losses:
            given = {**overrides.get(ALL, {}), **overrides.get(loss, {})}
            settings = {**(data or {}), **given, "loss": loss, "seed": seed, "epochs": epochs}
            cfg = override(base, settings, source="benchmark")
            cfg.validate()
            spec, params = resolve(cfg.loss, cfg.loss_overrides())
            key = str(cfg.data)
            if key not in counted:  # the pairs `infopo train` will read (a mix's size depends on the seed: rare here)
                counted[key] = load_mix(cfg.data, DataOptions.from_config(cfg), cfg.seed).pairs
            # what it trains on: pairs, or unpaired rows where the loss or --unpair splits them (twice as many)
            trained = preflight.fit_to_loss(cfg, spec, params, counted[key])[0]
            per_epoch, total, every = schedule(len(trained), cfg.batch_size * cfg.grad_accum, epochs, evals_per_epoch)
            name = f"{loss}{tag(given)}-{epochs:g}ep{suffix}-seed{seed}"
            # a checkpoint every quarter epoch: a run killed by the machine (not stopped) loses at most that much
            specs.append(RunSpec(loss, seed, name, {**settings, "max_steps": total, "eval_generate_every": every,
                                                    "save_every": math.ceil(per_epoch / 4)}, per_epoch))
    return specs


def differences(saved, expected) -> list[str]:
    """Settings in which a run folder's config.toml differs from what the plan would train now (a changed preset,
    say): such a folder must not count as this run. Unset expected values (a loss's default) are not compared."""
    from infopo_cli.config import FIELDS

    return [f"{k} {getattr(saved, k)!r} there, {getattr(expected, k)!r} now" for k in FIELDS
            if k not in RESOLVED + NOT_RESULTS and getattr(expected, k) not in (None, "auto") and getattr(saved, k) != getattr(expected, k)]


def check_folders(specs: Sequence[RunSpec], runs_dir: Path, preset: str) -> None:
    from infopo_cli import presets
    from infopo_cli.config import override
    from infopo_cli.train.compare import state_of

    base = presets.load_preset(preset)
    for spec in specs:
        folder = runs_dir / spec.name
        if state_of(folder) == "new":
            continue
        expected = override(base, {**spec.settings, "output": str(folder)}, source="benchmark")
        if diff := differences(presets.load_preset(str(folder / "config.toml")), expected):
            raise SystemExit(f"error: {folder} was trained with other settings ({'; '.join(diff)}); move it away or "
                             "pass another --out")


def task_sources(task: str, split: str) -> dict[str, str]:
    """Training and held-out data of a bundled benchmark task (`infopo_cli/bundled/tasks.py`): its train split, and
    its validation split (for choosing settings) or test split (only for reporting)."""
    from infopo_cli.bundled.tasks import TASKS

    if task not in TASKS:
        raise SystemExit(f"error: --task {task}: one of {', '.join(TASKS)}")
    if split not in ("validation", "test"):
        raise SystemExit(f"error: --split {split}: validation (to choose settings) or test (to report)")
    return {"data": f"bundled:{task}_train", "eval_data": f"bundled:{task}_{split}"}


def reply_budgets(specs: Sequence[RunSpec]) -> str:
    """', replies of up to N new tokens' for the header (per loss where they differ; '' where the preset decides)."""
    budgets = {s.loss: s.settings["eval_max_new_tokens"] for s in specs if "eval_max_new_tokens" in s.settings}
    if not budgets:
        return ""
    if len(set(budgets.values())) == 1:
        return f", replies of up to {next(iter(budgets.values()))} new tokens"
    return ", replies of up to " + ", ".join(f"{n} ({loss})" for loss, n in budgets.items()) + " new tokens"


def task_tokenizer(model: str) -> Any:
    """The tokenizer of the model a --task run trains (the embedded default is converted once, as `infopo train` does)."""
    from infopo_cli.errors import InfopoError
    from infopo_cli.model.source import resolve_source
    from infopo_cli.model.stack import load_tokenizer

    try:
        return load_tokenizer(resolve_source(model, log=lambda line: None))
    except (InfopoError, OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read the tokenizer of {model}: {str(err).splitlines()[0]}") from None


def answer_budget(eval_source: str, tokenizer: Any) -> int:
    """New tokens enough for every scored reply to finish: twice the longest chosen reply of `eval_source` in the
    model's tokens, as the default preset sizes its own (the columns task's worked replies run past its 128)."""
    from infopo_cli.data.sources import read_rows

    longest = max((len(tokenizer(row["chosen"], add_special_tokens=False)["input_ids"])
                   for _, row in read_rows(eval_source) if isinstance(row, dict) and isinstance(row.get("chosen"), str)),
                  default=0)
    if not longest:
        raise SystemExit(f"error: {eval_source} has no chosen reply to size the answer budget by")
    return 2 * longest


def slice_rows(spec: str, rows: int, folder: Path) -> str:
    """The first `rows` lines of a .jsonl source, as a file in `folder` (a smoke run's data)."""
    from infopo_cli.data.sources import resolve

    source = resolve(spec)
    if source.suffix != ".jsonl":
        raise SystemExit(f"error: --max-pairs/--max-eval slice a .jsonl file; {spec} is not one")
    lines = [line for line in source.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()][:rows]
    path = folder / f"{source.stem}-first{rows}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != "".join(lines):
        path.write_text("".join(lines), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Point:
    step: int
    by_seed: dict[int, float]  # answer accuracy of each seed that reached this evaluation

    @property
    def mean(self) -> float:
        return sum(self.by_seed.values()) / len(self.by_seed)

    @property
    def low(self) -> float:
        return min(self.by_seed.values())

    @property
    def high(self) -> float:
        return max(self.by_seed.values())


@dataclass(frozen=True)
class Curve:
    label: str              # the loss and its settings
    seeds: tuple[int, ...]
    points: list[Point]
    steps_per_epoch: int

    def best(self) -> Point | None:
        return max(self.points, key=lambda p: p.mean, default=None)


def curve(label: str, records_by_seed: dict[int, list[dict]], steps_per_epoch: int) -> Curve:
    """The seeds' answer-accuracy evaluations, step by step."""
    from infopo_cli.reporting.plot import answer_curve

    by_step: dict[int, dict[int, float]] = {}
    for seed, records in records_by_seed.items():
        for step, accuracy in zip(*answer_curve(records)):
            by_step.setdefault(step, {})[seed] = accuracy
    return Curve(label, tuple(records_by_seed), [Point(s, by_step[s]) for s in sorted(by_step)], steps_per_epoch)


def percent(x: float) -> str:
    return f"{100 * x:.1f}"


def cell(point: Point | None, seeds: Sequence[int]) -> str:
    """'18.0 / 14.0 / 15.0 (mean 15.7, 95% CI 10.5–20.8)': each seed in the curve's order ('–' for a seed without it),
    then the mean and, over two or more seeds, the 95% interval of the mean (Student's t; within 0–100)."""
    from infopo_cli.reporting.intervals import mean_interval

    if point is None:
        return ""
    values = " / ".join(percent(point.by_seed[s]) if s in point.by_seed else "–" for s in seeds)
    if len(seeds) == 1:
        return values
    if len(point.by_seed) < 2:
        return f"{values} (mean {percent(point.mean)})"
    _, low, high = mean_interval(list(point.by_seed.values()))
    return f"{values} (mean {percent(point.mean)}, 95% CI {percent(max(0.0, low))}–{percent(min(1.0, high))})"


def markdown(curves: Sequence[Curve], choose: bool = True) -> str:
    """One row per evaluation step, one column per loss; answer accuracy in % of the held-out problems. The last row
    is each curve's best mean (`choose`: on validation data, where settings are chosen) or its mean at the end of
    training (on test data, which must not pick the step it is reported at)."""
    steps = sorted({p.step for c in curves for p in c.points})
    per_epoch = curves[0].steps_per_epoch if curves else 1
    head = ["step", "epoch", *(f"{c.label}, seed{'s' * (len(c.seeds) > 1)} {' / '.join(map(str, c.seeds))}"
                                for c in curves)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for step in steps:
        points = [next((p for p in c.points if p.step == step), None) for c in curves]
        lines.append(f"| {step} | {step / per_epoch:.2f} | " + " | ".join(cell(p, c.seeds) for p, c in zip(points, curves))
                     + " |")
    if choose:
        bests = [c.best() for c in curves]
        lines.append("| best mean | | " + " | ".join("" if b is None else f"**{percent(b.mean)}** at step {b.step}"
                                                     for b in bests) + " |")
    else:
        ends = [c.points[-1] if c.points else None for c in curves]
        lines.append("| end of training | | " + " | ".join("" if e is None else f"**{percent(e.mean)}** at step {e.step}"
                                                           for e in ends) + " |")
    return "\n".join(lines) + "\n"


def base_accuracy(curves: Sequence[Curve]) -> float | None:
    """Every run's step 0 is the same base model (the LoRA starts at zero): the mean of their step-0 scores."""
    starts = [v for c in curves for p in c.points if p.step == 0 for v in p.by_seed.values()]
    return sum(starts) / len(starts) if starts else None


def plot(curves: Sequence[Curve], path: Path, title: str) -> bool:
    """Mean line and min-max band per loss, the base model at step 0, epochs on the top axis; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator, PercentFormatter
    except ImportError:
        return False
    from infopo_cli.reporting.plot import save_figure

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for curve_ in curves:
        steps = [p.step for p in curve_.points]
        spread = f"mean of {len(curve_.seeds)} seeds, band: min–max" if len(curve_.seeds) > 1 else f"seed {curve_.seeds[0]}"
        line = ax.plot(steps, [p.mean for p in curve_.points], "-o", ms=4, lw=1.8, label=f"{curve_.label} ({spread})")[0]
        ax.fill_between(steps, [p.low for p in curve_.points], [p.high for p in curve_.points],
                        color=line.get_color(), alpha=0.18, lw=0)
    if (base := base_accuracy(curves)) is not None:
        ax.axhline(base, color="black", ls=":", lw=1)
        ax.plot([0], [base], "k*", ms=13, label=f"base model (step 0): {percent(base)}%", zorder=5)
    if curves:
        per_epoch = curves[0].steps_per_epoch
        last = max((p.step for c in curves for p in c.points), default=0)
        for epoch in range(1, last // per_epoch + 1):
            ax.axvline(epoch * per_epoch, color="grey", lw=0.6, alpha=0.5)
        top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out answer accuracy (greedy, exact match)")
    fig.suptitle(title, fontsize=10)  # above the epoch axis, which takes the axes' own title space
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def curves_of(specs: Sequence[RunSpec], runs_dir: Path) -> list[Curve]:
    """The planned runs read back (as `infopo report` reads them), one curve per loss over its seeds."""
    from infopo_cli.reporting.runs import read_run
    from infopo_cli.reporting.table import params_text

    out = []
    for loss in dict.fromkeys(s.loss for s in specs):
        mine = [s for s in specs if s.loss == loss]
        runs = {s.seed: read_run(runs_dir / s.name) for s in mine}
        first = next(iter(runs.values()))
        lr = first.settings.get("lr")
        label = f"{loss} ({', '.join(filter(None, [params_text(first), f'lr={lr:g}' if isinstance(lr, float) else '']))})"
        out.append(curve(label, {seed: run.records for seed, run in runs.items()}, mine[0].steps_per_epoch))
    return out


# ---------------------------------------------------------------- problem by problem


@dataclass(frozen=True)
class Scored:
    """One run's answers at the step it is reported at, in the held-out order: each problem (FILE:LINE) and whether
    the run got it right."""

    loss: str
    seed: int
    task: str
    step: int
    problems: tuple[str, ...]
    right: tuple[bool, ...]


def scored(run_dir: Path, step: int) -> tuple[tuple[str, ...], tuple[bool, ...]] | None:
    """(problems, right or wrong) at `step` from the run's answers/step-N.jsonl; None where the run did not write it
    (trained before infopo wrote them)."""
    import json

    from infopo_cli.train.answer_eval import answers_file

    path = answers_file(run_dir, step)
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tuple(r["where"] for r in records), tuple(bool(r["right"]) for r in records)


def scored_runs(specs: Sequence[RunSpec], curves: Sequence[Curve], runs_dir: Path, choose: bool,
                task: str = "") -> tuple[list[Scored], list[str]]:
    """Every run's answers at its loss's reported step: the best mean step (`choose`, on validation) or the end of
    training (on test); and the runs without an answers file there, named."""
    out, missing = [], []
    for curve_, loss in zip(curves, dict.fromkeys(s.loss for s in specs)):
        point = curve_.best() if choose else (curve_.points[-1] if curve_.points else None)
        if point is None:
            continue
        for spec in specs:
            if spec.loss != loss:
                continue
            if (found := scored(runs_dir / spec.name, point.step)) is None:
                missing.append(f"{spec.name} (step {point.step})")
            else:
                out.append(Scored(loss, spec.seed, task, point.step, *found))
    return out, missing


def problem_tables(runs: Sequence[Scored], first: str, choose: bool) -> str:
    """Each run's accuracy with its 95% Wilson interval (and, over several tasks, each loss and seed over all of them);
    then `first` against each other loss on the same problems: per seed (its tasks together) McNemar's exact test on
    the problems only one of the two gets right, and over all seeds a sign test that counts each problem once (by how
    many seeds each gets it right). A difference is real only where p < 0.05 on data no setting was chosen on: on
    validation (`choose`) the reported step was picked on these very problems, so the p-values are exploratory."""
    from infopo_cli.reporting.intervals import mcnemar, sign_test, wilson

    tasks = any(r.task for r in runs)
    lines = ["| loss |" + (" task |" if tasks else "") + " seed | step | right | accuracy, 95% CI |",
             "|---|" + ("---|" if tasks else "") + "---:|---:|---:|---|"]
    rows = [(r.loss, r.task, r.seed, f"{r.step}{' (base model)' * (r.step == 0)}", r.right) for r in runs]
    if len({r.task for r in runs}) > 1:  # each loss and seed over every task, too
        for loss, seed in dict.fromkeys((r.loss, r.seed) for r in runs):
            rows.append((loss, "all", seed, "", [x for r in runs if (r.loss, r.seed) == (loss, seed) for x in r.right]))
    for loss, task, seed, step, right in rows:
        k, n = sum(right), len(right)
        low, high = wilson(k, n)
        lines.append(f"| {loss} |" + (f" {task} |" if tasks else "") + f" {seed} | {step} | {k} / {n} | "
                     f"{percent(k / n if n else 0.0)} ({percent(low)}–{percent(high)}) |")
    by = {(r.loss, r.task, r.seed): r for r in runs}
    others = [loss for loss in dict.fromkeys(r.loss for r in runs) if loss != first]
    if not others or not any(r.loss == first for r in runs):
        return "\n".join(lines) + "\n"
    lines += ["", ("On validation the step was chosen on these problems: the p-values are exploratory, not tests. "
                   if choose else "") + "Each p-value stands alone (no correction for the several comparisons).", "",
              f"| {first} against | seeds | problems | only {first} right | only the other right | p | verdict |",
              "|---|---|---:|---:|---:|---:|---|"]
    for other in others:
        shared = [key[1:] for key in by if key[0] == other and (first, *key[1:]) in by]  # (task, seed), runs' order
        for key in shared:
            if by[(first, *key)].problems != by[(other, *key)].problems:
                raise SystemExit(f"error: {first} and {other} (seed {key[1]}) were scored on different problems; "
                                 "compare runs of one held-out set")
        seeds = list(dict.fromkeys(seed for _, seed in shared))
        for seed in seeds:
            keys = [key for key in shared if key[1] == seed]
            pair = mcnemar([x for key in keys for x in by[(first, *key)].right],
                           [x for key in keys for x in by[(other, *key)].right])
            steps = {by[(loss, *key)].step for key in keys for loss in (first, other)}
            lines.append(_paired_row(other, str(seed), sum(len(by[(first, *k)].right) for k in keys), pair, choose,
                                     base_only=steps == {0}))
        task_names = list(dict.fromkeys(task for task, _ in shared))
        if len(seeds) > 1:  # the seeds every task has for both losses, each problem once
            common = [seed for seed in seeds if all((task, seed) in shared for task in task_names)]
            if len(common) > 1:
                pair = sign_test(*[[[x for task in task_names for x in by[(loss, task, seed)].right] for seed in common]
                                   for loss in (first, other)])
                problems = sum(len(by[(first, task, common[0])].right) for task in task_names)
                lines.append(_paired_row(other, f"{', '.join(map(str, common))} (sign test)", problems, pair, choose))
    return "\n".join(lines) + "\n"


def _paired_row(other: str, seeds: str, problems: int, pair, choose: bool, base_only: bool = False) -> str:
    from infopo_cli.reporting.intervals import verdict

    said = ("both are the base model (step 0)" if base_only else "exploratory" if choose else verdict(pair.real))
    return f"| {other} | {seeds} | {problems} | {pair.only_first} | {pair.only_second} | {pair.p_value:.3g} | {said} |"


# ---------------------------------------------------------------- running


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_plan(specs: Sequence[RunSpec], runs_dir: Path, preset: str, train: Callable[..., Any],
             say: Callable[[str], None]) -> tuple[Any, dict[str, float]]:
    """Train what is not done yet (`infopo compare`'s runner: finished runs kept, a stopped one resumed);
    (the summary of a run that stopped, or None; wall seconds of each run trained now)."""
    from infopo_cli.train.compare import Variant, configs, run_all

    seconds: dict[str, float] = {}

    def timed(cfg, resume=None):
        t = time.perf_counter()
        summary = train(cfg, resume=resume)
        seconds[Path(cfg.output).name] = time.perf_counter() - t
        say(f"{Path(cfg.output).name}: {summary.status} in {minutes(seconds[Path(cfg.output).name])} "
            f"({summary.steps} steps, {minutes(summary.seconds)} of them training)")
        return summary

    runs_dir.mkdir(parents=True, exist_ok=True)
    variants = [Variant(s.name, s.settings) for s in specs]
    _, stopped = run_all(variants, configs(variants, {}, runs_dir, preset), runs_dir, timed, say)
    return stopped, seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma list (default %(default)s); the first is the "
                        "one the others are compared with problem by problem")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma list (default %(default)s)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--evals-per-epoch", type=int, default=4,
                        help="answer evaluations per epoch (default 4: every quarter epoch; fewer is faster; 0: the "
                        "base model and the end only, for a test split whose length was chosen on validation)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default benchmarks/results/answers)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="[LOSS:]KEY=V[,KEY=V]",
                        help="train settings of one loss (or of all), e.g. infopo:beta=0.5,lr=1e-5; repeatable")
    parser.add_argument("--preset", default=None, help="preset (default: infopo's default, smollm2-135m)")
    parser.add_argument("--task", default=None, help="bundled benchmark tasks, a comma list (word, columns, units): "
                        "train on each one's train split, score on --split (default: the preset's data); several "
                        "tasks go to OUT/TASK each, and OUT/answers.md pools them")
    parser.add_argument("--split", default=None, help="with --task: validation (choose settings, the default) or test "
                        "(report: the table gives each run's end of training, not its best step)")
    parser.add_argument("--max-pairs", type=int, default=None, help="train on the first N pairs only (smoke run)")
    parser.add_argument("--max-eval", type=int, default=None, help="score the first N held-out problems only (smoke run)")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.markup import escape

    console = Console()
    t0 = time.perf_counter()
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds {args.seeds}: whole numbers, comma-separated (--seeds 42,1,7)") from None
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"error: --out {args.out}: a file is there; --out is the folder the runs and tables go in")
    if not losses or not seeds or len(set(losses)) != len(losses) or len(set(seeds)) != len(seeds):
        raise SystemExit("error: name each loss and each seed once (--losses a,b --seeds 42,1)")
    if args.split and not args.task:
        raise SystemExit("error: --split picks a split of a --task; the preset's data has its own held-out set")
    tasks = [t.strip() for t in args.task.split(",") if t.strip()] if args.task is not None else [None]
    if not tasks or len(set(tasks)) != len(tasks):
        raise SystemExit("error: name each task once (--task word,columns,units)")
    for task in tasks:  # every name and the split checked before hours of training on the first task
        if task:
            task_sources(task, args.split or "validation")
    pooled: list[Scored] = []
    for task in tasks:
        out = args.out / task if task and len(tasks) > 1 else args.out
        code, scored_here = benchmark(args, losses, seeds, task, out, console, t0)
        if code:
            return code
        pooled += scored_here
    if len(tasks) > 1:
        split = args.split or "validation"
        title = (f"Answers of {', '.join(tasks)} pooled ({split} split; "
                 f"{len(seeds)} seed{'s' * (len(seeds) > 1)}, {args.epochs:g} epoch{'s' * (args.epochs != 1)})")
        text = (f"{title}; each task's own table is in {', '.join(str(args.out / t / 'answers.md') for t in tasks)}.\n\n"
                + (problem_tables(pooled, losses[0], split == "validation") if pooled
                   else "No run has an answers file to pool.\n"))
        (args.out / "answers.md").write_text(text, encoding="utf-8")
        sys.stdout.write("\n" + text + "\n")
        console.print(f"pooled table -> {escape(str(args.out / 'answers.md'))}", highlight=False)
    return 0


def benchmark(args: argparse.Namespace, losses: list[str], seeds: list[int], task: str | None, out: Path, console,
              t0: float) -> tuple[int, list[Scored]]:
    """Plan, train what is not done, and tabulate one task (or the preset's data) into `out`; (exit code, the
    runs' per-problem answers at the reported step)."""
    from rich.markup import escape

    from infopo_cli import presets
    from infopo_cli.errors import InfopoError
    from infopo_cli.train.compare import state_of

    preset = args.preset or presets.DEFAULT_PRESET
    split = args.split or "validation"
    try:
        overrides = parse_settings(args.settings)
        cfg = presets.load_preset(preset)
        data, suffix = {}, ""
        sources = {"data": str(cfg.data), "eval_data": str(cfg.eval_data)}
        if task:
            sources = data = task_sources(task, split)
            suffix = f"-{task}-{split}"
            # the task's budget; a loss's own --set eval_max_new_tokens wins over it in `plan`
            model = str(overrides.get(ALL, {}).get("model", cfg.model))
            data = {**data, "eval_max_new_tokens": answer_budget(sources["eval_data"], task_tokenizer(model))}
        if args.max_pairs:
            data = {**data, "data": slice_rows(sources["data"], args.max_pairs, out / "data")}
            suffix += f"-{args.max_pairs}pairs"
        if args.max_eval:
            data = {**data, "eval_data": slice_rows(sources["eval_data"], args.max_eval, out / "data")}
            suffix += f"-{args.max_eval}heldout"
        if "data" in data:  # the held-out set goes with it: a slice of the preset's data is no data of one's own
            data.setdefault("eval_data", sources["eval_data"])
        if args.evals_per_epoch < 0:
            raise SystemExit("error: --evals-per-epoch must be 0 (the start and the end only) or more")
        if args.evals_per_epoch != 4:
            suffix += f"-{args.evals_per_epoch}evals"
        specs = plan(preset, losses, seeds, args.epochs, overrides, data, suffix, args.evals_per_epoch)
        runs_dir = out / "runs"
        check_folders(specs, runs_dir, preset)
    except InfopoError as err:
        raise SystemExit(f"error: {err}") from None
    spec0 = specs[0]
    console.print(f"[bold]answers benchmark[/]{f' ({task})' if task else ''}: {len(specs)} runs ({', '.join(losses)} x "
                  f"seeds {', '.join(map(str, seeds))}), {args.epochs:g} epoch(s) = {spec0.settings['max_steps']} steps, "
                  f"answers scored every {spec0.settings['eval_generate_every']} steps (an epoch is "
                  f"{spec0.steps_per_epoch})" + reply_budgets(specs) + f" -> {escape(str(out))}", highlight=False)
    done_before = [s.name for s in specs if state_of(runs_dir / s.name) == "done"]

    from infopo_cli.train.progress import Reporter
    from infopo_cli.train.recipe import train
    from infopo_cli.train.stops import StopNow

    def halted(message: str, code: int) -> tuple[int, list[Scored]]:
        console.print(f"[yellow]{escape(message)}[/]\n[yellow]rerun the same command to continue (finished runs are "
                      f"kept, the stopped one resumes)[/]; {minutes(time.perf_counter() - t0)} so far", highlight=False)
        return code, []

    try:
        stopped, seconds = run_plan(specs, runs_dir, preset,
                                    lambda cfg, resume=None: train(cfg, Reporter(console), resume=resume),
                                    lambda line: console.print(f"[bold]{escape(line)}[/]", highlight=False))
    except StopNow as stop:  # a second Ctrl-C: the run's last complete checkpoint is intact
        return halted(str(stop), stop.exit_code)
    except InfopoError as err:
        return halted(f"error: {err}", err.exit_code)
    if stopped is not None:
        return halted(stopped.message, stopped.exit_code or 1)

    from infopo_cli.reporting.runs import read_run

    choose = not (task and split == "test")
    curves = curves_of(specs, runs_dir)
    answers, missing = scored_runs(specs, curves, runs_dir, choose, task or "")
    # the problems scored (an unpaired run holds two held-out rows per problem, its data_info counts rows)
    problems = len(answers[0].problems) if answers else read_run(runs_dir / spec0.name).data_info.get("eval_pairs", "?")
    model = overrides.get(ALL, {}).get("model")
    title = (f"Held-out answer accuracy during training ({preset}{f', model {model_name(model)}' if model else ''}"
             f"{f', {task} {split}' if task else ''}, {problems} "
             f"held-out problems; {len(seeds)} seed{'s' * (len(seeds) > 1)}, {args.epochs:g} "
             f"epoch{'s' * (args.epochs != 1)})")
    table = f"{title}: answer accuracy in % of the held-out problems.\n\n" + markdown(curves, choose=choose)
    if answers:
        table += ("\nProblem by problem, at each loss's " + ("best step" if choose else "end of training")
                  + ":\n\n" + problem_tables(answers, losses[0], choose))
    if missing:
        table += ("\nNo answers file (runs trained before infopo wrote answers/step-N.jsonl), so left out problem by "
                  "problem: " + ", ".join(missing) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.md").write_text(table, encoding="utf-8")
    drawn = plot(curves, out / "answers.png", title)
    sys.stdout.write("\n" + table + "\n")
    console.print(f"table -> {escape(str(out / 'answers.md'))}"
                  + (f", figure -> {escape(str(out / 'answers.png'))}" if drawn
                     else " (figure skipped: matplotlib is not installed)"), highlight=False)
    trained = ", ".join(f"{name} {minutes(s)}" for name, s in seconds.items())
    console.print(f"total {minutes(time.perf_counter() - t0)}: {len(seconds)} runs trained now ({trained or 'none'}), "
                  f"{len(done_before)} finished before and kept", highlight=False)
    return 0, answers


if __name__ == "__main__":
    sys.exit(main())
