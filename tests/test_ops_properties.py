"""Property-based tests: every op against its pure-PyTorch twin in dynamask/ops/_reference (and
torchvision where it applies) on generated inputs: random shapes, empty inputs (no RoIs, no images,
empty spatial maps such as [1, 1, 0, 4]), degenerate, inverted and out-of-image boxes, extreme aspect
ratios, mixed resolutions in one paste; gradients too where they are cheap.

The examples are bounded (a few hundred per op in all, about a minute for the file on one core) and
derandomized, so CI runs the same cases every time; a failure prints the example to reproduce it. Run
more locally with ``DYNAMASK_FUZZ_EXAMPLES=10 pytest tests/test_ops_properties.py`` (a multiplier).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torchvision
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_util

from dynamask import ops
from dynamask.ops._reference.deform_conv2d import deform_conv2d_reference
from dynamask.ops._reference.group_by_resolution import group_by_resolution_reference
from dynamask.ops._reference.paste_masks import paste_masks_reference
from dynamask.ops._reference.roi_align import roi_align_multilevel_reference, roi_align_stages_reference

SCALE = float(os.environ.get("DYNAMASK_FUZZ_EXAMPLES", "1"))
CI = settings(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def examples(n: int) -> settings:
    return settings(CI, max_examples=max(1, int(n * SCALE)))


# Hypothesis favours simple numbers (0, 1, -1, 0.5), which put samples exactly on the edges where a
# sample's value jumps (RoIAlign's "more than one pixel outside" rule). The kernel and the twin then
# differ by the last bit of a coordinate, not by their semantics; a shift by this non-dyadic amount
# moves every box off those edges without changing its kind (degenerate stays degenerate, and so on).
GENERIC = 3.1e-6

# float64 against the float64 twin: the same terms summed in another order, n <= a few hundred terms
# of size <= 10 per output: |difference| <= n * u64 * sum|terms| < 1e-12. Gradients: at most a few
# thousand terms per element: < 1e-10. A wrong tap or weight shows at 1e-2 or more.
VALUES = dict(rtol=1e-10, atol=1e-10)
GRADS = dict(rtol=1e-9, atol=1e-9)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ boxes

lengths = st.one_of(
    st.floats(0.5, 60.0),  # ordinary
    st.floats(1e-3, 0.5),  # tiny
    st.sampled_from([0.0, -0.0]),  # degenerate
    st.floats(-40.0, -0.1),  # inverted
    st.floats(100.0, 400.0),  # much larger than the map: with a tiny other side, an extreme aspect ratio
)
starts = st.one_of(st.floats(-30.0, 70.0), st.floats(-400.0, -100.0), st.floats(120.0, 500.0))  # off the image


@st.composite
def boxes(draw, n: int) -> torch.Tensor:
    """[n, 4] float64 (x1, y1, x2, y2): inside, partly or wholly outside, degenerate, inverted, tiny, huge."""
    rows = []
    for _ in range(n):
        x1, y1 = draw(starts), draw(starts)
        rows.append([x1, y1, x1 + draw(lengths), y1 + draw(lengths)])
    return torch.tensor(rows, dtype=torch.float64).reshape(n, 4) + GENERIC


# ------------------------------------------------------------------------------------- RoIAlign


@st.composite
def roi_align_case(draw):
    n_images = draw(st.integers(0, 3))
    n_levels = draw(st.integers(1, 3))
    k0 = draw(st.integers(0, 3))  # the finest level's scale is 2^-k0
    scales = [2.0 ** -(k0 + l) for l in range(n_levels)]
    C = draw(st.integers(1, 3))
    # map sizes per level, empty ones included (height or width 0)
    hw = [(draw(st.integers(0, 9)), draw(st.integers(0, 9))) for _ in range(n_levels)]
    R = draw(st.integers(0, 6)) if n_images else 0
    b = boxes(R)
    rois = torch.cat([torch.tensor([[float(draw(st.integers(0, n_images - 1)))] for _ in range(R)],
                                   dtype=torch.float64).reshape(R, 1), draw(b)], 1)
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    feats = [torch.randn(n_images, C, h, w, generator=g, dtype=torch.float64) for h, w in hw]
    out_size = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    sampling_ratio = draw(st.sampled_from([0, 1, 2, 3]))
    aligned = draw(st.booleans())
    levels = None
    if draw(st.booleans()):
        levels = torch.tensor([draw(st.integers(0, n_levels - 1)) for _ in range(R)], dtype=torch.int64)
    return feats, rois, out_size, scales, sampling_ratio, aligned, levels, g


def _small_grids(rois, scales, out_size, sampling_ratio):
    """Adaptive sampling puts ceil(box / bin) samples per bin; keep the twin's per-RoI loop cheap."""
    if sampling_ratio:
        return True
    side = (rois[:, 3:5] - rois[:, 1:3]).abs().max() if len(rois) else torch.tensor(0.0)
    return float(side) * max(scales) / min(out_size) <= 64


