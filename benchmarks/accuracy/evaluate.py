"""Evaluation of many mask-routing policies on ONE DynaMask model's detections, in one pass.

Detections do not depend on how masks are routed, so every policy of a model (each fixed resolution, the
size rule, the oracle, one or more switches) is scored on the same detections: the head runs every stage
on every detection once, and each policy picks its masks from those outputs. Per policy: COCO segm AP,
Boundary AP, and the mask-head GMAC per instance averaged over all detections the head runs on (the
switch's own cost included for switch policies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from dynamask.engine.coco_eval import coco_metrics, output_to_results
from dynamask.engine.routing_probe import Switch, head_outputs, mask_iou_top_grid
from dynamask.engine.routing_value import oracle_choice
from dynamask.models import mask_handoff, mask_losses, routing_policy

ORACLE_TOL = 0.01
MATCH_IOU = 0.5  # a detection is scored against the GT it overlaps most, when the box IoU reaches this


@torch.no_grad()
def detect(model: nn.Module, image: Tensor) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
    """The box branch of a DynaMask detector on one image: ``(image_list, features, detections)`` with
    ``boxes [n, 4]`` in the network's input frame, ``scores``, ``labels``."""
    images, _ = model.transform([image])
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features)
    boxes, scores, labels = model.roi_heads.detect_boxes(features, proposals, images.image_sizes)
    return images, features, {"boxes": boxes[0], "scores": scores[0], "labels": labels[0]}


def oracle_on_detections(probs: Sequence[Tensor], det_boxes: Tensor, gt_boxes: Tensor, gt_masks: Tensor,
                         tol: float = ORACLE_TOL) -> Tensor:
    """Per detection, the cheapest resolution whose mask IoU with its matched GT (box IoU ≥ 0.5, on the
    finest grid) is within ``tol`` of the best; unmatched detections take the cheapest. ``[n]`` int64."""
    n = det_boxes.shape[0]
    choice = torch.zeros(n, dtype=torch.int64)
    if n == 0 or gt_boxes.shape[0] == 0:
        return choice
    overlap, match = box_iou(det_boxes, gt_boxes).max(dim=1)
    top = mask_losses.mask_targets([gt_masks], [det_boxes], [match], [probs[-1].shape[-1]])[0]
    iou = mask_iou_top_grid(probs, top).numpy()
    best = torch.from_numpy(oracle_choice(iou, tol))
    return torch.where(overlap >= MATCH_IOU, best, choice)


@torch.no_grad()
def evaluate_policies(model: nn.Module, dataset, *, costs: Mapping[int, float],
                      switches: Mapping[str, tuple[Switch, float]] | None = None,
                      fixed: bool = True, size_rule: bool = True, oracle: bool = True,
                      progress: bool = True) -> dict[str, dict[str, Any]]:
    """Every policy's metrics on ``dataset`` (a :class:`dynamask.data.CocoDetection`).

    Args:
        model: a DynaMask detector. costs: resolution → per-RoI head GMAC (``dynamask.models.flops``).
        switches: name → ((MSM, "roi" | "trunk"), its per-RoI GMAC).
        fixed, size_rule, oracle: also score every fixed resolution (as ``fixed-S``), Eq. 8 (``size-rule``)
            and the oracle (``oracle``).

    Returns:
        policy name → ``{"segm": {AP...}, "boundary": {AP...}, "mask_gmacs_per_instance": float,
        "detections": int}``.
    """
    from tqdm import tqdm

    model.eval()
    heads = model.roi_heads
    resolutions = list(heads.mask_head.resolutions)
    k = len(resolutions)
    res_t = torch.tensor(resolutions, dtype=torch.int64)
    cost_t = torch.tensor([float(costs[r]) for r in resolutions], dtype=torch.float64)
    switches = dict(switches or {})
    results: dict[str, list[dict[str, Any]]] = {}
    gmacs: dict[str, float] = {}
    count = 0
    for i in tqdm(range(len(dataset)), desc="eval policies", disable=not progress, dynamic_ncols=True):
        image, target = dataset[i]
        images, features, det = detect(model, image)
        boxes = det["boxes"]
        # a fitted switch weighs its choice by each detection's score, as the model's own inference does
        probs, choices = head_outputs(model, features, [boxes], images.image_sizes,
                                      {name: sw for name, (sw, _) in switches.items()}, [det["labels"]],
                                      [det["scores"]])
        n = boxes.shape[0]
        policies: dict[str, Tensor] = dict(choices)
        if fixed:
            for j, s in enumerate(resolutions):
                policies[f"fixed-{s}"] = torch.full((n,), j, dtype=torch.int64)
        if size_rule:
            policies["size-rule"] = routing_policy.size_policy(boxes, k)
        if oracle:
            _, tgt = model.transform([image], [{key: v for key, v in target.items()}])
            policies["oracle"] = oracle_on_detections(probs, boxes, tgt[0]["boxes"], tgt[0]["masks"])
        image_id = int(target["image_id"])
        info = dataset.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        ih, iw = images.image_sizes[0]
        scale = torch.tensor([w / iw, h / ih, w / iw, h / ih])
        for name, choice in policies.items():
            extra = switches[name][1] if name in switches else 0.0
            gmacs[name] = gmacs.get(name, 0.0) + float(cost_t[choice].sum()) + extra * n
            out = {"boxes": boxes * scale, "scores": det["scores"], "labels": det["labels"],
                   "mask_resolution": res_t[choice],
                   mask_handoff.HANDOFF_KEY: mask_handoff.handoff_from_choice(probs, choice)}
            out = mask_handoff.paste_instance_masks(out, (h, w))
            results.setdefault(name, []).extend(output_to_results(image_id, out, dataset.cat_ids, image_size=(h, w)))
        count += n
    metrics = {}
    # every policy shares the detector's boxes: one box AP for all of them
    bbox = coco_metrics(dataset.coco, next(iter(results.values())), "bbox")[0] if results else None
    for name, res in results.items():
        segm, _ = coco_metrics(dataset.coco, res, "segm")
        boundary, _ = coco_metrics(dataset.coco, res, "boundary")
        metrics[name] = {"bbox": bbox, "segm": segm, "boundary": boundary, "detections": count,
                         "mask_gmacs_per_instance": gmacs[name] / count if count else None}
    return metrics


