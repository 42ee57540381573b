"""Find and read presets: TOML files of `TrainConfig` settings shipped in `presets/`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from infopo_cli.config import TrainConfig, merge
from infopo_cli.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_PRESET = "smollm2-135m"


def presets_dir() -> Path:
    """Installed wheels carry the presets inside the package; a source checkout has them at the top."""
    packaged = Path(__file__).parent / "presets"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "presets"


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(presets_dir().glob("*.toml"))}


def read(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Return (name, raw settings) for a preset name or a path to a .toml file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        name = path.stem
    else:
        presets = available()
        if name_or_path not in presets:
            raise ConfigError(f"unknown preset '{name_or_path}'; available: {', '.join(presets)}")
        name, path = name_or_path, presets[name_or_path]
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    raw.pop("description", None)
    return name, raw


def description(path: Path) -> str:
    return str(tomllib.loads(path.read_text(encoding="utf-8")).get("description", ""))


def load(name_or_path: str, _seen: tuple[str, ...] = ()) -> TrainConfig:
    """Defaults < preset (< the preset it `extends`). Unknown keys are errors, so a typo cannot go unnoticed."""
    name, raw = read(name_or_path)
    if name in _seen:
        raise ConfigError(f"preset {name}: 'extends' loops back to itself ({' -> '.join(_seen + (name,))})")
    parent = raw.pop("extends", None)
    base = load(parent, _seen + (name,)) if parent else TrainConfig()
    cfg = merge(base, raw, source=f"preset {name}")
    cfg.preset = raw.get("preset") or name  # a run's config.toml keeps the preset it came from
    return cfg
