#!/usr/bin/env bash
# CUDA-kernel section of the GPU check, callable on its own or from the GPU suite script.
#
#   1. build owl_sparse._C (setup.py; OWL_SPARSE_CUDA_ARCHS, default "80;90") and load it,
#   2. nvcc compile checks (tests/kernels/test_cuda_compile.py),
#   3. GPU correctness tests (tests/kernels/test_cuda_kernels.py, tests/kernels/test_mma_layout.py),
#   4. compute-sanitizer memcheck, racecheck and synccheck on benchmarks/sanitize_cuda.py.
#
# Per-step logs go to $CUDA_CHECK_LOGS (default /tmp/owl_cuda_check); when $OUT is set
# (the device tool brings back at most 8 files from it), one combined $OUT/cuda_check.log.
# Exit status: 0 when every step passed; otherwise the number of failed steps.
# Usage: bash benchmarks/gpu_cuda_check.sh [--no-build] [--no-tests] [--no-sanitize]
# From the GPU suite (which builds and runs the gpu tests itself), the sanitizer part only:
#   SANITIZE_TOOLS=memcheck bash benchmarks/gpu_cuda_check.sh --no-build --no-tests
# Time on an H100 (estimate, unmeasured): build ~1-2 min, tests ~1 min, each sanitizer
# tool ~1 min (mostly CUDA / torch start-up under instrumentation).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LOG=${CUDA_CHECK_LOGS:-/tmp/owl_cuda_check}
mkdir -p "$LOG"
BUILD=1
TESTS=1
SANITIZE=1
for arg in "$@"; do
  case "$arg" in
    --no-build) BUILD=0 ;;
    --no-tests) TESTS=0 ;;
    --no-sanitize) SANITIZE=0 ;;
    *) echo "unknown option $arg" >&2; exit 64 ;;
  esac
done

failed=0
summary=()
step() {  # step NAME CMD...: run, log, record PASS/FAIL
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name"
  if "$@" >"$LOG/$name.log" 2>&1; then
    summary+=("PASS  $name ($((SECONDS - t0)) s)")
  else
    summary+=("FAIL  $name ($((SECONDS - t0)) s, see $LOG/$name.log)")
    failed=$((failed + 1))
    tail -n 30 "$LOG/$name.log"
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$LOG/gpu.txt" 2>&1
echo "GPU: $(cat "$LOG/gpu.txt")"

if [ "$BUILD" = 1 ]; then
  export OWL_SPARSE_NVCC_THREADS=${OWL_SPARSE_NVCC_THREADS:-8}
  export MAX_JOBS=${MAX_JOBS:-8}
  step build "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
step load "$PY" -c "
import owl_sparse.ops.cuda as c
ok = c.load(); print(c.status()); assert ok
print('plan decode 4096x4096, 1 token:', c.plan('sparse24', 1, 4096, 4096))
print('plan bitmap 4096x4096, 512 tokens:', c.plan('bitmap', 512, 4096, 4096))"
if [ "$TESTS" = 1 ]; then
  step compile "$PY" -m pytest -q tests/kernels/test_cuda_compile.py
  step gpu_tests "$PY" -m pytest -q -ra tests/kernels/test_cuda_kernels.py tests/kernels/test_mma_layout.py tests/ops/test_cuda.py
fi

if [ "$SANITIZE" = 1 ]; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
      step "sanitize_$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
        "$PY" benchmarks/sanitize_cuda.py
    done
  else
    summary+=("SKIP  sanitize (compute-sanitizer not on PATH)")
  fi
fi

echo "== CUDA kernel check summary"
printf '%s\n' "${summary[@]}" | tee "$LOG/summary.txt"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in "$LOG"/summary.txt "$LOG"/*.log; do
    [ -f "$f" ] && { echo "##### $(basename "$f")"; cat "$f"; }
  done >"$OUT/cuda_check.log"
fi
exit "$failed"
