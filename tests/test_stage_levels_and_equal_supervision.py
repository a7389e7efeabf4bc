"""The accuracy study's two fairness knobs (issue 32): which FPN level each r-FPN stage fuses
(``stage_levels``), and Mask R-CNN's mask supervision capped as DynaMask's (``mask_rois_per_image``)."""

import pytest
import torch
from model_helpers import one_thread  # noqa: F401

from dynamask.models import DynaMaskHead, dynamask_resnet_fpn
from dynamask.models.maskrcnn import CappedMaskRoIHeads, maskrcnn_resnet_fpn


def _levels(size=64, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, c, size // s, size // s, generator=g) for s in (4, 8, 16, 32)]


def _stage_outputs(head, features):
    rois = torch.tensor([[0.0, 6.0, 8.0, 40.0, 50.0], [0.0, 20.0, 4.0, 60.0, 30.0]])
    roi_features = torch.randn(2, 16, 14, 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return head.stage_features(roi_features, features, [1 / 4, 1 / 8, 1 / 16, 1 / 32], rois, [2, 2, 2, 2])


@pytest.mark.parametrize("levels", [(2, 1, 0), (0, 0, 0), (1, 0, 0)])
def test_each_stage_reads_only_its_level(levels):
    """Changing one FPN level changes exactly the stages that fuse it (and the stages after them)."""
    torch.manual_seed(0)
    head = DynaMaskHead(in_channels=16, trunk_channels=8, stage_channels=(8, 8, 8), stage_levels=levels).eval()
    base = _stage_outputs(head, _levels())
    for level in range(4):
        changed = _levels()
        changed[level] = changed[level] + 1.0
        outs = _stage_outputs(head, changed)
        first = next((s for s, lv in enumerate(levels, start=1) if lv == level), None)
        for k, (a, b) in enumerate(zip(base, outs)):
            moved = not torch.equal(a, b)
            assert moved == (first is not None and k >= first), (levels, level, k)


def test_stage_levels_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"stage_levels index the FPN levels"):
        DynaMaskHead(in_channels=16, trunk_channels=8, stage_channels=(8, 8, 8), stage_levels=(4, 1, 0))
    with pytest.raises(ValueError, match=r"one entry per stage"):
        DynaMaskHead(in_channels=16, trunk_channels=8, stage_channels=(8, 8, 8), stage_levels=(0, 0))


def test_builder_passes_stage_levels():
    model = dynamask_resnet_fpn(depth=18, num_classes=3, fpn_channels=16, trunk_channels=8, stage_channels=(8, 8, 8),
                                stage_levels=(0, 0, 1), box_representation_size=16, min_size=64, max_size=64)
    assert model.roi_heads.mask_head.stage_levels == (0, 0, 1)


def _maskrcnn(cap):
    torch.manual_seed(0)
    return maskrcnn_resnet_fpn(num_classes=3, depth=18, fpn_channels=16, mask_head_layers=(8,),
                               box_representation_size=16, min_size=64, max_size=64, rpn_batch_size_per_image=32,
                               box_batch_size_per_image=64, mask_rois_per_image=cap)


def _batch():
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = []
    for boxes in ([[4.0, 4.0, 40.0, 44.0], [30.0, 10.0, 60.0, 36.0]], [[10.0, 12.0, 50.0, 58.0]]):
        b = torch.tensor(boxes)
        masks = torch.zeros(len(boxes), 64, 64, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(b.int().tolist()):
            masks[i, y1 + 2:y2 - 2, x1 + 3:x2 - 3] = 1
        targets.append({"boxes": b, "labels": torch.tensor([1, 2][:len(boxes)]), "masks": masks})
    return images, targets


def _mask_rows(model):
    rows: list[int] = []
    model.roi_heads.mask_head.register_forward_pre_hook(lambda m, i: rows.append(i[0].shape[0]))
    return rows


@pytest.mark.usefixtures("one_thread")
def test_capped_maskrcnn_matches_torchvision_when_the_cap_is_not_reached():
    """A cap above every image's positives changes nothing: the same losses as torchvision's forward."""
    images, targets = _batch()
    plain, capped = _maskrcnn(None), _maskrcnn(10_000)
    assert type(plain.roi_heads).__name__ == "RoIHeads" and isinstance(capped.roi_heads, CappedMaskRoIHeads)
    capped.load_state_dict(plain.state_dict())
    rows_plain, rows_capped = _mask_rows(plain), _mask_rows(capped)
    torch.manual_seed(1)
    want = plain.train()(images, targets)
    torch.manual_seed(1)
    got = capped.train()(images, targets)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert rows_capped == rows_plain and rows_plain[0] > 2  # positives were there to cap


@pytest.mark.usefixtures("one_thread")
def test_capped_maskrcnn_trains_on_at_most_the_cap():
    images, targets = _batch()
    plain, capped = _maskrcnn(None), _maskrcnn(1)
    capped.load_state_dict(plain.state_dict())
    rows = _mask_rows(capped)
    torch.manual_seed(1)
    want = plain.train()(images, targets)
    torch.manual_seed(1)
    got = capped.train()(images, targets)
    assert rows == [2]  # one positive per image, two images
    for k in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)  # the box branch is untouched
    assert torch.isfinite(got["loss_mask"]) and got["loss_mask"] > 0
    capped.eval()
    with torch.no_grad():
        out = capped(images)
    assert all("masks" in o for o in out)  # inference keeps torchvision's mask branch


def test_capped_maskrcnn_refuses_a_cap_below_one():
    with pytest.raises(ValueError, match="mask_rois_per_image"):
        _maskrcnn(0)


@pytest.mark.parametrize("min_size, want", [(800, (2, 1, 0)), (1333, (2, 1, 0)), (600, (2, 1, 0)), (512, (1, 0, 0)),
                                            (400, (1, 0, 0)), (192, (0, 0, 0)), (64, (0, 0, 0)),
                                            ((640, 672, 704, 736, 768, 800), (2, 1, 0))])
def test_stage_levels_follow_the_image_size(min_size, want):
    """The paper's P4, P3, P2 at 800 px, one level finer per halving (round(log2(800 / side))), floor P2."""
    from dynamask.models.builders import stage_levels_for

    assert stage_levels_for(min_size) == want


def test_builder_default_levels_and_old_checkpoints():
    from dynamask.engine.checkpoint import build_model
    from dynamask.models.builders import stage_levels_for

    with pytest.raises(ValueError, match="min_size must be >= 1"):
        stage_levels_for(0)
    kw = dict(depth=18, num_classes=3, fpn_channels=16, trunk_channels=8, stage_channels=[8, 8, 8],
              box_representation_size=16)
    assert dynamask_resnet_fpn(**kw).roi_heads.mask_head.stage_levels == (2, 1, 0)  # torchvision's 800 px
    assert dynamask_resnet_fpn(**kw, min_size=192, max_size=192).roi_heads.mask_head.stage_levels == (0, 0, 0)
    # a checkpoint saved before the levels followed the image size records none: it rebuilds as it was trained
    old = build_model({"name": "dynamask_resnet_fpn", "kwargs": dict(kw, min_size=192, max_size=192)})
    assert old.roi_heads.mask_head.stage_levels == (2, 1, 0)
    new = build_model({"name": "dynamask_resnet_fpn",
                       "kwargs": dict(kw, min_size=192, max_size=192, stage_levels=[0, 0, 0])})
    assert new.roi_heads.mask_head.stage_levels == (0, 0, 0)
