"""Batched RoIAlign ops against torchvision, the pure-PyTorch reference and hand-derived values."""

import math
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from dynamask.ops import roi_align_multilevel, roi_align_stages
from dynamask.ops._reference.roi_align import (
    fpn_levels_reference,
    roi_align_multilevel_reference,
    roi_align_stages_reference,
)

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
IMAGE = (256, 320)  # (H, W); P2..P5 are 64x80 ... 8x10


def pyramid(n=2, c=6, dtype=torch.float32, channels=None, device="cpu"):
    H, W = IMAGE
    chans = channels or [c] * 4
    return [
        torch.randn(n, ch, H // 2 ** (k + 2), W // 2 ** (k + 2), dtype=dtype, device=device)
        for k, ch in enumerate(chans)
    ]


def random_rois(n_per_image, n_images, dtype=torch.float32, outside=True):
    """Boxes of all sizes, some partly or wholly outside the image."""
    H, W = IMAGE
    rows = []
    for b in range(n_images):
        xy = torch.rand(n_per_image, 2) * torch.tensor([W, H]) * (1.4 if outside else 1.0) - (40 if outside else 0)
        wh = torch.rand(n_per_image, 2) ** 2 * torch.tensor([W, H]) * 1.2 + 0.5
        rows.append(torch.cat([torch.full((n_per_image, 1), float(b)), xy, xy + wh], 1))
    return torch.cat(rows).to(dtype)


def boundary_rois():
    """Boxes exactly on level boundaries (sqrt(area) = 224 * 2^k), degenerate and inverted boxes."""
    boxes = [
        [0, 10, 10, 10 + 224, 10 + 224],  # k = 4 exactly
        [0, 0, 0, 112, 112],  # k = 3
        [1, 5, 5, 5 + 56, 5 + 56],  # k = 2
        [1, 0, 0, 448, 112],  # sqrt = 224 -> k = 4
        [0, 30, 30, 30, 60],  # zero width
        [1, 20, 20, 20, 20],  # a point
        [0, 100, 100, 60, 140],  # inverted in x (negative area)
        [1, 150, 150, 90, 90],  # inverted in both (positive area)
        [0, 400, 300, 500, 400],  # wholly outside
        [1, -50, -50, -10, -10],  # wholly outside, negative side
    ]
    return torch.tensor(boxes, dtype=torch.float32)


def as_boxlists(rois, n_images):
    return [rois[rois[:, 0] == b, 1:] for b in range(n_images)]


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_equals_torchvision_multiscale(sampling_ratio):
    feats = pyramid(n=3)
    rois = random_rois(40, 3)
    rois = torch.cat([rois, boundary_rois()[:4]])
    rois = rois[torch.argsort(rois[:, 0], stable=True)]  # MultiScaleRoIAlign returns boxes in image order
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, sampling_ratio)
    expected = pooler(OrderedDict(zip(["p2", "p3", "p4", "p5"], feats)), as_boxlists(rois, 3), [IMAGE] * 3)
    out = roi_align_multilevel(feats, rois, 7, SCALES, sampling_ratio, aligned=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_with_given_levels_equals_roi_align(aligned, sampling_ratio):
    feats = pyramid(n=2)
    rois = torch.cat([random_rois(30, 2), boundary_rois()])
    levels = torch.randint(0, 4, (rois.shape[0],))
    out = roi_align_multilevel(feats, rois, (5, 9), SCALES, sampling_ratio, aligned, levels=levels)
    for l in range(4):
        idx = levels == l
        exp = roi_align(feats[l], rois[idx], (5, 9), SCALES[l], sampling_ratio, aligned)
        torch.testing.assert_close(out[idx], exp, rtol=1e-5, atol=1e-5)


def test_level_boundaries_follow_level_mapper():
    rois = boundary_rois()
    # hand-derived: 224 -> P4 (index 2), 112 -> P3, 56 -> P2, 448x112 -> P4; degenerate / negative area -> P2;
    # inverted in both axes has positive area 60*60 -> P2; outside boxes by their own size (100 -> P2, 40 -> P2)
    expected_levels = torch.tensor([2, 1, 0, 2, 0, 0, 0, 0, 0, 0])
    assert fpn_levels_reference(rois, SCALES).tolist() == expected_levels.tolist()
    feats = pyramid(n=2)
    auto = roi_align_multilevel(feats, rois, 7, SCALES, 2, True)
    forced = roi_align_multilevel(feats, rois, 7, SCALES, 2, True, levels=expected_levels)
    torch.testing.assert_close(auto, forced, rtol=0, atol=0)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_equals_reference(aligned, sampling_ratio):
    feats = pyramid(n=2, dtype=torch.float64)
    rois = torch.cat([random_rois(12, 2), boundary_rois()]).double()
    out = roi_align_multilevel(feats, rois, 4, SCALES, sampling_ratio, aligned)
    exp = roi_align_multilevel_reference(feats, rois, 4, SCALES, sampling_ratio, aligned)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_stages_equal_roi_align_with_mixed_channels(aligned, sampling_ratio):
    feats = pyramid(n=2, channels=[3, 5, 8, 4])
    rois = torch.cat([random_rois(15, 2), boundary_rois()])
    stages = [(2, 6, 25), (1, 12, 18), (0, 24, 7), (3, 3, 0)]
    outs = roi_align_stages(feats, rois, stages, SCALES, sampling_ratio, aligned)
    assert len(outs) == len(stages)
    for (l, s, n), o in zip(stages, outs):
        assert o.shape == (n, feats[l].shape[1], s, s)
        torch.testing.assert_close(
            o, roi_align(feats[l], rois[:n], s, SCALES[l], sampling_ratio, aligned), rtol=1e-5, atol=1e-5
        )
    exp = roi_align_stages_reference(feats, rois, stages, SCALES, sampling_ratio, aligned)
    for o, e in zip(outs, exp):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stages_channels_last_equal_nchw_crops(dtype):
    """channels_last=True writes the same values (bit for bit: same passes, only the store differs) in
    channels-last memory: large planes (several channel blocks of the kernel's scratch), mixed channels,
    an empty stage, boxes on and off the map, zero-area boxes, on a non-contiguous pyramid."""
    feats = [f.transpose(2, 3).contiguous().transpose(2, 3) for f in pyramid(n=2, channels=[24, 5, 1, 3], dtype=dtype)]
    rois = torch.cat([random_rois(12, 2), boundary_rois()]).to(dtype)
    n = rois.shape[0]
    stages = [(2, 28, n), (1, 56, 15), (0, 112, 9), (3, 7, 0), (0, 14, n)]
    plain = roi_align_stages(feats, rois, stages, SCALES)
    last = roi_align_stages(feats, rois, stages, SCALES, channels_last=True)
    for (l, s, c), a, b in zip(stages, plain, last):
        assert b.shape == (c, feats[l].shape[1], s, s) and b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, b)
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(b, roi_align(feats[l], rois[:c], s, SCALES[l], 2, True), rtol=tol, atol=tol)


