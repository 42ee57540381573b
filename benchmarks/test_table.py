"""The test split's report: every run `benchmarks/answers.py --split test` wrote into one OUT, each setting over its seeds.

    python benchmarks/test_table.py OUT [--first infopo] [--plot FILE.png]

The test split reports; it chooses nothing (settings are picked on validation, `benchmarks/sweep_table.py`), so each
run counts at the end of its training. Runs that differ only by seed are one setting (the loss and the settings
beyond the preset). Per setting and task, and pooled over the tasks: each seed's right answers with its 95% Wilson
interval, and over two or more seeds the mean with the 95% interval of the mean (Student's t). Then the `--first`
setting (a loss name or a setting's start; default: the first InfoPO setting) against each other one, problem by
problem, per task and pooled: per seed McNemar's exact test, and over the seeds both have a sign test that counts each
problem once. A difference is real where p < 0.05; each p-value stands alone (no correction for the several
comparisons). `--plot` draws each setting's accuracy per task and pooled with those intervals.
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

from sweep_table import Answers, collect  # noqa: E402

SEED = re.compile(r"-seed(\d+) \(test\)$")
POOLED = "pooled"


@dataclass(frozen=True)
class Setting:
    """One setting's runs at the end of training: task (and `pooled`, over every task) -> seed -> each problem's result."""

    name: str
    answers: dict[str, dict[int, Answers]]

    @property
    def loss(self) -> str:
        return self.name.split("-", 1)[0]

    def seeds(self, task: str) -> list[int]:
        return sorted(self.answers.get(task, {}))

    def pooled(self) -> dict[int, Answers]:
        """seed -> the answers over every task, for the seeds every task has."""
        tasks = [t for t in self.answers if t != POOLED]
        common = sorted(set.intersection(*(set(self.answers[t]) for t in tasks))) if tasks else []
        return {seed: {f"{t}|{where}": right for t in tasks for where, right in self.answers[t][seed].items()}
                for seed in common}


def settings_of(out: Path) -> tuple[list[Setting], list[str]]:
    """The test runs under OUT/TASK/runs grouped by setting, each at its last evaluated step; the runs that have not
    answered past the base model (step 0) yet are left out and named."""
    grouped: dict[str, dict[str, dict[int, Answers]]] = {}
    unfinished = []
    for name, by_task in collect(out).items():
        if not (match := SEED.search(name)):
            continue
        setting, seed = name[:match.start()], int(match[1])
        for task, steps in by_task.items():
            last = max(steps)
            if last == 0:
                unfinished.append(f"{setting} seed {seed} on {task}")
                continue
            grouped.setdefault(setting, {}).setdefault(task, {})[seed] = steps[last]
    settings = [Setting(name, by_task) for name, by_task in grouped.items()]
    for setting in settings:
        if len(setting.answers) > 1 and (pooled := setting.pooled()):
            setting.answers[POOLED] = pooled
    return settings, unfinished


def share(answers: Answers) -> float:
    return sum(answers.values()) / len(answers) if answers else 0.0


def summary(by_seed: dict[int, Answers]) -> tuple[float, float, float]:
    """(accuracy, low, high): the mean over seeds with Student's interval of the mean, within 0-1; one seed: Wilson's."""
    if len(by_seed) == 1:
        (answers,) = by_seed.values()
        return (share(answers), *wilson(sum(answers.values()), len(answers)))
    mean, low, high = mean_interval([share(a) for a in by_seed.values()])
    return mean, max(0.0, low), min(1.0, high)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_table(settings: Sequence[Setting], tasks: Sequence[str]) -> list[str]:
    lines = ["| setting (beyond the preset) | task | right per seed (95% Wilson interval) | mean over seeds, % (95% CI) |",
             "|---|---|---|---|"]
    for setting in settings:
        for task in tasks:
            by_seed = setting.answers.get(task)
            if not by_seed:
                continue
            seeds = "; ".join(f"seed {seed}: {sum(a.values())} / {len(a)} ({'–'.join(map(pct, wilson(sum(a.values()), len(a))))})"
                              for seed, a in sorted(by_seed.items()))
            mean, low, high = summary(by_seed)
            over = f"{pct(mean)} ({pct(low)}–{pct(high)})" + (" (one seed: Wilson)" if len(by_seed) == 1 else "")
            lines.append(f"| {setting.name} | {task} | {seeds} | {over} |")
    return lines


def aligned(first: Answers, other: Answers) -> tuple[list[bool], list[bool]]:
    """Both runs' results on the same problems in one order; an error if they were scored on different ones."""
    if set(first) != set(other):
        raise SystemExit("error: two runs were scored on different problems; compare runs of one held-out set")
    keys = sorted(first)
    return [first[k] for k in keys], [other[k] for k in keys]


