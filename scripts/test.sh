#!/usr/bin/env bash
# Runs the test suite; CUDA tests run when a GPU is present and are reported as skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q "$@"
