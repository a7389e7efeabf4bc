#!/usr/bin/env bash
# The oldest supported torch: builds dynamask against torch 2.11.0 / torchvision 0.26.0 in a virtual
# environment of its own, from a copy of the working tree (the checkout's own in-place build is for the
# default torch), and runs the tests there: the op and model tests by default, or the files given.
#   bash scripts/check_torch_range.sh                      # op and model tests
#   bash scripts/check_torch_range.sh tests                # the whole suite
# VENV (default .venv-torch2.11) is reused when it already holds that torch. CPU kernels only: the CUDA
# code is compile-checked against the default torch by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${OLD_TORCH:-2.11.0}"
VISION="${OLD_TORCHVISION:-0.26.0}"
VENV="${VENV:-.venv-torch2.11}"
start=$(date +%s)
source scripts/find_python.sh
if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH' and torchvision.__version__.split('+')[0] == '$VISION' else 1)" 2>/dev/null; then
  echo "== creating $VENV with torch $TORCH + torchvision $VISION"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH" "torchvision==$VISION"
fi
# the test dependencies, without the lint tools (requirements.txt pins those for the default torch)
grep -v -E '^(ruff|mypy)==' requirements.txt > "$VENV/requirements-tests.txt"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$VENV/requirements-tests.txt" \
  "torch==$TORCH" "torchvision==$VISION"
VPY="$(cd "$VENV" && pwd)/bin/python"
echo "== environment ready in $(( $(date +%s) - start )) s"
work="$(mktemp -d /tmp/dynamask-torch-range.XXXXXX)"
trap 'rm -rf "$work"' EXIT
# the working tree as git sees it (tracked and new files, nothing ignored: no build outputs)
git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - | tar -xf - -C "$work"
build_start=$(date +%s)
( cd "$work" && DYNAMASK_WITH_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$VPY" setup.py -q build_ext --inplace 2>&1 | grep -v '^\[' )
echo "== built against torch $TORCH in $(( $(date +%s) - build_start )) s"
if [ "$#" -eq 0 ]; then
  set -- tests/test_roi_align.py tests/test_roi_align_canonical.py tests/test_roi_align_channels_last.py \
    tests/test_deform_conv2d.py tests/test_paste_masks.py tests/test_paste_masks_index.py \
    tests/test_group_by_resolution.py tests/test_ops_args.py tests/test_ops_autocast.py \
    tests/test_ops_edge_cases.py tests/test_ops_layouts.py tests/test_ops_properties.py \
    tests/test_fam.py tests/test_model_dispatch.py tests/test_model_flops.py tests/test_model_import.py \
    tests/test_model_losses.py tests/test_model_train.py tests/test_class_specific_masks.py \
    tests/test_mask_handoff.py tests/test_routing_policy.py tests/test_roi_heads_public_door.py \
    tests/test_stage_levels_and_equal_supervision.py
fi
test_start=$(date +%s)
( cd "$work" && "$VPY" -m pytest -q -p no:cacheprovider "$@" )
echo "== tests on torch $TORCH took $(( $(date +%s) - test_start )) s; all in $(( $(date +%s) - start )) s"