def test_hand_derived_linear_ramp():
    """On f(y, x) = x every sample equals its x coordinate, so (aligned=True, boxes inside the map)
    each bin equals the x coordinate of its centre in feature pixels."""
    H, W = 32, 40
    ramp = torch.arange(W, dtype=torch.float64).expand(1, 1, H, W).contiguous()
    rois = torch.tensor([[0, 8.0, 8.0, 72.0, 40.0]], dtype=torch.float64)  # scale 1/2 -> x in [4, 36]
    out = roi_align_multilevel([ramp], rois, (2, 4), [0.5], 2, True, levels=torch.zeros(1, dtype=torch.long))
    # aligned: x range [4 - 0.5, 36 - 0.5] = [3.5, 35.5]; bin width 8 -> centres 7.5, 15.5, 23.5, 31.5
    expected = torch.tensor([7.5, 15.5, 23.5, 31.5], dtype=torch.float64).expand(2, 4)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)


def test_non_contiguous_inputs():
    base = pyramid(n=2, c=8)
    feats = [f.transpose(2, 3).contiguous().transpose(2, 3)[:, ::2] for f in base]  # strided, sliced channels
    assert not feats[0].is_contiguous()
    rois_full = torch.cat([random_rois(10, 2), torch.zeros(20, 2)], 1)
    rois = rois_full[:, :5]
    assert not rois.is_contiguous()
    out = roi_align_multilevel(feats, rois, 7, SCALES, 2, False)
    exp = roi_align_multilevel([f.contiguous() for f in feats], rois.contiguous(), 7, SCALES, 2, False)
    torch.testing.assert_close(out, exp, rtol=0, atol=0)
    outs = roi_align_stages(feats, rois, [(1, 8, 20)], SCALES)
    torch.testing.assert_close(outs[0], roi_align(feats[1].contiguous(), rois.contiguous(), 8, SCALES[1], 2, True))


def test_list_of_boxes_input():
    feats = pyramid(n=2)
    rois = random_rois(5, 2)
    out = roi_align_multilevel(feats, as_boxlists(rois, 2), 7, SCALES)
    torch.testing.assert_close(out, roi_align_multilevel(feats, rois, 7, SCALES), rtol=0, atol=0)


