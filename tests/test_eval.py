"""Evaluation: ground truth fed back scores AP 1.0, known perturbations lower it; resolution report."""

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from dynamask.data import CocoDetection
from dynamask.data.shapes import generate, split_paths
from dynamask.engine.coco_eval import coco_metrics, mask_boundary, output_to_results
from dynamask.engine.evaluate import evaluate, evaluate_results, format_metrics
from dynamask.engine.resolution_report import resolution_distribution
from dynamask.models.mask_head import DynaMaskHead

COSTS = {14: 0.23, 28: 0.62, 56: 1.01, 112: 1.40}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate(root, train=0, val=12, size=96, seed=2)
    img_dir, ann = split_paths(root, "val")
    return CocoDetection(img_dir, ann)


def _gt_results(coco, shift=0):
    out = []
    for a in coco.anns.values():
        h, w = coco.imgs[a["image_id"]]["height"], coco.imgs[a["image_id"]]["width"]
        mask = coco.annToMask(a)
        if shift:
            mask = np.roll(mask, shift, axis=1)
        rle = mask_utils.encode(np.asfortranarray(mask))
        x, y, bw, bh = a["bbox"]
        out.append({
            "image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x + shift, y, bw, bh],
            "score": 1.0, "segmentation": {"counts": rle["counts"].decode(), "size": [h, w]},
            "mask_resolution": 112 if a["category_id"] >= 4 else 14,
        })
    return out


def test_ground_truth_scores_one(shapes):
    m = evaluate_results(shapes.coco, _gt_results(shapes.coco), costs=COSTS)
    for kind in ("bbox", "segm", "boundary"):
        assert m[kind]["AP"] == pytest.approx(1.0), kind
        assert m[kind]["AP50"] == pytest.approx(1.0) and m[kind]["AP75"] == pytest.approx(1.0)


def test_perturbations_lower_ap(shapes):
    base = evaluate_results(shapes.coco, _gt_results(shapes.coco), boundary=True)
    shifted = evaluate_results(shapes.coco, _gt_results(shapes.coco, shift=2), boundary=True)
    assert shifted["segm"]["AP"] < base["segm"]["AP"] - 0.05
    assert shifted["bbox"]["AP"] < base["bbox"]["AP"] - 0.05
    # a 2-pixel shift hurts the boundary more than the area
    assert shifted["boundary"]["AP"] < shifted["segm"]["AP"] - 0.05
    # dropping half of the detections lowers recall and AP
    half = _gt_results(shapes.coco)[::2]
    assert coco_metrics(shapes.coco, half, "segm")[0]["AP"] < 0.7
    # wrong categories score nothing
    wrong = [dict(r, category_id=r["category_id"] % 7 + 1) for r in _gt_results(shapes.coco)]
    assert coco_metrics(shapes.coco, wrong, "segm")[0]["AP"] < 0.05
    assert coco_metrics(shapes.coco, [], "segm")[0]["AP"] == 0.0


def test_resolution_distribution_and_cost(shapes, tmp_path):
    results = _gt_results(shapes.coco)
    m = evaluate_results(shapes.coco, results, costs=COSTS, out_dir=str(tmp_path))
    dist = m["resolution"]
    easy = sum(1 for r in results if r["category_id"] <= 3)
    assert dist["instances"] == len(results)
    assert dist["overall"] == {14: easy, 28: 0, 56: 0, 112: len(results) - easy}
    assert dist["per_category"]["star"][112] == sum(1 for r in results if r["category_id"] == 4)
    assert m["mask_gmac_per_instance"] == pytest.approx((easy * 0.23 + (len(results) - easy) * 1.40) / len(results))
    for name in ("results.json", "metrics.json", "summary.txt", "resolution.png"):
        assert os.path.getsize(tmp_path / name) > 0
    assert json.load(open(tmp_path / "metrics.json"))["segm"]["AP"] == pytest.approx(1.0)
    assert "| segm | 100.0" in format_metrics(m)
    # metrics.json read back (str keys) formats the same as the in-memory metrics
    assert format_metrics(json.load(open(tmp_path / "metrics.json"))) == format_metrics(m)
    low = resolution_distribution([dict(r, score=0.1) for r in results], {1: "ellipse"}, score_threshold=0.5)
    assert low["instances"] == 0
    assert low["resolutions"] == list(DynaMaskHead().resolutions)  # no detection: the default head's columns


def test_mask_boundary():
    m = np.zeros((20, 20), np.uint8)
    m[5:15, 5:15] = 1
    b = mask_boundary(m, 2)
    assert b.sum() == 100 - 36 and not b[7:13, 7:13].any() and b[5, 5] and b[6, 10]
    full = np.ones((10, 10), np.uint8)  # the image border counts as outside
    assert mask_boundary(full, 1).sum() == 100 - 64


def test_output_to_results_rescales_to_annotated_size():
    masks = torch.zeros(2, 1, 20, 40)
    masks[0, 0, 2:6, 4:10] = 0.9
    masks[1, 0, :, :] = 0.4  # below the threshold: empty mask
    out = {"boxes": torch.tensor([[4.0, 2.0, 10.0, 6.0], [0, 0, 40, 20]]), "labels": torch.tensor([2, 1]),
           "scores": torch.tensor([0.9, 0.3]), "masks": masks, "mask_resolution": torch.tensor([28, 56])}
    res = output_to_results(5, out, [3, 7], image_size=(40, 80))
    assert [r["category_id"] for r in res] == [7, 3] and [r["mask_resolution"] for r in res] == [28, 56]
    assert res[0]["bbox"] == pytest.approx([8.0, 4.0, 12.0, 8.0])
    m0 = mask_utils.decode({"counts": res[0]["segmentation"]["counts"].encode(), "size": [40, 80]})
    assert m0.shape == (40, 80) and abs(int(m0.sum()) - 96) <= 12
    assert mask_utils.area({"counts": res[1]["segmentation"]["counts"].encode(), "size": [40, 80]}) == 0
    with pytest.raises(ValueError, match="label 3"):
        output_to_results(5, dict(out, labels=torch.tensor([3, 1])), [3, 7])


