#!/usr/bin/env bash
# The GPU playbook (benchmarks/playbook.py): prioritised, time-budgeted stages -> $OUT (default ./bench_out):
# playbook.json (every stage's status, seconds and results; the GPU and versions), playbook.log (all output) and
# tests.jsonl (one line per test), all written as the stages go.
#   benchmarks/run_gpu.sh                          # every stage within BUDGET_S=600 seconds
#   BUDGET_S=1800 benchmarks/run_gpu.sh            # more time (the GPU CI workflow)
#   benchmarks/run_gpu.sh --only a b               # some stages
#   benchmarks/run_gpu.sh --baseline benchmarks/results/bench_kernels_<GPU>.json   # also fail on >10% slower kernels
# Exit 1 if a stage failed or was cut; 2 if no GPU is visible or emd_fast cannot be imported from here.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh: no CUDA GPU visible')" || exit 2
if ! "$PY" -c "import emd_fast.kernels.langevin" 2>/dev/null; then  # not installed: the source tree finds its kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import emd_fast.kernels.langevin" || { echo "run_gpu.sh: cannot import emd_fast from $PWD"; exit 2; }
fi
exec "$PY" benchmarks/playbook.py --out "${OUT:-bench_out}" "$@"