def test_gradcheck_multilevel():
    feats = [f.requires_grad_() for f in pyramid(n=2, c=2, dtype=torch.float64)]
    feats = [f[:, :, : max(2, f.shape[2] // 4), : max(2, f.shape[3] // 4)].detach().requires_grad_() for f in feats]
    # small pyramid: P2 16x20 at scale 1/4 -> image 64x80
    rois = torch.tensor(
        [[0, 3.3, 4.1, 40.2, 50.7], [1, -5.0, 10.0, 30.0, 70.0], [0, 10.0, 10.0, 10.0, 30.0], [1, 0, 0, 80, 64]],
        dtype=torch.float64,
    )
    levels = torch.tensor([0, 1, 0, 2])
    for aligned in (True, False):
        for lv in (levels, None):
            assert torch.autograd.gradcheck(
                lambda *f, a=aligned, v=lv: roi_align_multilevel(list(f), rois, 3, SCALES, 2, a, levels=v), feats
            )


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_stages(channels_last):
    """channels_last=True: the gradients of the crops arrive channels-last."""
    feats = [
        torch.randn(2, c, 16 // 2**k, 20 // 2**k, dtype=torch.float64, requires_grad=True)
        for k, c in enumerate([2, 3, 1])
    ]
    rois = torch.tensor(
        [[0, 3.3, 4.1, 40.2, 50.7], [1, -5.0, 10.0, 30.0, 70.0], [0, 60.0, 50.0, 90.0, 90.0]], dtype=torch.float64
    )
    stages = [(2, 2, 1), (1, 3, 2), (0, 4, 3)]
    for sr in (0, 2):
        assert torch.autograd.gradcheck(
            lambda *f, sr=sr: tuple(roi_align_stages(list(f), rois, stages, SCALES[:3], sr, True,
                                                     channels_last=channels_last)), feats
        )


def test_backward_matches_torchvision():
    feats = [f.requires_grad_() for f in pyramid(n=2)]
    rois = torch.cat([random_rois(20, 2), boundary_rois()])
    stages = [(2, 7, 30), (1, 14, 20), (0, 28, 10)]
    outs = roi_align_stages(feats, rois, stages, SCALES, 2, True)
    grads_out = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, feats, grads_out, allow_unused=True)
    ref_feats = [f.detach().clone().requires_grad_() for f in feats]
    ref = [roi_align(ref_feats[l], rois[:n], s, SCALES[l], 2, True) for l, s, n in stages]
    exp = torch.autograd.grad(ref, ref_feats[:3], grads_out)
    for g, e in zip(got[:3], exp):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert got[3] is None or torch.count_nonzero(got[3]) == 0



def extreme_rois():
    """Boxes that stress the separable passes: wider/taller than the map, partly outside, thin (one
    feature row or column: x pass first), tall and narrow (y pass first), tiny, inverted, and many
    boxes on the same few rows."""
    H, W = IMAGE
    boxes = [
        [0, -80, -60, W + 90, H + 70],  # larger than the image on every side
        [1, -30, 40, W + 30, 41],  # wider than the map, under one feature row
        [0, 40, -50, 41.5, H + 50],  # taller than the map, one column wide
        [1, 100, 10, 104, 250],  # tall and narrow
        [0, W - 10, H - 10, W + 40, H + 40],  # over the bottom-right corner
        [1, -40, -40, 6, 6],  # over the top-left corner
        [0, 50.2, 60.7, 50.3, 60.9],  # tiny
        [1, 90, 90, 30, 30],  # inverted
        [0, W + 10, 20, W + 60, 60],  # wholly right of the map
    ]
    boxes += [[b % 2, 7.0 * i, 100.0, 7.0 * i + 60, 103.0] for b, i in enumerate(range(12))]  # same rows
    return torch.tensor(boxes, dtype=torch.float32)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 3])
def test_stages_extreme_rois_equal_roi_align(aligned, sampling_ratio):
    """Adaptive sampling (0) gives grids of dozens of samples per bin on the large boxes. Gradients
    are compared in float64: they sum hundreds of overlapping samples, where float32 rounding of any
    summation order (torchvision's included) exceeds 1e-5."""
    feats = pyramid(n=2, channels=[3, 5, 2, 4])
    rois = torch.cat([extreme_rois(), random_rois(6, 2)])
    n = rois.shape[0]
    stages = [(3, 5, n), (2, 14, n), (1, 27, n), (0, 56, n)]
    outs = roi_align_stages(feats, rois, stages, SCALES, sampling_ratio, aligned)
    for (l, s, _), o in zip(stages, outs):
        torch.testing.assert_close(
            o, roi_align(feats[l], rois, s, SCALES[l], sampling_ratio, aligned), rtol=1e-5, atol=1e-5
        )
    feats = [f.double().requires_grad_() for f in feats]
    rois = rois.double()
    outs = roi_align_stages(feats, rois, stages, SCALES, sampling_ratio, aligned)
    ref_feats = [f.detach().clone().requires_grad_() for f in feats]
    ref = [roi_align(ref_feats[l], rois, s, SCALES[l], sampling_ratio, aligned) for l, s, _ in stages]
    grads_out = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, feats, grads_out)
    exp = torch.autograd.grad(ref, ref_feats, grads_out)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_extreme_rois_equal_reference(sampling_ratio):
    feats = pyramid(n=2, dtype=torch.float64)
    rois = extreme_rois().double()
    for size in [(3, 11), (16, 4)]:
        out = roi_align_multilevel(feats, rois, size, SCALES, sampling_ratio, True)
        exp = roi_align_multilevel_reference(feats, rois, size, SCALES, sampling_ratio, True)
        torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)


