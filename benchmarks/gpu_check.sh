#!/usr/bin/env bash
# One command for a GPU host: build, check, benchmark, probe, report.
#
#   MIMAC_COMMIT=<sha> bash benchmarks/gpu_check.sh [OUTDIR]
#
# OUTDIR defaults to $OUT (the job's output folder, if the host sets one), else
# benchmarks/results/<date>-gpu. The machine has no internet: peers' wheels
# (inf_cl, cut-cross-entropy) travel as files in $WHEELS (default: the first of
# benchmarks/wheels/ and .whl/ that holds *.whl) and are installed with
# `pip install --no-index --no-deps --target`. There is no .git there either,
# so pass the commit in MIMAC_COMMIT for the labels.
#
# Default: STEPS=quick (= env,build,quicktests,headline), GPU_CHECK_BUDGET=300,
# for a short GPU slot (15 minutes with the machine's start and one retry):
#   env ~5 s    build (cuda extension only) <= 90 s, ~35 s
#   quicktests  cuda-gpu <= 30 s, then triton <= 60 s (each leaving 120 s):
#               tests/kernels/test_backends.py, float32 and bf16, both pairings,
#               every critic, edge shapes left out
#   headline    the rest, ~150-200 s (python -m benchmarks.quick_check): a float64
#               check of both GPU backends at NT-Xent M = 65,536 and CLIP
#               N = 65,536, D = 128, bf16, then the five headline cases timed
#               (mimac-triton and mimac-cuda, eager, torch.compile last while time
#               remains), each beside its static sm_90 estimate
# and writes 6 files: quick_check.json, quick_check.md, dispatch_table.json (the
# measured choice between the GPU backends, for mimac_kernels/dispatch_table.json),
# tests-cuda-gpu.xml, tests-triton.xml, gpu_check.log.
#
# STEPS=full (= env,wheels,build,tests,bench,maxbatch,report) is the long run, its
# budget for a 600 s job limit (default GPU_CHECK_BUDGET=560 there):
#   env + wheels  ~15 s      build   <= 150 s     tests <= 120 s
#   bench         what is left minus 110 s, its pytest deadline 45 s earlier
#                 (cases run in priority order, so a cut drops the least important)
#   max-batch     <= 75 s    report  <= 30 s
# Each step is bounded with `timeout`; a step that fails is logged and the rest
# still run. Steps can be named one by one, e.g.
# STEPS=env,wheels,build,tests,sanitize in one call and STEPS=bench,maxbatch,report
# in the next (`sanitize`, compute-sanitizer's racecheck/memcheck/synccheck on
# benchmarks/sanitize_cuda.py, <= 60 s each, is in no preset). BENCH_SIZE
# (default gpu) and BENCH_ARGS (extra pytest options, e.g. -k M65536) adjust
# the benchmark step; `STEPS=bench,report BENCH_SIZE=smoke` is a CPU dry run, and
# `STEPS=quick QUICK_ARGS="--tiny --device cpu --backends torch"` the quick one's.
# BUILD_KIND (cuda in quick, all otherwise), QUICK_TESTS_K (the quicktests -k
# expression) and QUICK_ARGS (extra options of benchmarks.quick_check) adjust those.
#
# Writes at most 7 files per preset (for output folders that keep 8; give quick
# and full separate folders): full writes benchmark.json, max_batch.json,
# report.md, time.png, memory.png, tests.xml, gpu_check.log.
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-benchmarks/results/$(date -u +%F)-gpu}}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
STEPS=${STEPS:-quick}
QUICK=0
# Presets expand in place (whole names only: `quicktests` is a step of its own).
steps=()
IFS=, read -ra names <<<"$STEPS"
for s in "${names[@]}"; do
  case $s in
    quick) QUICK=1; steps+=(env build quicktests headline) ;;
    full) steps+=(env wheels build tests bench maxbatch report) ;;
    *) steps+=("$s") ;;
  esac
done
STEPS=$(IFS=,; echo "${steps[*]}")
if ((QUICK)); then BUDGET=${GPU_CHECK_BUDGET:-300}; else BUDGET=${GPU_CHECK_BUDGET:-560}; fi
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RC=0

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(elapsed))); }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
log() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$LOG"; }
# run NAME LIMIT CMD...: bounded, logged, never aborts the script.
run() {
  local name=$1 limit=$2
  shift 2
  if ((limit < 5)); then
    log "$name: skipped, no time left (${limit}s)"
    return 1
  fi
  log "$name: start (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "$name: rc=$rc"
  return "$rc"
}

log "out=$OUTDIR budget=${BUDGET}s steps=$STEPS commit=${MIMAC_COMMIT:-unknown}"

if want env; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true; } 2>&1 | tee -a "$LOG"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" \
    2>&1 | tee -a "$LOG"
fi

if want wheels; then
  WHEELS=${WHEELS:-}
  if [[ -z "$WHEELS" ]]; then
    for d in benchmarks/wheels .whl; do
      if compgen -G "$d/*.whl" >/dev/null; then WHEELS=$d; break; fi
    done
  fi
  if [[ -n "$WHEELS" ]]; then
    run wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    log "wheels: none carried (inf_cl / cut-cross-entropy benchmarks will record a skip)"
  fi
fi

