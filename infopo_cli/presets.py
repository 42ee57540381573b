"""Find and read presets: TOML files of `TrainConfig` settings shipped in `presets/`."""

from __future__ import annotations

import re
import stat
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from infopo_cli import files
from infopo_cli.config import TrainConfig, override, show, source_weight
from infopo_cli.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_PRESET = "smollm2-135m"
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def presets_dir() -> Path:
    """Installed wheels carry the presets inside the package; a source checkout has them at the top."""
    packaged = Path(__file__).parent / "presets"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "presets"


def available() -> dict[str, Path]:
    """Every shipped preset by name."""
    return {p.stem: p for p in sorted(presets_dir().glob("*.toml"))}


def find(name_or_path: str) -> Path:
    """The file of a preset name (see `available`) or of a path to a .toml file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise ConfigError(f"preset file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"preset file {path}: not a regular file")
        return path
    presets = available()
    if name_or_path not in presets:
        raise ConfigError(f"unknown preset '{name_or_path}'; available: {', '.join(presets)}")
    return presets[name_or_path]


MAX_BYTES = 1 << 20  # a preset is a page of settings; anything larger is not one


def _parse(path: Path) -> dict[str, Any]:
    """The whole TOML table of a preset file; every way it can be unreadable is one line naming it."""
    try:
        found = path.stat()
        if not stat.S_ISREG(found.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if found.st_size > MAX_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_BYTES >> 20} MiB, not a preset")
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors write one) is no error
    except tomllib.TOMLDecodeError as err:
        hint = " (presets are TOML: key = value lines, strings quoted)" if path.suffix.lower() != ".toml" else ""
        raise ConfigError(f"{path}: not valid TOML: {err}{hint}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files are UTF-8)") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a preset") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or 'unreadable'})") from None


def read(path: Path) -> dict[str, Any]:
    """The raw settings of a preset file, without its description."""
    raw = _parse(path)
    raw.pop("description", None)
    return raw


def description(path: Path) -> str:
    """The preset file's one-line `description` ("" when it has none)."""
    return str(_parse(path).get("description", ""))


def plain_name(text: str) -> str:
    """A file's stem as a plain name: what a run name must not hold becomes '-'."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", text).lstrip("._+-")[:100]
    return name or "preset"


def run_name(name: Any, path: Path) -> str:
    """A preset's name as it goes into run folder names (runs/NAME-TIME): a plain name, never a path."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise ConfigError(f"{path}: 'preset' must be a plain name (letters, digits, '.', '_', '+', '-'; it names "
                          f"the run folders under ./runs), got {show(name)}")
    return name


# settings added since the first release, with the value that reads an older release's run as that release did
ADDED_LATER = {"system_field": ""}  # a `system` column was ignored


STARTED_IN = ".started_in"  # in a run folder: the working folder the run started in, for its relative paths


def load_run_config(run_dir: Path, where_started: bool = True) -> TrainConfig:
    """A run folder's config.toml; a setting it lacks (an older release wrote it) set as that release had it. With
    `where_started`, its relative paths (model, data, held-out data) that the folder the run started in holds are
    made absolute there (in memory: config.toml keeps them as typed), so that `eval`, `generate` and `export` read
    what the run read from wherever they are run."""
    path = run_dir / "config.toml"
    missing = {key: value for key, value in ADDED_LATER.items() if key not in read(path)}
    cfg = replace(load_preset(str(path)), **missing)
    start, there = started_paths(run_dir, cfg)
    if not where_started or start is None or not there:
        return cfg
    absolute = {path: str((start / path).resolve()) for path in there}
    return replace(cfg, model=absolute.get(cfg.model, cfg.model),
                   **{key: _mapped(getattr(cfg, key), absolute) for key in ("data", "eval_data")})


def record_start(run_dir: Path) -> None:
    """Notes the folder a fresh run starts in: the relative paths its config.toml keeps as typed are relative to it."""
    files.write_text(run_dir / STARTED_IN, str(Path.cwd()) + "\n")


