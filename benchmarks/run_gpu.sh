#!/usr/bin/env bash
# On a GPU machine (no internet needed): the kernel tests on the GPU, then the kernel benchmark suite.
# Writes into $OUT (default ./bench_out): tests.txt, bench_kernels.json (pytest-benchmark), bench_kernels.md,
# tests_all.txt (the whole suite on the GPU machine), throughput.json/.txt (full EMD iterations, benchmarks/throughput.py).
#   benchmarks/run_gpu.sh
#   BASELINE=path/to/baseline.json benchmarks/run_gpu.sh    # also fail on >10% regressions (compare.py)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-bench_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh: no CUDA GPU visible')" || exit 2
if ! "$PY" -c "import emd_fast.kernels.langevin" 2>/dev/null; then  # kernels/ is mapped to emd_fast.kernels by setup.py
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "run_gpu.sh: cannot install the repo"; exit 2; }
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt"

rc=0
"$PY" -m pytest -q tests/test_kernels_langevin.py tests/test_kernels_losses.py tests/test_bench_compare.py \
    2>&1 | tee "$OUT/tests.txt" || rc=1
"$PY" -m pytest -q benchmarks/test_bench_kernels.py --benchmark-json="$OUT/bench_kernels.json" \
    --benchmark-columns=min,median,max,rounds 2>&1 | tee "$OUT/bench.txt" || rc=1
"$PY" -m pytest -q tests 2>&1 | tee "$OUT/tests_all.txt" | tail -3 || rc=1   # the whole suite, GPU paths included
"$PY" benchmarks/throughput.py --no-check-finite --out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt" || rc=1
if [ -f "$OUT/bench_kernels.json" ]; then
    "$PY" benchmarks/report.py "$OUT/bench_kernels.json" | tee "$OUT/bench_kernels.md"
    if [ -n "${BASELINE:-}" ]; then
        "$PY" benchmarks/compare.py "$BASELINE" "$OUT/bench_kernels.json" | tee "$OUT/compare.txt" || rc=1
    fi
fi
exit "$rc"