class _Oracle(torch.nn.Module):
    """A stand-in model that returns the ground truth of the dataset's images, in order."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset, self.i = dataset, 0

    def forward(self, images):
        outs = []
        for _ in images:
            _, t = self.dataset[self.i]
            self.i += 1
            n = len(t["labels"])
            outs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
                         "masks": t["masks"][:, None].float(), "mask_resolution": torch.full((n,), 28)})
        return outs


def test_evaluate_runs_a_model(shapes, tmp_path):
    m = evaluate(_Oracle(shapes), shapes, costs=COSTS, out_dir=str(tmp_path), progress=False, batch_size=2)
    assert m["segm"]["AP"] == pytest.approx(1.0) and m["bbox"]["AP"] == pytest.approx(1.0)
    assert m["mask_gmac_per_instance"] == pytest.approx(0.62)


def test_resolution_columns_follow_the_model():
    """A demo model at 7/14/28/56 gets those columns, not DynaMask's default 14/28/56/112."""
    results = [{"category_id": 1, "score": 0.9, "mask_resolution": 7},
               {"category_id": 1, "score": 0.9, "mask_resolution": 56}]
    dist = resolution_distribution(results, {1: "ellipse"}, resolutions=(7, 14, 28, 56))
    assert dist["resolutions"] == [7, 14, 28, 56]
    assert dist["overall"] == {7: 1, 14: 0, 28: 0, 56: 1}


def test_cost_report_counts_every_detection_and_the_per_image_work():
    """Hand-derived: the head segments every kept detection, whatever its score; the MSM runs on each; a
    stage's projection runs once per image whose RoIs reach it, over its level (ceil(H/t) x ceil(W/t))."""
    from dynamask.engine.resolution_report import cost_report
    from dynamask.models.flops import HeadCosts

    costs = HeadCosts(per_roi={14: 1.0, 28: 2.0, 56: 4.0}, msm=0.5, projections=((28, 0.01, 16), (56, 0.001, 8)))
    results = [
        {"image_id": 1, "score": 0.9, "mask_resolution": 14, "input_size": [64, 96]},
        {"image_id": 1, "score": 0.1, "mask_resolution": 28, "input_size": [64, 96]},  # low score: still run
        {"image_id": 2, "score": 0.7, "mask_resolution": 56, "input_size": [40, 40]},
    ]
    report = cost_report(results, costs, num_images=3)  # image 3 had no detection
    assert report["instances"] == 3
    assert report["mask_gmac_per_instance"] == pytest.approx((1 + 2 + 4) / 3 + 0.5)
    # image 1 reaches 28: P4 of 64x96 at stride 16 is 4x6; image 2 reaches 56: 3x3 at 16 and 5x5 at 8
    image1 = 2 * 0.5 + 0.01 * 4 * 6
    image2 = 1 * 0.5 + 0.01 * 3 * 3 + 0.001 * 5 * 5
    assert report["per_image_gmac"] == pytest.approx((image1 + image2) / 3)
    assert report["head_gmac_per_image"] == pytest.approx((image1 + 3 + image2 + 4) / 3)
    plain = cost_report(results, {14: 1.0, 28: 2.0, 56: 4.0}, num_images=3)  # resolution costs only
    assert plain["mask_gmac_per_instance"] == pytest.approx(7 / 3) and plain["per_image_gmac"] is None


def test_head_costs_of_the_default_head():
    """The default head at 800x1216: the projections are the ~0.87 GMAC of ``per_image_gmacs``, and
    one RoI at 112 adds the MSM and its cumulative cost."""
    from dynamask.models import flops
    from dynamask.models.mask_head import DynaMaskHead
    from dynamask.models.msm import MaskSwitchModule

    model = torch.nn.Module()
    model.mask_head, model.msm = DynaMaskHead(), MaskSwitchModule()
    costs = flops.HeadCosts.of(model)
    part, whole = costs.image((800, 1216), [112])
    assert part == pytest.approx(flops.per_image_gmacs(model, (800, 1216)) + flops.msm_gmacs(model))
    assert whole == pytest.approx(part + flops.mask_head_gmacs(model)[112])
    assert flops.HeadCosts.of(model, msm=False).msm == 0.0


def test_fixed_mask_resolution_is_read_from_the_layers():
    """Mask R-CNN's masks are 2 × its mask RoI pool's side (one stride-2 transposed conv); DynaMask reports
    its own per-instance resolution (None here); evaluation and the predictor use this, nothing patched on."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.ops import MultiScaleRoIAlign

    from dynamask.checks import fixed_mask_resolution
    from dynamask.models import dynamask_resnet_fpn
    from dynamask.models.maskrcnn import maskrcnn_resnet_fpn

    tiny = maskrcnn_resnet_fpn(num_classes=3, depth=18, fpn_channels=16, mask_head_layers=(8,),
                               box_representation_size=16, min_size=64, max_size=64)
    assert fixed_mask_resolution(tiny) == 28
    assert not hasattr(tiny, "fixed_mask_resolution")
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                               mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2))
    assert fixed_mask_resolution(tv) == 14
    assert fixed_mask_resolution(dynamask_resnet_fpn(depth=18, num_classes=3, fpn_channels=16, trunk_channels=8,
                                                     stage_channels=[8, 8, 8], box_representation_size=16)) is None
    assert fixed_mask_resolution(torch.nn.Linear(2, 2)) is None
