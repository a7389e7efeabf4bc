#!/usr/bin/env bash
# The main job: shapes data -> train a small DynaMask under a time cap -> evaluate -> runs/demo/report.md
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python scripts/demo.py
