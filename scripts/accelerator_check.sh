#!/usr/bin/env bash
# The accelerator check: everything a GPU must be measured for, in one call of at most 8 minutes,
# one JSON (GPT-2 small's MFU with cuDNN and XLA attention, custom_grads on and off; vectorized
# seeds against one run at a time; data parallel over every local device; memory of each).
#   scripts/accelerator_check.sh [OUT.json]        (default accelerator_check.json)
# Uses .venv when it exists (make test creates it), else the python3 on PATH with normexp
# importable from this checkout. No section starts after --budget seconds (default 420).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-accelerator_check.json}"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM 480 "$python" -m normexp.cli bench --accelerator --out "$out" \
    "${@:2}"
