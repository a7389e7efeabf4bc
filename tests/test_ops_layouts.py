"""Every op returns the layout its fake kernel reports, and passes torch.library.opcheck (which compares
the fake kernel's strides with the real one's, among others) on channels-last and non-contiguous inputs.
A fake kernel that reported another layout than the kernel returns made torch.compile fail."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dynamask.ops  # noqa: F401  (registers the ops)

OPS = torch.ops.dynamask


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as ``x [N, C, H, W]`` in three layouts."""
    wide = torch.cat([x, x], dim=-1)[..., : x.shape[-1]]  # a strided view that is neither layout
    return {"contiguous": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last),
            "strided": wide}


def _deform_args(layout: str, relu: bool = True, out_channels: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    inp = _layouts(x)[layout].requires_grad_()
    off = _layouts(torch.randn(2, 18, 6, 5, generator=g, dtype=torch.float64))[layout].requires_grad_()
    w = torch.randn(out_channels, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_channels, generator=g, dtype=torch.float64, requires_grad=True)
    res = _layouts(torch.randn(2, out_channels, 6, 5, generator=g, dtype=torch.float64))[layout]
    return (inp, off, w, b, None, res, 1, 1, 1, 1, 1, 1, relu)


def _fake_strides(op, args):
    mode = FakeTensorMode()
    with mode:
        def fake_of(a):
            return mode.from_tensor(a) if isinstance(a, torch.Tensor) else a

        fake = [[fake_of(t) for t in a] if isinstance(a, list) else fake_of(a) for a in args]
        out = op(*fake)
    return [o.stride() for o in (out if isinstance(out, (list, tuple)) else [out])]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("out_channels", [4, 1])
def test_deform_conv2d_fake_reports_the_kernels_layout(layout, out_channels):
    args = _deform_args(layout, out_channels=out_channels)
    real = OPS.deform_conv2d(*args)
    assert _fake_strides(OPS.deform_conv2d, args) == [real.stride()]
    # channels-last in, channels-last out on the CPU (for more than one output channel)
    expect_cl = layout == "channels_last" and out_channels > 1
    assert real.is_contiguous(memory_format=torch.channels_last) if expect_cl else real.is_contiguous()
    torch.library.opcheck(OPS.deform_conv2d.default, args)


def test_deform_conv2d_half_keeps_the_layout_rule():
    args = _deform_args("channels_last")
    half = tuple(a.detach().half() if isinstance(a, torch.Tensor) else a for a in args)
    real = OPS.deform_conv2d(*half)
    assert real.dtype == torch.float16 and _fake_strides(OPS.deform_conv2d, half) == [real.stride()]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_roi_align_ops_opcheck_on_every_layout(layout):
    g = torch.Generator().manual_seed(1)
    feats = [_layouts(torch.randn(2, 3, s, s, generator=g, dtype=torch.float64))[layout].requires_grad_()
             for s in (16, 8)]
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 30.0], [1, 4.0, 0.5, 9.0, 12.0], [0, 30.0, 30.0, 60.0, 62.0]],
                        dtype=torch.float64)
    ml = (feats, rois, None, [0.25, 0.125], 3, 4, 2, True)
    torch.library.opcheck(OPS.roi_align_multilevel.default, ml)
    assert _fake_strides(OPS.roi_align_multilevel, ml) == [OPS.roi_align_multilevel(*ml).stride()]
    for channels_last in (False, True):
        st = (feats, rois, [0, 1], [4, 2], [3, 2], [0.25, 0.125], 2, True, channels_last)
        torch.library.opcheck(OPS.roi_align_stages.default, st)
        real = OPS.roi_align_stages(*st)
        assert _fake_strides(OPS.roi_align_stages, st) == [o.stride() for o in real]
        assert all(o.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                   for o in real)
    # a non-contiguous rois tensor (every other row of a larger one)
    sparse = torch.cat([rois, rois], 0)[::2]
    torch.library.opcheck(OPS.roi_align_multilevel.default, (feats, sparse, None, [0.25, 0.125], 3, 3, 0, False))


@pytest.mark.parametrize("threshold", [0.5, None])
def test_paste_masks_opcheck_on_non_contiguous_inputs(threshold):
    g = torch.Generator().manual_seed(2)
    big = torch.rand(3, 14, 28, generator=g)
    masks = [big[:, :, ::2], torch.rand(2, 7, 7, generator=g).transpose(1, 2)]  # strided and transposed
    boxes = torch.tensor([[1.0, 2.0, 9.0, 11.0], [0.0, 0.0, 30.0, 20.0], [-3.0, 4.0, 5.0, 30.0],
                          [10.0, 1.0, 18.0, 6.0], [2.0, 2.0, 2.0, 9.0]]).t().contiguous().t()
    assert not boxes.is_contiguous()
    args = (masks, boxes, 20, 30, threshold)
    torch.library.opcheck(OPS.paste_masks.default, args)
    assert _fake_strides(OPS.paste_masks, args) == [OPS.paste_masks(*args).stride()]


def test_group_by_resolution_opcheck_on_a_strided_choice():
    choice = torch.tensor([3, 0, 2, 2, 1, 0, 3, 1, 1, 0])[::2]
    assert not choice.is_contiguous()
    torch.library.opcheck(OPS.group_by_resolution.default, (choice, 4))
