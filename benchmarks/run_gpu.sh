#!/usr/bin/env bash
# On a GPU machine (no internet needed): the AOT compile check and the roofline floors, the GPU tests, full-iteration
# throughput, the kernel benchmark suite, then the rest of the test suite. Writes into $OUT (default ./bench_out):
# env.txt, aot.txt, roofline.txt/.json, tests.txt (kernel and CUDA-graph
# tests), throughput.json/.txt (benchmarks/throughput.py: 2 problems x 4 impls x 2 backends x K 1/4/16, less
# compile/triton), bench_kernels.json (pytest-benchmark), bench_kernels.md, tests_all.txt (the other tests).
#   benchmarks/run_gpu.sh
#   BASELINE=path/to/baseline.json benchmarks/run_gpu.sh    # also fail on >10% regressions (compare.py)
#   THROUGHPUT_BASELINE=path/to/throughput.json benchmarks/run_gpu.sh   # the same for the throughput rows
#   THROUGHPUT_ARGS="--problems unet --impls eager graph-bf16" benchmarks/run_gpu.sh   # replaces the defaults below
#   STAGE_S=120 benchmarks/run_gpu.sh    # each stage stopped after 120 s with SIGINT (pytest still prints its summary)
# Test stages print each test's name and result as it runs (-v): a stage cut short still says what failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
# compile/triton left out to save time: the triton backend's gain shows in eager/triton and graph/triton
THROUGHPUT_ARGS="${THROUGHPUT_ARGS:---iters 20 --warmup 5 --skip compile/triton}"
GPU_TESTS=(tests/test_kernels_langevin.py tests/test_kernels_losses.py tests/test_graphs.py tests/test_fast_loop.py
           tests/test_fast_path.py tests/test_bench_compare.py)

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh: no CUDA GPU visible')" || exit 2
if ! "$PY" -c "import emd_fast.kernels.langevin" 2>/dev/null; then  # kernels/ is mapped to emd_fast.kernels by setup.py
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "run_gpu.sh: cannot install the repo"; exit 2; }
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt"

rc=0
stage() {  # run a stage, SIGINT after STAGE_S seconds when set (0 or unset: no limit)
    if [ "${STAGE_S:-0}" -gt 0 ]; then timeout -s INT -k 20 "$STAGE_S" "$@"; else "$@"; fi
}
stage "$PY" benchmarks/aot_check.py --out "$OUT/aot.txt" > /dev/null 2>&1 || rc=1
stage "$PY" benchmarks/roofline.py --json "$OUT/roofline.json" 2>&1 | tee "$OUT/roofline.txt" || rc=1
stage "$PY" -m pytest -v -rfE "${GPU_TESTS[@]}" 2>&1 | tee "$OUT/tests.txt" || rc=1
# shellcheck disable=SC2086  # THROUGHPUT_ARGS is a list of options
stage "$PY" benchmarks/throughput.py $THROUGHPUT_ARGS --out "$OUT/throughput.json" \
    ${THROUGHPUT_BASELINE:+--baseline "$THROUGHPUT_BASELINE"} 2>&1 | tee "$OUT/throughput.txt" || rc=1
stage "$PY" -m pytest -q benchmarks/test_bench_kernels.py --benchmark-json="$OUT/bench_kernels.json" \
    --benchmark-columns=min,median,max,rounds 2>&1 | tee "$OUT/bench.txt" || rc=1
# the rest of the suite, GPU paths included (the files above already ran)
stage "$PY" -m pytest -v -rfE tests "${GPU_TESTS[@]/#/--ignore=}" 2>&1 | tee "$OUT/tests_all.txt" | tail -3 || rc=1
if [ -f "$OUT/bench_kernels.json" ]; then
    "$PY" benchmarks/report.py "$OUT/bench_kernels.json" | tee "$OUT/bench_kernels.md"
    if [ -n "${BASELINE:-}" ]; then
        "$PY" benchmarks/compare.py "$BASELINE" "$OUT/bench_kernels.json" | tee "$OUT/compare.txt" || rc=1
    fi
fi
exit "$rc"
