"""The mask hand-off as it was before issue 19, kept so that ``benchmarks/e2e.py --before`` times it
against the current one in the same process (same weights, images and kernels).

Then the heads stored each image's masks under string keys ``mask_probs_S`` (split per image with one
host sync per resolution), and the detector popped them, turned the sizes back into indices and rebuilt
runs of one resolution in a Python loop before one :func:`dynamask.ops.paste_masks` call in box order.
The code below is that code (commit c29c094; the routing, unchanged, now shared as ``route``), calling
the paste op's old form (no ``index``).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MethodType

import torch
from torch import Tensor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from dynamask import ops
from dynamask.models.inputs import check_images


def split_by_image(mask_probs: Sequence[Tensor], choice_sorted: Tensor, image_ids_sorted: Tensor,
                   num_images: int) -> list[list[Tensor]]:
    per_image: list[list[Tensor]] = [[] for _ in range(num_images)]
    for k, probs in enumerate(mask_probs):
        ids = image_ids_sorted[choice_sorted == k]
        sizes = torch.bincount(ids, minlength=num_images).tolist() if ids.numel() else [0] * num_images
        for i, part in enumerate(probs.split(sizes, dim=0)):
            per_image[i].append(part)
    return per_image


def predict_masks(self, features, result, image_shapes) -> None:
    boxes = [r["boxes"] for r in result]
    resolutions = self.mask_head.resolutions
    (roi_features, levels, scales, rois), trunk, choice = self.route(features, boxes, image_shapes)
    perm, counts = ops.group_by_resolution(choice, len(resolutions))
    labels = torch.cat([r["labels"] for r in result]) if self.mask_head.mask_classes > 1 else None
    logits = self.mask_head.forward_dispatched(roi_features[perm], levels, scales, rois[perm], counts.tolist(),
                                               None if trunk is None else trunk[perm],
                                               None if labels is None else labels[perm])
    image_ids = rois[:, 0].to(torch.int64)
    per_image = split_by_image([x.sigmoid() for x in logits], choice[perm], image_ids[perm], len(result))
    sizes = torch.tensor(resolutions, dtype=torch.int64, device=choice.device)
    for r, parts, c in zip(result, per_image, choice.split([b.shape[0] for b in boxes])):
        r["mask_resolution"] = sizes[c]
        for s, part in zip(resolutions, parts):
            r[f"mask_probs_{s}"] = part


def paste_instance_masks(detection, image_size, resolutions):
    parts = [detection.pop(f"mask_probs_{s}") for s in resolutions]
    boxes = detection["boxes"]
    res = detection["mask_resolution"]
    index = torch.bucketize(res, torch.tensor(list(resolutions), device=res.device))
    h, w = int(image_size[0]), int(image_size[1])
    if boxes.shape[0] == 0:
        detection["masks"] = boxes.new_zeros((0, 1, h, w), dtype=torch.float32)
        return detection
    groups: list[Tensor] = []
    taken = [0] * len(parts)
    run_start = 0
    kinds = index.tolist()
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[run_start]:
            k, n = kinds[run_start], i - run_start
            groups.append(parts[k][taken[k]:taken[k] + n])
            taken[k] += n
            run_start = i
    detection["masks"] = ops.paste_masks(groups, boxes, (h, w), threshold=None)[:, None]
    return detection


def forward(model, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """``model(images)`` in eval mode, through the old hand-off."""
    images = check_images(images, next(model.parameters()).dtype)
    heads = model.roi_heads
    heads.predict_masks = MethodType(predict_masks, heads)  # shadows the class's method on this instance
    try:
        out = GeneralizedRCNN.forward(model, images)
    finally:
        del heads.predict_masks
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    res = heads.mask_head.resolutions
    return [paste_instance_masks(det, size, res) for det, size in zip(out, sizes)]
