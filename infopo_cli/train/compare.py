"""`infopo compare`: the same data, model and seed trained once per loss (or per value of a swept flag).

Each variant is an ordinary run in its own folder under one parent, so everything that works on a run
(`--resume`, `report`, `eval`, `export`) works on each. The plan is written to `PARENT/compare.json` first:
rerunning the same command skips the runs that finished, resumes the one that was stopped (exactly, from its
checkpoint) and starts the rest; a different plan for the same parent is refused.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from infopo_cli import files
from infopo_cli.config import FIELDS, flag, from_flag, override
from infopo_cli.errors import ConfigError

PLAN = "compare.json"
# what the comparison itself decides for each run: not among the train flags `infopo compare` takes
OWN_FLAGS = ("loss", "output", "resume")


@dataclass(frozen=True)
class Variant:
    name: str                 # its folder under the parent
    settings: dict[str, Any]  # the flags that differ between the runs (loss, the swept setting)


def parse_sweep(text: str | None) -> tuple[str, list[str]] | None:
    """'beta=0.1,0.3' -> ('beta', ['0.1', '0.3']): one train setting and its values (as the command line gives them)."""
    if not text:
        return None
    name, equals, values = text.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not equals or not items:
        raise ConfigError(f"--sweep {text}: write SETTING=V1,V2 (e.g. --sweep beta=0.1,0.3)")
    if name == "preset":  # the field only records a run's preset name: sweeping it would load nothing
        raise ConfigError(f"--sweep {text}: presets are not swept; run one comparison per preset (--preset NAME)")
    if name not in FIELDS or name in OWN_FLAGS:
        raise ConfigError(f"--sweep {text}: '{name}' is not a setting a comparison can sweep")
    return name, items


def plan(losses: list[str], sweep: tuple[str, list[str]] | None) -> list[Variant]:
    """One variant per loss, times one per swept value; names say what differs."""
    if not losses:
        raise ConfigError("--loss: name at least one loss (e.g. --loss infopo,dpo)")
    if len(set(losses)) != len(losses):
        raise ConfigError(f"--loss {','.join(losses)}: name each loss once")
    values = sweep[1] if sweep else [None]
    out = []
    for loss in losses:
        for value in values:
            settings: dict[str, Any] = {"loss": loss}
            name = loss
            if sweep:
                settings[sweep[0]] = value
                name += f"-{sweep[0].replace('_', '-')}{re.sub(r'[^A-Za-z0-9.+-]', '_', value)}"
            out.append(Variant(name, settings))
    return out


@dataclass(frozen=True)
class Comparison:
    variants: list[Variant]
    configs: list[Any]      # each run's TrainConfig, checked
    parent: Path
    flags: dict[str, str]   # the train flags given, as the plan records them

    def check(self) -> bool:
        """Whether the parent holds this very comparison (it continues); writes nothing."""
        return check_parent(self.parent, self.variants, self.flags)

    def claim(self) -> bool:
        """`check`, then the plan written into a new parent."""
        return claim_parent(self.parent, self.variants, self.flags)


def prepare(losses: str, sweep: str | None, output: str | None, flags: dict[str, Any], preset: str) -> Comparison:
    """`infopo compare`'s command line as a checked plan: `losses` a comma list, `sweep` SETTING=V1,V2, `output` the
    parent (default runs/compare-LOSSES-TIME), `flags` the train settings given. Every loss name and flag is checked
    here, before anything is written."""
    swept = parse_sweep(sweep)
    if swept and swept[0] in flags:  # the sweep sets it for every run: the flag would be dropped without a word
        raise ConfigError(f"--sweep {sweep} sets {swept[0]} for every run, and {flag(swept[0])} is given too; drop one")
    variants = plan([name.strip() for name in losses.split(",") if name.strip()], swept)
    # the swept values typed as `infopo train` types them on its command line
    variants = [replace(v, settings={k: value if k == "loss" else from_flag(k, value) for k, value in v.settings.items()})
                for v in variants]
    names = "-".join(v.settings["loss"] for v in variants[:3])
    parent = Path(output) if output else Path("runs") / f"compare-{names}-{time.strftime('%Y%m%d-%H%M%S')}"
    checked = configs(variants, flags, parent, preset)
    if swept:  # the first loss's runs, one per value, in order
        each_value_once(sweep, swept[1], [getattr(cfg, swept[0]) for cfg in checked[:len(swept[1])]])
        if len({v.name for v in variants}) < len(variants):  # distinct values the folder names spell alike ("a b", "a_b")
            raise ConfigError(f"--sweep {sweep}: two values give the same run folder name; give values that differ "
                              "in letters, digits or . + -")
    return Comparison(variants, checked, parent, {k: str(v) for k, v in flags.items()})


def each_value_once(text: str, items: list[str], values: list[Any]) -> None:
    """Refuse a swept value given twice, compared as the run reads it (0.1 and 0.10 are one value): it would train the
    same run twice."""
    first: dict[str, str] = {}
    for item, value in zip(items, values):
        key = json.dumps(value, sort_keys=True, default=str)  # lists (target_modules) too
        if key in first:
            again = "is given twice" if item == first[key] else f"is the same value as {first[key]}"
            raise ConfigError(f"--sweep {text}: {item} {again}; give each value once")
        first[key] = item


def configs(variants: list[Variant], flags: dict[str, Any], parent: Path, preset: str) -> list[Any]:
    """Each run's settings, checked as `infopo train` checks them before its model loads (loss names and the flags
    each loss takes included): a mistake in the command is refused before the parent or its plan is written."""
    from infopo_cli.losses import registry
    from infopo_cli.train import preflight

    return [preflight.check_settings(override(registry.load_preset(preset), {**flags, **v.settings, "output": str(parent / v.name)},
                                              source="command line"))[0] for v in variants]


def check_data(configs: list[Any]) -> None:
    """Every run's loss against the training data, read once: a loss that cannot train on it (a pair loss on thumbs
    up/down rows) or a flag that does not apply to it is refused before the first run trains, not after it."""
    from infopo_cli.data.loading import DataOptions
    from infopo_cli.data.mixing import load_mix
    from infopo_cli.losses import registry
    from infopo_cli.train import preflight

    first = configs[0]
    pairs = load_mix(first.data, DataOptions.from_config(first), first.seed).pairs
    for cfg in configs:
        spec, params = registry.resolve(cfg.loss, cfg.loss_overrides())
        preflight.fit_to_loss(cfg, spec, params, pairs)


def _plan_of(variants: list[Variant], flags: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({"runs": [v.name for v in variants], "settings": [v.settings for v in variants],
                                  "flags": {k: v for k, v in sorted(flags.items())}}))


def check_parent(parent: Path, variants: list[Variant], flags: dict[str, Any]) -> bool:
    """Whether `parent` can hold this comparison, writing nothing: True when it holds this very plan (the comparison
    resumes), False when it is new or empty; anything else is a one-line error."""
    path = parent / PLAN
    if os.path.lexists(parent) and not parent.is_dir():
        raise ConfigError(f"--output {parent}: a file is there; a comparison writes a folder of runs")
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or not isinstance(saved.get("runs"), list):
            raise ConfigError(f"{path} is not a comparison plan infopo can read; pass another --output")
        if saved != _plan_of(variants, flags):
            raise ConfigError(f"{parent} holds another comparison ({', '.join(map(str, saved['runs']))}); pass another "
                              "--output, or the same flags to continue it")
        return True
    if parent.is_dir() and any(parent.iterdir()):
        raise ConfigError(f"{parent} already exists and is not a comparison; pass another --output")
    return False


def claim_parent(parent: Path, variants: list[Variant], flags: dict[str, Any]) -> bool:
    """`check_parent`, then the plan written into a new parent. True when the comparison resumes."""
    if check_parent(parent, variants, flags):
        return True
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--output {parent}: cannot create it ({err.strerror})") from None
    files.write_json(parent / PLAN, _plan_of(variants, flags))
    return False


def state_of(folder: Path) -> str:
    """'done' (finished), 'stopped' (has a config: resume it) or 'new'."""
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text(encoding="utf-8")).get("status") == "completed":
                return "done"
        except ValueError:
            pass
    return "stopped" if (folder / "config.toml").is_file() else "new"


def run_all(variants: list[Variant], settings: list[Any], parent: Path,
            train: Callable[..., Any], say: Callable[[str], None]) -> tuple[list[Path], Any]:
    """Train every variant not yet done, in order (`settings`: each one's, from `configs`). Returns (the run folders,
    None), or at a run that stopped
    (Ctrl-C, out of memory, ...) (the folders so far, its summary): rerunning the command carries on from it."""
    from infopo_cli.presets import load_run_config
    from infopo_cli.train.resume import resumed_config

    folders = []
    for i, (variant, cfg) in enumerate(zip(variants, settings), 1):
        folder = parent / variant.name
        folders.append(folder)
        state = state_of(folder)
        say(f"[{i}/{len(variants)}] {variant.name}: " + {"done": "finished before, kept", "stopped": "resuming",
                                                        "new": "training"}[state])
        if state == "done":
            continue
        if state == "stopped":
            summary = train(resumed_config(load_run_config(folder, where_started=False), {}, folder), resume=folder)
        else:
            summary = train(cfg)
        if summary.exit_code:
            return folders, summary
    return folders, None


def report(parent: Path, folders: list[Path]) -> tuple[list[Any], list[Path]]:
    """The finished runs side by side: PARENT/report.md and, with matplotlib, report.png. Returns (the loaded runs, the
    files written)."""
    from infopo_cli.reporting import figure, table
    from infopo_cli.reporting.runs import read_runs

    runs = read_runs(folders)
    files.write_text(parent / "report.md", table.markdown_table(runs))
    written = [parent / "report.md"]
    if figure.plot_runs(runs, parent / "report.png"):
        written.append(parent / "report.png")
    return runs, written


def evaluate_all(parent: Path, folders: list[Path], evaluate: Callable[[Path], Any]) -> tuple[str, Path]:
    """`evaluate` (`infopo eval --generate`, given by the caller) on every run, one table of them in PARENT/eval.md.
    Returns (the table, its path)."""
    markdown = eval_markdown([(folder.name, evaluate(folder)) for folder in folders])
    files.write_text(parent / "eval.md", markdown)
    return markdown, parent / "eval.md"


def eval_markdown(results: list[tuple[str, Any]]) -> str:
    """One table over the runs' `infopo eval --generate` results: preference accuracy and answers, base vs tuned (with
    the tuned accuracy's 95% interval); then each two runs on the same problems: how many only one of them answers
    right, and McNemar's exact p (below 0.05 the difference is real, else within chance)."""
    from infopo_cli.reporting.intervals import mcnemar, verdict

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    lines = ["| run | chosen log-prob change | held-out reward accuracy | answers base | answers tuned (95% interval) "
             "| replies changed |", "|---|---|---|---|---|---|"]
    for name, result in results:
        preference, generation = result.preference or {}, result.generation or {}
        base, tuned = generation.get("base") or {}, generation.get("tuned") or {}
        change = preference.get("logp_change_chosen")
        interval = tuned.get("interval")
        lines.append(f"| {name} | {'n/a' if change is None else f'{change:+.2f}'} | "
                     f"{percent(preference.get('reward_accuracy'))} | {percent(base.get('accuracy'))} | "
                     f"{percent(tuned.get('accuracy'))}" + (f" ({interval[0]:.0%}-{interval[1]:.0%})" if interval else "")
                     + f" | {percent(generation.get('changed'))} |")
    scored = {name: [row["tuned"]["correct"] for row in result.rows or []
                     if row.get("tuned") and row["tuned"]["correct"] is not None] for name, result in results}
    pairs = [(a, b) for i, (a, _) in enumerate(results) for b, _ in results[i + 1:]
             if scored[a] and len(scored[a]) == len(scored[b])]
    if pairs:
        lines += ["", "| run | against | right only in run | right only against | McNemar p | |", "|---|---|---|---|---|---|"]
        for a, b in pairs:
            test = mcnemar(scored[a], scored[b])
            lines.append(f"| {a} | {b} | {test.only_first} | {test.only_second} | {test.p_value:.3g} | "
                         f"{verdict(test.real)} |")
    return "\n".join(lines) + "\n"
