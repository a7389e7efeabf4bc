#!/usr/bin/env bash
# ruff (lint, import order) over the repository and mypy over the dynamask package, with the versions
# pinned in requirements.txt and the settings in pyproject.toml. Needs .venv (scripts/setup_env.sh);
# takes seconds. Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy
