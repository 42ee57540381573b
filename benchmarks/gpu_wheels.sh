#!/usr/bin/env bash
# benchmarks/gpu_wheels.sh: fill .whl/ (ignored through .git/info/exclude) with what benchmarks/gpu.sh installs on
# the GPU machine, which has no network: the packages its image lacks (bitsandbytes, trl, datasets and the two of
# datasets' needs it lacks, gguf), infopo itself as a wheel, and the tokenizer of the benchmark's checkpoint.
# Prints the folder's size and what travels in all (the device tool takes 64 MiB).
#
#   bash benchmarks/gpu_wheels.sh                 # then the device run carries [".whl"]
#   EXTRA="transformers==5.24.0" bash benchmarks/gpu_wheels.sh   # also carry another version of an image package
#
# The image already has torch 2.11 (CUDA 13.0), transformers, peft, accelerate, tokenizers, safetensors, pandas,
# pyarrow, xxhash, typer and rich (/work/.library/device/KINDS.md). bitsandbytes' wheel ships kernels for every CUDA
# and ROCm release (41 MiB); only the CUDA 13 ones (KEEP_CUDA, default "130 132") and the CPU one are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
CACHE=${WHEEL_CACHE:-/tmp/infopo-wheel-cache}
KEEP_CUDA=${KEEP_CUDA:-130 132}
PKGS=(bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 ${EXTRA:-})
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

rm -rf "$WHL"
mkdir -p "$WHL" "$CACHE"
for spec in "${PKGS[@]}"; do
  dir=$CACHE/${spec/==/-}
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$dir" "$spec" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  fi
  ls "$dir"/*.whl >/dev/null 2>&1 || { echo "no wheel for $spec" >&2; exit 1; }
  cp "$dir"/*.whl "$WHL"/
done

# bitsandbytes without the kernels of other CUDA/ROCm/XPU releases (its RECORD rewritten to match)
python3 - "$WHL" "$KEEP_CUDA" <<'EOF'
import re, sys, zipfile
from pathlib import Path
folder, keep = Path(sys.argv[1]), {f"libbitsandbytes_cuda{v}.so" for v in sys.argv[2].split()} | {"libbitsandbytes_cpu.so"}
for wheel in folder.glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    dropped = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        drop = {n for n in src.namelist() if re.search(r"/libbitsandbytes_[^/]+\.so$", n) and n.rsplit("/", 1)[-1] not in keep}
        for item in src.infolist():
            if item.filename in drop:
                dropped += 1
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line + "\n" for line in data.decode().splitlines() if line.split(",")[0] not in drop).encode()
            dst.writestr(item, data)
    slim.replace(wheel)
    print(f"{wheel.name}: {dropped} kernels of other releases left out, kept {sorted(keep)}")
EOF

# infopo itself, and a fingerprint of the sources it was built from (gpu.sh warns when the tree has moved on)
python3 -m pip wheel -q --no-deps -w "$WHL" . 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
ls "$WHL"/infopo-*.whl >/dev/null
find infopo_cli presets -type f \( -name '*.py' -o -name '*.toml' -o -name '*.jsonl' \) ! -path '*/__pycache__/*' \
  | LC_ALL=C sort | xargs sha256sum pyproject.toml | sha256sum | cut -c1-16 > "$WHL/SOURCE.sha256"

# the benchmark checkpoint's tokenizer: the embedded default's (SmolLM2), without its chat template
PYX=${PY:-}
if [[ -z $PYX ]]; then
  for candidate in .venv/bin/python python3; do
    if "$candidate" -c "import infopo_cli, transformers" 2>/dev/null; then PYX=$candidate; break; fi
  done
fi
"${PYX:?no python with infopo installed: set PY}" benchmarks/gpu_bench.py tokenizer --to "$WHL/tokenizer"

echo
ls -l "$WHL" "$WHL/tokenizer"
echo ".whl: $(du -sh "$WHL" | cut -f1) ($(du -sb "$WHL" | cut -f1) bytes)"
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "what travels: the tree $(( tree / 1024 ))K + .whl $(( $(du -sb "$WHL" | cut -f1) / 1024 ))K (the device tool takes 64 MiB = 65536K)"
