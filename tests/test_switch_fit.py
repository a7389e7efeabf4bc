"""The switch fit (dynamask.engine.switch_fit) and the MSM's cost penalty."""

from __future__ import annotations

import os

import pytest
import torch
from model_helpers import synthetic_batch, tiny_model

from dynamask.engine import switch_fit
from dynamask.engine.routing_probe import mask_iou_top_grid
from dynamask.models.flops import mask_head_gmacs
from dynamask.models.msm import MaskSwitchModule


def small_msm(k: int = 3) -> MaskSwitchModule:
    return MaskSwitchModule(in_channels=8, in_size=6, conv_channels=(8, 4), hidden=16, num_resolutions=k,
                            se_reduction=4)


def test_cost_penalty_defaults_to_zero_and_is_subtracted():
    torch.manual_seed(0)
    msm = small_msm().eval()
    x = torch.randn(5, 8, 6, 6)
    assert torch.equal(msm(x), msm.raw(x))
    msm.set_cost_penalty(torch.tensor([0.0, 1.0, 3.0]))
    assert torch.allclose(msm(x), msm.raw(x) - torch.tensor([0.0, 1.0, 3.0]))
    with pytest.raises(ValueError, match="cost_penalty must have shape"):
        msm.set_cost_penalty(torch.zeros(4))


def test_a_state_dict_from_before_the_cost_penalty_loads_with_zeros():
    torch.manual_seed(0)
    old = small_msm()
    state = old.state_dict()
    del state["cost_penalty"]
    state._metadata[""]["version"] = 1  # what an MSM of version 1 wrote
    new = small_msm()
    new.set_cost_penalty(torch.ones(3))
    new.load_state_dict(state, strict=True)
    assert torch.equal(new.cost_penalty, torch.zeros(3))
    assert torch.equal(new.heads[1].fc2.weight, old.heads[1].fc2.weight)
    # a current state dict keeps its penalty
    old.set_cost_penalty(torch.tensor([0.0, 2.0, 5.0]))
    new.load_state_dict(old.state_dict(), strict=True)
    assert torch.equal(new.cost_penalty, torch.tensor([0.0, 2.0, 5.0]))


def constant_msm(values: list[float]) -> MaskSwitchModule:
    """An MSM whose raw output is ``values`` for every RoI (each head's last layer's weights zero, its bias the
    values)."""
    msm = small_msm(len(values)).eval()
    with torch.no_grad():
        for h in msm.heads:
            h.fc2.weight.zero_()
            h.fc2.bias.copy_(torch.tensor(values))
    return msm


def test_choose_weighs_by_confidence_only_when_fitted_so_and_only_moves_a_priced_choice():
    x = torch.randn(3, 8, 6, 6)
    msm = constant_msm([0.5, 0.8, 1.0])
    conf = torch.tensor([1.0, 0.5, 0.1])
    # no price: the argmax of the outputs, whatever the weights (a Gumbel-trained switch chooses as before)
    assert msm.choose(x).tolist() == [2, 2, 2]
    msm.set_confidence_weighted(True)
    assert msm.choose(x, conf).tolist() == [2, 2, 2]
    # priced: 0.5 - 0, 0.8 - 0.2, 1.0 - 0.45 -> index 1 for a sure detection; weighted by 0.5: 0.25, 0.2, 0.05 -> 0;
    # by 0.1: 0.05, -0.12, -0.35 -> 0
    msm.set_cost_penalty(torch.tensor([0.0, 0.2, 0.45]))
    assert msm.choose(x, conf).tolist() == [1, 0, 0]
    assert msm.choose(x).tolist() == [1, 1, 1]  # no scores (ground-truth boxes): weight 1
    msm.set_confidence_weighted(False)
    assert msm.choose(x, conf).tolist() == [1, 1, 1]  # the flag off: the scores are not read
    assert torch.equal(msm.choose(x), (msm(x)).argmax(dim=1))
    with pytest.raises(ValueError, match=r"confidence must have shape \[3\]"):
        msm.choose(x, torch.ones(2))