def test_gradcheck_extreme_rois():
    """float64 gradcheck of the backward on boxes beyond the map, thin and tall boxes, large grids."""
    feats = [
        torch.randn(2, c, 9 // 2**k + 1, 11 // 2**k + 1, dtype=torch.float64, requires_grad=True)
        for k, c in enumerate([2, 1])
    ]
    # level 0 is 10x12 at scale 1/4 (image 40x48), level 1 5x6 at 1/8
    rois = torch.tensor(
        [
            [0, -20.0, -10.0, 60.0, 50.0],
            [1, -5.0, 13.0, 50.0, 14.5],
            [0, 9.0, -8.0, 12.0, 45.0],
            [1, 30.0, 30.0, 48.0, 40.0],
        ],
        dtype=torch.float64,
    )
    stages = [(1, 3, 4), (0, 7, 4), (0, 2, 2)]
    for sr in (0, 3):
        for aligned in (True, False):
            assert torch.autograd.gradcheck(
                lambda *f, s=sr, a=aligned: tuple(roi_align_stages(list(f), rois, stages, SCALES[:2], s, a)), feats
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision(dtype):
    """Half inputs accumulate in float: results match float32 on the same (rounded) inputs to the
    output's rounding."""
    feats = [f.to(dtype).float() for f in pyramid(n=2)]
    rois = torch.cat([random_rois(20, 2), extreme_rois()]).to(dtype).float()
    half = [f.to(dtype).requires_grad_() for f in feats]
    out = roi_align_multilevel(half, rois.to(dtype), 7, SCALES, 2, False)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.float(), roi_align_multilevel(feats, rois, 7, SCALES, 2, False), rtol=2e-2, atol=3e-2
    )
    outs = roi_align_stages(half, rois.to(dtype), [(0, 28, 30)], SCALES)
    full = [f.clone().requires_grad_() for f in feats]
    ref = roi_align_stages(full, rois, [(0, 28, 30)], SCALES)
    torch.testing.assert_close(outs[0].float(), ref[0], rtol=2e-2, atol=3e-2)
    g = torch.randn_like(ref[0])
    (gh,) = torch.autograd.grad(outs, half[:1], [g.to(dtype)])
    (gf,) = torch.autograd.grad(ref, full[:1], [g])
    assert gh.dtype == dtype
    torch.testing.assert_close(gh.float(), gf, rtol=2e-2, atol=3e-2)

def test_empty_inputs():
    feats = pyramid(n=2)
    rois = torch.zeros(0, 5)
    out = roi_align_multilevel(feats, rois, 7, SCALES)
    assert out.shape == (0, 6, 7, 7)
    outs = roi_align_stages(feats, rois, [(2, 28, 0), (0, 112, 0)], SCALES)
    assert [o.shape for o in outs] == [(0, 6, 28, 28), (0, 6, 112, 112)]
    no_images = [f[:0] for f in feats]
    assert roi_align_multilevel(no_images, rois, 14, SCALES).shape == (0, 6, 14, 14)
    f = [x.clone().requires_grad_() for x in feats]
    roi_align_multilevel(f, rois, 7, SCALES).sum().backward()
    assert all(x.grad is not None and torch.count_nonzero(x.grad) == 0 for x in f)


def test_bad_input_errors():
    feats = pyramid(n=2)
    good = random_rois(3, 2)
    with pytest.raises(ValueError, match=r"rois must be \[R, 5\]"):
        roi_align_multilevel(feats, good[:, 1:], 7, SCALES)
    bad_batch = good.clone()
    bad_batch[1, 0] = 2
    with pytest.raises(ValueError, match=r"batch index.*\[0, 2\)"):
        roi_align_multilevel(feats, bad_batch, 7, SCALES)
    with pytest.raises(ValueError, match=r"batch index"):
        roi_align_stages(feats, bad_batch, [(0, 7, 3)], SCALES)
    nan_box = good.clone()
    nan_box[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        roi_align_multilevel(feats, nan_box, 7, SCALES)
    with pytest.raises(ValueError, match="non-finite"):
        roi_align_stages(feats, nan_box, [(0, 7, 3)], SCALES)
    mixed = [feats[0].to("meta")] + feats[1:]
    with pytest.raises(ValueError, match="device"):
        roi_align_multilevel(mixed, good, 7, SCALES)
    with pytest.raises(ValueError, match="device"):
        roi_align_stages(mixed, good, [(0, 7, 3)], SCALES)
    chans = pyramid(n=2, channels=[4, 4, 8, 4])
    with pytest.raises(ValueError, match="same channel count"):
        roi_align_multilevel(chans, good, 7, SCALES)
    roi_align_stages(chans, good, [(2, 7, 3), (0, 14, 3)], SCALES)  # allowed: each stage keeps its level's C
    with pytest.raises(ValueError, match="dtype"):
        roi_align_multilevel(feats, good.double(), 7, SCALES)
    with pytest.raises(ValueError, match="levels"):
        roi_align_multilevel(feats, good, 7, SCALES, levels=torch.tensor([0, 1, 9, 0, 0, 0]))
    with pytest.raises(ValueError, match="powers of two"):
        roi_align_multilevel(feats, good, 7, [0.25, 0.2, 1 / 16, 1 / 32])
    with pytest.raises(ValueError, match="count"):
        roi_align_stages(feats, good, [(0, 7, 99)], SCALES)


def test_opcheck():
    feats = pyramid(n=2, c=3)
    feats = [f[:, :, :16, :20].contiguous().requires_grad_() for f in feats]
    rois = torch.tensor([[0, 3.3, 4.1, 40.2, 50.7], [1, -5.0, 10.0, 30.0, 70.0], [0, 0, 0, 300, 250]])
    torch.library.opcheck(torch.ops.dynamask.roi_align_multilevel, (feats, rois, None, SCALES, 3, 3, 2, False))
    torch.library.opcheck(
        torch.ops.dynamask.roi_align_stages, (feats, rois, [2, 1, 0], [2, 3, 4], [1, 2, 3], SCALES, 2, True)
    )


# ------------------------------------------------------------------ error bounds (CPU vs CUDA, half)
# Each comparison below is bounded element by element from an error model, never by a hand-tuned number:
# - a float sum of n terms in any order is within (n - 1) * u * sum|terms| of the exact sum (u = the unit
#   roundoff); two orders differ by twice that. sum|terms| is computed: RoIAlign's bilinear weights are
#   >= 0, so the forward on |features| and the backward of |upstream gradient| give it per element.
# - a sample coordinate computed in float32 (or with a fused multiply-add on the device) is off by at most
#   8 * u32 * (|coordinate| + 1) (a handful of roundings), and a bilinear sample moves by at most
#   2 * max|feature| per pixel along each axis.
# - a half/bf16 result rounded once more: u_dtype * |result|.
# The backward passes use "dyadic" boxes, whose every sample coordinate and bilinear weight is exact in
# float32: then only the summation order differs, and n is the exact count of terms per pixel.
U32 = torch.finfo(torch.float32).eps / 2


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def rounding_error(x, dtype):
    """The most that rounding x to dtype changes it: u * |x|, or half the spacing of the subnormals."""
    u = unit_roundoff(dtype)
    return u * x.abs() + u * torch.finfo(dtype).tiny


def assert_within(got, ref, bound, what):
    """Element-wise |got - ref| <= bound (got moved to ref's device and dtype)."""
    err = (got.detach().to(ref.device, ref.dtype) - ref.detach()).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements beyond the bound; worst error "
                           f"{float(err.max()):.3g} where the bound is {float(bound.flatten()[err.argmax()]):.3g}")


def dyadic_rois(n_per_image, n_images, seed=0):
    """Boxes exact in float16 and bfloat16 whose samples are exact in float32 for outputs of 7 * 2^k and
    sampling ratios of 1, 2 or 4: corners on multiples of 8 px, sides of 56 * m px, so a bin is
    8 * m / 2^k image px; sqrt(area) is never 56 * 2^j, so no box lies on a level boundary."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(n_images):
        while sum(r[0] == b for r in rows) < n_per_image:
            mx, my = (int(v) for v in torch.randint(1, 7, (2,), generator=g))
            if (mx * my) in (1, 4, 16):
                continue
            x1, y1 = (8 * int(v) - 48 for v in torch.randint(0, 40, (2,), generator=g))
            rows.append([b, x1, y1, x1 + 56 * mx, y1 + 56 * my])
    return torch.tensor(rows, dtype=torch.float64)


def terms_per_pixel(hw, rois, size, scale, sampling_ratio, aligned):
    """[H, W]: how many (sample, corner) products each pixel's gradient sums over the given RoIs (all of
    one image and level), with torchvision's rules (a sample past the last row or column puts two of its
    corners on it; one more than a pixel outside adds nothing)."""
    H, W = hw
    n = torch.zeros(H, W, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for x1, y1, x2, y2 in (rois[:, 1:].double() * scale - off).tolist():
        w, h = x2 - x1, y2 - y1
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        gh = sampling_ratio or math.ceil(h / size)
        gw = sampling_ratio or math.ceil(w / size)
        ys = y1 + (torch.arange(size, dtype=torch.float64)[:, None] + (torch.arange(gh) + 0.5)[None] / gh) * h / size
        xs = x1 + (torch.arange(size, dtype=torch.float64)[:, None] + (torch.arange(gw) + 0.5)[None] / gw) * w / size
        Y, X = ys.flatten()[:, None].expand(-1, xs.numel()), xs.flatten()[None].expand(ys.numel(), -1)
        ok = (Y >= -1) & (Y <= H) & (X >= -1) & (X <= W)
        y0, x0 = Y.clamp(min=0).floor().long().clamp(max=H - 1), X.clamp(min=0).floor().long().clamp(max=W - 1)
        y1_, x1_ = (y0 + 1).clamp(max=H - 1), (x0 + 1).clamp(max=W - 1)
        for yy in (y0, y1_):
            for xx in (x0, x1_):
                n.view(-1).index_add_(0, (yy * W + xx)[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
    return n


def multilevel_terms(feats, rois, levels, size, scales, sampling_ratio, aligned):
    """terms_per_pixel for every level and image: a list of [N, 1, H_l, W_l]."""
    out = []
    for l, f in enumerate(feats):
        N, _, H, W = f.shape
        n = torch.zeros(N, 1, H, W, dtype=torch.float64)
        for b in range(N):
            sel = rois[(levels == l) & (rois[:, 0] == b)]
            n[b, 0] = terms_per_pixel((H, W), sel, size, scales[l], sampling_ratio, aligned)
        out.append(n)
    return out


def coordinate_slack(feats, rois, scales, u=U32):
    """The forward's bound for coordinates rounded in a type of unit roundoff u (float32 by default):
    4 * max|f| * 8 * u * (|coord| + 1)."""
    coord = float(rois[:, 1:].abs().max()) * max(scales) + 2
    return 4 * max(float(f.abs().max()) for f in feats) * 8 * u * (coord + 1)


def multilevel_bounds(feats, rois, size, sampling_ratio, aligned, u_sum, out_dtype=None):
    """(reference, bound) for roi_align_multilevel's forward: float64 torchvision on each RoI's level."""
    levels = fpn_levels_reference(rois, SCALES)
    ref = torch.zeros(rois.shape[0], feats[0].shape[1], size, size, dtype=torch.float64)
    s = torch.zeros_like(ref)
    for l, f in enumerate(feats):
        sel = (levels == l).nonzero().flatten()
        if len(sel):
            ref[sel] = roi_align(f.double(), rois[sel], size, SCALES[l], sampling_ratio, aligned)
            s[sel] = roi_align(f.double().abs(), rois[sel], size, SCALES[l], sampling_ratio, aligned)
    side = (rois[:, 3:5] - rois[:, 1:3]).abs().max() * SCALES[0] / size  # the largest bin side, in P2 pixels
    n = 4 * (sampling_ratio or math.ceil(float(side) + 1)) ** 2 + 1  # terms per output
    rounded = rounding_error(ref, out_dtype) if out_dtype is not None else 0.0
    bound = 2 * n * u_sum * s + rounded + coordinate_slack(feats, rois, SCALES, u_sum)
    return levels, ref, bound


def multilevel_grad_reference(feats, rois, size, sampling_ratio, aligned, g):
    """float64 torchvision on each RoI's level, differentiated: (gradients for g, the same for |g| = the
    sum|terms| of each pixel, and the number of terms per pixel), one [N, C_l, H_l, W_l] per level."""
    levels = fpn_levels_reference(rois, SCALES)
    leaves = [f.detach().double().requires_grad_() for f in feats]
    out = torch.zeros(rois.shape[0], feats[0].shape[1], size, size, dtype=torch.float64)
    for l, f in enumerate(leaves):
        sel = (levels == l).nonzero().flatten()
        if len(sel):
            out[sel] = roi_align(f, rois[sel].double(), size, SCALES[l], sampling_ratio, aligned)
    grads, sums = (
        [torch.zeros_like(f) if x is None else x for f, x in
         zip(leaves, torch.autograd.grad(out, leaves, v.double(), retain_graph=True, allow_unused=True))]
        for v in (g, g.abs()))
    return grads, sums, multilevel_terms(feats, rois, levels, size, SCALES, sampling_ratio, aligned)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_cpu(dtype):
    """CPU and CUDA on identical inputs (built on the CPU and moved; upstream gradients drawn on the CPU)."""
    u = unit_roundoff(dtype)
    feats = pyramid(n=2, dtype=dtype)
    rois = torch.cat([random_rois(40, 2), boundary_rois()]).to(dtype)
    cf = [f.cuda() for f in feats]
    for sr in (0, 2):
        out_c = roi_align_multilevel(cf, rois.cuda(), 7, SCALES, sr, False)
        out_p = roi_align_multilevel(feats, rois, 7, SCALES, sr, False)
        _, _, bound = multilevel_bounds(feats, rois.double(), 7, sr, False, u)
        assert_within(out_c, out_p.double(), bound, f"multilevel forward, sampling_ratio={sr}")
        stages = [(2, 28, 30), (1, 56, 20), (0, 112, 10)]
        for (l, size, n), a, b in zip(stages, roi_align_stages(cf, rois.cuda(), stages, SCALES, sr, True),
                                      roi_align_stages(feats, rois, stages, SCALES, sr, True)):
            s = roi_align(feats[l].double().abs(), rois[:n].double(), size, SCALES[l], sr, True)
            side = float((rois[:n, 3:5] - rois[:n, 1:3]).abs().max()) * SCALES[l] / size
            terms = 4 * (sr or math.ceil(side + 1)) ** 2 + 1
            assert_within(a, b.double(), 2 * terms * u * s + coordinate_slack(feats, rois, SCALES, u), f"stage {l}")

        # channels-last crops on CUDA: the same values in the other layout
        for a, b in zip(roi_align_stages(cf, rois.cuda(), stages, SCALES, sr, True, channels_last=True),
                        roi_align_stages(cf, rois.cuda(), stages, SCALES, sr, True)):
            assert a.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)

    # backward on dyadic boxes: exact coordinates and weights, so only the order of the sums differs
    drois = dyadic_rois(8, 2).to(dtype)
    for sr in (1, 2):
        pf = [f.clone().requires_grad_() for f in feats]
        gf = [f.cuda().requires_grad_() for f in feats]
        out_p = roi_align_multilevel(pf, drois, 7, SCALES, sr, True)
        out_c = roi_align_multilevel(gf, drois.cuda(), 7, SCALES, sr, True)
        g = torch.randn(out_p.shape, dtype=torch.float64).to(dtype)
        got = torch.autograd.grad(out_c, gf, g.cuda())
        exp = torch.autograd.grad(out_p, pf, g)
        _, s, n = multilevel_grad_reference(feats, drois, 7, sr, True, g)
        for l, (a, b) in enumerate(zip(got, exp)):
            assert_within(a, b.double(), 2 * n[l] * u * s[l], f"multilevel grad of level {l}, sr={sr}")
        stages = [(2, 28, 16), (1, 14, 12), (0, 56, 6)]
        out_p = roi_align_stages(pf, drois, stages, SCALES, sr, True)
        out_c = roi_align_stages(gf, drois.cuda(), stages, SCALES, sr, True)
        gs = [torch.randn(o.shape, dtype=torch.float64).to(dtype) for o in out_p]
        got = torch.autograd.grad(out_c, gf[:3], [x.cuda() for x in gs])
        exp = torch.autograd.grad(out_p, pf[:3], gs)
        for j, (l, size, cnt) in enumerate(stages):  # each stage reads its own level: its gradient alone
            r = drois[:cnt]
            s = torch.autograd.grad(roi_align(pf[l].double(), r.double(), size, SCALES[l], sr, True), pf[l],
                                    gs[j].double().abs())[0]
            n = torch.stack([terms_per_pixel(feats[l].shape[2:], r[r[:, 0] == b], size, SCALES[l], sr, True)
                             for b in range(2)])[:, None]
            assert_within(got[l], exp[l].double(), 2 * n * u * s.double(), f"stage grad of level {l}, sr={sr}")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_forward_against_rounded_reference(dtype, device):
    """Half/bf16 against float64 torchvision on the same ROUNDED features and boxes (bf16 moves a box near
    790 px by 2-4 px, enough to change its level: the reference must see the rounded box). Bound: float32
    sums and coordinates, then one rounding to the dtype (see the error model above)."""
    feats = [f.to(dtype).double() for f in pyramid(n=2)]
    rois = torch.cat([random_rois(40, 2), boundary_rois()[:4]]).to(dtype).double()
    low = [f.to(device, dtype) for f in feats]
    out = roi_align_multilevel(low, rois.to(device, dtype), 7, SCALES, 2, False)
    assert out.dtype == dtype and out.device.type == device
    _, ref, bound = multilevel_bounds(feats, rois, 7, 2, False, U32, out_dtype=dtype)
    assert_within(out, ref, bound, f"{dtype} multilevel forward")
    (st,) = roi_align_stages(low, rois.to(device, dtype), [(0, 28, 40)], SCALES)
    ref = roi_align(feats[0], rois[:40], 28, SCALES[0], 2, True)
    s = roi_align(feats[0].abs(), rois[:40], 28, SCALES[0], 2, True)
    assert_within(st, ref, 2 * 17 * U32 * s + rounding_error(ref, dtype) + coordinate_slack(feats, rois, SCALES),
                  f"{dtype} stage forward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_backward_against_rounded_reference(dtype, device):
    """Half/bf16 backward of both ops against the float64 torchvision backward of the same rounded inputs
    and upstream gradient. Dyadic boxes make every sample exact, so the error is the float32 sum of the n
    terms of each pixel (<= 2 n u32 sum|terms|, n counted per pixel) and one rounding to the dtype
    (u |ref|): a sum kept in the dtype instead would be off by about n u sum|terms|."""
    feats = [f.to(dtype) for f in pyramid(n=2)]
    rois = dyadic_rois(8, 2).to(dtype)
    leaves = [f.to(device).requires_grad_() for f in feats]
    out = roi_align_multilevel(leaves, rois.to(device), 7, SCALES, 2, True)
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(out, leaves, g.to(device))
    exp, s, n = multilevel_grad_reference(feats, rois.double(), 7, 2, True, g)  # levels of the exact boxes
    for l in range(4):
        assert got[l].dtype == dtype
        assert_within(got[l], exp[l], rounding_error(exp[l], dtype) + 2 * n[l] * U32 * s[l],
                      f"{dtype} multilevel grad, level {l}")

    stages = [(2, 14, 16), (0, 28, 10)]
    outs = roi_align_stages(leaves, rois.to(device), stages, SCALES, 2, True)
    gs = [torch.randn(o.shape, dtype=torch.float64).to(dtype) for o in outs]
    got = torch.autograd.grad(outs, [leaves[2], leaves[0]], [x.to(device) for x in gs])
    for (l, size, cnt), a, gj in zip(stages, got, gs):
        leaf = feats[l].double().requires_grad_()
        ref = roi_align(leaf, rois[:cnt].double(), size, SCALES[l], 2, True)
        (e,) = torch.autograd.grad(ref, leaf, gj.double(), retain_graph=True)
        (s,) = torch.autograd.grad(ref, leaf, gj.double().abs())
        r = rois[:cnt].double()
        n = torch.stack([terms_per_pixel(feats[l].shape[2:], r[r[:, 0] == b], size, SCALES[l], 2, True)
                         for b in range(2)])[:, None]
        assert a.dtype == dtype
        assert_within(a, e, rounding_error(e, dtype) + 2 * n * U32 * s, f"{dtype} stage grad, level {l}")


@pytest.mark.cuda
def test_cuda_deterministic_mode_rejects_the_atomic_backward():
    """Both backward passes scatter with atomic adds on CUDA: under torch.use_deterministic_algorithms(True)
    they must raise (as torchvision's RoIAlign does); the forward passes stay allowed."""
    feats = [f.cuda().requires_grad_() for f in pyramid(n=2)]
    rois = random_rois(6, 2).cuda()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = roi_align_multilevel(feats, rois, 7, SCALES)
        with pytest.raises(RuntimeError, match="deterministic"):
            out.sum().backward()
        outs = roi_align_stages(feats, rois, [(0, 14, 6)], SCALES)
        with pytest.raises(RuntimeError, match="deterministic"):
            outs[0].sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)


