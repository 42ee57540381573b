"""infopo_cli's layers: every import (top-level or inside a function) goes down the order README.md declares.

A unit is a sub-package (data, model, ...) or a top-level module (config, cli, ...). A unit may import units on a
lower tier; units on the same tier may import each other as long as no two units import each other in a circle.
The order is read from README.md's "Development" section, so the guide and this test cannot disagree.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from conftest import ROOT

PACKAGE = ROOT / "infopo_cli"
README = ROOT / "README.md"


@dataclass(frozen=True)
class Edge:
    source: str   # importing unit
    target: str   # imported unit
    where: str    # FILE:LINE of the import statement


def read_order(readme: str = "") -> list[list[str]]:
    """The tiers, lowest first, from the fenced block after README's 'Layers, lowest first' line."""
    text = readme or README.read_text(encoding="utf-8")
    found = re.search(r"Layers, lowest first.*?\n```[a-z]*\n(.*?)\n```", text, re.S)
    assert found, "README.md has no 'Layers, lowest first' block followed by a fenced list of tiers"
    tiers = []
    for line in found.group(1).splitlines():
        line = line.split(":", 1)[1] if ":" in line else line   # an optional 'foundation:' label
        tiers.append([name.strip().split(" ")[0] for name in line.split(",") if name.strip()])
    return tiers


def unit_of(module: str) -> str:
    """infopo_cli.data.loading -> data; infopo_cli.config -> config; infopo_cli -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted module name of a file in the package (a package's __init__ is the package itself)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """Every infopo_cli module this file imports, at any depth (functions included), with its line."""
    found = []
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "infopo_cli"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this file's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "infopo_cli":
                continue
            for alias in node.names:   # `from infopo_cli import config` imports the module config
                sub = f"{base}.{alias.name}"
                file = root / Path(*sub.split("."))
                is_module = file.with_suffix(".py").exists() or file.is_dir()
                found.append((sub if is_module else base, node.lineno))
    return found


def edges(package: Path = PACKAGE) -> list[Edge]:
    """Every import between two different units."""
    out, root = [], package.parent
    for path in sorted(package.rglob("*.py")):
        source = unit_of(module_name(path, root))
        for target_module, line in imports(path, root):
            target = unit_of(target_module)
            if target != source:
                out.append(Edge(source, target, f"{path.relative_to(root)}:{line}"))
    return out


def units(package: Path = PACKAGE) -> set[str]:
    """Every unit that exists: sub-packages and top-level modules."""
    return {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir()
                                                    if p.is_dir() and (p / "__init__.py").exists()}


def order_violations(found: list[Edge], tiers: list[list[str]]) -> list[str]:
    """Imports of a unit on a higher tier than the importer."""
    tier = {name: i for i, names in enumerate(tiers) for name in names}
    unknown = sorted({u for e in found for u in (e.source, e.target) if u not in tier})
    if unknown:
        return [f"not in README.md's layer order: {', '.join(unknown)}"]
    return [f"{e.where}: {e.source} (tier {tier[e.source]}) imports {e.target} (tier {tier[e.target]}), "
            f"a higher tier" for e in found if tier[e.target] > tier[e.source]]


def cycles(found: list[Edge]) -> list[str]:
    """Package-level cycles (strongly connected groups of two or more units), each with the imports that close it."""
    graph: dict[str, set[str]] = {}
    for e in found:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {u: reach(u) for u in graph}
    groups = {frozenset({u} | {v for v in reachable[u] if u in reachable[v]}) for u in graph if u in reachable[u]}
    out = []
    for group in sorted(groups, key=sorted):
        closing = sorted({f"{e.where}: {e.source} -> {e.target}" for e in found
                          if e.source in group and e.target in group})
        out.append(f"cycle between {', '.join(sorted(group))}:\n    " + "\n    ".join(closing))
    return out


def test_readme_order_names_every_unit_once():
    tiers = read_order()
    listed = [name for names in tiers for name in names]
    assert len(listed) == len(set(listed)), f"a unit is listed twice in README's layer order: {listed}"
    assert set(listed) == units(), (f"README's layer order and infopo_cli differ: missing {sorted(units() - set(listed))}, "
                                    f"not in the package {sorted(set(listed) - units())}")


def test_imports_follow_the_declared_order():
    problems = order_violations(edges(), read_order())
    assert not problems, "imports against the layer order in README.md:\n" + "\n".join(problems)


def test_no_package_level_cycles():
    problems = cycles(edges())
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_violation(tmp_path):
    """The walker sees function-local and relative imports, and both checks name the offending line."""
    pkg = tmp_path / "infopo_cli"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("import os\n\ndef f():\n    from infopo_cli.data import loading\n")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "loading.py").write_text("from .. import config\n")
    found = edges(pkg)
    assert order_violations(found, [["__init__"], ["config"], ["data"]]) == [
        "infopo_cli/config.py:4: config (tier 1) imports data (tier 2), a higher tier"]
    assert cycles(found) == ["cycle between config, data:\n    infopo_cli/config.py:4: config -> data\n"
                             "    infopo_cli/data/loading.py:1: data -> config"]
