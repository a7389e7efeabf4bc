"""``dynamask train --freeze detector``: train DynaMask's mask branch on a frozen detector.

The detector (backbone, FPN, RPN, the box head and box predictor) keeps its weights: its parameters get
``requires_grad = False`` (so the optimiser never holds them and weight decay never touches them) and its
BatchNorm layers, if any, stay in eval mode (their running statistics do not move). What trains is the
mask head (the r-FPN stages and their predictors) and the Mask Switch Module, on the RoIs the frozen
detector proposes and samples.

The RPN and box losses are still computed (torchvision's heads compute them in training mode, which the
RPN and the RoI sampling need, and they cost nothing beyond the forward pass the mask branch needs anyway)
and logged, as a check that the imported detector fits the data, but they are left out of the loss that is
back-propagated: they have no trainable parameter to reach, and left in they would only make the logged
``loss`` a sum of terms that cannot move.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

FreezeChoice = Literal["none", "detector"]
# the losses of the detector's heads (torchvision's RPN and box branch names)
DETECTOR_LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
# the parts of a DynaMask RoI head that train on a frozen detector
TRAINED_PARTS = ("mask_head", "msm")
# builder arguments that give a detector its weights
DETECTOR_WEIGHTS = ("weights", "torchvision_weights")


def check_freeze(cfg: Any) -> None:
    """Before any work: a frozen detector must come from weights (``--arch-kwargs`` ``weights`` or
    ``torchvision_weights``) or from the run being resumed, and be a DynaMask model."""
    if cfg.freeze == "none":
        return
    if cfg.freeze != "detector":
        raise ValueError(f"freeze must be 'none' or 'detector', got {cfg.freeze!r}")
    if cfg.arch == "maskrcnn_resnet_fpn":
        raise ValueError("--freeze detector trains DynaMask's mask head and switch; maskrcnn_resnet_fpn has neither")
    if not cfg.resume and not any(cfg.arch_kwargs.get(k) for k in DETECTOR_WEIGHTS):
        raise ValueError("--freeze detector keeps the detector's weights as they are: give them with --arch-kwargs "
                         "'{\"weights\": \"runs/x/last.pth\"}' (a DynaMask checkpoint) or '{\"torchvision_weights\": "
                         "\"maskrcnn_resnet50_fpn_coco.pth\"}' (torchvision's Mask R-CNN); a frozen random "
                         "detector proposes nothing to learn from")
    check_torchvision_predictor(cfg.arch_kwargs)


def coco_label_ids(label_map: dict[int, tuple[int, str]]) -> list[int] | None:
    """torchvision's COCO class index (= COCO category id) of each label 1, 2, ... of ``label_map``, when every
    category is one of COCO's, with its COCO id and name; else None (other data: no mapping is guessed)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    names = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = class id, "__background__" first
    ids = []
    for label in sorted(label_map):
        cat_id, name = label_map[label]
        if not (0 < int(cat_id) < len(names) and names[int(cat_id)] == name != "N/A"):
            return None
        ids.append(int(cat_id))
    return ids or None


def check_torchvision_predictor(arch_kwargs: dict[str, Any], num_classes: int | None = None) -> None:
    """torchvision's box predictor is imported only when its class count is the model's; frozen, a box
    predictor left at random would classify nothing. Read with ``mmap`` (only the one tensor's shape)."""
    path = arch_kwargs.get("torchvision_weights")
    num_classes = arch_kwargs.get("num_classes", num_classes)
    if not isinstance(path, str) or num_classes is None or arch_kwargs.get("weights"):
        return
    if arch_kwargs.get("torchvision_label_ids") is not None:  # the predictor is cut to the data's labels
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # the builder reads the file next and reports what is wrong with it
        return
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    weight = state.get("roi_heads.box_predictor.cls_score.weight") if isinstance(state, dict) else None
    if weight is not None and int(weight.shape[0]) != int(num_classes):
        raise ValueError(
            f"--freeze detector: the box predictor of torchvision_weights {path} has {weight.shape[0]} classes and "
            f"this model {num_classes} (num_classes, the background included), so it would not be imported and "
            "would stay random and frozen; train the detector on this data first (without --freeze) or give "
            "weights whose classes match")


def detector_modules(model: nn.Module) -> list[nn.Module]:
    """The frozen parts: the backbone (with the FPN), the RPN, and every child of the RoI heads but the
    mask head and the switch (the box pooler, box head and box predictor)."""
    heads = cast(Any, model).roi_heads
    parts = [cast(Any, model).backbone, cast(Any, model).rpn]
    parts += [m for name, m in heads.named_children() if name not in TRAINED_PARTS]
    return parts


def freeze_detector(model: nn.Module) -> list[str]:
    """Sets ``requires_grad = False`` on the detector's parameters; returns the names of the parameters
    that still train (the mask head's and the switch's)."""
    from dynamask.models.roi_heads import DynaMaskRoIHeads

    if not isinstance(getattr(model, "roi_heads", None), DynaMaskRoIHeads):
        raise ValueError(f"--freeze detector: {type(model).__name__} has no DynaMask mask head to train")
    for part in detector_modules(model):
        for p in part.parameters():
            p.requires_grad_(False)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def detector_eval_mode(model: nn.Module) -> None:
    """Puts the frozen parts' BatchNorm layers in eval mode (after ``model.train()``): their running
    statistics stay those of the weights. The rest of the detector stays in training mode, which the RPN
    and the RoI sampling need."""
    for part in detector_modules(model):
        for m in part.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def trained_loss(loss_dict: dict[str, Tensor], freeze: str) -> Tensor:
    """The loss back-propagated: every term, or with a frozen detector the mask branch's alone."""
    terms = [v for k, v in loss_dict.items() if freeze != "detector" or k not in DETECTOR_LOSSES]
    return cast(Tensor, sum(terms))
