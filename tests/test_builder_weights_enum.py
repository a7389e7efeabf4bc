"""The builders take torchvision's weights enums, read from the local torch hub cache (a temporary TORCH_HOME
holding fake files here), never downloaded: torchvision's detections with its imported Mask R-CNN weights, a
warning that the DynaMask mask head is untrained, num_classes from the enum, and one-line refusals."""

import os

import pytest
import torch
from model_helpers import one_thread, pair_detections  # noqa: F401
from torchvision.models import ResNet18_Weights, ResNet50_Weights, resnet18, resnet50
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_V2_Weights, MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from dynamask.models import dynamask_resnet50_fpn, dynamask_resnet_fpn

COCO_V1 = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
KW = dict(min_size=128, max_size=128, box_score_thresh=0.05, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
          box_detections_per_img=6)
SMALL = dict(fpn_channels=32, trunk_channels=16, stage_channels=(8, 8, 8), mask_roi_size=7, box_representation_size=32)
UNTRAINED = r"the detector is trained but the DynaMask mask head is not"


def _torchvision_coco_model(state):
    """What ``torchvision.models.detection.maskrcnn_resnet50_fpn(weights=COCO_V1)`` builds from the file, but
    for its download and hash check: FrozenBatchNorm, 3 trainable layers, the state dict, eps 0."""
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91, **KW)
    model.load_state_dict(state)
    overwrite_eps(model, 0.0)
    return model.eval()


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    """A fake ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``: random torchvision Mask R-CNN weights, with batch
    norm statistics that are not the identity (so FrozenBatchNorm's eps and the statistics matter)."""
    torch.manual_seed(1)
    state = MaskRCNN(_resnet_fpn_extractor(resnet50(weights=None), 5), num_classes=91).state_dict()
    g = torch.Generator().manual_seed(2)
    for k, v in state.items():
        if k.endswith("running_var"):
            v.copy_(0.5 + torch.rand(v.shape, generator=g))
        elif k.endswith("running_mean"):
            v.copy_(0.1 * torch.randn(v.shape, generator=g))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("weights") / "coco.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache in a temporary TORCH_HOME, its ``checkpoints`` folder returned; any attempt
    to download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would shadow TORCH_HOME

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return folder


def _put(hub, weights, source):
    os.symlink(source, hub / os.path.basename(weights.url))  # what torchvision's download leaves there


def test_coco_v1_enum_gives_torchvision_detections(hub, coco_file):
    _put(hub, COCO_V1, coco_file)
    with pytest.warns(UserWarning, match=rf"^weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1: {UNTRAINED}"):
        # torchvision's own call; weights_backbone is ignored when weights are given (its file is absent)
        ours = dynamask_resnet50_fpn(weights=COCO_V1, progress=True, num_classes=None,
                                     weights_backbone=ResNet50_Weights.IMAGENET1K_V1, mask_policy=14, **KW).eval()
    assert ours.roi_heads.box_predictor.cls_score.out_features == 91  # the enum's categories
    norms = [m for m in ours.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(m.eps == 0.0 for m in norms)  # as torchvision sets it for these weights
    trainable = {n.split(".")[0] for n, p in ours.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    reference = _torchvision_coco_model(torch.load(coco_file, weights_only=True))
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 112, 128, generator=g), torch.rand(3, 128, 96, generator=g)]
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    for e, o in zip(expected, got):
        assert e["boxes"].shape[0] > 0
        j = pair_detections(e, o)  # our RoIAlign sums in another order: near-equal scores may swap
        torch.testing.assert_close(o["boxes"][j], e["boxes"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(o["scores"][j], e["scores"], rtol=1e-4, atol=1e-4)
        assert torch.equal(o["labels"][j], e["labels"])


def test_torchvision_weights_path_is_unchanged(coco_file):
    """The path form imports the same weights, warns the same, and leaves eps alone (as before)."""
    with pytest.warns(UserWarning, match=rf"^torchvision_weights {coco_file}: {UNTRAINED}"):
        model = dynamask_resnet50_fpn(torchvision_weights=str(coco_file), **KW)
    state = torch.load(coco_file, weights_only=True)
    assert torch.equal(model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       state["roi_heads.box_predictor.cls_score.weight"])
    assert all(m.eps == 1e-5 for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d))


def test_enum_with_other_num_classes_keeps_a_new_box_predictor(hub, coco_file):
    _put(hub, COCO_V1, coco_file)
    with pytest.warns(UserWarning, match=r"box predictor \(num_classes 5, not the weights'\) and the DynaMask "):
        model = dynamask_resnet50_fpn(weights=COCO_V1, num_classes=5, **KW)
    state = torch.load(coco_file, weights_only=True)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert torch.equal(model.state_dict()["roi_heads.box_head.fc7.weight"], state["roi_heads.box_head.fc7.weight"])


def test_missing_file_is_refused_in_one_line(hub):
    expected = str(hub / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    with pytest.raises(FileNotFoundError) as info:
        dynamask_resnet50_fpn(weights=COCO_V1)
    msg = str(info.value)
    assert msg.startswith(f"weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1: {expected} not found")
    assert COCO_V1.url in msg and "nothing is downloaded" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match=r"^weights_backbone=ResNet18_Weights.IMAGENET1K_V1: .*"
                                                r"resnet18-f37072fd\.pth not found.*https://download"):
        dynamask_resnet_fpn(depth=18, weights_backbone=ResNet18_Weights.IMAGENET1K_V1, **SMALL)


def test_backbone_enum_loads_the_cached_imagenet_weights(hub, tmp_path):
    torch.manual_seed(3)
    state = resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    _put(hub, ResNet18_Weights.IMAGENET1K_V1, tmp_path / "r18.pth")
    model = dynamask_resnet_fpn(depth=18, num_classes=3, weights_backbone=ResNet18_Weights.IMAGENET1K_V1, **SMALL)
    body = model.backbone.body.state_dict()
    for k, v in body.items():  # the FPN extractor keeps layer1-4 of the ResNet (not its fc)
        assert torch.equal(v, state[k]), k
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)


def test_num_classes_defaults_to_torchvision_s():
    assert dynamask_resnet_fpn(depth=18, **SMALL).roi_heads.box_predictor.cls_score.out_features == 91


@pytest.mark.parametrize("call, message", [
    (lambda: dynamask_resnet50_fpn(weights=MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
     r"^weights=MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1: the _v2 models have another RPN and box head"),
    (lambda: dynamask_resnet_fpn(depth=18, weights=COCO_V1),
     r"^weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1 are ResNet-50 weights, but depth is 18$"),
    (lambda: dynamask_resnet50_fpn(weights=ResNet50_Weights.IMAGENET1K_V1),
     r"^weights=ResNet50_Weights.IMAGENET1K_V1: a torchvision weights enum here must be MaskRCNN_ResNet50_FPN"),
    (lambda: dynamask_resnet_fpn(depth=18, weights_backbone=ResNet50_Weights.IMAGENET1K_V2),
     r"^weights_backbone=ResNet50_Weights.IMAGENET1K_V2 does not fit a ResNet-18: use ResNet18_Weights$"),
    (lambda: dynamask_resnet50_fpn(weights=COCO_V1, torchvision_weights="tv.pth"),
     r"^give torchvision's Mask R-CNN weights once"),
], ids=["v2", "depth", "backbone-enum-as-weights", "backbone-depth", "twice"])
def test_wrong_enums_are_refused_before_reading_any_file(hub, call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
