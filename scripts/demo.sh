#!/usr/bin/env bash
# The main job. Until the training demo lands it runs the kernel benchmarks on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/demo
.venv/bin/python benchmarks/roi_align.py --out runs/demo/roi_align.md
echo "table written to runs/demo/roi_align.md"
