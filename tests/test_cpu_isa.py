"""The CPU kernels whose hot loops have AVX2 and AVX-512 instances (RoIAlign's channels-last forward, the
deformable conv's sample planning, sampler, scatter and epilogue) give the same results in every instance
this machine runs: the baseline (DYNAMASK_NO_AVX2=1), AVX2 (DYNAMASK_NO_AVX512=1) and AVX-512. The
choice is read once per process, so each instance runs in a subprocess, which also reports the instance
it used (``dynamask.ops.cpu_isa``)."""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import sys, torch
from dynamask import ops
torch.manual_seed(0)
feats = [torch.randn(2, 40, 32 // 2**k, 40 // 2**k) for k in range(4)]
xy = torch.rand(30, 2) * 120 - 10
rois = torch.cat([torch.randint(0, 2, (30, 1)).float(), xy, xy + 4 + torch.rand(30, 2) * 90], 1)
pooled = ops.roi_align_multilevel(feats, rois, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2, aligned=True)
out = {"isa": ops.cpu_isa(), "pooled": pooled}
# generic (16 channels, two groups) and fixed-width (32 channels) samplers; NCHW and channels-last; a
# residual and ReLU in the epilogue; offsets far enough out to cross the border
for name, c, groups in (("generic", 16, 2), ("fixed", 32, 1)):
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, c, 9, 11).contiguous(memory_format=layout).requires_grad_()
        off = (torch.randn(3, 18, 9, 11) * 3).requires_grad_()
        w = torch.randn(8, c // groups, 3, 3, requires_grad=True)
        res = torch.randn(3, 8, 9, 11)
        y = ops.deform_conv2d(x, off, w, torch.randn(8), padding=(1, 1), residual=res, activation="relu")
        gx, goff, gw = torch.autograd.grad(y, [x, off, w], torch.randn_like(y))
        key = f"{name}-{'cl' if layout == torch.channels_last else 'nchw'}"
        out.update({f"{key}-y": y.detach(), f"{key}-gx": gx, f"{key}-goff": goff, f"{key}-gw": gw})
torch.save(out, sys.argv[1])
"""


def run(path, cap):
    """Runs SCRIPT with the instruction set capped at ``cap`` ("baseline", "avx2" or None for the widest)."""
    env = dict(os.environ)
    env.pop("DYNAMASK_NO_AVX2", None)
    env.pop("DYNAMASK_NO_AVX512", None)
    if cap == "baseline":
        env["DYNAMASK_NO_AVX2"] = "1"
    elif cap == "avx2":
        env["DYNAMASK_NO_AVX512"] = "1"
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True)
    return torch.load(path, weights_only=True)


def test_every_instance_agrees_with_the_baseline(tmp_path):
    base = run(tmp_path / "base.pt", "baseline")
    assert base.pop("isa") == "baseline"
    results = {"avx2 cap": run(tmp_path / "avx2.pt", "avx2"), "widest": run(tmp_path / "widest.pt", None)}
    isas = {label: r.pop("isa") for label, r in results.items()}
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2 " in flags and " fma " in flags:
        assert isas["avx2 cap"] == "avx2"
    if all(f" {f} " in flags for f in ("avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq")):
        assert isas["widest"] == "avx512"
    else:
        assert isas["widest"] == isas["avx2 cap"]
    if isas["widest"] == "baseline":
        pytest.skip("this CPU has no AVX2: only the baseline instance runs here")
    for label, r in results.items():
        for name in base:
            # instances differ in fused multiply-adds only (float32: a few ulp of sums of tens of products)
            torch.testing.assert_close(r[name], base[name], rtol=1e-5, atol=1e-5,
                                       msg=f"{label} ({isas[label]}): {name}")
