"""Inputs that fuzzing against torchvision and the references found to crash or to give garbage, kept as
tests: empty spatial maps, infinite scales, float32-overflowing paste boxes and NaN offsets; and the
opt-in full checks that stand in for device-side asserts on CUDA."""

from __future__ import annotations

import pytest
import torch

import dynamask.ops as ops
from dynamask.ops._reference.deform_conv2d import deform_conv2d_reference
from dynamask.ops._reference.paste_masks import paste_masks_reference
from dynamask.ops._reference.roi_align import roi_align_multilevel_reference, roi_align_stages_reference


def test_roi_align_multilevel_on_an_empty_map_pools_zeros():
    # crashed (SIGSEGV): a 0-row map clamped a sample to row -1
    feats = [torch.randn(1, 1, 0, 4, dtype=torch.float64, requires_grad=True)]
    rois = torch.tensor([[0.0, -2, -2, 2, 2]], dtype=torch.float64)
    out = ops.roi_align_multilevel(feats, rois, 7, [1.0])
    assert out.shape == (1, 1, 7, 7) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert feats[0].grad.shape == (1, 1, 0, 4)
    for shape in [(1, 2, 5, 0), (1, 2, 0, 0)]:  # no columns, neither
        f = [torch.randn(*shape)]
        assert torch.equal(ops.roi_align_multilevel(f, rois.float(), 3, [1.0]), torch.zeros(1, 2, 3, 3))


def test_roi_align_stages_on_an_empty_map_pools_zeros():
    feats = [torch.randn(2, 4, 0, 16, dtype=torch.float64)]
    rois = torch.tensor([[0, 0.0, 0, 0.5, 0.5], [1, -2, -2, 2, 2]], dtype=torch.float64)
    (out,) = ops.roi_align_stages(feats, rois, [(0, 7, 2)], [1.0], aligned=False)
    assert torch.equal(out, torch.zeros(2, 4, 7, 7, dtype=torch.float64))
    # and a non-empty level beside it still equals the reference
    both = [feats[0], torch.randn(2, 4, 9, 9, dtype=torch.float64)]
    got = ops.roi_align_stages(both, rois, [(0, 3, 2), (1, 5, 2)], [1.0, 0.5])
    ref = roi_align_stages_reference(both, rois, [(1, 5, 2)], [1.0, 0.5])
    torch.testing.assert_close(got[1], ref[0], rtol=0, atol=1e-12)
    # the reference agrees on the empty level too
    assert torch.equal(roi_align_multilevel_reference(feats, rois, 3, [1.0], levels=torch.zeros(2, dtype=torch.int64)),
                       torch.zeros(2, 4, 3, 3, dtype=torch.float64))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_deform_conv2d_offset_gradient_on_an_empty_map(device):
    # crashed (SIGSEGV) in the CPU backward, and in the CUDA forward (an illegal address that loses the
    # CUDA context): corners at position 0 of a map that has none
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(1, 4, 0, 6, **kw)
    w = torch.randn(3, 4, 3, 3, **kw)
    off = torch.randn(1, 18, 2, 4, **kw)
    out = ops.deform_conv2d(x, off, w, padding=(2, 0))
    assert out.shape == (1, 3, 2, 4) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (x, w, off):
        assert torch.equal(t.grad, torch.zeros_like(t))
    ref = deform_conv2d_reference(x.detach().cpu(), off.detach().cpu(), w.detach().cpu(), padding=(2, 0))
    assert torch.equal(ref, out.detach().cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_deform_conv2d_off_map_samples_do_not_read_the_map(device, bad):
    # The CUDA sampler read all four corners of an off-map sample (position 0, weight 0), so an inf or
    # NaN at input[c, 0, 0] made every off-map sample NaN there (0 * inf); the CPU writes 0.
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    x[:, :, 0, 0] = bad
    w = torch.randn(3, 2, 1, 1, dtype=torch.float64)
    off = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    off[:, 0, 2:, :] = 50.0  # rows 2..4 of the output sample 50 px below the map: off it
    mask = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    dev = [t.to(device) for t in (x, off, w, mask)]
    out = ops.deform_conv2d(dev[0], dev[1], dev[2], mask=dev[3]).cpu()
    assert torch.equal(out[:, :, 2:], torch.zeros(1, 3, 3, 5, dtype=torch.float64))
    # The on-map samples other than (0, 0) are finite and equal the reference, the border ones too (their
    # off-map corners, weight 0, read a corner of their own, not (0, 0)); (0, 0) itself carries `bad`.
    ref = deform_conv2d_reference(x, off, w, mask=mask)
    on_map = torch.ones(5, 5, dtype=torch.bool)
    on_map[2:] = False
    on_map[0, 0] = False
    torch.testing.assert_close(out[:, :, on_map], ref[:, :, on_map], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out[:, :, on_map]).all() and not torch.isfinite(out[:, :, 0, 0]).any()
    # the weight gradient recomputes the columns (the same sampler): with every sample off the map, the
    # columns are all zero, so the weight's gradient is exactly zero (NaN if the corner were read)
    ws = dev[2].clone().requires_grad_(True)
    out = ops.deform_conv2d(dev[0], torch.full_like(dev[1], 50.0), ws, mask=dev[3])
    assert torch.equal(out.detach().cpu(), torch.zeros(1, 3, 5, 5, dtype=torch.float64))
    out.sum().backward()
    assert torch.equal(ws.grad.cpu(), torch.zeros_like(w))


def test_infinite_or_nan_spatial_scale_is_refused():
    feats = [torch.randn(1, 2, 8, 8)]
    rois = torch.tensor([[0.0, 1, 1, 5, 5]])
    for bad in (float("inf"), float("nan"), 0.0, -0.25):
        with pytest.raises(ValueError, match=r"spatial_scales\[0\] must be positive and finite"):
            ops.roi_align_multilevel(feats, rois, 3, [bad], levels=torch.zeros(1, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"spatial_scales\[0\] must be positive and finite"):
            ops.roi_align_stages(feats, rois, [(0, 3, 1)], [bad])


def test_paste_box_whose_width_overflows_float32_is_refused():
    masks = torch.rand(2, 7, 7)
    boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0], [-3e38, 0.0, 3e38, 8.0]])
    with pytest.raises(ValueError, match=r"boxes\[1\] .* too large: its width or height overflows float32"):
        ops.paste_masks(masks, boxes, (10, 12))
    with pytest.raises(ValueError, match=r"boxes\[1\] .*overflows float32"):
        ops.paste_masks_rle(masks, boxes, (10, 12))
    # a float64 box beyond float32's range is non-finite once in float32
    with pytest.raises(ValueError, match=r"boxes\[0\] has a non-finite coordinate"):
        ops.paste_masks(masks[:1].double(), torch.tensor([[0.0, 0.0, 1e39, 4.0]], dtype=torch.float64), (10, 12))
    # the largest box that fits still pastes, and equals the reference: every pixel samples the
    # mask's centre, far from the box's edges
    ok = torch.tensor([[-1.5e38, -1.5e38, 1.5e38, 1.5e38]])
    m = torch.rand(1, 4, 4)
    got = ops.paste_masks(m, ok, (3, 5), threshold=None)
    torch.testing.assert_close(got, paste_masks_reference([m], ok, (3, 5), threshold=None), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[0], m[0, 1:3, 1:3].mean().expand(3, 5), rtol=0, atol=1e-6)


