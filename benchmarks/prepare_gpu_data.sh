#!/usr/bin/env bash
# Fill gpu_data/ (git-ignored) with what the GPU suite needs, on the development machine:
# the GPU machine has no package index and does not see ../shared.
#
#   gpu_data/shared/stories260K/{stories260K.bin,tok512.bin}   tests that use real data
#   gpu_data/shared/wikitext-2-raw/wiki.test.raw               calibration / evaluation text
#   gpu_data/smollm2_owl70.json  per-block sparsities of a REAL OWL + Wanda 70% run on
#                                SmolLM2-135M, done here on the CPU (skip: --no-smollm2)
#
# The real SmolLM2-135M weights cannot travel: the device tool carries at most 64 MiB and
# even their 4-bit GGUF form is 94 MiB.  The GPU suite therefore benchmarks SmolLM2's
# architecture with random weights at the real OWL profile, while the real-weight dense vs
# sparse table is measured here on the CPU (benchmarks/results/cpu-smollm2-135m-<date>.*).
#
# Then run the suite in one device call that carries gpu_data:
#   run(command="bash benchmarks/gpu_suite.sh", carry=["gpu_data"])
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${OWL_SPARSE_DATA:-$(cd .. && pwd)/shared/data}
PY=${PYTHON:-python}
mkdir -p gpu_data/shared/stories260K gpu_data/shared/wikitext-2-raw
for f in stories260K/stories260K.bin stories260K/tok512.bin wikitext-2-raw/wiki.test.raw; do
    if [ -f "$DATA/$f" ]; then
        cp "$DATA/$f" "gpu_data/shared/$f"
    else
        echo "prepare_gpu_data: $DATA/$f not found (set OWL_SPARSE_DATA); tests using it will skip"
    fi
done
if [ "${1:-}" != "--no-smollm2" ]; then
    DATE=$(date -u +%Y-%m-%d)
    # real OWL + Wanda 70% and Wanda 2:4 on SmolLM2-135M, served on the CPU: prints the
    # dense vs sparse table and saves the OWL block sparsities for the GPU suite
    # one thread and the best of 3 decode runs: a shared CPU is noisy enough as it is
    OWL_SPARSE_DATA=$DATA $PY -m benchmarks.bench_e2e --device cpu --models smollm2-135m \
        --threads "${THREADS:-1}" --repeats 3 \
        --save-owl-profile gpu_data/smollm2_owl70.json \
        --json-out "benchmarks/results/cpu-smollm2-135m-$DATE.json" \
        --md-out "benchmarks/results/cpu-smollm2-135m-$DATE.md"
fi
du -sh gpu_data
echo "gpu_data ready: carry it with the suite call (carry=[\"gpu_data\"])"
