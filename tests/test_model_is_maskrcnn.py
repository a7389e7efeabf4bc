"""DynaMaskRCNN is a torchvision MaskRCNN: torchvision's detection reference scripts evaluate its masks
("segm"), its torchvision arguments mean what they mean in torchvision, and torchvision's own mask-branch
arguments are refused in one line."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torchvision
from model_helpers import one_thread, synthetic_batch, tiny_model  # noqa: F401
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign

from dynamask.models import DynaMaskRCNN


# ---- torchvision's references/detection, reimplemented (the folder is not installed) --------------------
def _get_iou_types(model):
    """references/detection/engine.py: which COCO iou types torchvision's ``evaluate`` scores."""
    model_without_ddp = model
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model_without_ddp = model.module
    iou_types = ["bbox"]
    if isinstance(model_without_ddp, torchvision.models.detection.MaskRCNN):
        iou_types.append("segm")
    if isinstance(model_without_ddp, torchvision.models.detection.KeypointRCNN):
        iou_types.append("keypoints")
    return iou_types


def _prepare(predictions, iou_type):
    """references/detection/coco_eval.py: CocoEvaluator.prepare_for_coco_detection / _segmentation."""
    results = []
    for image_id, p in predictions.items():
        scores, labels = p["scores"].tolist(), p["labels"].tolist()
        if iou_type == "bbox":
            x1, y1, x2, y2 = p["boxes"].unbind(1)
            boxes = torch.stack((x1, y1, x2 - x1, y2 - y1), dim=1).tolist()
            results += [{"image_id": image_id, "category_id": labels[k], "bbox": b, "score": scores[k]}
                        for k, b in enumerate(boxes)]
        else:
            masks = p["masks"] > 0.5
            rles = [mask_util.encode(np.array(m[0, :, :, np.newaxis], dtype=np.uint8, order="F"))[0] for m in masks]
            for rle in rles:
                rle["counts"] = rle["counts"].decode("utf-8")
            results += [{"image_id": image_id, "category_id": labels[k], "segmentation": rle, "score": scores[k]}
                        for k, rle in enumerate(rles)]
    return results


def _coco_ap(coco_gt, predictions, iou_type):
    """CocoEvaluator.update + synchronize_between_processes + accumulate: COCO AP at IoU .50:.95."""
    coco_dt = COCO.loadRes(coco_gt, _prepare(predictions, iou_type))
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    ev.params.imgIds = sorted(predictions)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0])


def _ground_truth(outputs, count=5):
    """A COCO ground truth made of the model's best detections over all images, and the outputs it judges.

    A random-weights model finds nothing real, so its own most confident detections are the ground truth: the
    first ``count`` in score order whose mask is not empty, and more until both images hold one. A detection
    with an empty mask can match no ground truth, so those that rank among the ground truth are taken out of
    the outputs judged (which of them are empty depends on the random weights). Each ground-truth detection is
    then matched exactly (box and mask IoU 1) by a detection scoring above every detection that is not ground
    truth, so both APs must be exactly 1 when the masks are evaluated and belong to their boxes.

    Returns ``(coco, judged)``: the ground truth and the outputs without the empty-mask detections so dropped."""
    binary = {k: (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8) for k, out in outputs.items()}
    ranked = sorted(((float(s), k, i) for k, out in outputs.items() for i, s in enumerate(out["scores"])),
                    reverse=True)
    anns = []
    dropped: dict[int, set[int]] = {k: set() for k in outputs}
    for _, k, i in ranked:
        if len(anns) >= count and len({a["image_id"] for a in anns}) == len(outputs):
            break
        if not binary[k][i].any():
            dropped[k].add(i)
            continue
        x1, y1, x2, y2 = outputs[k]["boxes"][i].tolist()
        rle = mask_util.encode(np.asfortranarray(binary[k][i]))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": len(anns) + 1, "image_id": k, "category_id": int(outputs[k]["labels"][i]),
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle, "area": float(binary[k][i].sum()),
                     "iscrowd": 0})
    assert len(anns) >= 3 and len({a["image_id"] for a in anns}) == 2, "want ground truth in both images"
    coco = COCO()
    coco.dataset = {"images": [{"id": k, "height": int(out["masks"].shape[-2]), "width": int(out["masks"].shape[-1])}
                               for k, out in outputs.items()],
                    "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
    coco.createIndex()
    judged = {}
    for k, out in outputs.items():
        keep = torch.tensor([i not in dropped[k] for i in range(out["scores"].shape[0])], dtype=torch.bool)
        judged[k] = {key: v[keep] for key, v in out.items()}
    return coco, judged


def test_torchvision_engine_evaluates_masks():
    torch.manual_seed(0)
    model = tiny_model(box_score_thresh=0.0).eval()
    assert isinstance(model, MaskRCNN) and isinstance(model, DynaMaskRCNN)
    assert _get_iou_types(model) == ["bbox", "segm"]
    images, _ = synthetic_batch()
    with torch.no_grad():
        outputs = {image_id: out for image_id, out in zip((11, 12), model(images))}  # engine.py's `res`
    coco_gt, outputs = _ground_truth(outputs)
    aps = {t: _coco_ap(coco_gt, outputs, t) for t in _get_iou_types(model)}
    assert aps == {"bbox": pytest.approx(1.0), "segm": pytest.approx(1.0)}
    # control: every mask mirrored left-right, away from its box; the boxes are untouched, so only segm drops
    mirrored = {k: dict(v, masks=v["masks"].flip(-1)) for k, v in outputs.items()}
    assert _coco_ap(coco_gt, mirrored, "bbox") == pytest.approx(1.0)
    assert _coco_ap(coco_gt, mirrored, "segm") < 0.2


# ---- torchvision's arguments are torchvision's -----------------------------------------------------------
def _settings(model):
    """Everything torchvision's MaskRCNN constructor derives from its arguments, outside the modules."""
    rpn, heads, t = model.rpn, model.roi_heads, model.transform
    return dict(
        rpn=(rpn._pre_nms_top_n, rpn._post_nms_top_n, rpn.nms_thresh, rpn.score_thresh,
             rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold,
             rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction, rpn.box_coder.weights,
             rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios),
        heads=(heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
               heads.proposal_matcher.allow_low_quality_matches, heads.fg_bg_sampler.batch_size_per_image,
               heads.fg_bg_sampler.positive_fraction, tuple(heads.box_coder.weights), heads.score_thresh,
               heads.nms_thresh, heads.detections_per_img),
        transform=(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size),
    )


@pytest.fixture(scope="module")
def backbone():
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)


