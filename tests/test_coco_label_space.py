"""torchvision's COCO box predictor on a COCO data set: its 91 outputs are indexed by COCO category id, a data
set here numbers its categories 1, 2, ...; the rows of the data's categories are imported, so a frozen detector
classifies as torchvision's does."""

from __future__ import annotations

import warnings

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from dynamask.engine.freeze import check_torchvision_predictor, coco_label_ids
from dynamask.models import dynamask_resnet50_fpn
from dynamask.models.builders import select_box_classes


def test_coco_label_ids_follow_the_category_ids_and_names():
    label_map = {1: (1, "person"), 2: (18, "dog"), 3: (90, "toothbrush")}
    assert coco_label_ids(label_map) == [1, 18, 90]
    assert coco_label_ids({1: (1, "person"), 2: (18, "cat")}) is None  # COCO's 18 is the dog
    assert coco_label_ids({1: (1, "ring"), 2: (2, "star")}) is None  # another data set: nothing guessed
    assert coco_label_ids({1: (12, "N/A")}) is None  # one of COCO's unused ids


def test_select_box_classes_takes_the_rows_of_the_labels():
    src = {"roi_heads.box_predictor.cls_score.weight": torch.arange(91.0)[:, None].repeat(1, 3),
           "roi_heads.box_predictor.cls_score.bias": torch.arange(91.0),
           "roi_heads.box_predictor.bbox_pred.weight": torch.arange(364.0)[:, None].repeat(1, 3),
           "roi_heads.box_predictor.bbox_pred.bias": torch.arange(364.0), "other": torch.ones(1)}
    out = select_box_classes(src, [5, 1])
    assert out["roi_heads.box_predictor.cls_score.bias"].tolist() == [0, 5, 1]
    assert out["roi_heads.box_predictor.bbox_pred.bias"].tolist() == [0, 1, 2, 3, 20, 21, 22, 23, 4, 5, 6, 7]
    assert out["roi_heads.box_predictor.cls_score.weight"][:, 0].tolist() == [0, 5, 1]
    assert out["other"] is src["other"]
    with pytest.raises(ValueError, match="class 91 is not among the weights' 91 classes"):
        select_box_classes(src, [91])


def test_the_builder_imports_torchvisions_predictor_rows(tmp_path):
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = str(tmp_path / "tv.pth")
    torch.save(tv.state_dict(), path)
    ids = [1, 18, 3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = dynamask_resnet50_fpn(num_classes=4, torchvision_weights=path, torchvision_label_ids=ids)
    # the predictor was imported: the warning names only the mask head as untrained
    assert any("the detector is trained but the DynaMask mask head is not" in str(w.message) for w in caught)
    ours, theirs = model.roi_heads.box_predictor, tv.roi_heads.box_predictor
    rows = torch.tensor([0, *ids])
    assert torch.equal(ours.cls_score.weight, theirs.cls_score.weight[rows])
    assert torch.equal(ours.bbox_pred.bias, theirs.bbox_pred.bias.view(91, 4)[rows].flatten())
    with pytest.raises(ValueError, match="torchvision_label_ids names 3 classes but num_classes 5"):
        dynamask_resnet50_fpn(num_classes=5, torchvision_weights=path, torchvision_label_ids=ids)
    # --freeze detector accepts such weights (its predictor is imported), and refuses them without the mapping
    check_torchvision_predictor({"torchvision_weights": path, "num_classes": 4, "torchvision_label_ids": ids})
    with pytest.raises(ValueError, match="has 91 classes and this model 4"):
        check_torchvision_predictor({"torchvision_weights": path, "num_classes": 4})
