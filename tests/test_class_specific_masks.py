"""Class-specific mask predictors (``class_specific_masks=True``): each RoI's mask is its label's channel,
at every resolution, in training, in the dispatcher, at inference and in the switch's ``mask`` view."""

import pytest
import torch
import torch.nn.functional as F
from model_helpers import one_thread, synthetic_batch, tiny_model  # noqa: F401  (one_thread: autouse)

from dynamask import ops
from dynamask.engine.routing_probe import head_outputs
from dynamask.models import DynaMaskHead
from dynamask.models.flops import mask_head_macs, switch_input_macs
from dynamask.models.switch_input import switch_channels, switch_view

C = 5  # classes, background included


def _features(size=64, c=32):
    return [torch.randn(1, c, size // s, size // s) for s in (4, 8, 16, 32)], [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _rois(r, size=64):
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(r, 2, generator=g) * size * 0.6
    wh = torch.rand(r, 2, generator=g) * size * 0.4 + 4
    return torch.cat([torch.zeros(r, 1), xy, xy + wh], dim=1)


def _head(classes=C):
    torch.manual_seed(0)
    head = DynaMaskHead(in_channels=32, trunk_channels=16, stage_channels=(8, 8, 8), roi_size=7, mask_classes=classes)
    for p in head.mask_predictors:  # the default init (std 1e-3) would make every class look alike
        torch.nn.init.normal_(p.weight)
        torch.nn.init.normal_(p.bias)
    return head.eval()


def test_training_path_picks_each_rois_label_channel():
    head = _head()
    feats, scales = _features()
    rois, x = _rois(6), torch.randn(6, 32, 7, 7)
    labels = torch.tensor([1, 4, 0, 2, 4, 3])
    with torch.no_grad():
        masks, edges = head.forward_train(x, feats, scales, rois, labels=labels)
        outs = head.stage_features(x, feats, scales, rois, [6] * 4)
    for k, (m, o) in enumerate(zip(masks, outs)):
        p = head.mask_predictors[k]
        # independent: one 1×1 conv per RoI with only its label's filter
        want = torch.stack([F.conv2d(o[i:i + 1], p.weight[c:c + 1], p.bias[c:c + 1])[0, 0]
                            for i, c in enumerate(labels.tolist())])
        torch.testing.assert_close(m, want, rtol=1e-5, atol=1e-5)
        assert edges[k].shape == m.shape  # edge predictors stay class-agnostic
    # another label gives another mask: the channel really is chosen
    with torch.no_grad():
        other, _ = head.forward_train(x, feats, scales, rois, labels=(labels + 1) % C)
    assert not torch.allclose(other[3], masks[3])


def test_dispatched_matches_training_path_with_permuted_labels():
    head = _head()
    feats, scales = _features()
    rois, x = _rois(7), torch.randn(7, 32, 7, 7)
    labels = torch.tensor([1, 2, 3, 4, 1, 2, 3])
    choice = torch.tensor([3, 0, 1, 2, 0, 3, 1])
    perm, counts = ops.group_by_resolution(choice, 4)
    with torch.no_grad():
        out = head.forward_dispatched(x[perm], feats, scales, rois[perm], counts.tolist(), labels=labels[perm])
        full, _ = head.forward_train(x[perm], feats, scales, rois[perm], labels=labels[perm])
    reach = [int((choice >= k).sum()) for k in range(4)] + [0]
    for k in range(4):
        torch.testing.assert_close(out[k], full[k][reach[k + 1]:reach[k]], rtol=1e-4, atol=1e-5)


def test_missing_or_bad_labels_are_refused_before_any_work():
    head = _head()
    feats, scales = _features()
    calls = []
    hook = head.trunk.register_forward_pre_hook(lambda m, i: calls.append(1))
    with pytest.raises(ValueError, match="class-specific"):
        head.forward_train(torch.randn(2, 32, 7, 7), feats, scales, _rois(2))
    with pytest.raises(ValueError, match=r"labels must be \[2\]"):
        head.forward_dispatched(torch.randn(2, 32, 7, 7), feats, scales, _rois(2), [2, 0, 0, 0],
                                labels=torch.tensor([1, 2, 3]))
    hook.remove()
    assert not calls
    with pytest.raises(ValueError, match="mask_classes"):
        DynaMaskHead(in_channels=32, mask_classes=0)


def test_flops_count_every_class_channel():
    agnostic, specific = _head(1), _head(C)
    res, chans = specific.resolutions, specific.channels
    extra = [(C - 1) * c * s * s for c, s in zip(chans, res)]
    assert [b - a for a, b in zip(mask_head_macs(agnostic), mask_head_macs(specific))] == extra
    # the switch's "mask" view: every class channel and the edge channel, counted
    assert switch_input_macs("mask", specific) - switch_input_macs("mask", agnostic) == (C - 1) * chans[0] * res[0] ** 2
    view = switch_view("mask", specific, torch.randn(3, 32, 7, 7))
    assert view.shape[1] == switch_channels("mask", fpn_channels=32, trunk_channels=16, mask_classes=C) == 16 + C + 1


def test_model_trains_only_the_labels_channels_and_predicts_with_them():
    torch.manual_seed(0)
    model = tiny_model(num_classes=4, class_specific_masks=True, switch_input="mask", box_score_thresh=0.0)
    images, targets = synthetic_batch()  # labels 1 and 2 only
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    for p in model.roi_heads.mask_head.mask_predictors:
        assert p.weight.shape[0] == 4
        g = p.weight.grad.flatten(1).abs().sum(1)
        # positives are matched to labels 1 and 2: the background and class-3 filters get no gradient
        assert g[0] == 0 and g[3] == 0 and g[1] > 0 and g[2] > 0
    model.eval()
    model.roi_heads.mask_policy = 28
    with torch.no_grad():
        out = model(images[:1])[0]
        il, _ = model.transform(images[:1])
        assert il.image_sizes[0] == (64, 80)  # no resize: boxes are in the input frame as they come out
        feats = model.backbone(il.tensors)
        probs, _ = head_outputs(model, feats, [out["boxes"]], il.image_sizes, {}, [out["labels"]])
        other, _ = head_outputs(model, feats, [out["boxes"]], il.image_sizes, {}, [out["labels"] % 3 + 1])
    n = out["labels"].shape[0]
    assert n > 0
    # the pasted masks come from each detection's label channel: paste the probe's 28² masks and compare
    from dynamask.models.mask_handoff import HANDOFF_KEY, handoff_from_choice, paste_instance_masks

    res = model.roi_heads.mask_head.resolutions
    ref = {"boxes": out["boxes"], "mask_resolution": torch.full((n,), 28),
           HANDOFF_KEY: handoff_from_choice(probs, torch.full((n,), res.index(28)))}
    pasted = paste_instance_masks(ref, (64, 80))["masks"]
    torch.testing.assert_close(out["masks"], pasted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(probs[1], other[1])
