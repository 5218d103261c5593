#!/usr/bin/env bash
# A non-editable install used as a user would: `pip install .` into a fresh venv (once with build isolation, once
# without), then, from a directory outside the repo, the main command (first without triton, an optional extra, as
# the README's first command installs it), sampling, the digits preset (its shipped assets) and the Triton backend in
# the interpreter. Usage: .ci/check_install.sh VENV_DIR
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$1"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"  # nothing of the repo on sys.path from here on

check() {
    # the installed copy, not the repo's folder (the venv itself may live inside the repo, as CI's does)
    "$py" -c "import emd_fast.kernels.langevin as k; assert not k.__file__.startswith('$repo/kernels/'), k.__file__"
    "$py" -m emd_fast.train --steps 20 --batch 64 --teacher-fit-steps 50 --eval-samples 200 --quiet --out "$1/ring"
    "$py" -m emd_fast.sample "$1/ring" --n 16 --out "$1/ring.npz"
    "$py" -m emd_fast.train --preset digits --steps 3 --batch 8 --eval-samples 50 --quiet --out "$1/digits"
    "$py" -m emd_fast.sample "$1/digits" --n 16 --out "$1/digits.png"
    TRITON_INTERPRET=1 "$py" -m emd_fast.train --backend triton --steps 3 --batch 16 --K 2 --teacher-fit-steps 10 \
        --eval-samples 100 --quiet --out "$1/triton"
    emd_train="$venv/bin/emd-train"
    "$emd_train" --help > /dev/null
    "$venv/bin/emd-export" --help > /dev/null
    "$venv/bin/emd-report" "$1/ring" "$1/digits" --out "$1/report" > /dev/null
}

echo "--- pip install . (build isolation)"
"$py" -m pip install -q "$repo"
"$py" -m emd_fast.train --steps 5 --batch 64 --teacher-fit-steps 20 --eval-samples 100 --quiet --out "$work/no-triton"
"$py" -m pip install -q triton
check "$work/isolated"
echo "--- pip install --no-build-isolation . from the repo root, beside PyPI's kernels package (it hooks into setuptools)"
"$py" -m pip install -q setuptools wheel kernels
(cd "$repo" && "$py" -m pip install -q --force-reinstall --no-deps --no-build-isolation .)
check "$work/no-isolation"
echo "install checks passed"
