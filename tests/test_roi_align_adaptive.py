"""sampling_ratio=-1, torchvision's spelling of adaptive sampling, in our RoIAlign wrappers and the model's
pooler: the same values as torchvision's op and pooler with -1 (which, like ours with 0, sample
ceil(roi side / output side) points per bin and axis); other negative values are refused in one line."""

from collections import OrderedDict

import pytest
import torch
from test_roi_align import IMAGE, SCALES, as_boxlists, boundary_rois, pyramid, random_rois
from torchvision.ops import MultiScaleRoIAlign, roi_align

from dynamask.models.roi_pool import MultiLevelRoIPool
from dynamask.ops import roi_align_multilevel, roi_align_stages


def _rois():
    """Boxes from under a feature cell to larger than the image, so adaptive sampling takes 1 to many points
    per bin (a fixed ratio of 2 gives other values on most of them: checked below)."""
    return torch.cat([random_rois(25, 2), boundary_rois()[:4]])


@pytest.mark.parametrize("aligned", [True, False])
def test_multilevel_minus_one_equals_torchvision(aligned):
    feats = pyramid(n=2)
    rois = _rois()
    levels = torch.randint(0, 4, (rois.shape[0],), generator=torch.Generator().manual_seed(3))
    out = roi_align_multilevel(feats, rois, (5, 7), SCALES, -1, aligned, levels=levels)
    for l in range(4):
        idx = levels == l
        expected = roi_align(feats[l], rois[idx], (5, 7), SCALES[l], -1, aligned)
        torch.testing.assert_close(out[idx], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, roi_align_multilevel(feats, rois, (5, 7), SCALES, 0, aligned, levels=levels))
    # adaptive is not a fixed ratio in disguise
    assert not torch.allclose(out, roi_align_multilevel(feats, rois, (5, 7), SCALES, 2, aligned, levels=levels))


@pytest.mark.parametrize("aligned", [True, False])
def test_stages_minus_one_equal_torchvision(aligned):
    feats = pyramid(n=2, channels=[3, 5, 8, 4])
    rois = _rois()
    stages = [(2, 6, 25), (1, 12, 18), (0, 24, 7)]
    outs = roi_align_stages(feats, rois, stages, SCALES, -1, aligned)
    for (l, s, n), o in zip(stages, outs):
        torch.testing.assert_close(o, roi_align(feats[l], rois[:n], s, SCALES[l], -1, aligned), rtol=1e-5, atol=1e-5)
    for o, z in zip(outs, roi_align_stages(feats, rois, stages, SCALES, 0, aligned)):
        assert torch.equal(o, z)


def test_minus_one_backward_equals_torchvision():
    """The autograd function keeps the ratio the kernel ran with (0), so the gradient is adaptive's too."""
    feats = [f.requires_grad_() for f in pyramid(n=2)]
    rois = _rois()
    stages = [(2, 7, 20), (0, 14, 10)]
    outs = roi_align_stages(feats, rois, stages, SCALES, -1, True)
    grads_out = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, [feats[2], feats[0]], grads_out)
    ref_feats = [f.detach().clone().requires_grad_() for f in (feats[2], feats[0])]
    ref = [roi_align(ref_feats[0], rois[:20], 7, SCALES[2], -1, True),
           roi_align(ref_feats[1], rois[:10], 14, SCALES[0], -1, True)]
    for g, e in zip(got, torch.autograd.grad(ref, ref_feats, grads_out)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_pooler_minus_one_equals_torchvision_multiscale():
    feats = pyramid(n=3)
    rois = torch.cat([random_rois(40, 3), boundary_rois()[:4]])
    rois = rois[torch.argsort(rois[:, 0], stable=True)]  # MultiScaleRoIAlign returns boxes in image order
    names = ["p2", "p3", "p4", "p5"]
    fdict = OrderedDict(zip(names, feats))
    boxes, shapes = as_boxlists(rois, 3), [IMAGE] * 3
    ours = MultiLevelRoIPool(featmap_names=names, output_size=7, sampling_ratio=-1, aligned=False)
    expected = MultiScaleRoIAlign(names, 7, -1)(fdict, boxes, shapes)
    torch.testing.assert_close(ours(fdict, boxes, shapes), expected, rtol=1e-5, atol=1e-5)


def test_other_negative_ratios_are_refused_in_one_line():
    feats, rois = pyramid(n=2), random_rois(3, 2)
    for ratio in (-2, -7):
        with pytest.raises(ValueError, match=rf"^roi_align_multilevel: sampling_ratio must be >= 0, or -1 "
                                             rf"\(torchvision's adaptive, the same as 0\), got {ratio}$"):
            roi_align_multilevel(feats, rois, 7, SCALES, ratio)
        with pytest.raises(ValueError, match=rf"^roi_align_stages: sampling_ratio .* got {ratio}$"):
            roi_align_stages(feats, rois, [(0, 7, 3)], SCALES, ratio)
        with pytest.raises(ValueError, match=rf"^MultiLevelRoIPool: sampling_ratio .* got {ratio}$"):
            MultiLevelRoIPool(sampling_ratio=ratio)  # at construction, not at the first forward
    with pytest.raises(TypeError, match=r"sampling_ratio must be an int .* got 2\.5"):
        roi_align_multilevel(feats, rois, 7, SCALES, 2.5)  # was truncated to 2 silently