def _torchvision_applies(feats, rois, sampling_ratio, aligned):
    # torchvision's CPU kernel throws on inverted boxes with aligned=True and adaptive sampling, and
    # has no rule for empty maps
    inverted = bool(((rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2])).any()) if len(rois) else False
    return all(f.shape[2] * f.shape[3] > 0 for f in feats) and not (aligned and sampling_ratio == 0 and inverted)


@examples(150)
@given(roi_align_case())
def test_roi_align_multilevel_matches_twin_and_torchvision(case):
    feats, rois, out_size, scales, sr, aligned, levels, g = case
    assume(_small_grids(rois, scales, out_size, sr))
    leaves = [f.clone().requires_grad_() for f in feats]
    out = ops.roi_align_multilevel(leaves, rois, out_size, scales, sr, aligned, levels=levels)
    twin_leaves = [f.clone().requires_grad_() for f in feats]
    ref = roi_align_multilevel_reference(twin_leaves, rois, out_size, scales, sr, aligned, levels)
    assert out.shape == (rois.shape[0], feats[0].shape[1], *out_size)
    torch.testing.assert_close(out, ref, **VALUES)
    if levels is not None and _torchvision_applies(feats, rois, sr, aligned):
        for l, f in enumerate(feats):
            sel = levels == l
            tv = torchvision.ops.roi_align(f, rois[sel], out_size, scales[l], sr, aligned)
            torch.testing.assert_close(out[sel].detach(), tv, **VALUES)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, go, allow_unused=True)
    exp = torch.autograd.grad(ref, twin_leaves, go, allow_unused=True) if ref.requires_grad else [None] * len(feats)
    for f, a, e in zip(feats, got, exp):
        torch.testing.assert_close(torch.zeros_like(f) if a is None else a, torch.zeros_like(f) if e is None else e,
                                   **GRADS)


@examples(100)
@given(roi_align_case(), st.data())
def test_roi_align_stages_match_twin_and_torchvision(case, data):
    feats, rois, _, scales, sr, aligned, _, g = case
    R = rois.shape[0]
    stages = [(data.draw(st.integers(0, len(feats) - 1)), data.draw(st.integers(1, 5)), data.draw(st.integers(0, R)))
              for _ in range(data.draw(st.integers(1, 3)))]
    assume(_small_grids(rois, scales, (min(s for _, s, _ in stages),) * 2, sr))
    leaves = [f.clone().requires_grad_() for f in feats]
    outs = ops.roi_align_stages(leaves, rois, stages, scales, sr, aligned)
    twin_leaves = [f.clone().requires_grad_() for f in feats]
    refs = roi_align_stages_reference(twin_leaves, rois, stages, scales, sr, aligned)
    for (l, s, n), o, r in zip(stages, outs, refs):
        assert o.shape == (n, feats[l].shape[1], s, s)
        torch.testing.assert_close(o, r, **VALUES)
        if _torchvision_applies(feats, rois[:n], sr, aligned):
            torch.testing.assert_close(
                o.detach(), torchvision.ops.roi_align(feats[l], rois[:n], s, scales[l], sr, aligned), **VALUES
            )
    gos = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    got = torch.autograd.grad(outs, leaves, gos, allow_unused=True)
    used = [(r, go) for r, go in zip(refs, gos) if r.requires_grad]
    exp = (torch.autograd.grad([r for r, _ in used], twin_leaves, [go for _, go in used], allow_unused=True)
           if used else [None] * len(feats))
    for f, a, e in zip(feats, got, exp):
        torch.testing.assert_close(torch.zeros_like(f) if a is None else a, torch.zeros_like(f) if e is None else e,
                                   **GRADS)


# ---------------------------------------------------------------------------------- deform conv


