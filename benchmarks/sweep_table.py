"""One table of a whole settings sweep that `benchmarks/answers.py` wrote into one OUT: every run folder, every task.

    python benchmarks/sweep_table.py OUT [--against RUN_PREFIX]

`answers.py` tabulates the runs of one command; a sweep is many commands (a loss, then its β, its learning rate...)
into the same OUT, with OUT/TASK/runs/ per task. This reads every finished or stopped run there (its answers/step-N.jsonl
files) and prints, per run name (the loss and the settings that differ from the preset) and task, the right answers at
each evaluated step, the last one with its 95% Wilson interval, and over all tasks the pooled count at the last step
every task reached. With `--against`, each run's pooled last-step answers are compared problem by problem with that
run's (McNemar's exact test): on a validation split this is exploratory, the settings were chosen on those problems.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infopo_cli.reporting.intervals import mcnemar, wilson  # noqa: E402

STEP_FILE = re.compile(r"step-(\d+)\.jsonl$")


def read_answers(run: Path) -> dict[int, list[bool]]:
    """step -> whether each held-out problem was answered right, in the file's order."""
    out = {}
    for path in (run / "answers").glob("step-*.jsonl"):
        if match := STEP_FILE.search(path.name):
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            out[int(match[1])] = [bool(r["right"]) for r in rows]
    return dict(sorted(out.items()))


def setting_of(run_name: str, task: str) -> str:
    """'infopo-sft-weight1-2ep-units-validation-100heldout-1evals-seed42' -> 'infopo-sft-weight1-2ep ... seed42'
    without the task's part, so one setting's runs on every task share a row."""
    return re.sub(rf"-{re.escape(task)}-(validation|test)", "", run_name)


def collect(out: Path) -> dict[str, dict[str, dict[int, list[bool]]]]:
    """setting -> task -> step -> right per problem, for every run under OUT/TASK/runs."""
    table: dict[str, dict[str, dict[int, list[bool]]]] = {}
    for runs in sorted(out.glob("*/runs")):
        task = runs.parent.name
        for run in sorted(p for p in runs.iterdir() if p.is_dir()):
            if answers := read_answers(run):
                table.setdefault(setting_of(run.name, task), {})[task] = answers
    return table


def interval(right: Sequence[bool]) -> str:
    low, high = wilson(sum(right), len(right))
    return f"{100 * low:.1f}–{100 * high:.1f}"


def pooled_last(by_task: dict[str, dict[int, list[bool]]], tasks: Sequence[str]) -> tuple[int, list[bool]] | None:
    """The last step every task of `tasks` evaluated, and the answers there over all of them; None if a task is missing."""
    if any(task not in by_task for task in tasks):
        return None
    common = set.intersection(*(set(by_task[task]) for task in tasks))
    if not common:
        return None
    step = max(common)
    return step, [x for task in tasks for x in by_task[task][step]]


def markdown(table: dict[str, dict[str, dict[int, list[bool]]]], against: str | None = None) -> str:
    tasks = sorted({task for by_task in table.values() for task in by_task})
    head = ["run (settings beyond the preset)", *(f"{task}: right at each step, last (95% CI)" for task in tasks),
            "all tasks at the last common step"]
    reference = next((pooled_last(table[s], tasks) for s in table if against and s.startswith(against)), None)
    if against:
        head.append(f"vs {against} (McNemar)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, by_task in table.items():
        cells = [setting]
        for task in tasks:
            answers = by_task.get(task)
            if not answers:
                cells.append("–")
                continue
            counts = " → ".join(f"{sum(r)}" for r in answers.values())
            last = list(answers.values())[-1]
            cells.append(f"{counts} of {len(last)} (steps {', '.join(map(str, answers))}); {interval(last)}")
        pooled = pooled_last(by_task, tasks)
        cells.append(f"{sum(pooled[1])} / {len(pooled[1])} at step {pooled[0]} ({interval(pooled[1])})" if pooled else "–")
        if against:
            if pooled and reference and len(pooled[1]) == len(reference[1]):
                paired = mcnemar(pooled[1], reference[1])
                cells.append(f"+{paired.only_first} / −{paired.only_second}, p = {paired.p_value:.3f}")
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the OUT answers.py wrote into (with OUT/TASK/runs/)")
    parser.add_argument("--against", default=None, help="a run name's start (e.g. infopo-2ep) to compare every run with")
    args = parser.parse_args(argv)
    table = collect(args.out)
    if not table:
        raise SystemExit(f"error: no run with answers under {args.out}/*/runs/")
    sys.stdout.write(markdown(table, args.against))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
