"""What the user watches during a run: a rich progress bar with TRL's live metrics."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

SHOWN = [("loss", "loss"), ("rewards/chosen", "rewards/chosen"), ("rewards/margins", "margins"),
         ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected"), ("rewards/accuracies", "acc")]


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{label} {metrics[key]:.4g}" for key, label in SHOWN if key in metrics)


class TrainProgress:
    """A live bar on a terminal; one plain line per step when output goes to a file or CI log."""

    def __init__(self, console: Console, total: int) -> None:
        self.console, self.total = console, total
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("<"), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                            console=console, transient=False)
        self.task = self.bar.add_task("train", total=total, metrics="")

    def __enter__(self) -> TrainProgress:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bar.stop()

    def skip_to(self, step: int) -> None:
        """A resumed run starts its bar where the checkpoint left off."""
        self.bar.update(self.task, completed=step)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        text = format_metrics(metrics)
        self.bar.update(self.task, completed=step, metrics=text)
        if not self.live:
            self.console.print(f"step {step}/{self.total}  {text}", highlight=False, markup=False)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False)
