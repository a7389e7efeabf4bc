#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py --help), with the python of $PYTHON (default python3):
#   bash scripts/gpu_check.sh --phase 1     # preflight, build for this GPU, the CUDA tests -> OUT/verdict.md
#   bash scripts/gpu_check.sh --phase 2     # the GPU benchmarks, reusing phase 1's build -> OUT/verdict.md
#   bash scripts/gpu_check.sh --dry-run     # without a GPU: the preflight and the plan
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
