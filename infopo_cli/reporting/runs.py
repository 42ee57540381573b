"""A run folder read back: its settings (config.toml), its metrics records (metrics.jsonl), its summary.json, and the
held-out figures before and after training. Standard library only, so `infopo report` starts without torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infopo_cli.config import LOSS_PARAMS
from infopo_cli.errors import ConfigError, InfopoError
from infopo_cli.presets import read

CONFIG, METRICS, SUMMARY = "config.toml", "metrics.jsonl", "summary.json"
# The held-out figures a report compares before and after training.
EVAL_KEYS = ("eval/logps/chosen", "eval/logps/rejected", "eval/rewards/margins", "eval/rewards/accuracies",
             "eval/logps/accuracies")


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line torn by SIGKILL or a full disk is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def is_run(folder: Path) -> bool:
    """A folder `infopo train` finished writing an adapter to: its adapter_config.json and config.toml."""
    return (folder / "adapter_config.json").is_file() and (folder / "config.toml").is_file()


def newest_run(runs: Path = Path("runs")) -> Path:
    """The most recently written run folder under ./runs (what `infopo export` alone exports)."""
    found = [p for p in runs.iterdir() if p.is_dir() and is_run(p)] if runs.is_dir() else []
    if not found:
        raise ConfigError(f"no finished run under {runs}/ to export; pass a run folder, or --base and --adapter")
    return max(found, key=lambda p: (p / "adapter_model.safetensors").stat().st_mtime
               if (p / "adapter_model.safetensors").exists() else p.stat().st_mtime)


class NotARunError(InfopoError):
    """A folder `infopo report` was given that `infopo train` did not write."""

    exit_code = 2


@dataclass
class Run:
    """A run folder read back: where it is, its settings, its metrics records and its summary."""

    path: Path
    settings: dict[str, Any]                              # config.toml as written: the resolved settings
    records: list[dict[str, Any]]                         # metrics.jsonl, in order
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json; empty while a run is still going
    shown: str = ""                                       # the name to show where the folder's own is not enough

    @property
    def name(self) -> str:
        return self.shown or self.path.resolve().name

    @property
    def loss(self) -> str:
        return str(self.settings.get("loss", "?"))

    @property
    def label(self) -> str:
        return f"{self.name} ({self.loss})"

    @property
    def loss_params(self) -> dict[str, Any]:
        """The loss's own parameters. config.toml holds the loss's resolved parameters and the registry refuses any
        other, so the loss settings present are exactly its own; sft_weight only when it is on."""
        return {k: self.settings[k] for k in LOSS_PARAMS if k in self.settings and (k != "sft_weight" or self.settings[k])}

    @property
    def data(self) -> list[str]:
        value = self.settings.get("data", [])
        return [value] if isinstance(value, str) else list(value)

    @property
    def eval_data(self) -> list[str]:
        value = self.settings.get("eval_data", [])
        return [v for v in ([value] if isinstance(value, str) else list(value)) if v]

    @property
    def data_info(self) -> dict[str, Any]:
        """Rows and format as the run read them (summary.json; absent for runs of older versions)."""
        data = self.summary.get("data")
        return data if isinstance(data, dict) else {}  # another file's summary.json (an eval's) holds no such table

    @property
    def unit(self) -> str:
        """What the run trained on: "pairs", or "unpaired rows" (thumbs up/down feedback)."""
        return self.data_info.get("unit", "pairs")

    @property
    def train(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "train"]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "eval"]

    @property
    def eval_before(self) -> dict[str, Any]:
        """The step-0 evaluation: the model before training (for a resumed run, still the first part's)."""
        return next((r for r in self.evals if r.get("step") == 0), {})

    @property
    def eval_after(self) -> dict[str, Any]:
        """The last evaluation after step 0 (the end of the run, or where it stopped)."""
        later = [r for r in self.evals if (r.get("step") or 0) > 0]
        return later[-1] if later else {}

    @property
    def steps(self) -> int:
        return int(self.summary.get("steps") or (self.train[-1]["step"] if self.train else 0))


def read_runs(folders: list[str | Path]) -> list[Run]:
    """`read_run` of each; runs whose folders share a name (`infopo` of two comparisons) are shown with as much of
    their paths as tells them apart."""
    runs = [read_run(folder) for folder in folders]
    paths = [run.path.resolve() for run in runs]
    deepest = max((len(p.parts) for p in paths), default=1)
    for depth in range(1, deepest + 1):
        names = [str(Path(*p.parts[-depth:])) for p in paths]
        if len(set(names)) == len(set(paths)):  # one folder given twice keeps one name
            break
    if depth > 1:
        for run, name in zip(runs, names):
            run.shown = name
    return runs


def read_run(folder: str | Path) -> Run:
    """Read a run folder; one that `infopo train` did not write is a one-line NotARunError."""
    path = Path(folder)
    if not path.is_dir():
        raise NotARunError(f"{path} is not a folder; pass a run folder written by `infopo train`")
    missing = [name for name in (CONFIG, METRICS) if not (path / name).is_file()]
    if missing:
        raise NotARunError(f"{path} is not a run folder (no {' or '.join(missing)}); pass a folder written by "
                           "`infopo train`")
    try:
        records = read_records(path / METRICS)
        summary = json.loads((path / SUMMARY).read_text(encoding="utf-8")) if (path / SUMMARY).is_file() else {}
    except ValueError:
        summary = {}  # a torn summary.json: the records hold everything a report needs
    except OSError as err:
        raise NotARunError(f"cannot read {path}: {err.strerror or err}") from None
    return Run(path, read(path / CONFIG), records, summary if isinstance(summary, dict) else {})
