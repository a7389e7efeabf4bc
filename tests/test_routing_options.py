"""Routing options of the dynamic phase (signal, coupling, what the switch reads) and the probe helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import one_thread, synthetic_batch, tiny_model  # noqa: F401

from dynamask.engine.routing_probe import mask_iou_top_grid
from dynamask.models import flops
from dynamask.models import mask_losses as L

COSTS = [0.23, 0.52, 0.85, 1.29]


def _inputs(seed: int = 0, res=(14, 28, 56, 112), r: int = 5):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.randn(r, s, s, generator=g).requires_grad_() for s in res]
    edges = [torch.randn(r, s, s, generator=g).requires_grad_() for s in res]
    mt = [(torch.rand(r, s, s, generator=g) > 0.5).float() for s in res]
    et = [(torch.rand(r, s, s, generator=g) > 0.8).float() for s in res]
    msm = torch.randn(r, len(res), generator=g).requires_grad_()
    return masks, edges, mt, et, msm


def _grads(out, tensors):
    return torch.autograd.grad(sum(out.values()), tensors, allow_unused=True)


def test_default_is_the_papers_eq3():
    masks, edges, mt, et, msm = _inputs()
    kw = dict(edge_weight=0.1, budget_weight=0.4, target_gmacs=0.5, costs_gmacs=COSTS, tau=0.5)
    torch.manual_seed(3)
    out = L.dynamic_losses(masks, edges, mt, et, msm, **kw)
    assert list(out) == ["loss_mask", "loss_edge", "loss_entropy", "loss_budget"]  # no new term by default
    g_default = _grads(out, [*masks, *edges, msm])
    # the reference, written out from Eq. 3–7 with the same Gumbel draw
    torch.manual_seed(3)
    y = F.gumbel_softmax(msm, tau=0.5, hard=True, dim=-1)
    lm = torch.stack(
        [F.binary_cross_entropy_with_logits(x, t, reduction="none").mean((1, 2)) for x, t in zip(masks, mt)], 1
    )
    le = torch.stack(
        [F.binary_cross_entropy_with_logits(x, t, reduction="none").mean((1, 2)) for x, t in zip(edges, et)], 1
    )
    p = msm.softmax(1)
    f = p.mean(0)
    expected_c = (p * torch.tensor(COSTS)).sum(1).mean()
    ref = {"loss_mask": (y * lm).sum(1).mean(), "loss_edge": 0.1 * (y * le).sum(1).mean(),
           "loss_entropy": 0.4 * (f * f.log()).mean(), "loss_budget": 0.4 * torch.clamp(expected_c / 0.5 - 1, min=0)}
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    for a, b in zip(g_default, _grads(ref, [*masks, *edges, msm])):
        torch.testing.assert_close(a, b)
    # naming the default explicitly changes nothing
    torch.manual_seed(3)
    explicit = L.dynamic_losses(masks, edges, mt, et, msm, routing_signal="paper", coupled=True, **kw)
    for k in out:
        assert torch.equal(out[k], explicit[k])


def test_decoupled_stages_get_pretrain_gradients_and_switch_gets_detached_losses():
    masks, edges, mt, et, msm = _inputs(1)
    kw = dict(edge_weight=0.1, budget_weight=0.4, target_gmacs=None, costs_gmacs=COSTS, tau=0.5)
    torch.manual_seed(5)
    out = L.dynamic_losses(masks, edges, mt, et, msm, coupled=False, **kw)
    assert set(out) == {"loss_mask", "loss_edge", "loss_route", "loss_entropy"}
    g = _grads(out, [*masks, *edges, msm])
    pre = L.pretrain_losses(masks, edges, mt, et, edge_weight=0.1)
    for a, b in zip(g[:8], _grads(pre, [*masks, *edges])):  # stages: exactly the pretrain supervision
        torch.testing.assert_close(a, b)
    torch.manual_seed(5)
    y = F.gumbel_softmax(msm, tau=0.5, hard=True, dim=-1)
    with torch.no_grad():
        s = torch.stack([L.per_roi_bce(x, t) for x, t in zip(masks, mt)], 1) + 0.1 * torch.stack(
            [L.per_roi_bce(x, t) for x, t in zip(edges, et)], 1)
    ref = (y * s).sum(1).mean() + 0.4 * L.entropy_loss(msm.softmax(1))
    (g_ref,) = torch.autograd.grad(ref, [msm])
    torch.testing.assert_close(g[8], g_ref)


def test_coupled_with_another_signal_trains_the_stages_at_the_chosen_resolution_only():
    masks, edges, mt, et, msm = _inputs(2)
    torch.manual_seed(7)
    out = L.dynamic_losses(masks, edges, mt, et, msm, edge_weight=0.1, budget_weight=0.4, target_gmacs=None,
                           costs_gmacs=COSTS, tau=0.5, routing_signal="grid", coupled=True)
    torch.manual_seed(7)
    y = F.gumbel_softmax(msm.detach(), tau=0.5, hard=True, dim=-1)
    g = torch.autograd.grad(out["loss_mask"], masks)
    for k, gk in enumerate(g):  # RoIs not routed to k get no gradient at k
        unrouted = y[:, k] == 0
        assert torch.all(gk[unrouted] == 0)
        assert torch.any(gk[~unrouted] != 0) or not (~unrouted).any()


def test_grid_boundary_and_iou_signals_by_hand():
    # two resolutions (4, 8); constant logits c_k, so upsampling keeps them; target: left half of the 8x8
    c = [0.5, -1.0]
    masks = [torch.full((1, 4, 4), c[0]), torch.full((1, 8, 8), c[1])]
    top = torch.zeros(1, 8, 8)
    top[:, :, :4] = 1
    mt = [F.interpolate(top[None], size=4, mode="nearest")[0], top]
    grid = L.routing_signal_losses(masks, masks, mt, mt, signal="grid", edge_weight=0.1)
    sp = F.softplus
    for k, ck in enumerate(c):
        ck = torch.tensor(ck)
        assert grid[0, k] == pytest.approx(float(0.5 * sp(-ck) + 0.5 * sp(ck)), rel=1e-5)
    # the outline is column 3 (inside pixels next to the background); the band (half-width 1 at 8 px)
    # is columns 2..4, of which 2/3 are foreground
    band = L.boundary_band(top, 1)
    assert band[0].any(dim=0).tolist() == [False, False, True, True, True, False, False, False]
    boundary = L.routing_signal_losses(masks, masks, mt, mt, signal="boundary", edge_weight=0.1)
    for k, ck in enumerate(c):
        ck = torch.tensor(ck)
        assert boundary[0, k] == pytest.approx(float(2 / 3 * sp(-ck) + 1 / 3 * sp(ck)), rel=1e-5)
    # soft IoU with a constant probability q over 64 pixels, 32 of them foreground:
    # intersection Σ q t = 32 q; union Σ (q + t − q t) = 64 q + 32 − 32 q = 32 + 32 q
    iou = L.routing_signal_losses(masks, masks, mt, mt, signal="iou", edge_weight=0.1)
    for k, ck in enumerate(c):
        q = float(torch.tensor(ck).sigmoid())
        assert iou[0, k] == pytest.approx(1 - 32 * q / (32 + 32 * q), rel=1e-5)
    # an empty target and an all-background prediction: a perfect match
    empty = [torch.full((1, 4, 4), -1e4), torch.full((1, 8, 8), -1e4)]
    zero_t = [torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)]
    assert L.routing_signal_losses(empty, empty, zero_t, zero_t, signal="iou", edge_weight=0.1).tolist() == [[0.0, 0.0]]


def test_bad_routing_options_are_named():
    masks, edges, mt, et, msm = _inputs()
    with pytest.raises(ValueError, match="routing_signal"):
        L.dynamic_losses(masks, edges, mt, et, msm, edge_weight=0.1, budget_weight=0.4, target_gmacs=None,
                         costs_gmacs=COSTS, tau=0.5, routing_signal="edges")
    with pytest.raises(ValueError, match="switch_input"):
        tiny_model(switch_input="p2")
    with pytest.raises(ValueError, match="coupled"):
        tiny_model(coupled="no")


def _switch_input_widths(model, images) -> set[int]:
    """Runs inference; the channel counts the MSM was given (every image must get its masks)."""
    seen = []
    hook = model.roi_heads.msm.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    model.eval()
    with torch.no_grad():
        out = model(images)
    hook.remove()
    assert seen and all("masks" in o for o in out)
    return set(seen)


def test_switch_reading_the_trunk_trains_and_routes_on_the_trunk_output():
    torch.manual_seed(0)
    model = tiny_model(switch_input="trunk", routing_signal="boundary", coupled=False, target_gmacs=0.01)
    heads = model.roi_heads
    assert heads.msm.se.fc1.in_features == heads.mask_head.channels[0] == 32
    images, targets = synthetic_batch()
    model.train()
    model.mask_training = "dynamic"
    losses = model(images, targets)
    assert "loss_route" in losses
    sum(losses.values()).backward()
    assert heads.msm.conv1.weight.grad.abs().sum() > 0
    assert _switch_input_widths(model, images) == {32}  # the trunk's width, not the FPN's 256
    # the switch's cost is counted with its own input width
    assert flops.msm_gmacs(model) < flops.msm_gmacs(tiny_model())


def test_switch_reading_the_coarse_mask_sees_trunk_mask_and_edge_logits():
    from dynamask.models.switch_input import switch_view

    torch.manual_seed(0)
    model = tiny_model(switch_input="mask", target_gmacs=0.01)
    heads, head = model.roi_heads, model.roi_heads.mask_head
    c0, s0 = head.channels[0], head.resolutions[0]
    assert heads.msm.se.fc1.in_features == c0 + 2
    # the view, against the head's own layers run by hand
    x = torch.randn(3, head.in_channels, s0, s0)
    t = head.run_trunk(x)  # the trunk as the model runs it (channels-last on the CPU: same layers, same rounding)
    view = switch_view("mask", head, x)
    assert not view.requires_grad
    torch.testing.assert_close(view[:, :c0], t)
    torch.testing.assert_close(view[:, c0], F.conv2d(t, head.mask_predictors[0].weight,
                                                     head.mask_predictors[0].bias)[:, 0])
    torch.testing.assert_close(view[:, c0 + 1], F.conv2d(t, head.edge_predictors[0].weight,
                                                         head.edge_predictors[0].bias)[:, 0])
    # the two 1×1 predictors are counted beside the MSM's own MACs
    assert flops.msm_macs(model) == flops.msm_macs(heads.msm) + 2 * c0 * s0 * s0
    # it trains (coupled, the paper's signal) and routes on that view at inference
    images, targets = synthetic_batch()
    model.train()
    model.mask_training = "dynamic"
    sum(model(images, targets).values()).backward()
    assert heads.msm.conv1.weight.grad.abs().sum() > 0
    assert _switch_input_widths(model, images) == {c0 + 2}


def test_mask_iou_top_grid_by_hand():
    gt = torch.zeros(3, 4, 4)
    gt[0, :2] = 1  # 8 pixels
    gt[1, :, :1] = 1  # 4 pixels
    probs = [torch.tensor([0.9, 0.1, 0.1])[:, None, None].expand(3, 2, 2),  # all in / empty / empty
             gt.clone()]
    iou = mask_iou_top_grid(probs, gt)
    assert iou[:, 0].tolist() == pytest.approx([8 / 16, 0.0, 1.0])  # empty mask vs empty target: 1
    assert iou[:, 1].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_maskrcnn_head_gmacs_by_hand():
    from dynamask.models.maskrcnn import maskrcnn_resnet_fpn

    m = maskrcnn_resnet_fpn(num_classes=8, depth=18, fpn_channels=32, mask_head_layers=(16, 16, 16, 16),
                            box_representation_size=64, min_size=64, max_size=64)
    by_hand = (32 * 16 * 9 + 3 * 16 * 16 * 9) * 14 * 14 + 16 * 16 * 4 * 14 * 14 + 16 * 8 * 28 * 28
    assert flops.maskrcnn_mask_head_gmacs(m) == pytest.approx(by_hand / 1e9, rel=1e-12)


def test_mask_branch_defaults_are_declared_once():
    """The detector takes the mask branch's defaults from MaskBranchSettings and passes them whole."""
    import dataclasses
    import inspect

    from dynamask.models.detector import DynaMaskRCNN
    from dynamask.models.roi_heads import MASK_DEFAULTS, DynaMaskRoIHeads

    params = inspect.signature(DynaMaskRCNN.__init__).parameters
    for f in dataclasses.fields(MASK_DEFAULTS):
        assert params[f.name].default == getattr(MASK_DEFAULTS, f.name), f.name
    assert inspect.signature(DynaMaskRoIHeads.__init__).parameters["settings"].default == MASK_DEFAULTS
    given = tiny_model(edge_weight=0.3, target_gmacs=0.02, gumbel_tau=0.7, mask_rois_per_image=3,
                       routing_signal="grid", coupled=False).roi_heads
    assert (given.edge_weight, given.target_gmacs, given.gumbel_tau, given.mask_rois_per_image, given.routing_signal,
            given.coupled) == (0.3, 0.02, 0.7, 3, "grid", False)
    heads = tiny_model().roi_heads
    assert (heads.routing_signal, heads.coupled, heads.switch_input) == ("paper", True, "roi")  # the paper's
