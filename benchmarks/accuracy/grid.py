"""The accuracy study's picture grid: the same instances at each of DynaMask's resolutions and from Mask R-CNN's
28² head, on their ground-truth boxes, so that a reader sees what each r-FPN stage adds.

One row per instance (the first validation instance of each category asked for), columns: the image crop, the
ground truth, DynaMask at every resolution, then Mask R-CNN; each mask is its probability upsampled to the
crop and thresholded at 0.5, with its IoU against the target on the finest grid in the title.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

GRID_CATEGORIES = ("ring", "star", "gear", "ellipse")


def _first_instances(dataset, categories: Sequence[str]) -> list[tuple[int, int, str]]:
    """(image index, instance index, category) of the first instance of each category, in dataset order."""
    names = {int(c["id"]): str(c["name"]) for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    found: dict[str, tuple[int, int, str]] = {}
    for i in range(len(dataset)):
        info = dataset.coco.imgs[dataset.ids[i]]
        anns = [a for a in dataset.coco.imgToAnns.get(info["id"], []) if not a.get("iscrowd", 0)]
        for j, a in enumerate(anns):
            name = names.get(int(a["category_id"]))
            if name in categories and name not in found:
                found[name] = (i, j, name)
        if len(found) == len(categories):
            break
    return [found[c] for c in categories if c in found]


@torch.no_grad()
def _dynamask_masks(model, image, target, j: int) -> tuple[list[np.ndarray], np.ndarray, Any]:
    from dynamask.engine.routing_probe import head_outputs
    from dynamask.models import mask_losses

    images, targets = model.transform([image], [dict(target)])
    features = model.backbone(images.tensors)
    boxes = targets[0]["boxes"][j : j + 1]
    labels = targets[0]["labels"][j : j + 1]
    probs, _ = head_outputs(model, features, [boxes], images.image_sizes, {}, [labels])
    top = model.roi_heads.mask_head.resolutions[-1]
    gt = mask_losses.mask_targets([targets[0]["masks"][j : j + 1]], [boxes], [torch.zeros(1, dtype=torch.int64)],
                                  [top])[0]
    return [p[0].numpy() for p in probs], gt[0].numpy(), (images, targets, boxes)


@torch.no_grad()
def _maskrcnn_mask(model, image, target, j: int) -> np.ndarray:
    images, targets = model.transform([image], [dict(target)])
    features = model.backbone(images.tensors)
    boxes = targets[0]["boxes"][j : j + 1]
    heads = model.roi_heads
    logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, [boxes], images.image_sizes)))
    return logits[0, int(targets[0]["labels"][j])].sigmoid().numpy()


def _iou(prob: np.ndarray, gt: np.ndarray) -> float:
    up = F.interpolate(torch.from_numpy(prob)[None, None], size=gt.shape, mode="bilinear", align_corners=False)
    m, g = up[0, 0].numpy() >= 0.5, gt > 0.5
    union = (m | g).sum()
    return float((m & g).sum() / union) if union else 1.0


def picture_grid(dynamask, maskrcnn, dataset, path: str, *, categories: Sequence[str] = GRID_CATEGORIES) -> None:
    """Writes the grid to ``path`` (PNG). ``maskrcnn`` may be None (its column is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dynamask.eval()
    if maskrcnn is not None:
        maskrcnn.eval()
    picks = _first_instances(dataset, categories)
    res = list(dynamask.roi_heads.mask_head.resolutions)
    cols = 2 + len(res) + (maskrcnn is not None)
    fig, axes = plt.subplots(len(picks), cols, figsize=(1.6 * cols, 1.7 * len(picks)), squeeze=False)
    for row, (i, j, name) in enumerate(picks):
        image, target = dataset[i]
        probs, gt, (images, targets, boxes) = _dynamask_masks(dynamask, image, target, j)
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[0])
        crop = images.tensors[0, :, max(y1, 0) : max(y2, y1 + 1), max(x1, 0) : max(x2, x1 + 1)]
        crop = (crop - crop.amin()) / (crop.amax() - crop.amin()).clamp(min=1e-6)
        panels: list[tuple[str, np.ndarray]] = [(name, crop.permute(1, 2, 0).numpy()), ("ground truth", gt)]
        panels += [(f"{s}²  IoU {_iou(p, gt):.2f}", p >= 0.5) for s, p in zip(res, probs)]
        if maskrcnn is not None:
            p = _maskrcnn_mask(maskrcnn, image, target, j)
            panels.append((f"Mask R-CNN 28²  IoU {_iou(p, gt):.2f}", p >= 0.5))
        for col, (title, picture) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(picture, cmap=None if picture.ndim == 3 else "gray", interpolation="nearest", aspect="auto")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
