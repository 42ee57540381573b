"""What `infopo train --resume RUN` may change: the run's length and how it saves, nothing that alters the maths.

Flags that repeat the run's own settings are accepted (so the original command plus `--resume` works);
a flag that disagrees is refused with one line saying why. `--batch-size` and `--grad-accum` may change
together when their product, the global batch, stays the same: the data order and each step's
gradient are those of the global batch, and a smaller micro-batch is the way out of an out-of-memory stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infopo_cli.config import TrainConfig, flag as _flag, merge
from infopo_cli.errors import ConfigError

# the length of the run, and where and how often it saves or evaluates: the adapter stays the same
MAY_CHANGE = ("max_steps", "epochs", "save_every", "keep_checkpoints", "eval_every", "eval_batch_size", "max_bad_steps",
              "report_to", "reference", "eval_generate_every", "eval_max_new_tokens")


def resumed_config(saved: TrainConfig, flags: dict[str, Any], run_dir: Path) -> TrainConfig:
    flags = dict(flags)
    preset = flags.pop("preset", None)
    if preset is not None and saved.preset not in (preset, Path(preset).stem) and Path(preset) != run_dir / "config.toml":
        raise ConfigError(f"--resume continues {run_dir} with its own preset ({saved.preset}); drop --preset {preset}")
    output = flags.pop("output", None)
    if output is not None and Path(output).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume writes into {run_dir} itself; drop --output {output}")
    if flags.get("dtype") == "auto":  # config.toml holds what auto chose for this run
        flags.pop("dtype")
    if flags.get("init_adapter") and saved.init_adapter and Path(flags["init_adapter"]).expanduser().resolve() == Path(saved.init_adapter):
        flags.pop("init_adapter")  # config.toml holds the folder as an absolute path
    cfg = merge(saved, {**flags, "output": str(run_dir)}, source="command line")
    for key in sorted(set(flags) - set(MAY_CHANGE) - {"batch_size", "grad_accum"}):
        if getattr(cfg, key) != getattr(saved, key):
            raise ConfigError(f"{_flag(key)} {getattr(cfg, key)!r} differs from this run's {getattr(saved, key)!r}: --resume "
                              f"continues a run with its own settings (it may change {', '.join(map(_flag, MAY_CHANGE))}, "
                              "and --batch-size with --grad-accum at the same global batch)")
    if cfg.batch_size * cfg.grad_accum != saved.batch_size * saved.grad_accum:
        raise ConfigError(f"the global batch (--batch-size x --grad-accum) must stay {saved.batch_size} x {saved.grad_accum} = "
                          f"{saved.batch_size * saved.grad_accum} on --resume (got {cfg.batch_size} x {cfg.grad_accum})")
    if "max_steps" not in flags and cfg.epochs != saved.epochs:
        cfg = merge(cfg, {"max_steps": None}, source="command line")  # a new --epochs sets the length; the saved max_steps must not win
    return cfg
