#!/usr/bin/env bash
# One prepared run for a lent GPU machine (its own torch, no network): build the kernels for sm_90
# from source, run the CUDA tests and the benchmarks on the GPU, write everything under $OUT.
# Usage there: bash scripts/gpu_check.sh      (OUT defaults to ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DYNAMASK_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
( time $PY setup.py -q build_ext --inplace ) > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -m pytest -q -m cuda tests 2>&1 | tee "$OUT/cuda_tests.txt" | tail -15
for b in benchmarks/roi_align.py benchmarks/deform_conv.py benchmarks/paste.py benchmarks/mask_head.py benchmarks/e2e.py; do
  [ -f "$b" ] || continue
  name=$(basename "$b" .py)
  timeout 240 $PY "$b" --device cuda > "$OUT/${name}_cuda.md" 2> "$OUT/${name}.err" \
    && tail -20 "$OUT/${name}_cuda.md" || { echo "== $b failed"; tail -20 "$OUT/${name}.err"; }
done
