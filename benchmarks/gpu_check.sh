#!/usr/bin/env bash
# Everything a GPU machine must verify, in one command (< 8 minutes on one H100/H200).
#
#   bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
#
# Steps (each with its own time limit; a failing step does not stop the next ones):
#   1 env        GPU, driver, Python and package versions                 -> OUTDIR/env.txt
#   2 install    pip install --no-deps --no-build-isolation . (no network needed; on failure the
#                remaining steps run from the source tree, which they do anyway)  -> install.log
#   3 tests      the tests that need a real GPU (pytest -m gpu: every cuda/cupy case of the suite;
#                the CPU and emulator tests run in CI), one line per test as it ends, so a timeout
#                still leaves the results so far (tests needing a missing package, e.g. dask, skip
#                with their reason; a skip for want of a GPU fails this step)   -> pytest.log, pytest.xml
#   4 memcheck, 5 racecheck, 6 synccheck
#                compute-sanitizer on benchmarks/sanitize_kernels.py, which launches every kernel
#                of gpu_phase_router/kernels/*.cu through the package     -> sanitize_<tool>.log
#   7 bench      benchmarks/bench_cuda.py                  -> bench_cuda.json, bench_cuda.md, bench.log
#                and benchmarks/bench_learned_router.py: the default MoERouter forward at 16384 x 256,
#                k = 8, beside torch.topk alone          -> learned_router_cuda.json, learned_router.md
#   8 compile    benchmarks/bench_compile.py --device cuda: torch.compile of the MoE training model,
#                compiled vs eager step time and equal routes/losses -> bench_compile.json, compile.log
#                (tests/test_torch_compile.py's CUDA tests run in step 3)
#   9 nccl       examples/expert_parallel.py under torchrun on one GPU: ExpertParallel's all-to-all
#                on NCCL (world size 1: one GPU, no network)              -> nccl.log
# OUTDIR/summary.md lists each step's status and time; the exit status is 1 if any step failed.
# Without a usable GPU it prints one line and exits 0. --dry-run prints every step, runs none.
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUT=""; DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    -*) echo "unknown option $a" >&2; usage ;;
    *) [ -z "$OUT" ] && OUT="$a" || usage ;;
  esac
done
[ -n "$OUT" ] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT" || exit 2

STEPS=(env install tests memcheck racecheck synccheck bench compile nccl)
# limits add up to 475 s: the whole check stays under 8 minutes even when a step hangs and ends on
# TERM; one that ignores TERM is killed KILL_AFTER s later (at worst 565 s, under 10 minutes)
KILL_AFTER=10
declare -A LIMIT=([env]=15 [install]=15 [tests]=210 [memcheck]=50 [racecheck]=50 [synccheck]=35 [bench]=40 [compile]=35 [nccl]=25)
declare -A LOG=([env]=env.txt [install]=install.log [tests]=pytest.log [memcheck]=sanitize_memcheck.log
                [racecheck]=sanitize_racecheck.log [synccheck]=sanitize_synccheck.log [bench]="bench.log, bench_cuda.md, learned_router.md"
                [compile]="compile.log, bench_compile.json" [nccl]=nccl.log)
GPU_SKIP='^SKIPPED.*(no CuPy with a usable CUDA|CUDA backend not usable|real GPU run skipped|nvcc not found)'

