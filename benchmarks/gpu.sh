#!/usr/bin/env bash
# benchmarks/gpu.sh: ONE device call that measures infopo against TRL's DPOTrainer (and Unsloth's, when its wheels
# were carried) side by side on an 8B Llama-shaped random checkpoint under a 24 GiB CUDA cap: s/step, tokens/s
# (infopo's with and without its reference pre-pass) and peak GiB at 2 pairs x (256 prompt + 768 response) tokens,
# every layer recomputed on both sides (infopo's `auto` as an extra row); the longest length each trains at batch 1;
# `infopo plan`'s predictions next to the measured peaks. The last lines printed are a Markdown table that names the
# card; the logs go to $OUT.
#
#   here, once:      bash benchmarks/gpu_wheels.sh       # fills .whl/ (ignored by git; carried to the GPU)
#   GPU machine:     bash benchmarks/gpu.sh              # device `run`: carry [".whl"], timeout_s 540
#   dry run (CPU):   bash benchmarks/gpu.sh --dry-run    # a tiny Llama and short pairs, no install (see below)
#
# The budget (BUDGET_S, 480 s): a device call runs at most 600 s of command time, and a session has 15 minutes of
# device time in all, the machine's start (1-2 minutes), transfers and idle time included. 480 s leave the call 60 s
# of margin under its timeout_s of 540, and the session about 3 minutes to rerun some phases (PHASES="infopo trl")
# on the still-warm machine, where the install and the checkpoint are reused. Each phase runs under `timeout`, at
# most its cap and never past the budget; the caps add up to at most the budget (checked before anything runs).
#
# Phases, in order: smoke (at most 60 s: a tiny model on CUDA through `infopo train` with the prompt shared and
# offloaded checkpointing on its two layers, and TRL's DPOTrainer built and stepped, a failure of either stopping the
# run there with its error; beside them `infopo train --attn-implementation flex_attention`, its compiled block mask
# on the GPU, and `infopo doctor` where it exists, both only reported), prep (the 8B checkpoint and the pairs),
# infopo (one model load: `infopo plan`, the reference pre-pass, the `on` and `auto` rows, the longest length), trl
# (its row, then its longest length on the same load), unsloth (when .whl/unsloth/ was carried), report. Before them,
# on the GPU, the carried wheels are installed offline into /tmp/site (and /tmp/site-unsloth).
# The dry run takes about 70 s on 2 CPU cores without TRL (whose phase, where TRL is installed, adds its own time);
# its phases may take DRY_SCALE (4) times their caps, so it ends within about 32 minutes (BUDGET_S x 4) at the most.
# Knobs (environment): BUDGET_S, CAP_GIB, STEPS, WARMUP, PHASES (e.g. PHASES="infopo trl" reruns those), WORK, OUT,
# PY, TOK (a tokenizer folder), DRY_SCALE (the dry run's phases may take this many times their caps, default 4).
set -u -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_DATASETS_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TQDM_DISABLE=1
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
BENCH=$REPO/benchmarks/gpu_bench.py
DRY=${DRY_RUN:-0}
usage() {  # the usage line, and with --help this header
  echo "usage: bash benchmarks/gpu.sh [--dry-run] [--help]"
  [[ $1 == long ]] && awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$REPO/benchmarks/gpu.sh"
}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) usage long; exit 0 ;;
    *) usage short >&2; exit 2 ;;
  esac
done
START=$(date +%s)
: "${BUDGET_S:=480}" "${CAP_GIB:=24}"

if [[ $DRY == 1 ]]; then
  # pairs longer than the preset's max_prompt_length (512); one real try per length search, the others "run out of
  # memory" on purpose (a CPU has no cap)
  SIZE=tiny PL=64 RL=512 PAIRS=6 FIT_UPPER=1024 FIT_GRID=128
  : "${STEPS:=2}" "${WARMUP:=1}"
  export FAKE_OOM_ABOVE=${FAKE_OOM_ABOVE:-768}
  : "${OUT:=$REPO/benchmarks/results/gpu-dryrun}" "${WORK:=/tmp/infopo-gpu-dry}"
  if [[ -z ${PY:-} ]]; then  # a Python with infopo, with trl if one has it (trl is not a dependency of infopo)
    for need in "trl, infopo_cli" "infopo_cli"; do
      for candidate in "$REPO/.venv/bin/python" python3; do
        if "$candidate" -c "import $need" 2>/dev/null; then PY=$candidate; break 2; fi
      done
    done
    : "${PY:=python3}"
  fi
  : "${TOK:=$WORK/tokenizer}"  # the embedded default's, as infopo converts it (made below)
  UNSLOTH=0
  REQUIRE=()
  SCALE=${DRY_SCALE:-4}  # the caps are the GPU run's; a shared 2-core CPU may take a few times as long