@st.composite
def deform_case(draw):
    B = draw(st.integers(0, 2))
    groups = draw(st.sampled_from([1, 2]))
    dg = draw(st.sampled_from([1, 2]))
    C = groups * dg * draw(st.integers(1, 2))
    C_out = groups * draw(st.integers(1, 2))
    H, W = draw(st.integers(0, 6)), draw(st.integers(0, 6))  # empty maps included
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    out_h = (H + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (W + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    assume(out_h > 0 and out_w > 0)
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    offset_scale = draw(st.sampled_from([0.3, 2.0, 20.0]))  # 20: most samples far outside the map
    K = kh * kw
    t = {
        "input": torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
        "offset": torch.randn(B, 2 * dg * K, out_h, out_w, generator=g, dtype=torch.float64) * offset_scale,
        "weight": torch.randn(C_out, C // groups, kh, kw, generator=g, dtype=torch.float64),
        "bias": torch.randn(C_out, generator=g, dtype=torch.float64) if draw(st.booleans()) else None,
        "mask": torch.rand(B, dg * K, out_h, out_w, generator=g, dtype=torch.float64) if draw(st.booleans()) else None,
        "residual": (torch.randn(B, C_out, out_h, out_w, generator=g, dtype=torch.float64)
                     if draw(st.booleans()) else None),
    }
    t["offset"] += GENERIC  # samples off the pixel grid, where the offset gradient is one-sided
    kwargs = dict(stride=stride, padding=pad, dilation=dil, activation=draw(st.sampled_from([None, "relu"])))
    return t, kwargs, g


def _deform(fn, t, kw):
    return fn(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], residual=t["residual"], **kw)


@examples(120)
@given(deform_case())
def test_deform_conv2d_matches_twin_and_torchvision(case):
    t, kw, g = case
    leaves = {n: v.clone().requires_grad_() for n, v in t.items() if v is not None}
    twin = {n: v.clone().requires_grad_() for n, v in t.items() if v is not None}
    out = _deform(ops.deform_conv2d, {**t, **leaves}, kw)
    ref = _deform(deform_conv2d_reference, {**t, **twin}, kw)
    torch.testing.assert_close(out, ref, **VALUES)
    x = t["input"]
    if kw["activation"] is None and t["residual"] is None and x.shape[0] and x.shape[2] * x.shape[3]:
        tv = torchvision.ops.deform_conv2d(x, t["offset"], t["weight"], t["bias"], kw["stride"], kw["padding"],
                                           kw["dilation"], t["mask"])
        torch.testing.assert_close(out.detach(), tv, **VALUES)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, list(leaves.values()), go, allow_unused=True)
    exp = torch.autograd.grad(ref, list(twin.values()), go, allow_unused=True)
    for name, a, e in zip(leaves, got, exp):
        z = torch.zeros_like(t[name])
        torch.testing.assert_close(z if a is None else a, z if e is None else e, **GRADS, msg=f"grad of {name}")


# ---------------------------------------------------------------------------------------- paste

RESOLUTIONS = [1, 2, 7, 14, 28, 56]


@st.composite
def paste_case(draw):
    H, W = draw(st.integers(0, 40)), draw(st.integers(0, 40))  # empty images included
    sizes = draw(st.lists(st.sampled_from(RESOLUTIONS), min_size=1, max_size=4))  # mixed resolutions
    counts = [draw(st.integers(0, 3)) for _ in sizes]  # empty groups included
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    groups = [torch.rand(n, s, s, generator=g) for n, s in zip(counts, sizes)]
    b = draw(boxes(sum(counts))) / 4  # a 40-px image: the same kinds of boxes at a quarter of the size
    return groups, b.float(), (H, W)


def paste_bound(groups) -> float:
    """float32 kernel vs the float64 twin: the cell coordinate c = (p + 0.5 - x1) * S / L - 0.5 takes
    about 5 roundings, <= 5 * u32 * (S + 1) cells where a tap is on the mask, and a bilinear sample of
    values in [0, 1] moves by at most that per axis; plus 4 roundings of the interpolation."""
    u32 = torch.finfo(torch.float32).eps / 2
    S = max((m.shape[-1] for m in groups), default=1)
    return 2 * 5 * u32 * (S + 1) + 4 * u32


@examples(120)
@given(paste_case(), st.sampled_from([None, 0.5, 0.1]))
def test_paste_masks_matches_twin_and_pycocotools(case, threshold):
    groups, boxes_f, image = case
    bound = paste_bound(groups)
    ref = paste_masks_reference(groups, boxes_f, image, None).double()
    out = ops.paste_masks(groups, boxes_f, image, threshold=threshold)
    assert out.shape == (boxes_f.shape[0], *image)
    if threshold is None:
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=bound)
        return
    decided = (ref - threshold).abs() > bound  # pixels nearer the threshold may go either way
    assert torch.equal(out & decided, (ref >= threshold) & decided)
    if image[0] * image[1]:
        rles = ops.paste_masks_rle(groups, boxes_f, image, threshold=threshold)
        coco = mask_util.encode(np.asfortranarray(out.numpy().astype(np.uint8).transpose(1, 2, 0))) if len(out) else []
        assert [r["counts"] for r in rles] == [c["counts"] for c in coco]


# -------------------------------------------------------------------------- group by resolution


@examples(100)
@given(st.integers(1, 9), st.data())
def test_group_by_resolution_matches_twin(K, data):
    choice = torch.tensor(data.draw(st.lists(st.integers(0, K - 1), max_size=300)), dtype=torch.int64)
    step = data.draw(st.sampled_from([1, 2]))
    choice = choice[::step]  # every other one: a strided input
    perm, counts = ops.group_by_resolution(choice, K)
    ref_perm, ref_counts = group_by_resolution_reference(choice.contiguous(), K)
    assert torch.equal(perm, ref_perm) and torch.equal(counts, ref_counts)