def test_a_state_dict_from_before_the_confidence_flag_loads_unweighted():
    torch.manual_seed(0)
    old = small_msm()
    old.set_cost_penalty(torch.tensor([0.0, 2.0, 5.0]))
    state = old.state_dict()
    del state["confidence_weighted"]
    state._metadata[""]["version"] = 2  # what an MSM of version 2 (priced, no flag) wrote
    new = small_msm()
    new.set_confidence_weighted(True)
    new.load_state_dict(state, strict=True)
    assert float(new.confidence_weighted) == 0.0  # it chooses as it was priced to
    assert torch.equal(new.cost_penalty, torch.tensor([0.0, 2.0, 5.0]))


def test_reset_parameters_gives_fresh_weights_and_clears_the_penalty():
    torch.manual_seed(0)
    msm = small_msm()
    msm.set_cost_penalty(torch.ones(3))
    msm.set_confidence_weighted(True)
    with torch.no_grad():
        msm.conv1.weight.fill_(7.0)
        for h in msm.heads:
            h.fc1.weight.fill_(7.0)
    msm.reset_parameters()
    assert not torch.any(msm.conv1.weight == 7.0)
    for h in msm.heads:
        assert not torch.any(h.fc1.weight == 7.0)
        assert torch.equal(h.fc2.bias, torch.zeros(3))
    # each head its own draw: the members of an average must differ
    assert not torch.equal(msm.heads[0].fc1.weight, msm.heads[1].fc1.weight)
    assert torch.equal(msm.cost_penalty, torch.zeros(3))
    assert float(msm.confidence_weighted) == 0.0