if want build; then
  if $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('mimac_kernels.build') is None)" 2>/dev/null; then
    # The quick run needs only the cuda extension (the cpu one is CI's business).
    kind=${BUILD_KIND:-$( ((QUICK)) && echo cuda || echo all)}
    cap=$( ((QUICK)) && echo 90 || echo 150)
    run build $((cap < $(left) ? cap : $(left))) $PY -m mimac_kernels.build --kind "$kind" || RC=1
  else
    log "build: mimac_kernels.build not present yet; extensions build on first use"
  fi
fi

if want tests; then
  # The CUDA and Triton suites first (a cut drops the rest), every failure up to 25
  # reported rather than the first; the CPU emulation is CI's job, not the chip's.
  # (files named one by one: pytest keeps that order, not with a folder among them).
  # test_backends.py runs its GPU backends (triton, cuda) before the CPU ones.
  first=(tests/kernels/test_backends.py tests/kernels/test_cuda_backend.py
         tests/kernels/test_triton.py)
  mapfile -t rest < <(ls tests/kernels/test_*.py \
    | grep -v -e test_backends.py -e test_cuda_backend.py -e test_triton.py)
  run tests $((120 < $(left) ? 120 : $(left))) $PY -m pytest "${first[@]}" "${rest[@]}" \
    --maxfail=25 -q -p no:cacheprovider -m "not emulated" -rfE --durations=10 \
    --junitxml="$OUTDIR/tests.xml" || RC=1
fi

if want quicktests; then
  # The chip's part of the backend matrix: float32 and bf16, both pairings, every
  # critic (~48 tests a backend); edge shapes stay in `tests`. The cuda backend
  # first (compiled already, ~10 s), then triton, whose JIT compiles each
  # variant: a cut then falls on triton's last critics, not on cuda.
  K=${QUICK_TESTS_K:-not torch.float16 and not test_edge_shapes}
  for backend in cuda-gpu triton; do
    limit=$(($(left) - 120))
    cap=$([[ $backend == cuda-gpu ]] && echo 30 || echo 60)
    run "quicktests-$backend" $((cap < limit ? cap : limit)) $PY -m pytest \
      tests/kernels/test_backends.py -k "$backend and ($K)" -m "not emulated" --maxfail=25 \
      -q -p no:cacheprovider -rfE --durations=5 --junitxml="$OUTDIR/tests-$backend.xml" || RC=1
  done
fi

if want headline; then
  limit=$(($(left) - 5))
  # A larger torch-backend tile: the float64 reference of the check runs at
  # M = 65,536 (256 MiB a tile; the backend's default is sized for CPUs).
  export MIMAC_KERNELS_TORCH_TILE=${MIMAC_KERNELS_TORCH_TILE:-$((1 << 25))}
  # shellcheck disable=SC2086  # QUICK_ARGS is a list of extra options
  run headline "$limit" $PY -m benchmarks.quick_check --out "$OUTDIR" \
    --deadline $((limit - 20)) ${QUICK_ARGS:-} || RC=1
fi

if want sanitize; then
  # compute-sanitizer on a small workout of the CUDA kernels (Firecracker machines
  # run it; gVisor ones do not): shared-memory races, memory errors, barrier misuse.
  SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [[ -x "$SAN" ]]; then
    for tool in racecheck memcheck synccheck; do
      run "sanitize-$tool" $((60 < $(left) ? 60 : $(left))) "$SAN" --tool "$tool" \
        --error-exitcode 1 $PY -m benchmarks.sanitize_cuda || RC=1
    done
  else
    log "sanitize: compute-sanitizer not found (not on PATH, not at $SAN)"
  fi
fi

if want bench; then
  reserve=0
  want maxbatch && reserve=$((reserve + 80))
  want report && reserve=$((reserve + 30))
  limit=$(($(left) - reserve))
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of extra options
  run bench "$limit" $PY -m pytest benchmarks/test_throughput.py --benchmark-only \
    --bench-size="${BENCH_SIZE:-gpu}" ${BENCH_ARGS:-} \
    --bench-deadline=$((limit - 45)) --benchmark-json="$OUTDIR/benchmark.json" \
    -p no:cacheprovider -q -rs --benchmark-columns=median,iqr,rounds || RC=1
fi

if want maxbatch; then
  r=0
  want report && r=30
  limit=$(($(left) - r))
  limit=$((limit > 75 ? 75 : limit))
  # A quick probe inside this budget (time-capped tries, extrapolated M); for the
  # full search give it its own call: python3 -m benchmarks.max_batch --deadline 480
  # --time-cap 60 --out $OUT/max_batch.json.
  # shellcheck disable=SC2086  # MAXBATCH_ARGS is a list of extra options
  run maxbatch "$limit" $PY -m benchmarks.max_batch --deadline $((limit - 15)) --time-cap 20 \
    ${MAXBATCH_ARGS:-} --out "$OUTDIR/max_batch.json" || RC=1
fi

if want report; then
  args=()
  [[ -f "$OUTDIR/max_batch.json" ]] && args=(--max-batch "$OUTDIR/max_batch.json")
  if [[ -f "$OUTDIR/benchmark.json" ]]; then
    run report 30 $PY -m benchmarks.report "$OUTDIR/benchmark.json" "${args[@]}" --out "$OUTDIR" || RC=1
    # The reply carries the end of the output: finish with the headline table.
    sed -n '/^## Summary/,/^## Details/p' "$OUTDIR/report.md" | head -60
  else
    log "report: no benchmark.json"
  fi
fi
log "done rc=$RC"
exit $RC
