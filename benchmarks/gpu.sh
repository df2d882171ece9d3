#!/usr/bin/env bash
# The multi-device checks and the step benchmark on whatever accelerators JAX finds.
# Prints the tables (and writes benchmarks/results/gpu/step.{md,json}); exits non-zero
# when a data-parallel style disagrees with one device or a benchmark check fails.
#
#   pip install -e ".[bench]" && bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

$PY -c 'import jax; print("JAX", jax.__version__, "devices:", jax.devices())'
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$PY examples/data_parallel.py
$PY benchmarks/step.py --no-torch --out benchmarks/results/gpu
