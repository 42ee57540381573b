"""A non-editable install must carry the presets and the bundled data inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from conftest import ROOT



def test_wheel_contains_presets_data_and_entry_point(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("infopo-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (ROOT / "presets").glob("*.toml")}
    assert presets and {f"infopo_cli/presets/{p}" for p in presets} <= names
    assert {"infopo_cli/bundled/arith_train.jsonl", "infopo_cli/bundled/arith_eval.jsonl",
            "infopo_cli/bundled/arithmetic.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "infopo = infopo_cli.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
