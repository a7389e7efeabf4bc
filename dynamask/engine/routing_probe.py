"""Measures a DynaMask model's masks at every resolution on given boxes, for judging its switch.

:func:`probe_boxes` runs the head's every stage on a set of boxes (ground truth or detections) and scores
each resolution's mask by its IoU with the ground truth on the finest grid: the mask probabilities of
resolution S_k are upsampled (bilinear) to S_K, thresholded at 0.5, and compared with the ground-truth
mask cut by the same box at S_K (the training targets' rule, :func:`mask_losses.mask_targets`). It also
returns what each given switch chooses for those boxes. :func:`gt_box_routing` does this for every
ground-truth instance of a dataset and returns the inputs of :mod:`dynamask.engine.routing_value`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamask.models import mask_losses
from dynamask.models.detector import DynaMaskRCNN
from dynamask.models.msm import MaskSwitchModule
from dynamask.models.roi_heads import DynaMaskRoIHeads
from dynamask.models.switch_input import switch_view

# A switch: (MSM module, what it reads: one of dynamask.models.switch_input.SWITCH_INPUTS)
Switch = tuple[nn.Module, str]

@torch.no_grad()
def mask_iou_top_grid(probs: Sequence[Tensor], target_top: Tensor, threshold: float = 0.5) -> Tensor:
    """IoU of each resolution's mask with the target on the finest grid.

    Args:
        probs: K tensors ``[R, S_k, S_k]`` of mask probabilities.
        target_top: ``[R, S_K, S_K]`` 0/1 ground truth cut at the finest resolution.

    Returns:
        ``[R, K]`` float64 IoUs (1.0 where both the mask and the target are empty).
    """
    size = target_top.shape[-2:]
    gt = target_top > 0.5
    out = []
    for p in probs:
        up = p if p.shape[-2:] == size else F.interpolate(p[:, None], size=size, mode="bilinear",
                                                          align_corners=False)[:, 0]
        m = up >= threshold
        inter = (m & gt).flatten(1).sum(1).double()
        union = (m | gt).flatten(1).sum(1).double()
        out.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)))
    return torch.stack(out, dim=1) if out else target_top.new_zeros((target_top.shape[0], 0), dtype=torch.float64)

@torch.no_grad()
def head_outputs(model: DynaMaskRCNN, features: dict[str, Tensor], boxes: list[Tensor],
                 image_sizes: list[tuple[int, int]], switches: Mapping[str, Switch] | None = None,
                 labels: list[Tensor] | None = None,
                 scores: list[Tensor] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Mask probabilities at every resolution and each switch's choice, for boxes in the input frame.

    Args:
        model: a DynaMask detector (``model.roi_heads`` a ``DynaMaskRoIHeads``), in eval mode.
        features: the backbone's output on the batch. boxes: per image ``[n_i, 4]``.
        switches: name → (MSM, "roi" | "trunk" | "mask"); None: the model's own switch as ``"msm"``.
        labels: per image ``[n_i]`` the boxes' classes (needed by a class-specific head).
        scores: per image ``[n_i]`` the boxes' detection scores, which a fitted switch weighs its choice by
            (:meth:`~dynamask.models.msm.MaskSwitchModule.choose`); None: ground-truth boxes, sure ones.

    Returns:
        ``(probs, choices)``: K tensors ``[R, S_k, S_k]`` (R = Σ n_i, image-major) and name → ``[R]`` int64.
    """
    heads = cast(DynaMaskRoIHeads, model.roi_heads)
    if switches is None:
        switches = {"msm": (heads.msm, heads.switch_input)}
    head = heads.mask_head
    cls = torch.cat(labels) if labels is not None and head.mask_classes > 1 else None
    confidence = torch.cat(scores) if scores else None
    out = heads.masks_every_resolution(features, boxes, image_sizes, cls)
    choices = {}
    for name, (msm, reads) in switches.items():
        if out.roi_features.shape[0] == 0:
            choices[name] = torch.zeros(0, dtype=torch.int64)
            continue
        view = switch_view(reads, head, out.roi_features, out.trunk)
        # a MaskSwitchModule chooses (priced, weighted by confidence when fitted); another switch module (the
        # accuracy study's variants) by the argmax of its output
        choices[name] = msm.choose(view, confidence) if isinstance(msm, MaskSwitchModule) else msm(view).argmax(dim=1)
    return [x.sigmoid() for x in out.mask_logits], choices


