#!/usr/bin/env bash
# For a GPU machine without network access: downloads, on a machine with it, the wheels of the GPU
# check's test dependencies that a plain torch image usually lacks, for Python ${PYVER:-3.12} on x86_64,
# into .whl/ (ignored by git). Copy the folder over and run
#   python3 scripts/gpu_check.py --phase 1 --wheels .whl
# which installs them to a temporary folder, never into your environment.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11 expecttest==0.3.0 pytest-timeout==2.4.0
ls -la .whl