def test_nan_offsets_sample_zero_and_get_zero_gradient():
    # documented choice: a NaN offset counts as outside the map (torchvision propagates the NaN)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    off = torch.zeros(1, 18, 3, 3, dtype=torch.float64)
    off[0, 0, 1, 1] = float("nan")  # tap 0's y at output (1, 1)
    off.requires_grad_()
    out = ops.deform_conv2d(x, off, w)
    assert torch.isfinite(out).all()
    # equal to the same conv with tap 0 at (1, 1) reading zero: push that tap far off the map
    far = off.detach().clone()
    far[0, 0, 1, 1] = -100.0
    torch.testing.assert_close(out, ops.deform_conv2d(x, far, w), rtol=0, atol=0)
    out.sum().backward()
    assert torch.isfinite(off.grad).all() and off.grad[0, 0, 1, 1] == 0 and off.grad[0, 1, 1, 1] == 0


# ------------------------------------------------------------------------------------- full checks


def test_full_checks_refuse_before_the_kernel(monkeypatch):
    """The Python-side checks that stand in for device-side asserts on CUDA, run here on CPU tensors: they
    raise from Python, before the op (replaced by a tripwire) is called."""
    feats = [torch.randn(2, 2, 8, 8)]

    def tripwire(*args, **kwargs):
        raise AssertionError("the kernel ran before the check")

    for name in ("roi_align_multilevel", "roi_align_stages", "paste_masks", "group_by_resolution"):
        monkeypatch.setattr(torch.ops.dynamask, name, tripwire)
    bad_rois = {
        "rois\\[1, 0\\] \\(batch index\\) is 0.5 but must be an integer in \\[0, 2\\)":
            [[0, 1, 1, 4, 4], [0.5, 1, 1, 4, 4]],
        "rois\\[0, 0\\] \\(batch index\\) is 2.0": [[2, 1, 1, 4, 4]],
        "rois\\[0\\] has a non-finite coordinate": [[0, 1, float("nan"), 4, 4]],
    }
    with ops.full_checks():
        assert ops.full_checks_enabled()
        for message, rows in bad_rois.items():
            rois = torch.tensor(rows)
            with pytest.raises(ValueError, match="roi_align_multilevel: " + message):
                ops.roi_align_multilevel(feats, rois, 3, [0.25])
            with pytest.raises(ValueError, match="roi_align_stages: " + message):
                ops.roi_align_stages(feats, rois, [(0, 3, len(rows))], [0.25])
        with pytest.raises(ValueError, match=r"levels\[1\] is 3 but must be in \[0, 1\)"):
            ops.roi_align_multilevel(feats, torch.tensor([[0.0, 1, 1, 4, 4]] * 2), 3, [0.25],
                                     levels=torch.tensor([0, 3]))
        with pytest.raises(ValueError, match=r"paste_masks: boxes\[0\] = .*overflows float32"):
            ops.paste_masks(torch.rand(1, 7, 7), torch.tensor([[-3e38, 0.0, 3e38, 8.0]]), (10, 12))
        with pytest.raises(ValueError, match=r"group_by_resolution: choice\[2\] is 4 but must be in \[0, 4\)"):
            ops.group_by_resolution(torch.tensor([0, 3, 4]), 4)
        # a stage only checks the RoIs it crops: the bad row 1 lies beyond count 1
        with pytest.raises(AssertionError, match="kernel ran"):
            ops.roi_align_stages(feats, torch.tensor([[0, 1, 1, 4, 4], [7, 1, 1, 4, 4.0]]), [(0, 3, 1)], [0.25])
    assert not ops.full_checks_enabled()
    with pytest.raises(AssertionError, match="kernel ran"):  # off again: straight to the kernel
        ops.group_by_resolution(torch.tensor([0, 3, 4]), 4)


