"""The RoI heads' public door to the branches' outputs, which the switch fit, the probes and the study use
(``detect_boxes``, ``training_positives``, ``masks_every_resolution``, ``switch_scores``, ``route``): each
checked against the model's own inference or training path."""

import pytest
import torch
from model_helpers import one_thread, synthetic_batch, tiny_model  # noqa: F401

from dynamask.models import mask_handoff


def _trained_enough():
    torch.manual_seed(0)
    model = tiny_model(box_score_thresh=0.0)
    return model.eval()


def _first_stage(model, images):
    il, _ = model.transform(images)
    features = model.backbone(il.tensors)
    proposals, _ = model.rpn(il, features)
    return il, features, proposals


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_detect_boxes_and_masks_every_resolution_match_inference(k):
    """At fixed resolution k the model's own masks (unpasted) are row for row the sigmoid of
    ``masks_every_resolution``'s logits at k on ``detect_boxes``' boxes."""
    model = _trained_enough()
    heads = model.roi_heads
    heads.mask_policy = heads.mask_head.resolutions[k]
    images, _ = synthetic_batch()
    images = [im[:, :64, :64] for im in images]  # 64 px: the transform keeps the frame (min_size 64)
    with torch.no_grad():
        out = model(images, paste_masks=False)
        il, features, proposals = _first_stage(model, images)
        boxes, scores, labels = heads.detect_boxes(features, proposals, il.image_sizes)
        every = heads.masks_every_resolution(features, boxes, il.image_sizes, torch.cat(labels))
    assert sum(b.shape[0] for b in boxes) > 0
    start = 0
    for o, b, s, lab in zip(out, boxes, scores, labels):
        torch.testing.assert_close(o["boxes"], b, rtol=0, atol=0)
        assert torch.equal(o["scores"], s) and torch.equal(o["labels"], lab)
        handoff = o[mask_handoff.HANDOFF_KEY]
        got = handoff.masks[k][handoff.rows]  # every detection routed to k
        want = every.mask_logits[k][start:start + b.shape[0]].sigmoid()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        start += b.shape[0]
    assert [x.shape[-1] for x in every.mask_logits] == list(heads.mask_head.resolutions)
    assert every.trunk.shape[0] == every.roi_features.shape[0] == start


@pytest.mark.usefixtures("one_thread")
def test_masks_every_resolution_on_no_boxes():
    model = _trained_enough()
    images, _ = synthetic_batch()
    with torch.no_grad():
        il, features, _ = _first_stage(model, images)
        every = model.roi_heads.masks_every_resolution(features, [torch.zeros(0, 4)] * 2, il.image_sizes)
        scores = model.roi_heads.switch_scores(features, [torch.zeros(0, 4)] * 2, il.image_sizes)
    assert [tuple(x.shape) for x in every.mask_logits] == [(0, s, s) for s in model.roi_heads.mask_head.resolutions]
    assert every.trunk.shape[0] == 0 and tuple(scores.shape) == (0, 4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cap", [None, 1])
def test_training_positives_are_the_positives_training_uses(cap):
    """``sample_training_positives`` draws what the training forward draws (same seed): the positives' boxes,
    matched ground truth and labels, at most ``cap`` per image."""
    model = tiny_model(mask_rois_per_image=cap).train()
    heads = model.roi_heads
    images, targets = synthetic_batch()
    seen = {}
    real = heads.mask_losses

    def spy(features, proposals, matched_idxs, image_shapes, targets, labels=None):
        seen.update(boxes=proposals, matched=matched_idxs, labels=labels)
        return real(features, proposals, matched_idxs, image_shapes, targets, labels)

    heads.mask_losses = spy
    il, tg = model.transform(images, targets)
    features = model.backbone(il.tensors)
    torch.manual_seed(3)
    proposals, _ = model.rpn(il, features, tg)
    torch.manual_seed(4)
    heads(features, [p.detach() for p in proposals], il.image_sizes, tg)
    torch.manual_seed(4)
    pos = heads.sample_training_positives([p.detach() for p in proposals], tg)
    for a, b in zip(pos.boxes, seen["boxes"]):
        assert torch.equal(a, b)
    for a, b in zip(pos.matched_idxs, seen["matched"]):
        assert torch.equal(a, b)
    assert torch.equal(pos.labels, seen["labels"]) and bool((pos.labels > 0).all())
    if cap is not None:
        assert all(b.shape[0] <= cap for b in pos.boxes)
    assert sum(b.shape[0] for b in pos.boxes) > 0


@pytest.mark.usefixtures("one_thread")
def test_route_decides_once_and_scores_are_unpriced():
    model = _trained_enough()
    heads = model.roi_heads
    heads.msm.set_cost_penalty(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    images, _ = synthetic_batch()
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 40.0]]), torch.tensor([[10.0, 20.0, 60.0, 60.0], [0.0, 0.0, 9.0, 5.0]])]
    with torch.no_grad():
        il, features, _ = _first_stage(model, images)
        routed = heads.route(features, boxes, il.image_sizes)
        scores = heads.switch_scores(features, boxes, il.image_sizes)
    assert routed.trunk is None  # the default switch reads the RoI feature, not the trunk
    assert torch.equal(routed.choice, (scores - heads.msm.cost_penalty).argmax(dim=1))