def evaluate_fixed_model(model: nn.Module, dataset, *, gmacs_per_instance: float,
                         progress: bool = True) -> dict[str, Any]:
    """A model with one mask resolution (torchvision's Mask R-CNN): segm and Boundary AP."""
    from dynamask.checks import fixed_mask_resolution
    from dynamask.engine.evaluate import run_model

    res = run_model(model, dataset, progress=progress, default_resolution=fixed_mask_resolution(model))
    bbox, _ = coco_metrics(dataset.coco, res, "bbox")
    segm, _ = coco_metrics(dataset.coco, res, "segm")
    boundary, _ = coco_metrics(dataset.coco, res, "boundary")
    return {"bbox": bbox, "segm": segm, "boundary": boundary, "detections": len(res),
            "mask_gmacs_per_instance": gmacs_per_instance}


@torch.no_grad()
def maskrcnn_gt_box_iou(model: nn.Module, dataset, *, top: int, progress: bool = True) -> dict[str, Any]:
    """torchvision Mask R-CNN's masks on the ground-truth boxes, scored as DynaMask's resolutions are
    (:func:`dynamask.engine.routing_probe.gt_box_routing`): each instance's mask of its own class, upsampled
    to the ``top`` x ``top`` grid, IoU with the target cut there. Returns ``{"iou": [N] float64,
    "categories": N names}``."""
    from tqdm import tqdm

    from dynamask.engine.routing_probe import mask_iou_top_grid
    from dynamask.models import mask_losses

    model.eval()
    heads = model.roi_heads
    names = {int(c["id"]): str(c["name"]) for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    ious, cats = [], []
    for i in tqdm(range(len(dataset)), desc="Mask R-CNN on gt boxes", disable=not progress, dynamic_ncols=True):
        image, target = dataset[i]
        if target["boxes"].shape[0] == 0:
            continue
        images, targets = model.transform([image], [dict(target)])
        features = model.backbone(images.tensors)
        boxes = targets[0]["boxes"]
        pooled = heads.mask_roi_pool(features, [boxes], images.image_sizes)
        logits = heads.mask_predictor(heads.mask_head(pooled))  # [n, classes, 28, 28]
        labels = targets[0]["labels"]
        probs = logits[torch.arange(labels.shape[0]), labels].sigmoid()
        n = boxes.shape[0]
        gt = mask_losses.mask_targets([targets[0]["masks"]], [boxes], [torch.arange(n)], [top])[0]
        ious.append(mask_iou_top_grid([probs], gt)[:, 0].numpy())
        cats += [names[dataset.cat_ids[int(lab) - 1]] for lab in target["labels"].tolist()]
    return {"iou": np.concatenate(ious) if ious else np.zeros(0), "categories": cats}


def choice_shares(
    choice: np.ndarray, categories: Sequence[str], names: Sequence[str], k: int
) -> dict[str, list[float]]:
    """Per category, the fraction of its (ground-truth) instances at each resolution."""
    from dynamask.engine.routing_value import shares

    return shares(choice, categories, k, names)