def paired_row(other: str, task: str, seeds: str, pair: Paired) -> str:
    return (f"| {other} | {task} | {seeds} | {pair.only_first} | {pair.only_second} | {pair.p_value:.3g} | "
            f"{verdict(pair.real)} |")


def paired_table(first: Setting, others: Sequence[Setting], tasks: Sequence[str]) -> list[str]:
    lines = [f"| {first.name} against | task | seeds | only it right | only the other right | p | verdict |",
             "|---|---|---|---:|---:|---:|---|"]
    for other in others:
        for task in tasks:
            mine, theirs = first.answers.get(task, {}), other.answers.get(task, {})
            common = sorted(seed for seed in set(mine) & set(theirs)
                            if task != POOLED or set(mine[seed]) == set(theirs[seed]))  # pooled over the same tasks
            for seed in common:
                lines.append(paired_row(other.name, task, str(seed), mcnemar(*aligned(mine[seed], theirs[seed]))))
            if len(common) > 1:
                pairs = [aligned(mine[seed], theirs[seed]) for seed in common]
                lines.append(paired_row(other.name, task, f"{', '.join(map(str, common))} (sign test)",
                                        sign_test([a for a, _ in pairs], [b for _, b in pairs])))
    return lines


def first_of(settings: Sequence[Setting], first: str | None) -> Setting:
    """The setting `--first` names (a whole name, a loss, or the start of exactly one name); default the first InfoPO."""
    if first is None:
        return next((s for s in settings if s.loss == "infopo"), settings[0])
    matches = [s for s in settings if s.name == first] or [s for s in settings if s.name.startswith(first)]
    if len(matches) != 1 and first in {s.loss for s in settings}:
        matches = [s for s in settings if s.loss == first][:1]
    if len(matches) != 1:
        raise SystemExit(f"error: --first {first}: " + (f"{len(matches)} settings start so: name one whole" if matches
                         else f"no such setting (there are: {', '.join(s.name for s in settings)})"))
    return matches[0]


def markdown(settings: Sequence[Setting], first: Setting, unfinished: Sequence[str]) -> str:
    tasks = sorted({t for s in settings for t in s.answers if t != POOLED}) + [POOLED] * any(POOLED in s.answers
                                                                                             for s in settings)
    lines = accuracy_table(settings, tasks)
    others = [s for s in settings if s is not first]
    if others:
        lines += ["", "Problem by problem (McNemar per seed; a sign test over the seeds both have, each problem once). "
                  "The test split chose nothing, so p < 0.05 is a real difference; each p-value stands alone.", ""]
        lines += paired_table(first, others, tasks)
    if unfinished:
        lines += ["", f"Not finished yet (left out): {'; '.join(unfinished)}."]
    return "\n".join(lines) + "\n"


def plot(settings: Sequence[Setting], path: Path) -> bool:
    """Per task and pooled, each setting's accuracy (the mean over seeds) with its interval; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import PercentFormatter
    except ImportError:
        return False
    from infopo_cli.reporting.plot import save_figure

    tasks = sorted({t for s in settings for t in s.answers if t != POOLED})
    tasks += [POOLED] * any(POOLED in s.answers for s in settings)
    width = 0.8 / max(1, len(settings))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(tasks) * max(1, len(settings)) / 2), 5))
    for i, setting in enumerate(settings):
        xs, means, errors = [], [], [[], []]
        for j, task in enumerate(tasks):
            if by_seed := setting.answers.get(task):
                mean, low, high = summary(by_seed)
                xs.append(j + (i - (len(settings) - 1) / 2) * width)
                means.append(mean)
                errors[0].append(mean - low)
                errors[1].append(high - mean)
        seeds = max((len(setting.answers[t]) for t in setting.answers), default=0)
        ax.bar(xs, means, width, yerr=errors, capsize=3,
               label=f"{setting.name} ({seeds} seed{'s' * (seeds != 1)})")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("test answer accuracy (greedy, exact match)")
    ax.set_title("test split, end of training: mean over seeds with 95% interval (one seed: Wilson)", fontsize=10)
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
    settings, unfinished = settings_of(args.out)
    if not settings:
        raise SystemExit(f"error: no finished test-split run under {args.out}/*/runs/"
                         + (f" (not finished: {'; '.join(unfinished)})" if unfinished else ""))
    sys.stdout.write(markdown(settings, first_of(settings, args.first), unfinished))
    if args.plot and not plot(settings, args.plot):
        print("matplotlib is not installed: no figure (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
