#!/usr/bin/env bash
# The GPU check (at most ~8 minutes on one H100): CUDA tests, then tools/gpu_check.py.
# Results as JSON under $OUT (default results/). Installs the project into a venv if needed;
# torch-geometric and torch-pruning come from PyPI or from wheels in shared/wheels when offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results}"
mkdir -p "$OUT"
PY=python3
if ! python3 -c "import torch, torch_geometric, torch_pruning, safetensors" 2>/dev/null; then
  python3 -m venv --system-site-packages .venv-gpu
  PY=.venv-gpu/bin/python
  if [ -d shared/wheels ]; then
    $PY -m pip install -q --no-index --find-links shared/wheels torch-geometric torch-pruning safetensors tqdm pyyaml
  fi
  $PY -m pip install -q -e . --no-deps
  $PY -m pip install -q torch-geometric "torch-pruning>=1.6.1,<1.7" safetensors tqdm pyyaml matplotlib 2>/dev/null || true
else
  $PY -m pip install -q -e . --no-deps 2>/dev/null || true
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/nvidia_smi.csv"
timeout 120 $PY -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tail -20 | tee "$OUT/cuda_tests.txt"
GPU_CHECK_BUDGET_S=330 timeout 420 $PY tools/gpu_check.py 2>&1 | tail -40
echo "results in $OUT/gpu_check.json"
