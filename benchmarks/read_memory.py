"""Peak memory and time of reading a large preference file: infopo's streaming readers against reading it whole.

    python benchmarks/read_memory.py [--rows 100000]

Writes one file per format (JSONL, a JSON array, CSV) of `--rows` rows with ~1 KiB replies into a temporary folder,
then reads each in a fresh process twice: with infopo's reader (`data.sources.read_rows`, which also checks every
row for repeated keys, nesting and unencodable text) and whole, as infopo did before it streamed (the file's bytes
in memory, then parsed: `json.loads` per line, `json.loads` of the array, `csv.DictReader` over the text). Prints
the peak resident memory above the interpreter's own and the seconds of each, side by side.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

READERS = {
    "infopo": "from infopo_cli.data.sources import read_rows\nrows = sum(1 for _ in read_rows(PATH))",
    "whole": ("import csv, io, json\nraw = open(PATH, 'rb').read()\n"
              "if PATH.endswith('.jsonl'):\n    rows = len([json.loads(l) for l in raw.split(b'\\n') if l.strip()])\n"
              "elif PATH.endswith('.json'):\n    rows = len(json.loads(raw))\n"
              "else:\n    rows = len(list(csv.DictReader(io.StringIO(raw.decode()))))"),
}
# VmHWM (this process's peak RSS) rather than ru_maxrss, which Linux carries over from the parent across exec
MEASURE = """
import time
def kib(key):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key))
base = kib('VmRSS:')
PATH = {path!r}
start = time.perf_counter()
{body}
print(rows, time.perf_counter() - start, (kib('VmHWM:') - base) / 1024)
"""


def write_files(folder: Path, n: int) -> list[Path]:
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"{2 * i}. " + "a" * 1000,
             "rejected": f"{2 * i + 1}. " + "b" * 1000} for i in range(n)]
    jsonl, array, table = folder / "pairs.jsonl", folder / "pairs.json", folder / "pairs.csv"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    array.write_text(json.dumps(rows))
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    return [jsonl, array, table]


def measure(path: Path, reader: str) -> tuple[int, float, float]:
    out = subprocess.run([sys.executable, "-c", MEASURE.format(path=str(path), body=READERS[reader])],
                         capture_output=True, text=True, check=True)
    rows, seconds, mib = out.stdout.split()
    return int(rows), float(seconds), float(mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(f"{'file':<12} {'MiB':>7} | {'infopo MiB':>10} {'s':>6} | {'whole MiB':>9} {'s':>6}")
        for path in write_files(Path(folder), args.rows):
            (n1, s1, m1), (n2, s2, m2) = measure(path, "infopo"), measure(path, "whole")
            assert n1 == n2 == args.rows, (n1, n2)
            print(f"{path.name:<12} {path.stat().st_size / 2**20:>7.0f} | {m1:>10.0f} {s1:>6.2f} | {m2:>9.0f} {s2:>6.2f}")


if __name__ == "__main__":
    main()
