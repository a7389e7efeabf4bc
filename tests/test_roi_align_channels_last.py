"""The channels-last forward of roi_align_multilevel (>= 16 channels, output planes up to 20x20).

The kernel copies a block of channels of one (level, image) to channels-last and pools every RoI of
that level and image from it, 32 channels per register block (8 per vector), so the cases cover
channel counts with every kind of tail (8-multiples, a scalar tail), RoIs of several images in any
order, images without RoIs, and each dtype's code path, against torchvision's roi_align.
"""

import pytest
import torch
from test_roi_align import (
    SCALES,
    U32,
    assert_within,
    boundary_rois,
    coordinate_slack,
    extreme_rois,
    pyramid,
    random_rois,
    rounding_error,
)
from torchvision.ops import roi_align

from dynamask.ops import roi_align_multilevel
from dynamask.ops._reference.roi_align import fpn_levels_reference, roi_align_multilevel_reference


def torchvision_multilevel(feats, rois, levels, size, sampling_ratio, aligned):
    """roi_align on each RoI's own level: the reference. torchvision's CPU kernel cannot take inverted
    boxes with aligned=True and adaptive sampling (its sample grid goes negative and it throws), so
    those few RoIs are pooled by the pure-PyTorch reference instead."""
    out = torch.zeros(rois.shape[0], feats[0].shape[1], size, size, dtype=feats[0].dtype)
    inverted = (rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2])
    slow = inverted if (aligned and sampling_ratio == 0) else torch.zeros_like(inverted)
    for lvl, scale in enumerate(SCALES):
        sel = ((levels == lvl) & ~slow).nonzero().flatten()
        if len(sel):
            out[sel] = roi_align(feats[lvl], rois[sel], size, scale, sampling_ratio, aligned)
    sel = slow.nonzero().flatten()
    if len(sel):
        out[sel] = roi_align_multilevel_reference(feats, rois[sel], size, SCALES, sampling_ratio, aligned, levels[sel])
    return out


def mixed_rois(n_images=3, skip_image=None, seed=0):
    """Random, boundary and extreme boxes, shuffled so images and levels interleave."""
    torch.manual_seed(seed)
    rois = torch.cat([random_rois(12, n_images), boundary_rois(), extreme_rois()])
    rois[:, 0] = rois[:, 0] % n_images
    if skip_image is not None:
        rois = rois[rois[:, 0] != skip_image]
    return rois[torch.randperm(rois.shape[0])]


@pytest.mark.parametrize("channels", [16, 24, 37, 40, 64])
@pytest.mark.parametrize("size", [7, 14, 20])
def test_channels_last_equals_torchvision(channels, size):
    torch.manual_seed(channels * 100 + size)
    feats = pyramid(n=3, c=channels)
    rois = mixed_rois(skip_image=1)  # an image without RoIs
    levels = torch.randint(0, 4, (rois.shape[0],))
    for sampling_ratio in (0, 2):
        for aligned in (False, True):
            ours = roi_align_multilevel(feats, rois, size, SCALES, sampling_ratio, aligned=aligned, levels=levels)
            ref = torchvision_multilevel(feats, rois, levels, size, sampling_ratio, aligned)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_channels_last_float64_and_level_mapper():
    feats = pyramid(n=2, c=32, dtype=torch.float64)
    rois = mixed_rois(n_images=2).double()
    ours = roi_align_multilevel(feats, rois, 14, SCALES, 2, aligned=False)
    levels = fpn_levels_reference(rois, SCALES)
    ref = torchvision_multilevel(feats, rois, levels, 14, 2, False)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_channels_last_non_contiguous_features():
    base = pyramid(n=2, c=64)
    feats = [f[:, ::2] for f in base]  # 32 channels, strided
    rois = mixed_rois(n_images=2)
    levels = torch.randint(0, 4, (rois.shape[0],))
    ours = roi_align_multilevel(feats, rois, 7, SCALES, 2, aligned=True, levels=levels)
    ref = torchvision_multilevel([f.contiguous() for f in feats], rois, levels, 7, 2, True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channels_last_half_precision(dtype):
    feats = pyramid(n=2, c=32)
    rois = mixed_rois(n_images=2)
    levels = torch.randint(0, 4, (rois.shape[0],))
    ours = roi_align_multilevel([f.to(dtype) for f in feats], rois.to(dtype), 14, SCALES, 2, aligned=True,
                                levels=levels)
    # Reference: float64 on the same rounded inputs. Ours sums the 4 * 2 * 2 = 16 terms of a bin in float
    # and rounds once: the error model of test_roi_align (float32 sums, float32 coordinates, one rounding).
    exact = [f.to(dtype).double() for f in feats]
    exact_rois = rois.to(dtype).double()
    ref = torchvision_multilevel(exact, exact_rois, levels, 14, 2, True)
    s = torchvision_multilevel([f.abs() for f in exact], exact_rois, levels, 14, 2, True)
    bound = 2 * 17 * U32 * s + rounding_error(ref, dtype) + coordinate_slack(exact, exact_rois, SCALES)
    assert ours.dtype == dtype
    assert_within(ours, ref, bound, f"{dtype} channels-last forward")


def test_channels_last_same_result_on_one_and_two_threads():
    feats = pyramid(n=2, c=48)
    rois = mixed_rois(n_images=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = roi_align_multilevel(feats, rois, 14, SCALES, 2)
        torch.set_num_threads(2)
        two = roi_align_multilevel(feats, rois, 14, SCALES, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
