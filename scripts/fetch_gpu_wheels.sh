#!/usr/bin/env bash
# Run HERE (where PyPI is reachable) before a lent-GPU session: downloads into .whl/ (git-ignored) the
# test dependencies that the GPU machine's image lacks, as wheels for its Python 3.12. Carry `.whl` with
# the device call; scripts/gpu_check.py installs them to /tmp/site. The image has torch, torchvision,
# numpy, pillow, hypothesis, matplotlib, tqdm, ninja and pybind11 already (see the device's KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11 expecttest==0.3.0
ls -la .whl
