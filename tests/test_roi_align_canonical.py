"""roi_align_multilevel's level rule takes the canonical box side (the side mapped to P4) as an argument:
torchvision's LevelMapper for 224 and any other scale, hand-derived levels for 56, forward and backward."""

import pytest
import torch
from test_roi_align import SCALES, boundary_rois, pyramid, random_rois
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper

from dynamask.ops import roi_align_multilevel
from dynamask.ops._reference.roi_align import fpn_levels_reference


def level_mapper(rois, canonical_scale):
    """torchvision's levels (0 = P2) for rois of positive area, as MultiScaleRoIAlign computes them."""
    return LevelMapper(k_min=2, k_max=5, canonical_scale=canonical_scale)([rois[:, 1:]]).to(torch.int64)


def with_positive_area(rois):
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    return rois[area > 0]


@pytest.mark.parametrize("canonical_scale", [224.0, 56.0, 37.5, 400.0])
def test_levels_equal_torchvision_level_mapper(canonical_scale):
    feats = pyramid(n=2)
    rois = with_positive_area(torch.cat([random_rois(40, 2), boundary_rois()]))
    expected_levels = level_mapper(rois, canonical_scale)
    assert torch.equal(fpn_levels_reference(rois, SCALES, canonical_scale), expected_levels)
    got = roi_align_multilevel(feats, rois, 7, SCALES, 2, False, canonical_scale=canonical_scale)
    forced = roi_align_multilevel(feats, rois, 7, SCALES, 2, False, levels=expected_levels)
    torch.testing.assert_close(got, forced, rtol=0, atol=0)
    if canonical_scale == 224.0:  # the default is torchvision's canonical size
        torch.testing.assert_close(roi_align_multilevel(feats, rois, 7, SCALES, 2, False), got, rtol=0, atol=0)


def test_hand_derived_levels_for_56():
    # k = floor(4 + log2(side / 56) + 1e-6), clamped to P2..P5, as an index from P2: a side of 56 is P4
    # (index 2), halving it drops a level, and the 1e-6 lifts a side a hair below 56 onto P4
    sides = [56.0, 55.0, 28.0, 27.0, 14.0, 112.0, 111.0, 224.0, 1000.0, 2.0, 56.0 * (1 - 2e-7)]
    expected = [2, 1, 1, 0, 0, 3, 2, 3, 3, 0, 2]
    rois = torch.tensor([[0.0, 0.0, 0.0, s, s] for s in sides])
    # zero width -> the finest level; inverted in both axes: area 30², side 30, floor(3.099) = P3
    rois = torch.cat([rois, torch.tensor([[1.0, 10.0, 10.0, 10.0, 80.0], [1.0, 50.0, 50.0, 20.0, 20.0]])])
    expected += [0, 1]
    assert level_mapper(rois[:-2], 56.0).tolist() == expected[:-2]  # torchvision agrees where it is defined
    feats = pyramid(n=2)
    got = roi_align_multilevel(feats, rois, 5, SCALES, 2, True, canonical_scale=56.0)
    for r, l in enumerate(expected):
        exp = roi_align(feats[l], rois[r:r + 1], 5, SCALES[l], 2, True)
        torch.testing.assert_close(got[r:r + 1], exp, rtol=1e-5, atol=1e-5, msg=f"roi {r} -> level {l}")


def test_backward_follows_the_same_levels():
    feats = [f.double().requires_grad_() for f in pyramid(n=2, c=2)]
    rois = with_positive_area(random_rois(8, 2, dtype=torch.float64))
    levels = level_mapper(rois.float(), 56.0)
    assert levels.unique().numel() > 1  # the rois spread over levels
    torch.autograd.gradcheck(lambda *f: roi_align_multilevel(list(f), rois, 3, SCALES, 2, True, canonical_scale=56.0),
                             tuple(feats), atol=1e-6)
    g = torch.randn(rois.shape[0], 2, 3, 3, dtype=torch.float64)
    a = torch.autograd.grad(roi_align_multilevel(feats, rois, 3, SCALES, 2, True, canonical_scale=56.0), feats, g)
    b = torch.autograd.grad(roi_align_multilevel(feats, rois, 3, SCALES, 2, True, levels=levels), feats, g)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0.0, -56.0, float("nan"), float("inf")])
def test_bad_canonical_scale_is_refused(bad):
    with pytest.raises(ValueError, match="canonical_scale must be a positive finite number"):
        roi_align_multilevel(pyramid(n=1), random_rois(3, 1), 7, SCALES, canonical_scale=bad)


def test_opcheck_with_canonical_scale():
    feats = [f.double().requires_grad_() for f in pyramid(n=2, c=3)]
    rois = torch.tensor([[0, 3.3, 4.1, 40.2, 50.7], [1, -5.0, 10.0, 30.0, 70.0], [0, 1.0, 1.0, 9.0, 9.0]],
                        dtype=torch.float64)
    torch.library.opcheck(torch.ops.dynamask.roi_align_multilevel.default,
                          (feats, rois, None, SCALES, 3, 3, 2, False, 56.0))


@pytest.mark.cuda
@pytest.mark.parametrize("canonical_scale", [224.0, 56.0])
def test_cuda_levels_equal_torchvision_level_mapper(canonical_scale):
    feats = [f.cuda().requires_grad_() for f in pyramid(n=2)]
    rois = with_positive_area(torch.cat([random_rois(40, 2), boundary_rois()]))
    levels = level_mapper(rois, canonical_scale).cuda()
    rois = rois.cuda()
    got = roi_align_multilevel(feats, rois, 7, SCALES, 2, False, canonical_scale=canonical_scale)
    forced = roi_align_multilevel(feats, rois, 7, SCALES, 2, False, levels=levels)
    torch.testing.assert_close(got, forced, rtol=0, atol=0)
    g = torch.randn_like(got)
    a = torch.autograd.grad(got, feats, g)
    b = torch.autograd.grad(forced, feats, g)
    for x, y in zip(a, b):  # atomics: the order of the sums may differ
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.dynamask.roi_align_multilevel.default,
                          ([f.detach() for f in feats], rois, None, SCALES, 3, 3, 2, False, canonical_scale))
