#!/usr/bin/env bash
# benchmarks/gpu_wheels.sh: fill .whl/ (ignored through .git/info/exclude) with what benchmarks/gpu.sh installs on
# the GPU machine, which has no network: the packages its image lacks (bitsandbytes, trl, datasets and the two of
# datasets' needs it lacks, gguf), infopo itself as a wheel, and the tokenizer of the benchmark's checkpoint; with
# UNSLOTH=1 also .whl/unsloth/, Unsloth's stack for the Unsloth row (gpu.sh installs it into a site of its own:
# Unsloth pins trl <= 1.15 and datasets < 5). Prints what travels in all (the device tool takes 64 MiB).
#
#   bash benchmarks/gpu_wheels.sh                 # then the device run carries [".whl"]
#   UNSLOTH=1 bash benchmarks/gpu_wheels.sh       # and the Unsloth row (about 25 MB more)
#   EXTRA="transformers==5.24.0" bash benchmarks/gpu_wheels.sh   # also carry another version of an image package
#
# The image already has torch 2.11 (CUDA 13.0), transformers 5.17, peft, accelerate, tokenizers, safetensors,
# pandas, pyarrow, xxhash, typer, rich, triton and torchvision (/work/.library/device/KINDS.md). bitsandbytes' wheel
# ships kernels for every CUDA and ROCm release (41 MiB); only the CUDA 13 ones (KEEP_CUDA, default "130 132") and the
# CPU one are kept. Unsloth's wheel carries its web UI (studio/, 26 MB), left out; xformers, which Unsloth uses only
# when it imports, stays behind (its wheel alone is over the limit): Unsloth then runs PyTorch's attention.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
CACHE=${WHEEL_CACHE:-/tmp/infopo-wheel-cache}
KEEP_CUDA=${KEEP_CUDA:-130 132}
PKGS=(bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 ${EXTRA:-})
# unsloth 2026.10.9's and unsloth_zoo's needs that the image lacks (or has at versions it refuses), pinned
UNSLOTH_PKGS=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 tyro==1.0.17 docstring-parser==0.18.0
              typeguard==4.6.1 shtab==1.13.0 torchao==0.18.0 cut_cross_entropy==25.1.1 hf_transfer==0.1.9 diffusers==0.42.1
              importlib_metadata==8.7.0 msgspec==0.23.0 json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0 pydantic==2.14.4
              pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

# fetch SPEC... into FOLDER: each wheel once into the cache, then copied
fetch() {
  local folder=$1 spec dir
  shift
  mkdir -p "$folder"
  for spec in "$@"; do
    dir=$CACHE/${spec/==/-}
    if ! ls "$dir"/*.whl >/dev/null 2>&1; then
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$dir" "$spec" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    fi
    ls "$dir"/*.whl >/dev/null 2>&1 || { echo "no wheel for $spec" >&2; exit 1; }
    cp "$dir"/*.whl "$folder"/
  done
}

rm -rf "$WHL"
mkdir -p "$WHL" "$CACHE"
fetch "$WHL" "${PKGS[@]}"
if [[ ${UNSLOTH:-0} == 1 ]]; then
  fetch "$WHL/unsloth" "${UNSLOTH_PKGS[@]}"
fi

# wheels without what the GPU run never loads (each RECORD rewritten to match): bitsandbytes' kernels of other
# CUDA/ROCm/XPU releases, Unsloth's web UI
python3 - "$WHL" "$KEEP_CUDA" <<'EOF'
import re, sys, zipfile
from pathlib import Path
folder, keep = Path(sys.argv[1]), {f"libbitsandbytes_cuda{v}.so" for v in sys.argv[2].split()} | {"libbitsandbytes_cpu.so"}
rules = {"bitsandbytes-*.whl": lambda n: re.search(r"/libbitsandbytes_[^/]+\.so$", n) and n.rsplit("/", 1)[-1] not in keep,
         "unsloth/unsloth-*.whl": lambda n: n.startswith("studio/")}
for pattern, drops in rules.items():
    for wheel in folder.glob(pattern):
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            drop = {n for n in src.namelist() if drops(n)}
            for item in src.infolist():
                if item.filename in drop:
                    continue
                data = src.read(item.filename)
                if item.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line + "\n" for line in data.decode().splitlines() if line.split(",")[0] not in drop).encode()
                dst.writestr(item, data)
        before = wheel.stat().st_size
        slim.replace(wheel)
        print(f"{wheel.name}: {len(drop)} files left out, {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB")
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
ls -lR "$WHL"
total=$(du -sb "$WHL" | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "what travels: the tree $(( tree / 1024 ))K + .whl $(( total / 1024 ))K = $(( (tree + total) / 1024 ))K (the device tool takes 64 MiB = 65536K)"
if (( tree + total > 64 * 1024 * 1024 )); then
  echo "over the device tool's 64 MiB: leave something out (UNSLOTH=0?)" >&2
  exit 1
fi