def test_cpu_kernels_refuse_what_cuda_zeroes():
    """Without the full checks the CPU kernels still refuse such input themselves, naming the row."""
    feats = [torch.randn(2, 2, 8, 8)]
    with pytest.raises(ValueError, match=r"rois\[0, 0\] \(batch index\) is 0.5"):
        ops.roi_align_multilevel(feats, torch.tensor([[0.5, 1, 1, 4, 4]]), 3, [0.25])
    with pytest.raises(ValueError, match=r"choice.*4"):
        ops.group_by_resolution(torch.tensor([0, 4]), 4)


@pytest.mark.parametrize("device", DEVICES)
def test_roi_align_stages_backward_refuses_a_level_out_of_range(device):
    # the op is public (torch.ops.dynamask); it indexed the level table with stage_levels[j] unchecked
    rois = torch.tensor([[0, 1.0, 1, 6, 6], [0, 2, 2, 7, 7]], device=device)
    grad = torch.ones(2, 3, 4, 4, device=device)
    args = ([1.0, 0.5], 1, [3, 3], [8, 4], [8, 4], 2, True)
    for bad in (2, -1, 7):
        with pytest.raises(ValueError, match=rf"stage 0 names level {bad} but there are 2 levels"):
            torch.ops.dynamask.roi_align_stages_backward([grad], rois, [bad], *args)
    with pytest.raises(ValueError, match=r"grads\[0\] must be \[count, C, S, S\] with count <= 2"):
        torch.ops.dynamask.roi_align_stages_backward([torch.ones(3, 3, 4, 4, device=device)], rois, [0], *args)
    with pytest.raises(ValueError, match="one grad per stage expected"):
        torch.ops.dynamask.roi_align_stages_backward([grad, grad], rois, [0], *args)
    # a valid call still gives the gradient the autograd path gives
    feats = [torch.randn(1, 3, 8, 8, device=device, requires_grad=True), torch.randn(1, 3, 4, 4, device=device)]
    (out,) = ops.roi_align_stages(feats, rois, [(0, 4, 2)], [1.0, 0.5])
    out.backward(grad)
    direct = torch.ops.dynamask.roi_align_stages_backward([grad], rois, [0], *args)
    assert torch.equal(direct[0], feats[0].grad) and not direct[1].any()
