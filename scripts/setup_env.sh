#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned torch, builds dynamask's kernels in place and installs
# the package in editable mode. CUDA kernels are built when a GPU and nvcc are present, or when
# DYNAMASK_WITH_CUDA=1 (set 0 to skip them). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/find_python.sh
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! $VPY -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')) else 1)" 2>/dev/null; then
  echo "== installing torch 2.14.1 + torchvision 0.29.1"
  $VPY -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
$VPY -m pip install -q --disable-pip-version-check -r requirements.txt
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS="${MAX_JOBS:-2}"
echo "== building dynamask kernels (DYNAMASK_WITH_CUDA=${DYNAMASK_WITH_CUDA:-auto})"
$VPY setup.py -q build_ext --inplace
DYNAMASK_SKIP_EXT=1 $VPY -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >/dev/null
$VPY -c "import dynamask, dynamask.ops as o; print('dynamask', dynamask.__version__, '| CUDA kernels compiled in:', o.cuda_available())"
