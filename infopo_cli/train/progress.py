"""What the user sees of a run: the `Reporter` (every message of `infopo train`) and the progress bar with TRL's
live metrics."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from infopo_cli.reporting.table import value_text
from infopo_cli.train.stops import NAMES

SHOWN = [("loss", "loss"), ("rewards/chosen", "rewards/chosen"), ("rewards/margins", "margins"),
         ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected"), ("rewards/accuracies", "acc")]


def format_metrics(metrics: dict[str, float]) -> str:
    """The live metrics as one short line (TRL's names), with the count of skipped steps when there are any."""
    text = "  ".join(f"{label} {metrics[key]:.4g}" for key, label in SHOWN if key in metrics)
    if metrics.get("skipped_steps"):  # steps whose loss or gradient was NaN/inf (or overflowed in fp16)
        text += f"  skipped {metrics['skipped_steps']}"
    return text


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
        """Move the bar to `step` with its metrics (a plain line when not on a terminal)."""
        text = format_metrics(metrics)
        self.bar.update(self.task, completed=step, metrics=text)
        if not self.live:
            self.console.print(f"step {step}/{self.total}  {text}", highlight=False, markup=False)

class Reporter:
    """Everything `infopo train` tells the user, so the recipe itself holds no console formatting."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(emoji=False)

    def silenced(self) -> Reporter:
        """The same messages, unprinted (processes other than rank 0 of a multi-process run)."""
        return type(self)(Console(quiet=True))

    def _say(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def note(self, message: str) -> None:
        """Print a plain message (markup in it is shown as typed)."""
        self._say(escape(message))

    def skipped_rows(self, reasons: list[str], rows: int) -> None:
        """Say how many invalid rows were skipped, with the first three reasons."""
        if reasons:
            self._say(f"[yellow]skipped {len(reasons)} invalid rows of {rows}[/]; the first ones:")
            for reason in reasons[:3]:
                self._say(f"  {escape(reason)}")

    def start(self, loss: str, params: dict, trained: str, data: str, n_eval: int, run_dir: Path) -> None:
        """The run's first line: loss and parameters, what it trains on (`preflight.counted`) and how much is held out,
        the run folder."""
        settings = ", ".join(f"{k}={value_text(v)}" for k, v in params.items())
        held = f"{n_eval} held out" if n_eval else "nothing held out (--eval-data FILE to evaluate)"
        self._say(f"[bold]{loss}[/] ({escape(settings)}) on {escape(trained)} ({escape(data)}), "
                  f"{held} -> {escape(str(run_dir))}")

    def lock(self, took_over: str | None) -> None:
        """Say whose stale run lock was taken over, if one was."""
        if took_over:
            self._say(f"[yellow]{escape(took_over)}[/]")

    def checkpointing(self, message: str) -> None:
        """What --gradient-checkpointing recomputes and why (model/recompute.py), one line."""
        self._say(escape(message))

    def precision(self, precision) -> None:
        """The device and compute dtype, and why they were picked."""
        self._say(f"device {precision.device}, compute dtype {precision.dtype_name}: {escape(precision.reason)}")

    def model(self, source: str, seconds: float, cfg, trainable: int, total: int) -> None:
        """The model loaded: how long it took, its quantisation, and the LoRA's trainable share."""
        self._say(f"model {escape(source)} loaded in {seconds:.1f}s ({'NF4 4-bit' if cfg.load_in_4bit else 'unquantised'}); "
                  f"LoRA r={cfg.lora_r}: {trainable / 1e6:.2f}M trainable of {total / 1e6:.0f}M parameters")

    def attention(self, kernel: str) -> None:
        """The attention kernel the model runs (what `--attn-implementation auto` chose on this machine)."""
        self._say(f"attention kernel: {escape(kernel)}")

    def tokenised(self, n_train: int, n_eval: int, cached: bool, truncated: int, max_length: int,
                  unit: str = "pairs") -> None:
        """The pairs (or unpaired rows) tokenised (or read from the cache), and how many were truncated."""
        self._say(f"tokenised{' (from cache)' if cached else ''}: {n_train} train / {n_eval} held-out {unit}"
                  + (f", [yellow]{truncated} truncated to max_length {max_length}[/]" if truncated else ""))

    def fresh_resume(self, run_dir: Path) -> None:
        """Say a resumed run had no checkpoint yet and starts over (killed before its first save, or before its first step)."""
        self._say(f"{escape(str(run_dir))} has no checkpoint yet (it was stopped before it saved one; `--save-every N` "
                  "keeps the steps a kill would lose): starting from the beginning")

    def resumed(self, step: int, total: int, checkpoint: Path, schedule) -> None:
        """The step and checkpoint a run resumes from, and the re-drawn decay when its length changed."""
        self._say(f"resuming after step {step} of {total} from {escape(str(checkpoint))}")
        if schedule.restart_factor is not None and schedule.restart == step:
            self._say(f"the run's length changed: the learning rate decays from {schedule.lr(step):.3g} "
                      f"(its value at step {step}) to zero at step {total}")

    def evaluation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """One held-out evaluation's figures (and answer accuracy, when generated)."""
        shown = [("loss", 4), ("logps/chosen", 2), ("logps/rejected", 2), ("rewards/accuracies", 3),
                 ("logps/accuracies", 3), ("kl", 3)]  # unpaired rows have no logps/accuracies; only kto a kl
        self._say(f"eval @ step {step} ({seconds:.0f}s): "
                  + "  ".join(f"{key} {metrics[f'eval/{key}']:.{digits}f}" for key, digits in shown if f"eval/{key}" in metrics)
                  + (f"  answers/accuracy {metrics['eval/answers/accuracy']:.3f} (stopped "
                     f"{metrics['eval/answers/stopped']:.0%})" if "eval/answers/accuracy" in metrics else ""))

    def progress(self, total: int, start: int) -> TrainProgress:
        """The progress bar of a run of `total` steps, already at `start`."""
        bar = TrainProgress(self.console, total)
        bar.skip_to(start)
        return bar

    @contextlib.contextmanager
    def task(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        """A bar for a pass before training (on a terminal only); yields `advance(n)`."""
        with Progress(TextColumn(f"[bold]{escape(name)}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True, disable=not self.console.is_terminal) as bar:
            task = bar.add_task(name, total=total)
            yield lambda n: bar.advance(task, n)

    def saved(self, checkpoint: Path) -> None:
        """Say a checkpoint was written (dimmed)."""
        self._say(f"[dim]saved {escape(str(checkpoint))}[/]")

    def stop_requested(self, signum: int) -> None:
        """Called from the signal handler, so written with os.write: the main thread may be inside a print,
        and buffered I/O entered again from a handler raises ("reentrant call")."""
        if self.console.quiet:
            return
        text = (f"{NAMES.get(signum, signum)}: stopping after the current step with a checkpoint, or before the first "
                "step if the run is still setting up (send it again to stop at once; the last complete checkpoint "
                "stays)\n")
        try:
            os.write(2, text.encode())
        except OSError:
            pass  # no stderr to tell: stopping is what matters
