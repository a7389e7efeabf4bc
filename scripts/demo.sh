#!/usr/bin/env bash
# The main job: set up (.venv, kernels this machine can run) -> shapes data -> train a small DynaMask
# under a time cap -> evaluate -> runs/demo/report.md. The report's time includes the set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEMO_T0="$(date +%s)"
bash scripts/setup_env.sh
.venv/bin/python scripts/demo.py