SAN_ARGS="--error-exitcode 1 --launch-timeout 120"
declare -A CMD=(
  [env]="{ nvidia-smi; echo; $PY -c 'import sys, platform; print(sys.version); print(platform.platform())'; $PY -m pip list 2>/dev/null | grep -iE '^(cupy|torch|numba|numpy|pytest|hypothesis|matplotlib|dask|nbmake) '; nvcc --version | tail -2; compute-sanitizer --version | head -2; } > \"\$OUT/env.txt\" 2>&1"
  [install]="$PY -m pip install --no-deps --no-build-isolation --no-index . > \"\$OUT/install.log\" 2>&1"
  [tests]="$PY -m pytest -v -ra -m gpu --durations=15 -p no:cacheprovider --junitxml=\"\$OUT/pytest.xml\" tests > \"\$OUT/pytest.log\" 2>&1; rc=\$?; if grep -E \"$GPU_SKIP\" \"\$OUT/pytest.log\"; then echo 'FAILED: tests skipped for want of a GPU or nvcc' >> \"\$OUT/pytest.log\"; rc=1; fi; exit \$rc"
  [memcheck]="compute-sanitizer --tool memcheck $SAN_ARGS $PY benchmarks/sanitize_kernels.py > \"\$OUT/sanitize_memcheck.log\" 2>&1"
  [racecheck]="compute-sanitizer --tool racecheck --racecheck-report all $SAN_ARGS $PY benchmarks/sanitize_kernels.py > \"\$OUT/sanitize_racecheck.log\" 2>&1"
  [synccheck]="compute-sanitizer --tool synccheck $SAN_ARGS $PY benchmarks/sanitize_kernels.py > \"\$OUT/sanitize_synccheck.log\" 2>&1"
  [bench]="$PY benchmarks/bench_cuda.py --out \"\$OUT/bench_cuda.json\" --md \"\$OUT/bench_cuda.md\" > \"\$OUT/bench.log\" 2>&1; r=\$?; $PY benchmarks/bench_learned_router.py --device cuda --tokens 16384 --experts 256 --k 8 --repeats 20 --out \"\$OUT/learned_router_cuda.json\" > \"\$OUT/learned_router.md\" 2>&1 || r=1; exit \$r"
  [compile]="$PY benchmarks/bench_compile.py --device cuda --steps 10 --repeats 3 --out \"\$OUT/bench_compile.json\" > \"\$OUT/compile.log\" 2>&1"
  [nccl]="$PY -m torch.distributed.run --standalone --nproc-per-node 1 examples/expert_parallel.py --backend nccl --steps 3 > \"\$OUT/nccl.log\" 2>&1 && grep -q '^rank 0/1' \"\$OUT/nccl.log\""
)

if [ "$DRY" = 1 ]; then
  echo "# gpu_check dry run: OUTDIR=$OUT, source tree $ROOT, python $PY (nothing is run)"
  echo "# env: PYTHONPATH=$ROOT, CUPY_CACHE_DIR=\$OUT/cupy_cache (kernels compiled once, reused by later steps)"
  i=1
  for s in "${STEPS[@]}"; do
    echo "[$i/${#STEPS[@]}] $s (limit ${LIMIT[$s]} s): ${CMD[$s]}"
    i=$((i + 1))
  done
  echo "# then: OUTDIR/summary.md with each step's status; exit 1 if any step failed"
  exit 0
fi

# No GPU: one line, exit 0.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 || \
   ! "$PY" -c 'import cupy, sys; sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no usable CUDA GPU (nvidia-smi and CuPy must both see one); nothing to check here"
  exit 0
fi

mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
export OUT PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" CUPY_CACHE_DIR="$OUT/cupy_cache"
for tool in compute-sanitizer nvcc; do
  command -v "$tool" >/dev/null 2>&1 || echo "gpu_check: $tool not on PATH; steps needing it will fail" >&2
done

SUMMARY="$OUT/summary.md"
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | status | seconds | output |"
  echo "|---|---|---:|---|"
} > "$SUMMARY"
FAILED=0
T_ALL=$(date +%s)
i=1
for s in "${STEPS[@]}"; do
  echo "[$i/${#STEPS[@]}] $s (limit ${LIMIT[$s]} s)"
  t0=$(date +%s)
  timeout --kill-after=$KILL_AFTER "${LIMIT[$s]}" bash -c "${CMD[$s]}"
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT"; FAILED=1 ;;
    *) status="FAILED (rc $rc)"; FAILED=1 ;;
  esac
  if [ "$s" = install ] && [ $rc -ne 0 ]; then status="$status; later steps run from the source tree"; fi
  echo "    -> $status in ${dt} s"
  echo "| $s | $status | $dt | ${LOG[$s]} |" >> "$SUMMARY"
  i=$((i + 1))
done
{
  echo
  echo "total $(( $(date +%s) - T_ALL )) s"
  tail -n 3 "$OUT/pytest.log" 2>/dev/null | sed 's/^/    /'
  for tool in memcheck racecheck synccheck; do
    [ -f "$OUT/sanitize_$tool.log" ] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY|kernels launched" "$OUT/sanitize_$tool.log" | sed "s/^/    $tool: /"
  done
  [ -f "$OUT/bench_cuda.md" ] && { echo; cat "$OUT/bench_cuda.md"; }
  [ -f "$OUT/learned_router.md" ] && { echo; cat "$OUT/learned_router.md"; }
} >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
