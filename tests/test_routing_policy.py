"""paste_instance_masks: one image's hand-off (masks grouped by resolution) pasted in detection order; the one check
of a mask policy, which the model's setter and choose_resolutions share."""

import pytest
import torch

from dynamask import ops
from dynamask.models.mask_handoff import HANDOFF_KEY, MaskHandoff, paste_instance_masks
from dynamask.models.routing_policy import check_policy, choose_resolutions


def test_interleaved_resolutions_paste_in_detection_order():
    torch.manual_seed(0)
    resolutions = (14, 28, 56, 112)
    kinds = [3, 0, 0, 2, 3, 1, 1, 1, 0, 3, 2, 0]  # runs of every length, each resolution several times
    n = len(kinds)
    xy = torch.rand(n, 2) * torch.tensor([60.0, 40.0])
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2) * 30], 1)
    # Per resolution, the masks of the detections routed there, in detection order (as the head gives).
    per_det = [torch.rand(resolutions[k], resolutions[k]) for k in kinds]
    det = {"boxes": boxes, "mask_resolution": torch.tensor([resolutions[k] for k in kinds])}
    groups = []
    for k, s in enumerate(resolutions):
        rows = [m for m, kk in zip(per_det, kinds) if kk == k]
        groups.append(torch.stack(rows) if rows else torch.zeros(0, s, s))
    order = [i for k in range(len(resolutions)) for i in range(n) if kinds[i] == k]  # the groups' rows
    det[HANDOFF_KEY] = MaskHandoff(masks=tuple(groups), rows=torch.tensor(order).argsort())
    out = paste_instance_masks(det, (48, 80))
    assert out["masks"].shape == (n, 1, 48, 80) and out["masks"].dtype == torch.float32
    assert not any(key.startswith("mask_probs_") for key in out)
    for i in range(n):  # each instance pasted on its own
        alone = ops.paste_masks([per_det[i][None]], boxes[i:i + 1], (48, 80), threshold=None)[0]
        assert torch.equal(out["masks"][i, 0], alone), i


def test_no_detections():
    det = {"boxes": torch.zeros(0, 4), "mask_resolution": torch.zeros(0, dtype=torch.int64)}
    det[HANDOFF_KEY] = MaskHandoff(masks=tuple(torch.zeros(0, s, s) for s in (14, 28)),
                                   rows=torch.zeros(0, dtype=torch.int64))
    out = paste_instance_masks(det, (10, 12))
    assert out["masks"].shape == (0, 1, 10, 12)


RES = (14, 28, 56, 112)


@pytest.mark.parametrize("policy", ["msm", "size", 14, 112, lambda feats, boxes, sizes: None])
def test_check_policy_accepts_the_policies(policy):
    check_policy(policy, RES)


@pytest.mark.parametrize("policy", ["MSM", 42, True, 28.0, None])
def test_check_policy_names_the_choices(policy):
    with pytest.raises(ValueError, match=r"mask_policy must be 'msm', 'size', one of \(14, 28, 56, 112\) or a "
                                         r"callable, got "):
        check_policy(policy, RES)


def test_choose_resolutions_checks_and_routes():
    feats, boxes = torch.rand(3, 2, 14, 14), [torch.rand(3, 4)]
    kw = dict(msm=torch.nn.Identity(), roi_features=feats, boxes=boxes, image_sizes=[(20, 20)], resolutions=RES)
    assert choose_resolutions(56, **kw).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match=r"one of \(14, 28, 56, 112\) or a callable, got 42"):
        choose_resolutions(42, **kw)
    with pytest.raises(ValueError, match="got None"):
        choose_resolutions(None, **kw)  # before, a TypeError with another wording
