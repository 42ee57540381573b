"""README.md's module map names every module of infopo_cli, once, and nothing that does not exist."""

from __future__ import annotations

import re
from pathlib import Path
from conftest import ROOT

PACKAGE = ROOT / "infopo_cli"


def mapped(readme: str) -> list[str]:
    """The module paths in the first cell of each row of the 'module | job' table under '## Development'."""
    section = readme.split("\n## Development", 1)[1].split("\n## ", 1)[0]
    table = section.split("| module | job |", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return [path for row in rows for path in re.findall(r"`([^`]+\.py)`", row.split("|")[1])]


def modules(package: Path = PACKAGE) -> set[str]:
    """Every module file, relative to the package; a sub-package's __init__.py is its package, not a module."""
    return {p.relative_to(package).as_posix() for p in package.rglob("*.py")
            if not (p.name == "__init__.py" and p.parent != package)}


def problems(listed: list[str], existing: set[str]) -> list[str]:
    """What is wrong with the map: modules missing from it, entries naming no module, entries given twice."""
    out = [f"{m}: not in README.md's module map" for m in sorted(existing - set(listed))]
    out += [f"{m}: in README.md's module map but no such module" for m in sorted(set(listed) - existing)]
    out += [f"{m}: listed more than once" for m in sorted({m for m in listed if listed.count(m) > 1})]
    return out


def test_the_module_map_lists_every_module_and_only_those():
    listed = mapped((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(listed) > 30, "README.md's module map was not found or lost its rows"
    found = problems(listed, modules())
    assert not found, "\n".join(found)


def test_the_check_names_a_missing_and_a_stale_module(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("__init__.py", "cli.py", "data/__init__.py", "data/new.py"):
        (tmp_path / name).write_text("")
    readme = "# x\n\n## Development\n\n| module | job |\n|---|---|\n| `cli.py`, `data/old.py` | jobs |\n| `__init__.py` | v |\n"
    assert problems(mapped(readme), modules(tmp_path)) == ["data/new.py: not in README.md's module map",
                                                          "data/old.py: in README.md's module map but no such module"]
