#!/usr/bin/env bash
# GPU diagnosis in one device call (after the suite, when something failed or was slow):
#
#   1. build owl_sparse._C for this GPU (skip: SKIP_BUILD=1),
#   2. every test file's GPU tests in its own pytest process (a crash stops one file, not
#      all), with a cuda-gdb backtrace of each file that crashed,
#   3. the LLaMA-2-7B-shape pruning benchmark (128 x 2048 calibration; DIAG_PRUNE_METHODS,
#      default owl+wanda, e.g. owl+sparsegpt with DIAG_PRUNE_LIMIT_S=500),
#   4. Nsight Compute sections of the CUDA kernels on a LLaMA-2-7B MLP shape,
#   5. compute-sanitizer memcheck and racecheck on benchmarks/sanitize_cuda.py,
#   6. the fixed cost of a 2:4 decode call (benchmarks/overheads.py: split-K counter zeroing).
#
# Steps are skipped once DIAG_BUDGET_S (default 540) seconds have passed; DIAG_STEPS
# (default "tests prune ncu sanitize overheads") picks steps; DIAG_PYTEST_MARK (default "gpu") the tests,
# DIAG_TEST_FILES (default: every test file with GPU tests) the files, DIAG_NCU_CASES the
# profiled cases ("format tokens [--wgmma]", comma-separated).  Logs: $OUT/diag.log (and the pruning
# JSON in $OUT/prune-7b.json) when $OUT is set, else /tmp/owl_diag.
#   run(command="bash benchmarks/gpu_diag.sh", carry=["gpu_data"])
set -u -o pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/owl_diag}
mkdir -p "$OUTDIR"
exec > >(tee -a "$OUTDIR/diag.log") 2>&1
PY=${PYTHON:-python3}
BUDGET=${DIAG_BUDGET_S:-540}
STEPS=${DIAG_STEPS:-tests prune ncu sanitize overheads}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 OWL_SPARSE_NO_JIT=1
export OWL_SPARSE_DATA=${OWL_SPARSE_DATA:-$PWD/gpu_data/shared}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
want() { [[ " $STEPS " == *" $1 "* ]]; }
run_for() { # run_for LIMIT CMD...: at most LIMIT seconds and never past the budget
    local lim=$1 l
    shift
    l=$(left)
    ((l < 15)) && { echo "--- skipped (budget spent): $*"; return 124; }
    ((lim > l)) && lim=$l
    echo "--- [$(($(date +%s) - T0))s] $* (limit ${lim}s)"
    timeout -k 5 "$lim" "$@"
    local rc=$?
    echo "--- exit $rc"
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
echo "commit ${OWL_SPARSE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
    run_for 200 env OWL_SPARSE_CUDA_ARCHS="$ARCH" OWL_SPARSE_NVCC_THREADS=8 MAX_JOBS=8 \
        $PY -m pip install --no-build-isolation --no-deps --no-index -q -e . || exit 1
fi

if want tests; then
    for f in ${DIAG_TEST_FILES:-$(grep -rl "gpu" tests --include="test_*.py" | sort)}; do
        run_for 150 $PY -m pytest -m "${DIAG_PYTEST_MARK:-gpu}" -q -rfE -p no:cacheprovider "$f"
        rc=$?
        if ((rc > 1 && rc != 5 && rc != 124)) && command -v cuda-gdb >/dev/null; then
            echo "--- $f crashed (exit $rc): backtrace"
            run_for 120 cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary owl" \
                --args $PY -m pytest -m gpu -x -q -p no:cacheprovider "$f" 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -60
        fi
    done
fi

if want prune; then
    run_for "${DIAG_PRUNE_LIMIT_S:-200}" $PY -m benchmarks.bench_prune --llama7b-shape --device cuda \
        --methods "${DIAG_PRUNE_METHODS:-owl+wanda}" --json-out "$OUTDIR/prune-7b.json"
fi

if want ncu && command -v ncu >/dev/null; then
    # DIAG_NCU_CASES: "format tokens [--wgmma]" items separated by commas
    IFS=, read -ra CASES <<<"${DIAG_NCU_CASES:-bitmap 16,bitmap 64 --wgmma,2:4 16,2:4 2048,2:4 2048 --wgmma}"
    for c in "${CASES[@]}"; do
        set -- $c
        run_for 60 ncu --kernel-name regex:'bitmap_kernel|sp24' --launch-skip 2 --launch-count 1 \
            --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
            --section MemoryWorkloadAnalysis \
            $PY benchmarks/profile_cuda.py --format "$1" --tokens "$2" ${3:-} --sparsity 0.7 |
            grep -v "^==PROF==" | grep -E "bitmap|sp24|Duration|Throughput|Registers|Shared Memory|Achieved|Theoretical Occ|Block Size|Grid Size|Waves|Stall|Warp Cycles|Issued|Eligible|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|WRN|OPT|Bank" | cut -c1-200
    done
fi

if want sanitize && command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        run_for 150 compute-sanitizer --tool $tool --error-exitcode 1 $PY benchmarks/sanitize_cuda.py | tail -25
    done
fi
if want overheads; then
    run_for 120 $PY -m benchmarks.overheads --json-out "$OUTDIR/overheads.json"
fi
echo "=== diag done in $(($(date +%s) - T0))s"