@torch.no_grad()
def gt_box_routing(model: DynaMaskRCNN, dataset, *, switches: Mapping[str, Switch] | None = None,
                   indices: Sequence[int] | None = None, progress: bool = True,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """Every ground-truth instance of ``dataset``: IoU at each resolution and each switch's choice.

    Returns ``{"iou": [N, K] float64, "choices": {name: [N] int64}, "categories": N names,
    "kinds": {name: supercategory}, "resolutions": [...]}`` (numpy arrays).
    """
    from tqdm import tqdm

    model.eval().to(device)
    head = cast(DynaMaskRoIHeads, model.roi_heads).mask_head
    names = {int(c["id"]): str(c["name"]) for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    kinds = {str(c["name"]): str(c.get("supercategory", "")) for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    ious, cats = [], []
    choices: dict[str, list[np.ndarray]] = {}
    for i in tqdm(range(len(dataset)) if indices is None else indices, desc="gt boxes", disable=not progress,
                  dynamic_ncols=True):
        image, target = dataset[i]
        if target["boxes"].shape[0] == 0:
            continue
        images, targets = model.transform([image.to(device)], [{k: v.to(device) for k, v in target.items()}])
        features = model.backbone(images.tensors)
        boxes = [targets[0]["boxes"]]
        probs, ch = head_outputs(model, features, boxes, images.image_sizes, switches, [targets[0]["labels"]])
        n = boxes[0].shape[0]
        top = mask_losses.mask_targets([targets[0]["masks"]], boxes, [torch.arange(n, device=boxes[0].device)],
                                       [head.resolutions[-1]])[0]
        ious.append(mask_iou_top_grid(probs, top).cpu().numpy())
        for name, c in ch.items():
            choices.setdefault(name, []).append(c.cpu().numpy())
        cats += [names[dataset.cat_ids[int(lab) - 1]] for lab in target["labels"].tolist()]
    k = head.num_resolutions
    return {
        "iou": np.concatenate(ious) if ious else np.zeros((0, k)),
        "choices": {name: np.concatenate(c) for name, c in choices.items()},
        "categories": cats,
        "kinds": kinds,
        "resolutions": list(head.resolutions),
    }

def routing_summary(probe: Mapping[str, Any], switch: str = "msm") -> dict[str, Any]:
    """``{"routing_value": {...}, "categories": {name: {"kind", "n", "iou_gain", "mean_index"}},
    "category_yardstick": float | None}`` of one switch from a :func:`gt_box_routing` result (the demo's
    ``routing.json``). ``category_yardstick``: the share captured, with the switch's counts, by a router that
    knows only each instance's category (:func:`dynamask.engine.routing_value.category_routing`)."""
    import numpy as np

    from dynamask.engine.routing_value import category_routing, per_category, routing_value

    choice = probe["choices"][switch]
    value = routing_value(probe["iou"], choice)
    cats = per_category(probe["iou"], probe["categories"], choice, kinds=probe["kinds"])
    counts = np.bincount(np.asarray(choice, dtype=np.int64), minlength=np.asarray(probe["iou"]).shape[1])
    by_category = category_routing(probe["iou"], probe["categories"], counts.tolist())
    yardstick = routing_value(probe["iou"], by_category).captured
    return {
        "category_yardstick": yardstick,
        "routing_value": {"switch": value.switch, "shuffled": value.shuffled,
                          "best_same_counts": value.best_same_counts, "captured": value.captured},
        "categories": {name: {"kind": c.get("kind"), "n": c["n"], "iou_gain": c["iou_gain"],
                              "mean_index": c.get("mean_index")} for name, c in cats.items()},
    }
