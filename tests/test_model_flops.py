"""Analytic FLOPs (dynamask.models.flops) against a hook-based MAC count on a real forward pass."""

import pytest
import torch
from model_helpers import MacCounter, one_thread  # noqa: F401

from dynamask.models import DynaMaskHead, MaskSwitchModule, dynamask_resnet_fpn, flops

PAPER = {14: 0.23, 28: 0.62, 56: 1.01, 112: 1.40}


def test_default_widths_within_paper_budget():
    head = DynaMaskHead()
    g = flops.mask_head_gmacs(head)
    assert list(g) == [14, 28, 56, 112]
    for s, bound in PAPER.items():
        assert g[s] <= bound * 1.02, (s, g[s])
    assert g[14] < g[28] < g[56] < g[112]
    assert flops.msm_gmacs(MaskSwitchModule()) <= 0.02
    # by hand: SE 2·256·16; first conv 256·64·9 at 7×7; each of 3 heads: conv 64·16·9 at 7×7, FCs 784·256 + 256·4
    one = 64 * 16 * 9 * 49 + 784 * 256 + 256 * 4
    assert flops.msm_macs(MaskSwitchModule()) == 2 * 256 * 16 + 256 * 64 * 9 * 49 + 3 * one
    assert flops.msm_macs(MaskSwitchModule(num_heads=1)) == 2 * 256 * 16 + 256 * 64 * 9 * 49 + one
    # the worked budget of docs/method.md §3 (mask predictor only; edge predictors are training-only)
    assert g[112] == pytest.approx(1.2859, abs=1e-3)
    assert flops.per_image_gmacs(head, (800, 1216)) == pytest.approx(0.8716, abs=1e-3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = dynamask_resnet_fpn(depth=18, num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0,
                            box_detections_per_img=2, rpn_pre_nms_top_n_test=30, rpn_post_nms_top_n_test=10)
    return m.eval()


@pytest.mark.parametrize("resolution", [14, 28, 56, 112])
def test_hook_count_equals_analytic(model, resolution):
    model.mask_policy = resolution
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    counter = MacCounter(model.roi_heads.mask_head)
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        counter.close()
    n = sum(o["boxes"].shape[0] for o in out)
    assert n == 4
    k = [14, 28, 56, 112].index(resolution)
    per_roi = flops.mask_head_macs(model)[k]
    per_image = flops.per_image_macs(model, (64, 64), stages=range(1, k + 1))
    assert counter.macs == n * per_roi + len(images) * per_image


def test_msm_hook_count_equals_analytic(model):
    msm = model.roi_heads.msm
    counter = MacCounter(msm)
    try:
        with torch.no_grad():
            msm(torch.rand(5, 256, 14, 14))
    finally:
        counter.close()
    assert counter.macs == 5 * flops.msm_macs(model)