def started_paths(run_dir: Path, cfg: TrainConfig) -> tuple[Path | None, list[str]]:
    """The folder the run in `run_dir` started in, and its relative paths (model, data, held-out data) found there;
    (None, []) where it was not recorded (an older release), is gone, is this folder, or the run folder has moved since
    (copied into another project, whose files of those names are not the run's)."""
    record = run_dir / STARTED_IN
    start = Path(record.read_text(encoding="utf-8").strip()) if record.is_file() else None
    if start is None or not start.is_dir() or start.resolve() == Path.cwd().resolve() or not cfg.output \
            or (start / cfg.output).resolve() != run_dir.resolve():
        return None, []
    return start, [path for path in relative_paths(cfg) if (start / path).exists()]


def relative_paths(cfg: TrainConfig) -> list[str]:
    """A run's relative local paths as its config.toml spells them: its model, its data and held-out data sources
    (weights dropped; bundled sets and absolute paths left out)."""
    specs = [_spec(text) for value in (cfg.data, cfg.eval_data) for text in _listed(value)] + [cfg.model]
    return [path for path in dict.fromkeys(specs) if path and not path.startswith("bundled:")
            and not Path(path).expanduser().is_absolute()]


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _spec(text: str) -> str:
    """'d/a.jsonl:0.3' -> 'd/a.jsonl'."""
    return source_weight(text)[0]


def _mapped(value: Any, absolute: dict[str, str]) -> Any:
    """A data setting with each source in `absolute` replaced, its weight kept."""
    def one(text: str) -> str:
        spec = _spec(text)
        return absolute[spec] + text[len(spec):] if spec in absolute else text
    return one(value) if isinstance(value, str) else [one(text) for text in value or []]


def _parent(path: Path, extends: Any) -> str | None:
    """The preset a preset file's `extends` names (None without one)."""
    if extends is None:
        return None
    if not isinstance(extends, str) or not extends.strip():
        raise ConfigError(f"{path}: 'extends' must be a preset name or a .toml file, got {show(extends)}")
    if extends.endswith(".toml") and not Path(extends).is_absolute() and (path.parent / extends).is_file():
        return str(path.parent / extends)  # `extends = "base.toml"` beside this preset, wherever infopo runs from
    return extends


def lineage(name_or_path: str) -> list[str]:
    """The preset and those it extends, itself first (as `load_preset` follows them; it has checked the chain)."""
    chain = [name_or_path]
    while (parent := _parent(path := find(chain[-1]), read(path).get("extends"))) is not None:
        chain.append(parent)
    return chain


def load_preset(name_or_path: str, _seen: tuple[Path, ...] = ()) -> TrainConfig:
    """Defaults < preset (< the preset it `extends`). Unknown keys and wrong types are errors that name the
    file they are in, so a typo cannot go unnoticed and the user knows which file to fix."""
    path = find(name_or_path)
    # by file, not name: a local llama3-8b-qlora.toml may extend the shipped llama3-8b-qlora
    if any(path.resolve() == seen.resolve() for seen in _seen):
        raise ConfigError(f"{_seen[-1]}: 'extends' loops back to {path} "
                          f"({' -> '.join(p.stem for p in (*_seen, path))})")
    raw = read(path)
    parent = _parent(path, raw.pop("extends", None))
    try:
        base = load_preset(parent, (*_seen, path)) if parent else TrainConfig()
    except ConfigError as err:
        if str(err).startswith(("preset file ", "unknown preset")):  # the file that names it is the one to fix
            raise ConfigError(f"{path}: extends = {parent!r}: {err}") from None
        raise
    cfg = override(base, raw, source=str(path))  # as flags over a preset: another loss, another held-out set
    # a run's config.toml keeps the preset it came from
    cfg.preset = run_name(raw["preset"], path) if raw.get("preset") else plain_name(path.stem)
    return cfg