else
  SIZE=8b PL=256 RL=768 PAIRS=24 FIT_UPPER=32768 FIT_GRID=512
  : "${STEPS:=10}" "${WARMUP:=3}"
  : "${OUT:=$REPO/benchmarks/results/gpu}" "${PY:=python3}" "${TOK:=$REPO/.whl/tokenizer}"
  if [[ -z ${WORK:-} ]]; then  # the 16 GB checkpoint: in RAM if /dev/shm has room, else on disk
    shm=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
    if [[ ${shm:-0} -ge 24 ]]; then WORK=/dev/shm/infopo-gpu; else WORK=/tmp/infopo-gpu; fi
  fi
  UNSLOTH=$(ls .whl/unsloth/*.whl >/dev/null 2>&1 && echo 1 || echo 0)
  REQUIRE=(--require-cuda --require-trl --trl-step --doctor)
  SCALE=1
fi

# --- the caps (seconds); with the Unsloth row its 85 s come out of the two length searches ---------------------------
SETUP_S=30 SMOKE_S=60 PREP_S=90 REPORT_S=15 OUTSIDE_S=15  # OUTSIDE_S: what runs between phases (nvidia-smi, logs)
caps() {  # caps UNSLOTH(0|1): sets INFOPO_S TRL_S UNSLOTH_S CAPS_SUM CAPS_TEXT
  if [[ $1 == 1 ]]; then INFOPO_S=105 TRL_S=80 UNSLOTH_S=85; else INFOPO_S=140 TRL_S=105 UNSLOTH_S=0; fi
  CAPS_SUM=$(( SETUP_S + SMOKE_S + PREP_S + INFOPO_S + TRL_S + UNSLOTH_S + REPORT_S + OUTSIDE_S ))
  CAPS_TEXT="setup $SETUP_S + smoke $SMOKE_S + prep $PREP_S + infopo $INFOPO_S + trl $TRL_S + unsloth $UNSLOTH_S"
  CAPS_TEXT+=" + report $REPORT_S + outside phases $OUTSIDE_S = $CAPS_SUM s"
}
caps $(( 1 - UNSLOTH )); OTHER_SUM=$CAPS_SUM OTHER_TEXT=$CAPS_TEXT
caps "$UNSLOTH"
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu.log
: > "$LOG"
log() { echo "$*" | tee -a "$LOG"; }
log "infopo GPU benchmark: $( [[ $DRY == 1 ]] && echo 'DRY RUN (CPU, tiny model)' || echo '8B, GPU' ); work $WORK; logs $OUT"
log "phase caps: $CAPS_TEXT <= budget ${BUDGET_S} s (a device call: at most 600 s; the session: 15 min with the machine's start)"
log "phase caps $( [[ $UNSLOTH == 1 ]] && echo without || echo with ) the Unsloth row: $OTHER_TEXT"
if (( CAPS_SUM > BUDGET_S || OTHER_SUM > BUDGET_S )); then
  log "the phase caps add up to more than the ${BUDGET_S} s budget: lower a cap"
  exit 2
fi
log "settings: cap ${CAP_GIB} GiB, pairs ${PL}+${RL}, batch 2, ${STEPS} steps per row (${WARMUP} warm-up)," \
    "lengths up to ${FIT_UPPER} by ${FIT_GRID}"
(( SCALE != 1 )) && log "dry run: each phase may take ${SCALE}x its cap on this CPU (DRY_SCALE): the run ends" \
  "within about $(( BUDGET_S * SCALE / 60 )) minutes"
DEADLINE=$(( START + (BUDGET_S - REPORT_S) * SCALE ))  # the report always gets its time
export INFOPO_HOME=$WORK/infopo-home          # infopo's caches (tokens, reference, file hashes) stay in WORK
echo "run $(date -u +%H:%M:%S)${PHASES:+ (phases: $PHASES)}:" >> "$WORK/phases"

wanted() { [[ -z ${PHASES:-} || " $PHASES " == *" $1 "* ]]; }

# phase NAME MAX_SECONDS COMMAND...: COMMAND under `timeout` (at most MAX_SECONDS, never past DEADLINE), its output to
# the screen, $LOG and WORK/NAME.log; its rc in PHASE_RC and, with its seconds, in WORK/phases.
phase() {
  local name=$1 max=$2 left t t0
  shift 2
  PHASE_RC=0
  wanted "$name" || return 0
  left=$(( DEADLINE - $(date +%s) ))
  max=$(( max * SCALE ))
  t=$(( max < left ? max : left ))
  if (( t < 20 )); then
    log "== $name: skipped, ${left}s left of the ${BUDGET_S}s budget"
    echo "$name skipped (time)" >> "$WORK/phases"
    PHASE_RC=124
    return 0
  fi
  log "== $name: at most ${t}s ($(( $(date +%s) - START ))s elapsed)"
  t0=$(date +%s)
  PHASE_DEADLINE=$(( t0 + t )) timeout -k 10 "$t" "$@" 2>&1 | grep --line-buffered -v "^Failed to load CPU gemm_4bit" \
    | tee "$WORK/$name.log" | tee -a "$LOG"
  PHASE_RC=${PIPESTATUS[0]}
  (( PHASE_RC == 124 || PHASE_RC == 137 )) && log "== $name: TIMED OUT after ${t}s"
  log "== $name: rc=$PHASE_RC in $(( $(date +%s) - t0 ))s"
  echo "$name rc=$PHASE_RC $(( $(date +%s) - t0 ))s" >> "$WORK/phases"
}

# the infopo sources' fingerprint: gpu_wheels.sh wrote it next to the wheel it built from them
source_hash() {
  find infopo_cli presets -type f \( -name '*.py' -o -name '*.toml' -o -name '*.jsonl' \) ! -path '*/__pycache__/*' \
    | LC_ALL=C sort | xargs sha256sum pyproject.toml | sha256sum | cut -c1-16
}

if [[ $DRY == 1 ]]; then
  if [[ ! -f $TOK/tokenizer.json ]]; then
    "$PY" "$BENCH" tokenizer --to "$TOK" 2>&1 | grep -v "^Failed to load CPU gemm_4bit"
  fi
else
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee -a "$LOG"
  if wanted setup; then
    ls .whl/*.whl >/dev/null 2>&1 || { log "no .whl/*.whl: run benchmarks/gpu_wheels.sh here first and carry .whl"; exit 1; }
    stamp=$(ls -lR .whl | sha256sum | cut -c1-16)
    if [[ -f /tmp/site/.installed-$stamp ]]; then
      log "-- setup: the wheels are installed already (this machine, an earlier run)"
    else
      t0=$(date +%s)
      # two sites: Unsloth pins trl <= 1.15 and datasets < 5, so its phase puts /tmp/site-unsloth first
      timeout "$SETUP_S" bash -c 'pip=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
          "${pip[@]}" --target /tmp/site .whl/*.whl || exit 1
          if ls .whl/unsloth/*.whl >/dev/null 2>&1; then "${pip[@]}" --target /tmp/site-unsloth .whl/unsloth/*.whl || exit 1; fi' \
        2>&1 | tee -a "$LOG" || { log "-- setup: the install failed (or took over ${SETUP_S}s)"; exit 1; }
      touch "/tmp/site/.installed-$stamp"
      log "-- setup: installed in $(( $(date +%s) - t0 ))s: $(find .whl -name '*.whl' -printf '%f ' | sort)"
      echo "setup rc=0 $(( $(date +%s) - t0 ))s" >> "$WORK/phases"
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

ABORT=""
phase smoke "$SMOKE_S" "$PY" "$BENCH" smoke --work "$WORK" --tokenizer "$TOK" "${REQUIRE[@]}"
if (( PHASE_RC != 0 )) && wanted smoke; then
  ABORT="the smoke phase failed (rc $PHASE_RC): $(grep -h '^SMOKE FAILED' "$WORK/smoke.log" | tail -1)"
fi
if [[ -z $ABORT ]]; then
  wanted prep && rm -f "$WORK/prep.json"
  phase prep "$PREP_S" "$PY" "$BENCH" prep --work "$WORK" --size $SIZE --tokenizer "$TOK" --prompt $PL --response $RL --pairs $PAIRS
  [[ -f $WORK/prep.json ]] || ABORT="prep failed: no checkpoint or pairs, nothing to measure"
fi
if [[ -z $ABORT ]]; then
  ROW=(--work "$WORK" --cap-gib "$CAP_GIB" --steps "$STEPS" --warmup "$WARMUP" --fit-upper "$FIT_UPPER" --fit-grid "$FIT_GRID")
  phase infopo "$INFOPO_S" "$PY" "$BENCH" infopo "${ROW[@]}"
  if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('trl') is None)" 2>/dev/null; then
    phase trl "$TRL_S" "$PY" "$BENCH" trl "${ROW[@]}"
  else
    log "== trl: skipped, trl is not importable by $PY"
    echo "trl skipped (no trl)" >> "$WORK/phases"
  fi
  if [[ $UNSLOTH == 1 ]]; then
    phase unsloth "$UNSLOTH_S" env PYTHONPATH="/tmp/site-unsloth:$PYTHONPATH" "$PY" "$BENCH" unsloth "${ROW[@]}"
  fi
fi
[[ -n $ABORT ]] && log "STOPPED: $ABORT; the phases after it did not run"

# the logs that matter, in one file (at most 8 files come back from $OUT)
(cd "$WORK" && find . -maxdepth 1 \( -name '*.log' -o -name '*.json' -o -name 'plan.txt' -o -name phases \) -print0 \
   | tar czf "$OUT/logs.tar.gz" --null -T -) 2>&1 | tee -a "$LOG"
log "elapsed $(( $(date +%s) - START ))s of ${BUDGET_S}s; full log $LOG, phase logs in $OUT/logs.tar.gz"
timeout $(( REPORT_S * SCALE )) "$PY" "$BENCH" report --work "$WORK" --out "$OUT" --unsloth "$UNSLOTH" \
  $( [[ $DRY == 1 ]] && echo --dry-run ) 2>&1 | tee -a "$LOG"
[[ -z $ABORT ]]