def test_cpu_deterministic_mode_allows_backward():
    """The CPU backward passes sum in a fixed order: deterministic mode must not reject them."""
    feats = [f.requires_grad_() for f in pyramid(n=2)]
    rois = random_rois(6, 2)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        roi_align_multilevel(feats, rois, 7, SCALES).sum().backward()
        roi_align_stages(feats, rois, [(0, 14, 6)], SCALES)[0].sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert feats[0].grad is not None


@pytest.mark.cuda
def test_cuda_opcheck_and_empty():
    feats = [f.cuda() for f in pyramid(n=2, c=3)]
    rois = torch.tensor([[0, 3.3, 4.1, 40.2, 50.7], [1, -5.0, 10.0, 30.0, 70.0]], device="cuda")
    torch.library.opcheck(torch.ops.dynamask.roi_align_multilevel, (feats, rois, None, SCALES, 3, 3, 2, False))
    torch.library.opcheck(torch.ops.dynamask.roi_align_stages, (feats, rois, [2, 0], [2, 4], [1, 2], SCALES, 2, True))
    assert roi_align_multilevel(feats, rois[:0], 7, SCALES).shape == (0, 3, 7, 7)


@pytest.mark.parametrize("canonical_scale", [224.0, 56.0, 37.5])
def test_pooler_canonical_scale_equals_torchvision(canonical_scale):
    # the model's pooler with a smaller canonical box (small images) maps levels as torchvision's
    # MultiScaleRoIAlign(canonical_scale=...) does, zero-area boxes included (inverted boxes are left
    # out: torchvision takes the square root of their negative area)
    from dynamask.models.roi_pool import MultiLevelRoIPool

    feats = pyramid(n=3)
    rois = torch.cat([random_rois(40, 3), boundary_rois()[:6]])
    rois = rois[torch.argsort(rois[:, 0], stable=True)]
    names = ["p2", "p3", "p4", "p5"]
    fdict = OrderedDict(zip(names, feats))
    ours = MultiLevelRoIPool(featmap_names=names, output_size=7, sampling_ratio=2, aligned=False,
                             canonical_scale=canonical_scale)
    boxes, shapes = as_boxlists(rois, 3), [IMAGE] * 3
    got = ours(fdict, boxes, shapes)
    expected = MultiScaleRoIAlign(names, 7, 2, canonical_scale=canonical_scale)(fdict, boxes, shapes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # pool(): the same features, and what it derived (levels, scales, RoIs) for the mask head's stages
    pooled = ours.pool(fdict, boxes, shapes)
    torch.testing.assert_close(pooled.features, got, rtol=0, atol=0)
    assert pooled.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32] and all(a is b for a, b in zip(pooled.levels, feats))
    torch.testing.assert_close(pooled.rois, rois)
    if canonical_scale != 224.0:  # and it differs from the default mapping on these boxes
        assert not torch.allclose(got, MultiScaleRoIAlign(names, 7, 2)(fdict, boxes, shapes))


def test_pooler_rejects_bad_canonical_scale():
    from dynamask.models.roi_pool import MultiLevelRoIPool

    with pytest.raises(ValueError, match="canonical_scale"):
        MultiLevelRoIPool(canonical_scale=0)


def test_mask_pool_must_output_the_heads_first_resolution():
    from model_helpers import tiny_model

    from dynamask.models.roi_heads import DynaMaskRoIHeads
    from dynamask.models.roi_pool import MultiLevelRoIPool

    heads = tiny_model().roi_heads  # a 7→56 head
    assert heads.dyn_mask_roi_pool.output_size == (7, 7)
    with pytest.raises(ValueError, match="first resolution 7"):
        DynaMaskRoIHeads(box_roi_pool=heads.box_roi_pool, box_head=heads.box_head, box_predictor=heads.box_predictor,
                         fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=8, positive_fraction=0.25,
                         bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=10,
                         mask_head=heads.mask_head, msm=heads.msm, mask_roi_pool=MultiLevelRoIPool(output_size=14))
