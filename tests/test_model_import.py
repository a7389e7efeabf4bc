"""Weights imported from torchvision's Mask R-CNN give torchvision's detections (same order)."""

import pytest
import torch
from model_helpers import one_thread, pair_detections  # noqa: F401
from torchvision.models.detection import maskrcnn_resnet50_fpn

from dynamask.models import dynamask_resnet50_fpn, dynamask_resnet_fpn

KW = dict(min_size=128, max_size=128, box_score_thresh=0.05, box_nms_thresh=0.5, rpn_pre_nms_top_n_test=200,
          rpn_post_nms_top_n_test=100, box_detections_per_img=6)


@pytest.fixture(scope="module")
def torchvision_model():
    torch.manual_seed(1)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, **KW).eval()


def test_detections_equal_torchvision(torchvision_model, tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(torchvision_model.state_dict(), path)
    ours = dynamask_resnet50_fpn(torchvision_weights=str(path), mask_policy=14, **KW).eval()
    # RPN and box head identical
    own = ours.state_dict()
    for k, v in torchvision_model.state_dict().items():
        if k.startswith(("backbone.", "rpn.", "roi_heads.box_")) and "num_batches_tracked" not in k:
            assert torch.equal(own[k], v), k
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 112, 128, generator=g), torch.rand(3, 128, 96, generator=g)]
    with torch.no_grad():
        expected = torchvision_model(images)
        got = ours(images)
    for e, o in zip(expected, got):
        assert e["boxes"].shape[0] > 0
        # our RoIAlign sums in another order than torchvision's: pair the detections (near-equal
        # scores may swap places) and compare the pairs
        j = pair_detections(e, o)
        torch.testing.assert_close(o["boxes"][j], e["boxes"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(o["scores"][j], e["scores"], rtol=1e-4, atol=1e-4)
        assert torch.equal(o["labels"][j], e["labels"])
        assert o["masks"].shape == e["masks"].shape  # [N, 1, H, W] in the original frame
        assert o["masks"].dtype == torch.float32 and 0 <= o["masks"].min() and o["masks"].max() <= 1
        assert torch.equal(o["mask_resolution"], torch.full_like(o["labels"], 14))


def test_box_predictor_skipped_when_classes_differ(torchvision_model):
    ours = dynamask_resnet50_fpn(num_classes=5, torchvision_weights=torchvision_model.state_dict(), **KW)
    tv = torchvision_model.state_dict()
    assert torch.equal(ours.state_dict()["roi_heads.box_head.fc6.weight"], tv["roi_heads.box_head.fc6.weight"])
    assert ours.roi_heads.box_predictor.cls_score.out_features == 5


def test_freezing_follows_torchvision(torchvision_model):
    from torchvision.ops.misc import FrozenBatchNorm2d

    fresh = dynamask_resnet_fpn(depth=18, num_classes=3)
    assert all(p.requires_grad for p in fresh.backbone.parameters())
    assert isinstance(fresh.backbone.body.bn1, torch.nn.BatchNorm2d)
    imported = dynamask_resnet50_fpn(torchvision_weights=torchvision_model.state_dict(), **KW)
    assert isinstance(imported.backbone.body.bn1, FrozenBatchNorm2d)
    trainable = {
        n.split(".")[1] for n, p in imported.backbone.named_parameters() if p.requires_grad and n.startswith("body.")
    }
    assert trainable == {"layer2", "layer3", "layer4"}


def test_mismatched_torchvision_weights_are_refused(torchvision_model):
    with pytest.raises(RuntimeError):
        dynamask_resnet_fpn(depth=18, torchvision_weights=torchvision_model.state_dict())


def test_own_weights_round_trip(tmp_path):
    from model_helpers import TINY

    torch.manual_seed(0)
    a = dynamask_resnet_fpn(**TINY)
    path = tmp_path / "ckpt.pth"
    torch.save({"format_version": 1, "model": a.state_dict()}, path)
    b = dynamask_resnet_fpn(weights=str(path), **TINY)
    own = b.state_dict()
    for k, v in a.state_dict().items():
        if "num_batches_tracked" not in k:
            assert torch.equal(own[k], v), k


def test_fpn_norm_adds_group_norm_and_refuses_torchvision_weights(torchvision_model):
    from model_helpers import TINY

    model = dynamask_resnet_fpn(**dict(TINY, fpn_norm=True, fpn_channels=64))
    norms = [m for m in model.backbone.fpn.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 8 and all(n.num_groups == 32 and n.num_channels == 64 for n in norms)  # 4 inner + 4 layer
    plain = dynamask_resnet_fpn(**dict(TINY, fpn_channels=64))
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.backbone.fpn.modules())
    with pytest.raises(ValueError, match="fpn_norm"):
        dynamask_resnet_fpn(depth=50, fpn_norm=True, torchvision_weights=torchvision_model.state_dict())
