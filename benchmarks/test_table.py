"""The test split's report: every run `benchmarks/answers.py --split test` wrote into one OUT, each setting over its seeds.

    python benchmarks/test_table.py OUT [--first SETTING] [--plot FILE.png]

The test split reports; it chooses nothing (settings are picked on validation, `benchmarks/sweep_table.py`), so each
run counts at the end of its training, and only finished runs count (the others are named). Runs that differ only by
seed are one setting (the loss and the settings beyond the preset). Per setting and task, and pooled over its tasks:
each seed's right answers with its 95% Wilson interval; over the seeds the mean with two 95% intervals, that of the
seeds (Student's t: how much another seed would move it) and that of the problems (Wilson's at the mean over one
seed's problems: how much another draw of problems would; the seeds share their problems, so they do not narrow it).
The base model is one more row: the runs' answers at step 0, before training.
Then the `--first` setting (default: the InfoPO one) against each other one problem by problem, per task and pooled:
McNemar's exact test per seed, and over the seeds both have a sign test that counts each problem once. A difference
is real where p < 0.05; each p-value stands alone (no correction for the several comparisons). `--plot` draws each
mean with the wider of its two intervals.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.append(str(Path(__file__).resolve().parent))  # sweep_table, beside this file

from infopo_cli.reporting.intervals import Paired, mcnemar, mean_interval, sign_test, verdict, wilson  # noqa: E402
from infopo_cli.train.compare import state_of  # noqa: E402

from sweep_table import Answers, aligned, interval, pooled, read_answers, reference_of, setting_of  # noqa: E402

SEED = re.compile(r"-seed(\d+) \(test\)$")
POOLED = "pooled"
BASE = "base model (step 0)"  # every run of a task starts from the same base: its answers before the first step

BySeed = dict[int, Answers]  # seed -> each problem's result at the end of that seed's run


@dataclass(frozen=True)
class Setting:
    """One setting's finished runs: task -> seed -> each problem's result at the end of training."""

    name: str
    by_task: dict[str, BySeed]

    @property
    def loss(self) -> str:
        return self.name.split("-", 1)[0]

    @property
    def tasks(self) -> list[str]:
        return sorted(self.by_task)

    def pooled(self) -> BySeed:
        """seed -> the answers over every task of this setting, for the seeds every task has."""
        return pooled(self.by_task, self.tasks)

    def pooled_label(self, all_tasks: Sequence[str]) -> str:
        return POOLED if self.tasks == list(all_tasks) else f"{POOLED} over {', '.join(self.tasks)}"

    def rows(self, all_tasks: Sequence[str]) -> list[tuple[str, BySeed]]:
        """(label, results) per task, then pooled over its tasks (named where they are not all of `all_tasks`)."""
        rows = [(task, self.by_task[task]) for task in self.tasks]
        if len(self.by_task) > 1 and (over := self.pooled()):
            rows.append((self.pooled_label(all_tasks), over))
        return rows


def settings_of(out: Path) -> tuple[list[Setting], list[str]]:
    """The finished test runs under OUT/TASK/runs grouped by setting, each at its last step, then the base model (the
    runs' step 0, per task and seed) as one more; the runs left out, named with why."""
    grouped: dict[str, dict[str, BySeed]] = {}
    base: dict[str, BySeed] = {}
    left_out = []
    for runs in sorted(out.glob("*/runs")):
        task = runs.parent.name
        for run in sorted(p for p in runs.iterdir() if p.is_dir()):
            name = setting_of(run.name, task)
            if not (match := SEED.search(name)):
                left_out.append(f"{task}/{run.name} (not a test-split run)")
                continue
            answers = read_answers(run)
            if state_of(run) != "done":
                left_out.append(f"{task}/{run.name} (not finished)")
            elif not answers or max(answers) == 0:
                left_out.append(f"{task}/{run.name} (no answers after training)")
            else:
                seed = int(match[1])
                grouped.setdefault(name[:match.start()], {}).setdefault(task, {})[seed] = answers[max(answers)]
                if 0 in answers:
                    base.setdefault(task, {}).setdefault(seed, answers[0])
    settings = [Setting(name, by_task) for name, by_task in grouped.items()]
    return settings + [Setting(BASE, base)] * bool(settings and base), left_out


def share(answers: Answers) -> float:
    return sum(answers.values()) / len(answers) if answers else 0.0


@dataclass(frozen=True)
class Summary:
    """A setting's accuracy on one task (or pooled) over its seeds."""

    mean: float
    seeds: tuple[float, float] | None  # Student's t over the seeds' accuracies (two seeds or more), within 0-1
    problems: tuple[float, float]      # Wilson's at the mean over one seed's problems

    @property
    def widest(self) -> tuple[float, float]:
        low, high = self.problems
        return (min(low, self.seeds[0]), max(high, self.seeds[1])) if self.seeds else (low, high)


def summary(by_seed: BySeed) -> Summary:
    shares = [share(a) for a in by_seed.values()]
    mean = sum(shares) / len(shares)
    problems = len(next(iter(by_seed.values())))
    seeds = None
    if len(shares) > 1:
        _, low, high = mean_interval(shares)
        seeds = (max(0.0, low), min(1.0, high))
    return Summary(mean, seeds, wilson(mean * problems, problems))


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def span(bounds: tuple[float, float] | None) -> str:
    return f"{pct(bounds[0])}–{pct(bounds[1])}" if bounds else "–"


def accuracy_table(settings: Sequence[Setting], all_tasks: Sequence[str]) -> list[str]:
    lines = ["| setting (beyond the preset) | task | right per seed (95% Wilson interval) | mean, % | 95% CI over seeds "
             "(t) | 95% CI over problems (Wilson at the mean) |", "|---|---|---|---:|---|---|"]
    for setting in settings:
        for task, by_seed in setting.rows(all_tasks):
            seeds = "; ".join(f"seed {seed}: {sum(a.values())} / {len(a)} ({interval(a)})" for seed, a in sorted(by_seed.items()))
            s = summary(by_seed)
            lines.append(f"| {setting.name} | {task} | {seeds} | {pct(s.mean)} | {span(s.seeds)} | {span(s.problems)} |")
    return lines


def paired_row(other: str, task: str, seeds: str, pair: Paired) -> str:
    return (f"| {other} | {task} | {seeds} | {pair.only_first} | {pair.only_second} | {pair.p_value:.3g} | "
            f"{verdict(pair.real)} |")


def compared(first: BySeed, other: BySeed, what: str) -> dict[int, tuple[list[bool], list[bool]]]:
    """seed -> both runs' results problem by problem, for the seeds both have; an error if they differ in problems."""
    both = {}
    for seed in sorted(set(first) & set(other)):
        if (pair := aligned(first[seed], other[seed])) is None:
            raise SystemExit(f"error: {what} (seed {seed}): the two runs were scored on different problems; compare runs "
                             "of one held-out set")
        both[seed] = pair
    return both


def paired_table(first: Setting, others: Sequence[Setting], all_tasks: Sequence[str]) -> list[str]:
    lines = [f"| {first.name} against | task | seeds | only it right | only the other right | p | verdict |",
             "|---|---|---|---:|---:|---:|---|"]
    skipped = []
    for other in others:
        rows = [(task, first.by_task[task], other.by_task[task]) for task in all_tasks
                if task in first.by_task and task in other.by_task]
        if first.tasks == other.tasks and len(first.tasks) > 1:
            rows.append((first.pooled_label(all_tasks), first.pooled(), other.pooled()))
        elif len(set(first.tasks) | set(other.tasks)) > 1:
            skipped.append(other.name)
        for task, mine, theirs in rows:
            both = compared(mine, theirs, f"{first.name} and {other.name} on {task}")
            for seed, pair in both.items():
                lines.append(paired_row(other.name, task, str(seed), mcnemar(*pair)))
            if len(both) > 1:
                lines.append(paired_row(other.name, task, f"{', '.join(map(str, both))} (sign test)",
                                        sign_test([a for a, _ in both.values()], [b for _, b in both.values()])))
    if skipped:
        lines += ["", f"Not compared pooled (they ran on other tasks than {first.name}): {', '.join(skipped)}."]
    return lines


def first_of(settings: Sequence[Setting], first: str | None) -> Setting:
    """The setting `--first` names (whole, or the start of exactly one name); by default the only InfoPO setting."""
    if first is None:
        infopo = [s.name for s in settings if s.loss == "infopo"]
        if len(infopo) > 1:
            raise SystemExit(f"error: {len(infopo)} InfoPO settings ({', '.join(infopo)}): name the one to compare "
                             "with --first")
        first = infopo[0] if infopo else settings[0].name
    name = reference_of([s.name for s in settings], first, "--first")
    return next(s for s in settings if s.name == name)


def all_tasks_of(settings: Sequence[Setting]) -> list[str]:
    return sorted({task for s in settings for task in s.by_task})


def in_order(settings: Sequence[Setting], first: Setting) -> list[Setting]:
    """The base model, then the setting the others are compared with, then the others in their folders' order: the
    order of the table and the figure."""
    base = [s for s in settings if s.name == BASE]
    return [*base, *[first] * (first.name != BASE), *(s for s in settings if s is not first and s.name != BASE)]


def markdown(settings: Sequence[Setting], first: Setting, left_out: Sequence[str]) -> str:
    tasks = all_tasks_of(settings)
    lines = accuracy_table(settings, tasks)
    if others := [s for s in settings if s is not first]:
        lines += ["", "Problem by problem (McNemar per seed; a sign test over the seeds both have, each problem once). "
                  "The test split chose nothing, so p < 0.05 is a real difference; each p-value stands alone.", ""]
        lines += paired_table(first, others, tasks)
    if left_out:
        lines += ["", f"Left out: {'; '.join(left_out)}."]
    return "\n".join(lines) + "\n"


def plot(settings: Sequence[Setting], path: Path) -> bool:
    """Per task and pooled, each setting's mean over seeds with the wider of its two intervals; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import PercentFormatter
    except ImportError:
        return False
    from infopo_cli.reporting.plot import save_figure

    tasks = all_tasks_of(settings)
    labels = [*tasks, POOLED] if any(len(s.by_task) > 1 for s in settings) else tasks
    width = 0.8 / len(settings)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.8 * len(labels) * len(settings)), 5))
    for i, setting in enumerate(settings):
        xs, means, errors = [], [], ([], [])
        for j, (_, by_seed) in enumerate(setting.rows(tasks)):
            x = labels.index(POOLED) if j >= len(setting.by_task) else labels.index(setting.tasks[j])
            s = summary(by_seed)
            low, high = s.widest
            xs.append(x + (i - (len(settings) - 1) / 2) * width)
            means.append(s.mean)
            errors[0].append(max(0.0, s.mean - low))  # Wilson's bound at 0 right can come out a hair above 0
            errors[1].append(max(0.0, high - s.mean))
        seeds = max(len(by_seed) for by_seed in setting.by_task.values())
        label = setting.name if setting.name == BASE else f"{setting.name} ({seeds} seed{'s' * (seeds != 1)})"
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(labels)), labels)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("test answer accuracy (greedy, exact match)")
    ax.set_title("test split, end of training: the mean over seeds;\n"
                 "error bars: the wider of its 95% intervals over seeds and over problems", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the OUT `answers.py --split test` wrote into (with OUT/TASK/runs/)")
    parser.add_argument("--first", default=None, help="the setting to compare every other one with (default: InfoPO's)")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the accuracies with their intervals (PNG)")
    args = parser.parse_args(argv)
    settings, left_out = settings_of(args.out)
    if not settings:
        raise SystemExit(f"error: no finished test-split run under {args.out}/*/runs/"
                         + (f" (left out: {'; '.join(left_out)})" if left_out else ""))
    first = first_of(settings, args.first)
    settings = in_order(settings, first)
    sys.stdout.write(markdown(settings, first, left_out))
    if args.plot and not plot(settings, args.plot):
        print("matplotlib is not installed: no figure (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
