"""`--report-to`: the records of `metrics.jsonl`, also sent to experiment trackers, each through its own library.

metrics.jsonl is always written; a tracker gets each record as it is written (`MetricsLog`'s sinks), under the
same names (`loss`, `rewards/chosen`, `eval/logps/chosen`, ...) at the record's step. `kind`, `step` and fields
that are not numbers (or not finite: null in metrics.jsonl) are not logged as scalars.

- tensorboard: event files in RUN/tensorboard/ (torch's SummaryWriter); the settings as text. A resumed run
  writes to the same folder from its checkpoint's step on (later events of the stopped part are purged).
- wandb: RUN/wandb/, offline unless WANDB_MODE or WANDB_API_KEY says otherwise (then `wandb sync RUN/wandb/offline-run-*`);
  the run id is kept in RUN/wandb/infopo-run-id, so a resumed run continues the same wandb run (resume="allow").
- trackio: its own local store ($TRACKIO_DIR, default $HF_HOME/trackio: ~/.cache/huggingface/trackio),
  project `infopo`; the run's name is kept in RUN/trackio.json so a resumed run continues it (`trackio show`).

Only the library names are imported here until a tracker opens: `check_available` runs before the model loads.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from infopo_cli.config import TRACKERS, to_toml, tracker_names
from infopo_cli.errors import ConfigError

PROJECT = "infopo"  # wandb (unless WANDB_PROJECT is set) and trackio
# the module each tracker needs; the extra that installs it is named after the tracker
LIBRARIES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class Tracker(Protocol):
    """An experiment tracker: it gets every metrics record, and is closed when the run ends."""

    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The record's metrics as numbers: no `kind`, no `step`, no flags (bool), strings or nulls."""
    return {k: float(v) for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def parse(report_to: str) -> list[str]:
    """`--report-to`'s names; an unknown one is a one-line error (config validation says the same)."""
    unknown = [n for n in tracker_names(report_to, known_only=False) if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"--report-to: unknown tracker {unknown[0]!r} (choose from {', '.join(TRACKERS)}, or none)")
    return tracker_names(report_to)


def check_available(names: list[str]) -> None:
    """Each tracker's library imports, or a one-line error naming the extra that installs it (before the model loads)."""
    for name in names:
        try:
            importlib.import_module(LIBRARIES[name])
        except ImportError:
            raise ConfigError(f"--report-to {name} needs the {LIBRARIES[name]} package: "
                              f"pip install 'infopo[{name}]'") from None


def open_trackers(names: list[str], run_dir: Path, settings: dict[str, Any], resume: int | None = None) -> list[Tracker]:
    """One open tracker per name. `settings`: the resolved settings (logged as the run's config); `resume`: the
    step a resumed run continues from (None for a new run). If one fails to open, those already open are closed."""
    check_available(names)
    opened: list[Tracker] = []
    try:
        for name in names:
            opened.append(OPENERS[name](run_dir, settings, resume))
    except BaseException:
        for tracker in reversed(opened):
            tracker.close()
        raise
    return opened


class TensorBoardTracker:
    """TensorBoard event files under RUN/tensorboard (torch's SummaryWriter); the settings as a text entry."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], resume: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = run_dir / "tensorboard"
        # a resumed run: events after the checkpoint's step (logged before the stop) are hidden, as metrics.jsonl cuts them
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=None if resume is None else resume + 1)
        toml = "\n".join("    " + line for line in to_toml(settings).splitlines())  # a markdown code block
        self.writer.add_text("config", toml, global_step=resume or 0)
        self.writer.flush()

    def log(self, record: dict) -> None:
        """Write the record's numbers as scalars at its step, flushed at once."""
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()  # a dashboard sees each step as it happens

    def close(self) -> None:
        self.writer.close()


class _RunTracker:
    """wandb and trackio share one API: a run object with log(values, step=...) and finish()."""

    run: Any

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class WandbTracker(_RunTracker):
    """A wandb run under RUN/wandb, offline unless WANDB_MODE or WANDB_API_KEY says otherwise; a resume continues the
    same run."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], resume: int | None) -> None:
        import wandb

        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "infopo-run-id"
        run_id = id_file.read_text(encoding="utf-8").strip() if resume is not None and id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n", encoding="utf-8")
        # no network by default: offline unless the user asked for a mode or gave a key
        mode = None if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_dir.name, id=run_id,
                              dir=str(run_dir), mode=mode, resume="allow")
        self.run.config.update(settings, allow_val_change=True)  # a resume may change max_steps and the like


class TrackioTracker(_RunTracker):
    """A trackio run in the infopo project; a resume continues the run named in RUN/trackio.json."""

    def __init__(self, run_dir: Path, settings: dict[str, Any], resume: int | None) -> None:
        import trackio

        state = run_dir / "trackio.json"
        saved = json.loads(state.read_text(encoding="utf-8")) if resume is not None and state.is_file() else {}
        # runs are found by name in the project: a new run gets a name no other run folder called the same has
        name = saved.get("name") or f"{run_dir.name}-{secrets.token_hex(3)}"
        project = saved.get("project") or PROJECT
        store = getattr(importlib.import_module("trackio.utils"), "TRACKIO_DIR", None)
        state.write_text(json.dumps({"project": project, "name": name, "store": str(store)}) + "\n", encoding="utf-8")
        # the run's own metrics only: no background system-metrics threads (older trackio lacks some options)
        quiet = {k: False for k in ("embed", "auto_log_gpu", "auto_log_cpu") if k in inspect.signature(trackio.init).parameters}
        self.run = trackio.init(project=project, name=name, config=settings, resume="allow" if saved else "never", **quiet)


OPENERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}
