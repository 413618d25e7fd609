#!/usr/bin/env bash
# The GPU suite: build the CUDA extension, run the GPU tests and every benchmark on one GPU
# in under 9 minutes, and write benchmarks/results/<gpu>-<date>.{json,md} plus PNG plots
# (device name, commit and date inside), and the measured dispatch table
# owl_sparse/ops/tables/<gpu>.json.
#
# Before, on the development machine:  bash benchmarks/prepare_gpu_data.sh   (fills gpu_data/)
# On the GPU machine, from the repository root, in ONE command (carry gpu_data/):
#     bash benchmarks/gpu_suite.sh
# Every step has a time limit; the suite starts no step after SUITE_BUDGET_S seconds
# (default 530) and a failed step is recorded, not fatal.  When $OUT is set, the results,
# the dispatch table and the logs are copied there as well (at most 8 files).
# Overrides (a dry run on a CPU machine, say): SKIP_BUILD=1, KERNEL_ARGS, E2E_ARGS,
# PRUNE_ARGS, RESULTS_DIR, PYTHON, SMOKE_BACKENDS, OWL_SPARSE_DISABLE.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUDGET=${SUITE_BUDGET_S:-530}
T0=$(date +%s)
PARTS=$(mktemp -d /tmp/owl-suite.XXXXXX)
PY=${PYTHON:-python3}
exec > >(tee -a "$PARTS/suite.log") 2>&1

export PYTHONUNBUFFERED=1
export OWL_SPARSE_DATA=${OWL_SPARSE_DATA:-$ROOT/gpu_data/shared}
export OWL_SPARSE_CACHE=$PARTS/cache
export OWL_SPARSE_COMMIT=${OWL_SPARSE_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$( [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo +dirty)}

left() { echo $((BUDGET - ($(date +%s) - T0))); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }
inner() { echo $(($1 - 40 > $1 / 2 ? $1 - 40 : $1 / 2)); } # a benchmark's own --budget-s

step() { # step NAME LIMIT_S COMMAND...: run with a time limit, record "name rc seconds"
    local name=$1 limit=$2 t rc
    shift 2
    if ((limit < 15)); then
        echo "=== $name: skipped, suite budget spent"
        echo "$name skipped 0" >>"$PARTS/steps.txt"
        return 1
    fi
    echo "=== $name (limit ${limit}s, $(($(date +%s) - T0))s into the suite)"
    t=$(date +%s)
    timeout -k 5 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - t))s"
    echo "$name $rc $(($(date +%s) - t))" >>"$PARTS/steps.txt"
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
echo "commit $OWL_SPARSE_COMMIT; parts in $PARTS"

# 1. build owl_sparse._C for this GPU only (sm_90 on Hopper) to keep the compile short
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
[ "${SKIP_BUILD:-0}" = 1 ] || step build "$(cap 170)" env OWL_SPARSE_CUDA_ARCHS="$ARCH" OWL_SPARSE_NVCC_THREADS=8 MAX_JOBS=8 \
    $PY -m pip install --no-build-isolation --no-deps --no-index -q -e .
# the prebuilt extension, or none: no step below may start a JIT build (minutes)
export OWL_SPARSE_NO_JIT=1
step cuda-ext 40 $PY -c "from owl_sparse import cuda_ext; ok = cuda_ext.load(); print(cuda_ext.status()); raise SystemExit(0 if ok else 1)"

# 2. GPU tests but the slow ones (gpu_diag.sh runs those; per-test timeout where
#    pytest-timeout exists)
TIMEOUT_ARGS=""
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS="--timeout 60"
step gpu-tests "$(cap 150)" bash -c "set -o pipefail; $PY -m pytest -m 'gpu and not slow' -q -rfE -p no:cacheprovider $TIMEOUT_ARGS tests 2>&1 | tee $PARTS/gpu_tests.log"

# 2b. backends that have not run on a GPU before: one small check each in its own process;
#     any that fails (or faults) is switched off for the benchmarks below, so that it cannot
#     end the CUDA context of a whole benchmark (OWL_SPARSE_DISABLE, owl_sparse/dispatch.py)
DISABLED=${OWL_SPARSE_DISABLE:-}
for b in ${SMOKE_BACKENDS:-cuda_gemv cuda_sp_wgmma cuda_mma_wgmma}; do
    if ! step "smoke-$b" "$(cap 60)" $PY -m benchmarks.smoke_backend "$b"; then
        DISABLED="${DISABLED:+$DISABLED,}$b"
    fi
done
export OWL_SPARSE_DISABLE="$DISABLED"
echo "switched off for the benchmarks: ${OWL_SPARSE_DISABLE:-none}"

# 3. benchmarks (each stops starting new work at its own --budget-s)
LIM=$(cap 150)
step kernels "$LIM" $PY -m benchmarks.bench_kernels ${KERNEL_ARGS:---grid quick} \
    --budget-s "$(inner "$LIM")" --json-out "$PARTS/kernels.json"
LIM=$(cap 115)
step e2e "$LIM" $PY -m benchmarks.bench_e2e ${E2E_ARGS:---owl-profile gpu_data/smollm2_owl70.json} \
    --budget-s "$(inner "$LIM")" --json-out "$PARTS/e2e.json"
if [ -f benchmarks/bench_prune.py ]; then
    # OWL + Wanda on the LLaMA-2-7B shape, 128 x 2048 calibration (its target: < 60 s)
    step prune "$(cap 110)" $PY -m benchmarks.bench_prune \
        ${PRUNE_ARGS:---llama7b-shape --device cuda --methods owl+wanda} --json-out "$PARTS/prune.json"
fi

# 4. merge, plot, copy out (the report runs even when the budget is spent)
BUDGET=$((BUDGET + 30))
step report "$(cap 30)" $PY -m benchmarks.suite_report --parts "$PARTS" --out-dir "${RESULTS_DIR:-benchmarks/results}" \
    --manifest "$PARTS/manifest.json"
echo "=== suite done in $(($(date +%s) - T0))s"
cat "$PARTS/steps.txt"
if [ -n "${OUT:-}" ]; then
    # three files back (the device tool returns at most 8): the markdown summary, the log,
    # and one archive of everything this run wrote, paths relative to the repository root
    # (untar it there to commit the results; suite_parts/ holds the raw parts and logs)
    mkdir -p "$OUT"
    FILES=$($PY -c "import json, sys; print(' '.join(json.load(open(sys.argv[1]))['files']))" \
        "$PARTS/manifest.json" 2>/dev/null)
    tar czf "$OUT/owl_suite_results.tgz" $FILES -C "$PARTS" --transform 's,^\./,suite_parts/,' .
    for f in $FILES; do case "$f" in *.md) cp "$f" "$OUT"/ ;; esac; done
    cp "$PARTS/suite.log" "$OUT"/suite.log
    ls -la "$OUT"
fi