def test_the_output_is_the_mean_of_the_heads():
    torch.manual_seed(0)
    msm = small_msm().eval()
    x = torch.randn(5, 8, 6, 6)
    shared = torch.relu(msm.conv1(msm.se(x)))
    by_hand = torch.stack([h.fc2(torch.relu(h.fc1(torch.relu(h.conv2(shared)).flatten(1)))) for h in msm.heads])
    assert msm.num_heads == 3 and msm.raw_heads(x).shape == (3, 5, 3)
    assert torch.allclose(msm.raw_heads(x), by_hand, atol=1e-6)
    assert torch.allclose(msm.raw(x), by_hand.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        MaskSwitchModule(num_heads=0)


def test_a_one_head_state_dict_loads_into_every_head_and_chooses_as_before():
    """An MSM saved before the heads (version 3: ``conv2``, ``fc1``, ``fc2`` at the top) loads into a three-head
    MSM with each head a copy, so its outputs are the one head's; so does one whose metadata was lost."""
    torch.manual_seed(0)
    one = small_msm()
    one_heads = MaskSwitchModule(in_channels=8, in_size=6, conv_channels=(8, 4), hidden=16, num_resolutions=3,
                                 se_reduction=4, num_heads=1)
    one_heads.set_cost_penalty(torch.tensor([0.0, 0.1, 0.3]))
    state = one_heads.state_dict()
    old = type(state)((k.replace("heads.0.", ""), v) for k, v in state.items())  # what version 3 wrote
    old._metadata = {"": {"version": 3}}
    x = torch.randn(4, 8, 6, 6)
    for saved in (old, type(state)(old)):  # the second has no metadata
        one.load_state_dict(saved, strict=True)
        for h in one.heads:
            assert torch.equal(h.fc1.weight, state["heads.0.fc1.weight"])
        assert torch.allclose(one.eval()(x), one_heads.eval()(x), atol=1e-6)


def test_calibrate_mu_on_a_hand_made_case():
    costs = torch.tensor([1.0, 2.0, 4.0])
    # IoU scores: row 0 gains 0.3 from the last resolution, row 1 gains 0.05, row 2 nothing
    scores = torch.tensor([[0.5, 0.6, 0.8], [0.70, 0.72, 0.75], [0.9, 0.9, 0.9]])
    assert switch_fit.calibrate_mu(scores, costs, 4.0) == 0.0  # unconstrained: every row at its best
    # a budget of 2 per row: buying row 0's gain (0.3 for +3 cost) is worth it; μ is row 1's price of its first
    # step (0.02 for +1 cost), the smallest at which row 1 stays at resolution 0
    mu = switch_fit.calibrate_mu(scores, costs, 2.0)
    choice = (scores - mu * costs).argmax(dim=1)
    assert choice.tolist() == [2, 0, 0] and float(costs[choice].mean()) <= 2.0
    assert mu == pytest.approx(0.02, abs=1e-6)
    assert float(costs[(scores - (mu - 1e-4) * costs).argmax(dim=1)].mean()) > 2.0
    assert switch_fit.calibrate_mu(torch.zeros(0, 3), costs, 1.0) == 0.0
    with pytest.raises(ValueError, match="below the cheapest"):
        switch_fit.calibrate_mu(scores, costs, 0.5)


def test_calibrate_mu_with_confidence_weights_on_a_hand_made_case():
    costs = torch.tensor([1.0, 2.0, 4.0])
    scores = torch.tensor([[0.5, 0.6, 0.8], [0.70, 0.72, 0.75], [0.9, 0.9, 0.9]])
    # row 0 a low-score detection (0.1): its gain weighs 0.03 for +3 cost, row 1's 0.05 for +3 cost; with a budget
    # of 2 per row one row may take resolution 2, and it is row 1: μ is where row 0's weighted step from
    # resolution 0 to 2 (0.03 for +3) stops paying, 0.01
    w = torch.tensor([0.1, 1.0, 1.0])
    mu = switch_fit.calibrate_mu(scores, costs, 2.0, w)
    choice = (scores * w[:, None] - mu * costs).argmax(dim=1)
    assert choice.tolist() == [0, 2, 0] and float(costs[choice].mean()) <= 2.0
    assert mu == pytest.approx(0.01, abs=1e-6)
    # all weights 1 is the unweighted rule
    assert switch_fit.calibrate_mu(scores, costs, 2.0, torch.ones(3)) == switch_fit.calibrate_mu(scores, costs, 2.0)
    with pytest.raises(ValueError, match=r"weights must have shape \[3\]"):
        switch_fit.calibrate_mu(scores, costs, 2.0, torch.ones(2))


def _separable_data(n: int, seed: int) -> switch_fit.SwitchData:
    """Half the RoIs (channel 0 bright) gain 0.4 IoU from resolution 2, the rest lose 0.1 there."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, 6, 6, generator=g) * 0.3
    fine = torch.rand(n, generator=g) < 0.5
    x[fine, 0] += 2.0
    iou = torch.full((n, 3), 0.5)
    iou[:, 1] = 0.52
    iou[:, 2] = torch.where(fine, torch.tensor(0.9), torch.tensor(0.4))
    return switch_fit.SwitchData(x.half(), iou)


def test_fit_switch_learns_which_rois_gain_and_meets_the_budget():
    train, test = _separable_data(256, 0), _separable_data(128, 1)
    costs = [1.0, 2.0, 4.0]
    msm = small_msm()
    rep = switch_fit.fit_switch(msm, train, costs=costs, target_gmacs=None, epochs=8, lr=3e-3, seed=0,
                                progress=False)
    assert rep.mu == 0.0 and rep.rois == 256 and len(rep.losses) == 8 and rep.losses[-1] < rep.losses[0]
    choice = msm(test.inputs.float()).argmax(dim=1)
    best = test.iou.argmax(dim=1)
    assert (choice == best).float().mean() >= 0.95
    # a budget that pays for resolution 2 on at most a quarter of the RoIs: the price keeps the mean training
    # cost within it, and the RoIs it sends to 2 are ones that gain there
    rep = switch_fit.fit_switch(msm, train, costs=costs, target_gmacs=1.75, epochs=8, lr=3e-3, seed=0,
                                progress=False)
    assert rep.mu > 0 and rep.mean_gmacs <= 1.75 and rep.shares[2] > 0.1
    assert torch.allclose(msm.cost_penalty, rep.mu * torch.tensor(costs))
    choice = msm(test.inputs.float()).argmax(dim=1)
    assert (best[choice == 2] == 2).float().mean() >= 0.95


def test_fit_switch_keeps_the_mean_of_the_last_epochs_weights():
    """The kept weights are the mean of those after each averaged epoch. The same seed gives the same epochs
    (one generator draws the order), so the weights after epochs 2 and 3 are those of 2- and 3-epoch fits
    that keep their last epoch's weights; 1 keeps the last epoch's, the default averages the last half."""
    data = _separable_data(64, 0)
    costs = [1.0, 2.0, 4.0]

    def fitted(epochs, average):
        msm = small_msm()
        rep = switch_fit.fit_switch(msm, data, costs=costs, target_gmacs=None, epochs=epochs, lr=3e-3, seed=0,
                                    average_epochs=average, progress=False)
        return {k: v.double() for k, v in msm.state_dict().items() if k != "cost_penalty"}, rep

    after2, _ = fitted(2, 1)
    after3, rep = fitted(3, 1)
    assert rep.averaged_epochs == 1 and any(not torch.equal(after2[k], after3[k]) for k in after2)
    mean, rep = fitted(3, 2)
    assert rep.averaged_epochs == 2
    for k in mean:
        torch.testing.assert_close(mean[k], (after2[k] + after3[k]) / 2, rtol=1e-5, atol=1e-6)
    after1, _ = fitted(1, 1)
    default, rep = fitted(3, None)
    assert rep.averaged_epochs == 2 and all(torch.equal(default[k], mean[k]) for k in mean)
    all3, rep = fitted(3, 3)
    for k in all3:
        torch.testing.assert_close(all3[k], (after1[k] + after2[k] + after3[k]) / 3, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="average_epochs"):
        fitted(3, 4)
    with pytest.raises(ValueError, match="average_epochs"):
        fitted(3, 0)
    # the model-level fit refuses it before collecting anything (no dataset is ever read)
    with pytest.raises(ValueError, match="average_epochs"):
        switch_fit.fit_model_switch(tiny_model(num_classes=3), None, target_gmacs=None, epochs=2, average_epochs=3,
                                    progress=False)


def test_fit_switch_refuses_bad_input_before_training():
    msm = small_msm()
    data = _separable_data(16, 0)
    before = msm.conv1.weight.clone()
    with pytest.raises(ValueError, match="below the cheapest"):
        switch_fit.fit_switch(msm, data, costs=[1.0, 2.0, 4.0], target_gmacs=0.5, progress=False)
    with pytest.raises(ValueError, match="3 resolutions"):
        switch_fit.fit_switch(msm, data, costs=[1.0, 2.0], target_gmacs=None, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        switch_fit.fit_switch(msm, data, costs=[1.0, 2.0, 4.0], target_gmacs=None, epochs=0, progress=False)
    assert torch.equal(msm.conv1.weight, before)
    with pytest.raises(ValueError, match="inputs but"):
        switch_fit.SwitchData(torch.zeros(3, 8, 6, 6), torch.zeros(2, 3))


def test_match_detections_keeps_those_on_an_object_then_the_objects():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    dets = torch.tensor([[0.0, 0, 10, 9],  # IoU 0.9 with object 0
                         [20, 20, 30, 25],  # 0.5 with object 1: at the threshold, kept
                         [0, 0, 10, 4],  # 0.4: dropped
                         [50, 50, 60, 60],  # on nothing
                         [19, 19, 30, 30]])  # 100/121 with object 1
    keep, matched = switch_fit.match_detections(dets, gt, 0.5)
    assert keep.tolist() == [0, 1, 4] and matched.tolist() == [0, 1, 1, 0, 1]
    keep, matched = switch_fit.match_detections(dets, gt, 0.95)
    assert keep.tolist() == [] and matched.tolist() == [0, 1]
    keep, matched = switch_fit.match_detections(dets[:0], gt, 0.5)  # no detection: the objects alone
    assert keep.tolist() == [] and matched.tolist() == [0, 1]
    keep, matched = switch_fit.match_detections(dets, gt[:0], 0.5)  # no object: nothing
    assert keep.tolist() == [] and matched.tolist() == []


def test_detected_head_outputs_runs_the_head_on_the_detections_on_objects_and_the_objects(monkeypatch):
    torch.manual_seed(0)
    model = tiny_model().eval()
    images, targets = synthetic_batch()
    _, tg = model.transform(images, targets)  # eval: a fixed resize, the frame the detections are in
    g0, g1 = tg[0]["boxes"], tg[1]["boxes"]
    far = torch.tensor([[0.0, 0, 2, 2]])
    # image 0: a copy of object 1's box with its label, one of object 0's with another label, one on nothing;
    # image 1: nothing detected
    fake = ([torch.cat([g0[1:2], g0[0:1], far]), g1[:0]], [torch.tensor([0.9, 0.3, 0.8]), torch.zeros(0)],
            [torch.tensor([2, 2, 1]), torch.zeros(0, dtype=torch.int64)])
    heads = model.roi_heads
    monkeypatch.setattr(heads, "detect_boxes", lambda *a, **k: fake)
    out = switch_fit.detected_head_outputs(model, images, targets)
    assert out is not None
    # rows: image 0's two kept detections, its two objects, then image 1's object
    assert out.roi_features.shape[0] == 5
    for det_row, obj_row in ((0, 3), (1, 2)):  # a detection on an object's exact box pools what the object does
        assert torch.equal(out.roi_features[det_row], out.roi_features[obj_row])
        for k in range(len(out.mask_targets)):
            assert torch.equal(out.mask_targets[k][det_row], out.mask_targets[k][obj_row])
    # the class-specific head reads each row's label: the copy of object 1 (same label) matches its row, the
    # relabelled copy of object 0 need not
    assert torch.equal(out.mask_logits[-1][0], out.mask_logits[-1][3])
    # the objects' own rows: as the head on the ground-truth boxes alone
    ref = heads.masks_every_resolution(model.backbone(model.transform(images)[0].tensors), [g0, g1],
                                       model.transform(images)[0].image_sizes, torch.cat([t["labels"] for t in tg]))
    assert torch.allclose(out.roi_features[2:], ref.roi_features, atol=1e-6)
    assert torch.allclose(out.mask_logits[0][2:], ref.mask_logits[0], atol=1e-5)
    # no object anywhere: nothing to learn from
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 64, 80, dtype=torch.uint8)} for _ in images]
    assert switch_fit.detected_head_outputs(model, images, empty) is None


def test_collect_keeps_the_switch_input_and_each_resolutions_iou():
    torch.manual_seed(0)
    model = tiny_model().eval()
    images, targets = synthetic_batch()
    torch.manual_seed(5)
    out = switch_fit.frozen_head_outputs(model, images, targets)
    torch.manual_seed(5)
    data = switch_fit.collect(model, [(images, targets)], progress=False)
    assert out is not None and data.inputs.shape == out.roi_features.shape
    assert torch.equal(data.inputs, out.roi_features.half())
    # the detections on objects instead, on request
    det = switch_fit.detected_head_outputs(model, images, targets)
    det_data = switch_fit.collect(model, [(images, targets)], progress=False, on_detections=True)
    assert det is not None and torch.equal(det_data.inputs, det.roi_features.half())
    assert torch.equal(det_data.iou, mask_iou_top_grid([x.sigmoid() for x in det.mask_logits],
                                                       det.mask_targets[-1]).float())
    # the IoU of each resolution, by hand: upsample, threshold at 0.5, count on the finest grid
    top = out.mask_targets[-1] > 0.5
    size = top.shape[-1]
    for k, logits in enumerate(out.mask_logits):
        up = torch.nn.functional.interpolate(logits.sigmoid()[:, None], size=(size, size), mode="bilinear",
                                             align_corners=False)[:, 0] >= 0.5
        inter = (up & top).flatten(1).sum(1).float()
        union = (up | top).flatten(1).sum(1).float()
        want = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        assert torch.allclose(data.iou[:, k], want, atol=1e-6)
    assert torch.equal(data.iou, mask_iou_top_grid([x.sigmoid() for x in out.mask_logits],
                                                   out.mask_targets[-1]).float())
    with pytest.raises(ValueError, match="no positive RoI"):
        empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 64, 80, dtype=torch.uint8)} for _ in images]
        switch_fit.collect(model, [(images, empty)], progress=False)
    empty_ok = switch_fit.collect(model, [(images, empty)], progress=False, allow_empty=True)
    assert empty_ok.inputs.shape == (0, *data.inputs.shape[1:]) and empty_ok.inputs.dtype == torch.float16
    assert empty_ok.iou.shape == (0, data.iou.shape[1])
    # a cap per batch keeps a subset of the rows, in their order, the same for the same seed
    n = data.inputs.shape[0]
    assert n > 2
    capped = []
    for _ in range(2):
        torch.manual_seed(5)
        capped.append(switch_fit.collect(model, [(images, targets)], progress=False, max_rois_per_batch=2, seed=1))
    assert capped[0].inputs.shape[0] == 2 and torch.equal(capped[0].inputs, capped[1].inputs)
    rows = [next(i for i in range(n) if torch.equal(data.inputs[i], x)) for x in capped[0].inputs]
    assert rows == sorted(rows) and len(set(rows)) == 2
    assert torch.equal(capped[0].iou, data.iou[rows])
    with pytest.raises(ValueError, match="max_rois_per_batch"):
        switch_fit.collect(model, [(images, targets)], progress=False, max_rois_per_batch=0)


def test_a_fitted_model_routes_by_its_priced_switch_and_the_checkpoint_keeps_the_price(tmp_path):
    from model_helpers import TINY

    from dynamask.data import CocoDetection
    from dynamask.data.shapes import generate, split_paths
    from dynamask.engine.checkpoint import make_arch, model_from_checkpoint, save_checkpoint

    generate(str(tmp_path / "data"), train=4, val=1, size=64, seed=0, max_objects=2)
    train = CocoDetection(*split_paths(str(tmp_path / "data"), "train"))
    torch.manual_seed(0)
    kw = {**TINY, "num_classes": 8}
    model = tiny_model(num_classes=8)
    costs = list(mask_head_gmacs(model.roi_heads.mask_head).values())
    target = (costs[0] + costs[1]) / 2
    rep = switch_fit.fit_model_switch(model, train, target_gmacs=target, num_batches=3, batch_size=2, epochs=2,
                                      calibration_images=4, progress=False)
    assert rep.rois > 0 and rep.calibrated_on == "detections" and rep.calibration_rois > 0
    assert torch.allclose(model.roi_heads.msm.cost_penalty, rep.mu * torch.tensor(costs))
    # the price meets the budget on the detections of those images, and is the smallest that does
    # (the same batches as the fit's calibration: another batching could round a detection in or out)
    images = [b[0] for b in switch_fit.sample_batches(train, batch_size=2, num_batches=2, seed=1)]
    penalty = model.roi_heads.msm.cost_penalty.clone()
    dets = switch_fit.detection_scores(model, images, progress=False)
    assert torch.equal(model.roi_heads.msm.cost_penalty, penalty)  # restored
    cost_t = torch.tensor(costs)
    assert dets.raw.shape[0] == dets.confidence.shape[0] == rep.calibration_rois
    assert rep.confidence_weighted and float(model.roi_heads.msm.confidence_weighted) == 1.0
    assert bool(((dets.confidence > 0) & (dets.confidence <= 1)).all())
    # the price is set on the choice the switch makes at inference: each detection's outputs times its score
    weighted = dets.raw * dets.confidence[:, None]
    assert float(cost_t[(weighted - rep.mu * cost_t).argmax(1)].mean()) <= target + 1e-12
    if rep.mu > 0:
        assert float(cost_t[(weighted - 0.999 * rep.mu * cost_t).argmax(1)].mean()) > target
    path = save_checkpoint(str(tmp_path / "fit.pth"), arch=make_arch("dynamask_resnet_fpn", **kw),
                           label_map={i: (i, str(i)) for i in range(1, 8)}, model=model)
    loaded, _ = model_from_checkpoint(path)
    assert torch.equal(loaded.roi_heads.msm.cost_penalty, model.roi_heads.msm.cost_penalty)
    assert float(loaded.roi_heads.msm.confidence_weighted) == 1.0  # the checkpoint keeps the rule too
    loaded.eval()
    images, _ = synthetic_batch()
    with torch.no_grad():
        il, _ = loaded.transform(images)
        feats = loaded.backbone(il.tensors)
        boxes = [torch.tensor([[4.0, 4.0, 40.0, 40.0], [10.0, 20.0, 60.0, 60.0]])] * 2
        conf = [torch.tensor([0.9, 0.05]), torch.tensor([0.3, 1.0])]
        routed = loaded.roi_heads.route(feats, boxes, il.image_sizes)
        routed_conf = loaded.roi_heads.route(feats, boxes, il.image_sizes, conf)
        raw = loaded.roi_heads.msm.raw(routed.pooled.features)
        pen = loaded.roi_heads.msm.cost_penalty
        scores = loaded.roi_heads.switch_scores(feats, boxes, il.image_sizes)
    torch.testing.assert_close(scores, raw, rtol=0, atol=0)
    assert torch.equal(routed.choice, (raw - pen).argmax(dim=1))  # no scores: sure boxes, weight 1
    assert torch.equal(routed_conf.choice, (raw * torch.cat(conf)[:, None] - pen).argmax(dim=1))


def test_cli_fit_switch_writes_a_fitted_checkpoint_and_refuses_bad_input(tmp_path, capsys):
    from model_helpers import TINY

    from dynamask.cli import main
    from dynamask.data.shapes import generate
    from dynamask.engine.checkpoint import load_checkpoint, make_arch, save_checkpoint

    data = str(tmp_path / "data")
    generate(data, train=4, val=1, size=64, seed=0)
    torch.manual_seed(0)
    kw = {**TINY, "num_classes": 8}
    model = tiny_model(num_classes=8)
    src = save_checkpoint(str(tmp_path / "last.pth"), arch=make_arch("dynamask_resnet_fpn", **kw),
                          label_map={i: (i, n) for i, n in enumerate(
                              ("ellipse", "rectangle", "triangle", "star", "gear", "ring", "blob"), start=1)},
                          model=model, iteration=7)
    costs = mask_head_gmacs(model.roi_heads.mask_head)
    out = str(tmp_path / "fitted.pth")
    # refused before any work: same path, a budget below the cheapest resolution, an unknown resolution
    assert main(["fit-switch", src, "--data", data, "--out", src, "--budget-at", "14"]) == 1
    assert "is the input checkpoint" in capsys.readouterr().err
    assert main(["fit-switch", src, "--data", data, "--out", out, "--target-gmacs", "1e-9"]) == 1
    assert "below the cheapest" in capsys.readouterr().err
    assert main(["fit-switch", src, "--data", data, "--out", out, "--budget-at", "13"]) == 1
    assert "resolutions are" in capsys.readouterr().err
    assert main(["fit-switch", src, "--data", data, "--out", out, "--budget-at", "14", "--epochs", "3",
                 "--average-epochs", "4"]) == 1
    assert "exceeds --epochs" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert main(["fit-switch", src, "--data", data, "--out", out, "--budget-at", "14", "--batches", "2",
                 "--epochs", "1", "--no-progress"]) == 0
    assert "price" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    fit = ckpt["extra"]["switch_fit"]
    assert ckpt["iteration"] == 7 and fit["target_gmacs"] == pytest.approx(costs[14]) and fit["rois"] > 0
    assert fit["averaged_epochs"] == 1
    assert torch.allclose(ckpt["model"]["roi_heads.msm.cost_penalty"], fit["mu"] * torch.tensor(list(costs.values())))
    assert fit["confidence_weighted"] is True and float(ckpt["model"]["roi_heads.msm.confidence_weighted"]) == 1.0
    blind = str(tmp_path / "blind.pth")
    assert main(["fit-switch", src, "--data", data, "--out", blind, "--budget-at", "14", "--batches", "2",
                 "--epochs", "1", "--no-progress", "--no-confidence-weighting"]) == 0
    assert "weighted by its confidence" not in capsys.readouterr().out
    assert float(load_checkpoint(blind)["model"]["roi_heads.msm.confidence_weighted"]) == 0.0
    # the stages are the input's
    before = load_checkpoint(src)["model"]
    for k, v in before.items():
        if not k.startswith("roi_heads.msm."):
            assert torch.equal(ckpt["model"][k], v), k


def test_every_entry_point_takes_the_fit_defaults_from_one_place(monkeypatch):
    """``dynamask train``, ``dynamask fit-switch``, the library call and the accuracy study fit on the same number of
    batches, epochs and calibration images as ``switch_fit_defaults`` holds (it fails if one of them differs)."""
    import dataclasses
    import inspect
    import sys

    from dynamask.cli import build_parser
    from dynamask.engine import switch_fit_defaults as defaults
    from dynamask.engine.train_config import TrainConfig

    expected = (defaults.BATCHES, defaults.EPOCHS, defaults.CALIBRATION_IMAGES)
    argv = ["fit-switch", "run/last.pth", "--data", "d", "--target-gmacs", "0.1", "--out", "o.pth"]
    lib = inspect.signature(switch_fit.fit_model_switch).parameters
    assert (lib["num_batches"].default, lib["epochs"].default, lib["calibration_images"].default) == expected
    assert inspect.signature(switch_fit.fit_switch).parameters["epochs"].default == defaults.EPOCHS
    field = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert (field["switch_fit_batches"], field["switch_fit_epochs"], field["switch_fit_calibration_images"]) == expected
    args = build_parser().parse_args(argv)
    assert (args.batches, args.epochs, args.calibration_images) == expected
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.accuracy.config import FitPlan

    plan = FitPlan()
    assert (plan.batches, plan.epochs, plan.calibration_images) == expected
    # the command line reads the default when it builds its parser, not a copy of it
    monkeypatch.setattr(defaults, "BATCHES", 5400)
    args = build_parser().parse_args(argv)
    assert args.batches == 5400
