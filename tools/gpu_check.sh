#!/usr/bin/env bash
# The GPU check (at most ~8 minutes on one H100): CUDA tests, then tools/gpu_check.py.
# Results as JSON under $OUT (default results/).
#
# Offline GPU machines: packages the machine lacks (torch-pruning, usually) travel as wheels in
# .whl/ (ignored by git), fetched beforehand where pip works:
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl torch-pruning==1.6.1
# The project itself is used from the checkout (PYTHONPATH), so nothing is built or fetched.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ! $PY -c "import torch_geometric, torch_pruning, safetensors" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/metaprune-site .whl/*.whl
  else
    # --no-deps: --target ignores what is installed, and must not pull a second torch over the machine's CUDA one
    $PY -m pip install -q --no-deps --no-compile --target /tmp/metaprune-site "torch-geometric<2.9" "torch-pruning>=1.6.1,<1.7"
  fi
  export PYTHONPATH="/tmp/metaprune-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, torch_geometric, torch_pruning; print('torch', torch.__version__, 'pyg', torch_geometric.__version__, 'tp', torch_pruning.__version__)" | tee "$OUT/versions.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/nvidia_smi.csv"
timeout 120 $PY -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tail -20 | tee "$OUT/cuda_tests.txt"
GPU_CHECK_BUDGET_S=330 timeout 420 $PY tools/gpu_check.py 2>&1 | tail -40
echo "results in $OUT/gpu_check.json"
