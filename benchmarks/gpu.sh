#!/usr/bin/env bash
# benchmarks/gpu.sh: ONE GPU run of at most 8 minutes (TOTAL_S, default 420 s) that measures infopo against TRL's
# DPOTrainer on an 8B Llama-shaped random checkpoint under a 24 GiB CUDA cap: s/step, tokens/s and peak GiB at
# 2 pairs x (256 prompt + 768 response) tokens; the longest length each trains at batch 1; `infopo plan`'s
# prediction next to the measured peak. The last lines printed are a Markdown table; full logs go to $OUT.
#
#   here, once:      bash benchmarks/gpu_wheels.sh            # fills .whl/ (ignored by git; carried to the GPU)
#   GPU machine:     bash benchmarks/gpu.sh                   # device `run`, carry [".whl"], timeout_s 450
#   dry run (CPU):   bash benchmarks/gpu.sh --dry-run         # or DRY_RUN=1: a tiny Llama, 3 steps, no install
#
# Phases (each bounded by `timeout` and by the run's overall deadline): install (the carried wheels, offline),
# prep (checkpoint + pairs), plan, infopo (`infopo train`), trl (DPOTrainer, then its longest length), infopo-fit
# (infopo's longest length), report. A phase that fails or times out leaves the others running; the table says
# what is missing. Rerun at once on the same (still warm) machine and the install and the checkpoint are reused.
# Knobs (environment): TOTAL_S, CAP_GIB, STEPS, WARMUP, TRL_FIT_S, INFOPO_FIT_S, FIT_UPPER, FIT_GRID, PHASES
# (e.g. PHASES="plan infopo" to rerun some phases only), WORK, PY.
set -u -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_DATASETS_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TQDM_DISABLE=1
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
BENCH=$REPO/benchmarks/gpu_bench.py
DRY=${DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
START=$(date +%s)

if [[ $DRY == 1 ]]; then
  SIZE=tiny PL=256 RL=768 PAIRS=8
  : "${TOTAL_S:=1200}" "${STEPS:=3}" "${WARMUP:=1}" "${CAP_GIB:=24}" "${TRL_FIT_S:=60}" "${INFOPO_FIT_S:=60}"
  : "${FIT_UPPER:=4096}" "${FIT_GRID:=256}"
  export FAKE_OOM_ABOVE=${FAKE_OOM_ABOVE:-1536}  # no cap on a CPU: longer tries "run out of memory" on purpose
  : "${OUT:=$REPO/benchmarks/results/gpu-dryrun}" "${WORK:=/tmp/infopo-gpu-dry}"
  if [[ -z ${PY:-} ]]; then  # a Python with infopo and trl (trl is not a dependency of infopo)
    for candidate in "$REPO/.venv/bin/python" "$REPO/../venv-bench/bin/python" python3; do
      if "$candidate" -c "import trl, infopo_cli" 2>/dev/null; then PY=$candidate; break; fi
    done
    : "${PY:=python3}"
  fi
  TOK=$WORK/tokenizer   # the embedded default's, as infopo converted it (made below, before INFOPO_HOME moves)
else
  SIZE=8b PL=256 RL=768 PAIRS=24
  : "${TOTAL_S:=420}" "${STEPS:=10}" "${WARMUP:=3}" "${CAP_GIB:=24}" "${TRL_FIT_S:=60}" "${INFOPO_FIT_S:=80}"
  : "${FIT_UPPER:=32768}" "${FIT_GRID:=512}"
  : "${OUT:=$REPO/benchmarks/results/gpu}" "${PY:=python3}"
  if [[ -z ${WORK:-} ]]; then  # the 16 GB checkpoint: in RAM if /dev/shm has room, else on disk
    shm=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
    if [[ ${shm:-0} -ge 24 ]]; then WORK=/dev/shm/infopo-gpu; else WORK=/tmp/infopo-gpu; fi
  fi
  TOK=$REPO/.whl/tokenizer
fi
mkdir -p "$OUT" "$WORK"
if [[ $DRY == 1 && ! -f $TOK/tokenizer.json ]]; then
  "$PY" "$BENCH" tokenizer --to "$TOK" 2>&1 | grep -v "^Failed to load CPU gemm_4bit"
fi
LOG=$OUT/gpu.log
RESERVE=25                                   # seconds kept for the report and the logs
DEADLINE=$(( START + TOTAL_S - RESERVE ))
export INFOPO_HOME=$WORK/infopo-home          # infopo's caches (token, reference, file hashes) stay in WORK
echo "run $(date -u +%H:%M:%S)${PHASES:+ (phases: $PHASES)}:" >> "$WORK/phases"

log() { echo "$*" | tee -a "$LOG"; }
wanted() { [[ -z ${PHASES:-} || " $PHASES " == *" $1 "* ]]; }

# phase NAME MAX_SECONDS COMMAND...: run COMMAND under `timeout` (at most MAX_SECONDS, never past DEADLINE),
# its output to the screen, $LOG and WORK/NAME.log; records rc and seconds in WORK/phases.
phase() {
  local name=$1 max=$2 left t t0 rc
  shift 2
  wanted "$name" || return 0
  left=$(( DEADLINE - $(date +%s) ))
  t=$(( max < left ? max : left ))
  if (( t < 20 )); then
    log "== $name: skipped, ${left}s left of the ${TOTAL_S}s budget"
    echo "$name skipped (time)" >> "$WORK/phases"
    return 0
  fi
  log "== $name: at most ${t}s ($(( $(date +%s) - START ))s elapsed)"
  t0=$(date +%s)
  : > "$WORK/$name.log"
  PHASE_DEADLINE=$(( t0 + t )) timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.log"
  rc=$?
  (( rc == 124 || rc == 137 )) && log "== $name: TIMED OUT after ${t}s"
  log "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" >> "$WORK/phases"
}

# the infopo sources' fingerprint: gpu_wheels.sh wrote it next to the wheel it built from them
source_hash() {
  find infopo_cli presets -type f \( -name '*.py' -o -name '*.toml' -o -name '*.jsonl' \) ! -path '*/__pycache__/*' \
    | LC_ALL=C sort | xargs sha256sum pyproject.toml | sha256sum | cut -c1-16
}

log "infopo GPU benchmark: $( [[ $DRY == 1 ]] && echo 'DRY RUN (CPU, tiny model)' || echo '8B, GPU' ); budget ${TOTAL_S}s; work $WORK; logs $OUT"
log "settings: cap ${CAP_GIB} GiB, pairs ${PL}+${RL}, batch 2, ${STEPS} steps (${WARMUP} warm-up), fit up to ${FIT_UPPER} by ${FIT_GRID} (TRL ${TRL_FIT_S}s, infopo ${INFOPO_FIT_S}s)"
if [[ $DRY != 1 ]]; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee -a "$LOG"
  if wanted install; then
    log "== install: the carried wheels (.whl/), offline, into /tmp/site"
    ls .whl/*.whl >/dev/null 2>&1 || { log "no .whl/*.whl: run benchmarks/gpu_wheels.sh here first and carry .whl"; exit 1; }
    stamp=$(ls -l .whl/*.whl | sha256sum | cut -c1-16)
    if [[ -f /tmp/site/.installed-$stamp ]]; then
      log "wheels already installed (same machine, earlier run)"
    else
      t0=$(date +%s)
      timeout 150 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | tee -a "$LOG" || { log "install failed"; exit 1; }
      touch "/tmp/site/.installed-$stamp"
      log "installed in $(( $(date +%s) - t0 ))s: $(cd .whl && ls *.whl | tr '\n' ' ')"
      echo "install rc=0 $(( $(date +%s) - t0 ))s" >> "$WORK/phases"
    fi
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  built=$(cat .whl/SOURCE.sha256 2>/dev/null || echo none)
  if [[ $built != "$(source_hash)" ]]; then
    log "WARNING: the carried infopo wheel was built from other sources than this tree ($built); measuring the tree's"
    log "         infopo_cli instead (rerun benchmarks/gpu_wheels.sh before the next run)"
    export PYTHONPATH=$REPO:$PYTHONPATH
  fi
fi
"$PY" - <<'EOF' 2>&1 | grep -v "^Failed to load CPU gemm_4bit" | tee -a "$LOG"
import importlib.metadata as md, sys
names = ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate", "infopo")
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "MISSING"
print(sys.executable, "; ".join(f"{n} {version(n)}" for n in names))
import infopo_cli, torch
print("infopo_cli from", infopo_cli.__path__[0], "| cuda:", torch.cuda.is_available(), torch.version.cuda)
EOF

wanted prep && rm -f "$WORK/prep.json"
phase prep 150 "$PY" "$BENCH" prep --work "$WORK" --size $SIZE --tokenizer "$TOK" --prompt $PL --response $RL --pairs $PAIRS
if [[ ! -f $WORK/prep.json ]]; then
  log "prep failed: no checkpoint or pairs, nothing to measure"
else
  phase plan 90 "$PY" "$BENCH" plan --work "$WORK" --gpu-mem "$CAP_GIB"
  FIT=(--fit-upper "$FIT_UPPER" --fit-grid "$FIT_GRID")
  phase infopo 160 "$PY" "$BENCH" infopo --work "$WORK" --cap-gib "$CAP_GIB" --steps "$STEPS" --warmup "$WARMUP"
  if "$PY" -c "import trl" 2>/dev/null; then
    phase trl $(( 110 + TRL_FIT_S )) "$PY" "$BENCH" trl --work "$WORK" --cap-gib "$CAP_GIB" --steps "$STEPS" \
      --warmup "$WARMUP" --fit-seconds "$TRL_FIT_S" "${FIT[@]}"
  else
    log "== trl: skipped, trl is not importable by $PY"
    echo "trl skipped (no trl)" >> "$WORK/phases"
  fi
  phase infopo-fit $(( 60 + INFOPO_FIT_S )) "$PY" "$BENCH" infopo-fit --work "$WORK" --cap-gib "$CAP_GIB" \
    --fit-seconds "$INFOPO_FIT_S" "${FIT[@]}"
fi

# the logs that matter, in one file (at most 8 files come back from $OUT)
(cd "$WORK" && { find . -maxdepth 1 \( -name '*.log' -o -name '*.json' -o -name 'plan.txt' -o -name phases \) -print0
   find . -mindepth 2 -maxdepth 2 -path './run-*' \( -name metrics.jsonl -o -name summary.json -o -name config.toml \) -print0
 } | tar czf "$OUT/logs.tar.gz" --null -T -) 2>&1 | tee -a "$LOG"
log "elapsed $(( $(date +%s) - START ))s of ${TOTAL_S}s; full log $LOG, phase logs and run metrics in $OUT/logs.tar.gz"
timeout 60 "$PY" "$BENCH" report --work "$WORK" --out "$OUT" --cap-gib "$CAP_GIB" $( [[ $DRY == 1 ]] && echo --dry-run ) 2>&1 \
  | grep -v "^Failed to load CPU gemm_4bit" | tee -a "$LOG"
