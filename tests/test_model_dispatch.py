"""The dispatcher: a RoI routed to resolution k runs exactly the stages ≤ k; policies; empty cases."""

import pytest
import torch
from model_helpers import one_thread, tiny_model  # noqa: F401

from dynamask import ops
from dynamask.models import DynaMaskHead
from dynamask.models.routing_policy import size_policy


def _features(n=1, size=64, c=256):
    return [torch.randn(n, c, size // s, size // s) for s in (4, 8, 16, 32)], [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _rois(r, n=1, size=64):
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(r, 2, generator=g) * size * 0.6
    wh = torch.rand(r, 2, generator=g) * size * 0.4 + 4
    ids = torch.randint(0, n, (r, 1), generator=g).float()
    return torch.cat([ids, xy, xy + wh], dim=1)


def _row_counter(head):
    rows = {"trunk": 0, 1: 0, 2: 0, 3: 0, "pred": [0, 0, 0, 0]}

    def add(key, k=None):
        def hook(module, inputs):
            if k is None:
                rows[key] += inputs[0].shape[0]
            else:
                rows[key][k] += inputs[0].shape[0]
        return hook

    hooks = [head.trunk.register_forward_pre_hook(add("trunk"))]
    hooks += [fam.register_forward_pre_hook(add(s)) for s, fam in enumerate(head.fam, start=1)]
    hooks += [p.register_forward_pre_hook(add("pred", k)) for k, p in enumerate(head.mask_predictors)]
    return rows, hooks


def test_stage_rows_and_outputs_match_training_path():
    torch.manual_seed(0)
    head = DynaMaskHead(trunk_channels=32, stage_channels=(16, 8, 8)).eval()
    feats, scales = _features()
    rois = _rois(9)
    roi_feats = torch.randn(9, 256, 14, 14)
    choice = torch.tensor([3, 0, 1, 2, 0, 3, 1, 0, 2])
    perm, counts = ops.group_by_resolution(choice, 4)
    rows, hooks = _row_counter(head)
    with torch.no_grad():
        out = head.forward_dispatched(roi_feats[perm], feats, scales, rois[perm], counts.tolist())
    for h in hooks:
        h.remove()
    # RoI routed to k runs exactly the stages <= k
    assert rows["trunk"] == 9
    assert [rows[s] for s in (1, 2, 3)] == [int((choice >= s).sum()) for s in (1, 2, 3)]
    assert rows["pred"] == [int((choice == k).sum()) for k in range(4)]
    # same logits as running every stage on every RoI
    with torch.no_grad():
        full, _ = head.forward_train(roi_feats[perm], feats, scales, rois[perm])
    reach = [int((choice >= k).sum()) for k in range(4)] + [0]
    for k in range(4):
        assert out[k].shape == (int(counts[k]), 14 * 2**k, 14 * 2**k)
        torch.testing.assert_close(out[k], full[k][reach[k + 1]:reach[k]], rtol=1e-4, atol=1e-5)


def test_all_routed_to_14_skips_every_stage():
    head = DynaMaskHead(trunk_channels=32, stage_channels=(16, 8, 8)).eval()
    feats, scales = _features()
    rows, hooks = _row_counter(head)
    with torch.no_grad():
        out = head.forward_dispatched(torch.randn(4, 256, 14, 14), feats, scales, _rois(4), [4, 0, 0, 0])
    assert rows[1] == rows[2] == rows[3] == 0 and rows["pred"] == [4, 0, 0, 0]
    assert [o.shape[0] for o in out] == [4, 0, 0, 0]


def test_size_policy_eq8():
    sides = torch.tensor([10.0, 55.0, 56.0, 111.0, 112.0, 223.0, 224.0, 1000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    assert size_policy(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(box_score_thresh=0.0).eval()


def test_detector_policies_and_outputs(model):
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    res = model.roi_heads.mask_head.resolutions
    calls = []

    def alternate(roi_features, boxes, image_sizes):
        calls.append((roi_features.shape, [b.shape[0] for b in boxes], image_sizes))
        return torch.arange(roi_features.shape[0]) % 4

    for policy in ("msm", "size", res[2], alternate):
        model.mask_policy = policy
        with torch.no_grad():
            out = model(images)
        for o, img in zip(out, images):
            n = o["boxes"].shape[0]
            assert n > 0
            assert o["masks"].shape == (n, 1, *img.shape[-2:]) and o["masks"].dtype == torch.float32
            assert o["mask_resolution"].shape == (n,) and o["mask_resolution"].dtype == torch.int64
            assert set(o["mask_resolution"].tolist()) <= set(res)
            assert not any(k.startswith("mask_probs") for k in o)
        if policy == res[2]:
            assert all((o["mask_resolution"] == res[2]).all() for o in out)
    assert calls and calls[0][0][1:] == (256, res[0], res[0])
    first = out[0]["mask_resolution"]
    assert first.tolist() == [res[i % 4] for i in range(first.shape[0])]
    with pytest.raises(ValueError):
        model.mask_policy = 42


def test_eval_with_no_detections(model):
    model.mask_policy = "msm"
    model.roi_heads.score_thresh = 1.0
    try:
        with torch.no_grad():
            out = model([torch.rand(3, 64, 64)])
    finally:
        model.roi_heads.score_thresh = 0.0
    assert out[0]["boxes"].shape == (0, 4)
    assert out[0]["masks"].shape == (0, 1, 64, 64)
    assert out[0]["mask_resolution"].shape == (0,)
