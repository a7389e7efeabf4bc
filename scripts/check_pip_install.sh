#!/usr/bin/env bash
# The promised `pip install .`, as a new user runs it: a clean clone of this repository, a fresh virtual
# environment with nothing in it, the plain command (pip's isolated build gets torch from
# pyproject.toml), then `import dynamask` and one kernel call from outside the source tree.
# CPU kernels only (DYNAMASK_WITH_CUDA=0): the CUDA compile check is .ci/run's own build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/find_python.sh
work="$(mktemp -d /tmp/dynamask-pip.XXXXXX)"
trap 'rm -rf "$work"' EXIT
git clone -q . "$work/src"
"$PY" -m venv "$work/venv"
start=$(date +%s)
( cd "$work/src" && DYNAMASK_WITH_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
    "$work/venv/bin/python" -m pip install -q --disable-pip-version-check . )
cd "$work"
"$work/venv/bin/python" - <<'PY'
import torch
import dynamask
import dynamask.ops as ops

assert "site-packages" in dynamask.__file__, dynamask.__file__  # the installed copy, not the source tree
feats = [torch.arange(16.0).view(1, 1, 4, 4)]
out = ops.roi_align_multilevel(feats, torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]]), 1, [1.0], sampling_ratio=1)
assert out.item() == 7.5, out  # the mean of a 4x4 ramp, sampled once at its centre
print(f"pip install . OK: dynamask {dynamask.__version__} on torch {torch.__version__} ({dynamask.__file__})")
PY
echo "pip install . took $(( $(date +%s) - start )) s"