NON_DEFAULT = dict(min_size=(96, 128), max_size=200, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.1],
                   rpn_pre_nms_top_n_train=300, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_train=120,
                   rpn_post_nms_top_n_test=60, rpn_nms_thresh=0.6, rpn_fg_iou_thresh=0.65, rpn_bg_iou_thresh=0.25,
                   rpn_batch_size_per_image=64, rpn_positive_fraction=0.4, rpn_score_thresh=0.01,
                   box_score_thresh=0.2, box_nms_thresh=0.45, box_detections_per_img=33, box_fg_iou_thresh=0.55,
                   box_bg_iou_thresh=0.45, box_batch_size_per_image=96, box_positive_fraction=0.3,
                   bbox_reg_weights=(5.0, 5.0, 2.0, 2.0), size_divisible=16, fixed_size=(96, 160))


@pytest.mark.parametrize("kwargs", [{}, NON_DEFAULT], ids=["defaults", "non-defaults"])
def test_torchvision_arguments_give_torchvision_settings(backbone, kwargs):
    reference = MaskRCNN(backbone, num_classes=5, **kwargs)
    ours = DynaMaskRCNN(backbone, num_classes=5, **kwargs)
    assert _settings(ours) == _settings(reference)
    assert type(ours.transform).__name__ == "SafeResizeTransform"  # never resizes a side to 0 px
    assert ours.roi_heads.box_predictor.cls_score.out_features == 5


def test_torchvision_box_pooler_is_used_as_given(backbone):
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 5, -1)
    model = DynaMaskRCNN(backbone, num_classes=3, box_roi_pool=pool, min_size=64, max_size=64,
                         box_score_thresh=0.0, box_detections_per_img=4).eval()
    assert model.roi_heads.box_roi_pool is pool
    assert model.roi_heads.box_head.fc6.in_features == 256 * 5 * 5  # the default box head fits its output
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])[0]
    assert out["masks"].shape == (len(out["boxes"]), 1, 64, 64) and len(out["boxes"]) == 4


def test_torchvision_mask_branch_arguments_are_refused(backbone):
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    for name, value in [("mask_predictor", MaskRCNNPredictor(256, 256, 3)),
                        ("mask_roi_pool", MultiScaleRoIAlign(["0"], 14, 2))]:
        with pytest.raises(TypeError, match=rf"^DynaMaskRCNN\(\) does not take torchvision's {name}: DynaMask"):
            DynaMaskRCNN(backbone, num_classes=3, **{name: value})
    with pytest.raises(TypeError, match=r"^DynaMaskRCNN\(\): mask_head must be a DynaMaskHead .* got MaskRCNNHeads$"):
        DynaMaskRCNN(backbone, num_classes=3, mask_head=MaskRCNNHeads(256, [256], 1))
    with pytest.raises(TypeError, match=r"'box_score_tresh' \(did you mean 'box_score_thresh'\?\)"):
        DynaMaskRCNN(backbone, num_classes=3, box_score_tresh=0.5)
    with pytest.raises(ValueError, match="num_classes is None"):
        DynaMaskRCNN(backbone, num_classes=None)
