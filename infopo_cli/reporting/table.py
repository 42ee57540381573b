"""The runs side by side: their settings and their held-out figures before and after training, as a rich Table on
screen or a Markdown table to paste."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from infopo_cli.reporting.runs import EVAL_KEYS, Run

SETTINGS = ("run", "model", "loss", "loss params", "lr", "steps", "data")
# Accuracies are fractions of pairs; log-probs and margins are nats (or beta-scaled nats).
DIGITS = {"eval/rewards/accuracies": 3, "eval/logps/accuracies": 3, "eval/rewards/margins": 3}


def value_text(value: Any) -> str:
    """A setting as the table shows it: booleans lower-case, floats short."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def params_text(run: Run) -> str:
    """The run's loss parameters as "k=v, ..."."""
    return ", ".join(f"{k}={value_text(v)}" for k, v in run.loss_params.items())


def model_text(run: Run) -> str:
    """The base model the run trained, as its settings name it."""
    return str(run.settings.get("model", "?"))


def data_text(run: Run) -> str:
    """The run's training data, with its pair (or unpaired row) count and format where recorded."""
    info = run.data_info
    text = ", ".join(run.data)
    if info.get("pairs") is not None:
        text += f" ({info['pairs']} {run.unit}, {info.get('format', '?')})"
    return text


def figure(key: str, record: dict[str, Any]) -> str:
    """One metric of an evaluation record, rounded for its kind; "n/a" when missing."""
    value = record.get(key)
    return "n/a" if value is None else f"{value:.{DIGITS.get(key, 2)}f}"


def before_after(run: Run, key: str) -> str:
    """"before → after" of a held-out metric, with the step of the last evaluation when the run stopped early."""
    before, after = run.eval_before, run.eval_after
    if not before and not after:
        return "n/a"
    text = f"{figure(key, before)} → {figure(key, after)}"
    if after and after.get("step") != run.steps:  # a stopped run: say where the last evaluation was
        text += f" (@{after.get('step')})"
    return text


def rows(runs: list[Run]) -> list[list[str]]:
    """One row per run: the settings, then each held-out figure as 'before → after'."""
    return [[run.name, model_text(run), run.loss, params_text(run), value_text(run.settings.get("lr", "?")), str(run.steps),
             data_text(run), *(before_after(run, key) for key in EVAL_KEYS)] for run in runs]


def headers() -> list[str]:
    """The table's column names: the settings, then the held-out figures."""
    return [*SETTINGS, *(key.replace("eval/", "held-out ") for key in EVAL_KEYS)]


def rich_tables(runs: list[Run]) -> list[Table]:
    """On screen, two tables that fit a terminal: the settings (a row per run), then the held-out figures (a row
    per figure, a column per run)."""
    settings = Table(title="runs")
    for name in SETTINGS:
        settings.add_column(name, justify="right" if name in ("lr", "steps") else "left", overflow="fold")
    for row in rows(runs):
        settings.add_row(*row[:len(SETTINGS)])
    figures = Table(title="held-out figures: before → after training")
    figures.add_column("metric")
    for run in runs:
        figures.add_column(f"{run.name}\n({run.loss})", justify="right", overflow="fold")
    for key in EVAL_KEYS:
        figures.add_row(key, *(before_after(run, key) for run in runs))
    return [settings, figures]


def markdown_table(runs: list[Run]) -> str:
    """A GitHub-flavoured Markdown table, one row per run (`|` in values escaped)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    head = headers()
    return "\n".join([line(head), "|" + "|".join("---:" if h.startswith("held-out") or h in ("lr", "steps") else "---"
                                                for h in head) + "|", *(line(row) for row in rows(runs))]) + "\n"
