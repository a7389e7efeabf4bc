"""Under torch.autocast the ops compute in float32 and return their input's dtype, as torchvision's do.

Each case runs torchvision's op beside ours under the same autocast, so the expected dtype is the peer's,
and checks our values against our own float32 call on the same (rounded) inputs, cast once at the end.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import dynamask.ops as ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LOW = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _feats(device, dtype):
    return [torch.randn(2, 3, 16, 16, device=device).to(dtype), torch.randn(2, 3, 8, 8, device=device).to(dtype)]


def _rois(device):
    return torch.tensor([[0, 1.0, 1, 9, 12], [1, 2, 3, 14, 15], [0, 0, 0, 30, 30]], device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("input_dtype", ["low", torch.float32])
def test_roi_align_multilevel_keeps_the_input_dtype(device, input_dtype):
    low = LOW[device]
    dtype = low if input_dtype == "low" else input_dtype
    feats, rois = _feats(device, dtype), _rois(device)
    levels = torch.tensor([0, 1, 1], device=device)
    with torch.autocast(device, dtype=low):
        out = ops.roi_align_multilevel(feats, rois, 5, [0.5, 0.25], levels=levels)
        peer = torchvision.ops.roi_align(feats[0], rois, 5, 0.5, 2, True)
    assert out.dtype == peer.dtype == dtype
    want = ops.roi_align_multilevel([f.float() for f in feats], rois, 5, [0.5, 0.25], levels=levels).to(dtype)
    assert torch.equal(out, want)


@pytest.mark.parametrize("device", DEVICES)
def test_roi_align_stages_keeps_each_levels_dtype(device):
    low = LOW[device]
    feats, rois = _feats(device, low), _rois(device)
    with torch.autocast(device, dtype=low):
        outs = ops.roi_align_stages(feats, rois, [(0, 4, 3), (1, 7, 2)], [0.5, 0.25])
    assert [o.dtype for o in outs] == [low, low]
    want = ops.roi_align_stages([f.float() for f in feats], rois, [(0, 4, 3), (1, 7, 2)], [0.5, 0.25])
    for o, w in zip(outs, want):
        assert torch.equal(o, w.to(low))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_flow_through_autocast(device):
    low = LOW[device]
    feats = [f.requires_grad_() for f in _feats(device, torch.float32)]
    with torch.autocast(device, dtype=low):
        (out,) = ops.roi_align_stages(feats, _rois(device), [(1, 4, 3)], [0.5, 0.25])
    out.float().sum().backward()
    assert feats[0].grad is None or not feats[0].grad.any()
    assert feats[1].grad.dtype == torch.float32 and feats[1].grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_deform_conv2d_keeps_the_input_dtype(device):
    low = LOW[device]
    x = torch.randn(1, 4, 6, 6, device=device).to(low)
    off = torch.randn(1, 18, 6, 6, device=device).to(low)
    w = torch.randn(5, 4, 3, 3, device=device)
    with torch.autocast(device, dtype=low):
        out = ops.deform_conv2d(x, off, w, padding=1)
        # torchvision registers deform_conv2d's autocast on CUDA only (its CPU kernel has no bfloat16)
        peer = torchvision.ops.deform_conv2d(x, off, w, padding=1) if device == "cuda" else out
    assert out.dtype == peer.dtype == low
    assert torch.equal(out, ops.deform_conv2d(x.float(), off.float(), w, padding=1).to(low))
