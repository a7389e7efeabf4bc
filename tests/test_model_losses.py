"""Mask-branch targets and losses (pure functions), checked by hand and against torchvision."""

import math

import pytest
import torch
import torchvision
from model_helpers import one_thread  # noqa: F401

from dynamask.models import mask_losses as L


def test_edge_targets_by_hand():
    m = torch.zeros(1, 6, 6)
    m[0, 1:4, 1:5] = 1  # 3x4 block
    full = (L._laplacian_edges(m, 1)[:, 0]).float()
    expected = torch.zeros(6, 6)
    expected[1, 1:5] = 1
    expected[3, 1:5] = 1
    expected[1:4, 1] = 1
    expected[1:4, 4] = 1  # the block's ring; the interior (2, 2:4) has 8 foreground neighbours -> 0
    assert torch.equal(full[0], expected)
    # the stride-2 part, upsampled nearest, is ORed in
    half = L._laplacian_edges(m, 2)[:, 0].float()
    up = half.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(L.edge_targets(m), torch.maximum(full, up))


def test_edge_targets_border_is_not_an_edge():
    full = torch.ones(1, 8, 8)
    assert L.edge_targets(full).sum() == 0  # replicate padding
    half = torch.zeros(1, 8, 8)
    half[0, :, :4] = 1  # touches three borders; only column 3 (and its stride-2 echo) is an edge
    e = L.edge_targets(half)[0]
    assert e[:, 3].all() and e[:, :2].sum() == 0 and e[:, 4:].sum() == 0


def test_mask_targets_one_call_equals_per_instance_roi_align():
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(2, 40, 50, generator=g) > 0.5).to(torch.uint8), (torch.rand(1, 30, 60, generator=g) > 0.5)]
    props = [torch.tensor([[2.0, 3.0, 30.0, 33.0], [10.0, 0.0, 49.0, 20.0], [0.0, 0.0, 50.0, 40.0]]),
             torch.tensor([[5.0, 5.0, 55.0, 25.0]])]
    matched = [torch.tensor([1, 0, 1]), torch.tensor([0])]
    got = L.mask_targets(masks, props, matched, (14, 28, 56, 112))
    for k, s in enumerate((14, 28, 56, 112)):
        # The reference is torchvision in float64. Averaging the taps of a binary mask often lands
        # exactly on the 0.5 threshold (two of four taps set), where float32 rounding (torchvision's or
        # ours, summed in different orders) decides the side: those exact ties are the only elements
        # allowed to differ, and they must stay a small share so that the comparison means something.
        ref = []
        for m, p, i in zip(masks, props, matched):
            rois = torch.cat([i[:, None].double(), p.double()], dim=1)
            ref.append(torchvision.ops.roi_align(m[:, None].double(), rois, s, 1.0, 0, True)[:, 0])
        ref = torch.cat(ref)
        tie = (ref - 0.5).abs() < 1e-9
        assert got[k].shape == (4, s, s)
        assert torch.equal(got[k][~tie], (ref[~tie] >= 0.5).float())
        assert tie.float().mean() < 0.1, f"{int(tie.sum())} ties at {s}x{s}"


def test_pretrain_losses_are_means_over_resolutions():
    torch.manual_seed(0)
    logits = [torch.randn(3, s, s) for s in (14, 28)]
    targets = [(torch.rand(3, s, s) > 0.5).float() for s in (14, 28)]
    out = L.pretrain_losses(logits, logits, targets, targets, edge_weight=0.1)
    bce = [torch.nn.functional.binary_cross_entropy_with_logits(x, t) for x, t in zip(logits, targets)]
    assert out["loss_mask"] == pytest.approx(float(sum(bce) / 2), rel=1e-5)
    assert out["loss_edge"] == pytest.approx(0.1 * float(sum(bce) / 2), rel=1e-5)


def test_budget_loss_zero_under_budget_and_grows_above():
    costs = torch.tensor([0.23, 0.52, 0.85, 1.29])
    cheap = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3)
    dear = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 3)
    mid = torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 3)
    assert L.budget_loss(cheap, costs, 0.4) == 0
    assert L.budget_loss(mid, costs, 0.4) == pytest.approx(0.85 / 0.4 - 1)
    assert L.budget_loss(dear, costs, 0.4) > L.budget_loss(mid, costs, 0.4) > 0
    assert L.budget_loss(dear, costs, 2.0) == 0


def test_entropy_lowest_at_uniform():
    uniform = torch.full((5, 4), 0.25)
    assert L.entropy_loss(uniform) == pytest.approx(-math.log(4) / 4)
    torch.manual_seed(0)
    for _ in range(20):
        p = torch.randn(5, 4).mul(3).softmax(dim=1)
        assert L.entropy_loss(p) > L.entropy_loss(uniform)
    onehot = torch.eye(4)[[0, 0, 0]]
    assert L.entropy_loss(onehot) == 0


def test_dynamic_losses_pick_one_resolution_and_train_the_msm():
    torch.manual_seed(0)
    res = (14, 28, 56, 112)
    logits = [torch.randn(6, s, s) for s in res]
    targets = [(torch.rand(6, s, s) > 0.5).float() for s in res]
    msm_logits = torch.randn(6, 4, requires_grad=True)
    out = L.dynamic_losses(logits, logits, targets, targets, msm_logits, edge_weight=0.1, budget_weight=0.4,
                           target_gmacs=0.3, costs_gmacs=[0.23, 0.52, 0.85, 1.29], tau=0.5)
    assert set(out) == {"loss_mask", "loss_edge", "loss_budget", "loss_entropy"}
    per = torch.stack([L.per_roi_bce(x, t) for x, t in zip(logits, targets)], dim=1)
    assert per.min(1).values.mean() <= out["loss_mask"] <= per.max(1).values.mean()
    sum(out.values()).backward()
    assert msm_logits.grad.abs().sum() > 0
    none = L.dynamic_losses(logits, logits, targets, targets, msm_logits, edge_weight=0.1, budget_weight=0.4,
                            target_gmacs=None, costs_gmacs=[0.23, 0.52, 0.85, 1.29], tau=0.5)
    assert "loss_budget" not in none
