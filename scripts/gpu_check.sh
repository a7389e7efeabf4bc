#!/usr/bin/env bash
# The GPU check for a lent GPU machine (its own torch, no network); see scripts/gpu_check.py.
#   bash scripts/gpu_check.sh --phase 1     # preflight, build for this GPU, the CUDA tests -> $OUT/verdict.md
#   bash scripts/gpu_check.sh --phase 2     # the GPU benchmarks -> $OUT/verdict.md and the tables
#   bash scripts/gpu_check.sh --dry-run     # on a CPU: the structure and the preflight
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
