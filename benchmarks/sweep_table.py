"""One table of a whole settings sweep that `benchmarks/answers.py` wrote into one OUT: every run folder, every task.

    python benchmarks/sweep_table.py OUT [--against RUN_PREFIX]

`answers.py` tabulates the runs of one command; a sweep is many commands (a loss, then its β, its learning rate...)
into the same OUT, with OUT/TASK/runs/ per task. This reads every finished or stopped run there (its answers/step-N.jsonl
files) and prints, per run name (the loss and the settings that differ from the preset) and task, the right answers at
each evaluated step, the last one with its 95% Wilson interval, and over all tasks the pooled count at each step every
task reached; under the table, each loss's best row and step (the settings and length to take to the test split). With `--against RUN` (a row's name, or the start of exactly one), each run's pooled last-step
answers are compared problem by problem with that run's (McNemar's exact test, problems matched by where they come
from): on a validation split this is exploratory, the settings were chosen on those problems.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infopo_cli.reporting.intervals import mcnemar, wilson  # noqa: E402

STEP_FILE = re.compile(r"step-(\d+)\.jsonl$")


Answers = dict[str, bool]  # where a held-out problem comes from (file:line) -> whether it was answered right


def read_answers(run: Path) -> dict[int, Answers]:
    """step -> each held-out problem's result."""
    out = {}
    for path in (run / "answers").glob("step-*.jsonl"):
        if match := STEP_FILE.search(path.name):
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            out[int(match[1])] = {str(r["where"]): bool(r["right"]) for r in rows}
    return dict(sorted(out.items()))


def setting_of(run_name: str, task: str) -> str:
    """'infopo-sft-weight1-2ep-units-validation-100heldout-1evals-seed42' -> 'infopo-sft-weight1-2ep-100heldout-1evals-
    seed42 (validation)': without the task's part, so one setting's runs on every task share a row, and with the
    split, so a validation run and a test run of one setting never share one."""
    split = re.search(rf"-{re.escape(task)}-(validation|test)", run_name)
    return f"{run_name[:split.start()]}{run_name[split.end():]} ({split[1]})" if split else run_name


Table = dict[str, dict[str, dict[int, Answers]]]  # setting -> task -> step -> answers


def collect(out: Path) -> Table:
    """Every run under OUT/TASK/runs with answers, by setting, task and step."""
    table: Table = {}
    for runs in sorted(out.glob("*/runs")):
        task = runs.parent.name
        for run in sorted(p for p in runs.iterdir() if p.is_dir()):
            if answers := read_answers(run):
                table.setdefault(setting_of(run.name, task), {})[task] = answers
    return table


def interval(answers: Answers) -> str:
    low, high = wilson(sum(answers.values()), len(answers))
    return f"{100 * low:.1f}–{100 * high:.1f}"


def pooled(by_task: dict[str, dict[int, Answers]], tasks: Sequence[str]) -> dict[int, Answers]:
    """step -> the answers over all of `tasks` there, at each step every task evaluated; {} if a task is missing."""
    if any(task not in by_task for task in tasks):
        return {}
    common = sorted(set.intersection(*(set(by_task[task]) for task in tasks)))
    return {step: {f"{task}|{where}": right for task in tasks for where, right in by_task[task][step].items()}
            for step in common}


def pooled_last(by_task: dict[str, dict[int, Answers]], tasks: Sequence[str]) -> tuple[int, Answers] | None:
    """The last step every task of `tasks` evaluated, and the answers there over all of them; None if there is none."""
    steps = pooled(by_task, tasks)
    return (max(steps), steps[max(steps)]) if steps else None


def best_per_loss(table: Table, tasks: Sequence[str]) -> dict[str, tuple[str, int, int, int]]:
    """loss -> (setting, step, right, problems): among the rows with a run on every one of `tasks`, the row and
    evaluated step (step 0, the base, excluded) with the highest share of right answers pooled over the tasks; a tie
    goes to the earlier step (less training), then to the shorter name (fewer settings changed)."""
    best: dict[str, tuple[str, int, int, int]] = {}
    for setting, by_task in table.items():
        loss = setting.split("-", 1)[0]
        for step, answers in pooled(by_task, tasks).items():
            candidate = (setting, step, sum(answers.values()), len(answers))
            held = best.get(loss)
            if step and (held is None or (-candidate[2] / candidate[3], step, len(setting))
                         < (-held[2] / held[3], held[1], len(held[0]))):
                best[loss] = candidate
    return best


def reference_of(names: Iterable[str], wanted: str, flag: str = "--against") -> str:
    """The name `flag` gives: itself, or the only one of `names` that starts with it."""
    names = list(names)
    if wanted in names:
        return wanted
    matches = [name for name in names if name.startswith(wanted)]
    if len(matches) != 1:
        raise SystemExit(f"error: {flag} {wanted}: " + (f"{len(matches)} runs start so ({', '.join(matches)}): name "
                         "one whole" if matches else f"no such run (there are: {', '.join(names)})"))
    return matches[0]


def aligned(answers: Answers, reference: Answers) -> tuple[list[bool], list[bool]] | None:
    """Both runs' results problem by problem in one order; None if they were scored on different problems."""
    if set(answers) != set(reference):
        return None
    keys = sorted(answers)
    return [answers[k] for k in keys], [reference[k] for k in keys]


def paired(answers: Answers, reference: Answers) -> str:
    if (both := aligned(answers, reference)) is None:
        return "other problems"
    result = mcnemar(*both)
    return f"+{result.only_first} / −{result.only_second}, p = {result.p_value:.3f}"


def markdown(table: Table, against: str | None = None) -> str:
    tasks = sorted({task for by_task in table.values() for task in by_task})
    head = ["run (settings beyond the preset)", *(f"{task}: right at each step, last (95% CI)" for task in tasks),
            "its tasks pooled at each common step"]
    # each row pools the tasks it has (named where they are not all); rows over other tasks are not paired
    reference = pooled_last(table[name], sorted(table[name])) if against and (name := reference_of(table, against)) else None
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
            counts = " → ".join(f"{sum(r.values())}" for r in answers.values())
            last = list(answers.values())[-1]
            cells.append(f"{counts} of {len(last)} (steps {', '.join(map(str, answers))}); {interval(last)}")
        steps = pooled(by_task, sorted(by_task))
        last = steps[max(steps)] if steps else None
        some = "" if len(by_task) == len(tasks) else f" over {', '.join(sorted(by_task))} only"
        cells.append(f"{' → '.join(str(sum(a.values())) for a in steps.values())} / {len(last)} at steps "
                     f"{', '.join(map(str, steps))} ({interval(last)}){some}" if last else "–")
        if against:
            cells.append(paired(last, reference[1]) if last and reference else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if best := best_per_loss(table, tasks):
        lines += ["", "Best per loss (the highest share right over all tasks at one evaluated step, rows with every task; "
                  "a tie goes to the earlier step, then to fewer settings):"]
        lines += [f"- {loss}: {setting} at step {step}, {right} / {problems}"
                  for loss, (setting, step, right, problems) in sorted(best.items())]
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
