"""The CPU kernels whose hot loops also have an AVX2 instance (RoIAlign's channels-last forward, the
deformable conv's sampler and scatter) give the same results with that instance switched off
(DYNAMASK_NO_AVX2=1, read once per process, so the baseline runs in a subprocess)."""

import os
import subprocess
import sys

import torch

SCRIPT = r"""
import sys, torch
from dynamask import ops
torch.manual_seed(0)
feats = [torch.randn(2, 40, 32 // 2**k, 40 // 2**k) for k in range(4)]
xy = torch.rand(30, 2) * 120 - 10
rois = torch.cat([torch.randint(0, 2, (30, 1)).float(), xy, xy + 4 + torch.rand(30, 2) * 90], 1)
pooled = ops.roi_align_multilevel(feats, rois, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2, aligned=True)
x = torch.randn(3, 16, 9, 9, requires_grad=True)
off = (torch.randn(3, 18, 9, 9) * 2).requires_grad_()
w = torch.randn(8, 16, 3, 3, requires_grad=True)
y = ops.deform_conv2d(x, off, w, None, padding=(1, 1))
gx, goff, gw = torch.autograd.grad(y, [x, off, w], torch.randn_like(y))
torch.save({"pooled": pooled, "y": y.detach(), "gx": gx, "goff": goff, "gw": gw}, sys.argv[1])
"""


def run(path, no_avx2):
    env = dict(os.environ)
    env.pop("DYNAMASK_NO_AVX2", None)
    if no_avx2:
        env["DYNAMASK_NO_AVX2"] = "1"
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True)
    return torch.load(path, weights_only=True)


def test_baseline_and_avx2_instances_agree(tmp_path):
    fast = run(tmp_path / "fast.pt", no_avx2=False)
    base = run(tmp_path / "base.pt", no_avx2=True)
    for name in fast:
        torch.testing.assert_close(fast[name], base[name], rtol=1e-5, atol=1e-5, msg=name)
