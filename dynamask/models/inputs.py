"""Checks of the images and targets a detector is called with, so that a bad input is an error naming it
rather than a silently wrong result (a NaN pixel spreads until no detection survives; a mask of another
size than its image trains on the wrong pixels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Slack on the [0, 1] range: resampling in float32 can overshoot it by rounding; a 0..255 image (the slip
# this catches) is off by far more.
RANGE_SLACK = 1e-3


def check_images(images: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``images``: ``[3, H, W]`` float tensors in [0, 1], finite, with data (not on the meta device) and at
    least one pixel. Other float precisions (float16, bfloat16) are converted to ``dtype``, the model's, so a
    half-precision image works as its float32 copy would; mixed precision is ``torch.autocast``'s job."""
    if isinstance(images, Tensor) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of [3, H, W] tensors, got {type(images).__name__}")
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3:
            shape = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
            raise ValueError(f"image {i} must be a [3, H, W] tensor (RGB), got {shape}")
        if im.shape[1] == 0 or im.shape[2] == 0:
            raise ValueError(f"image {i} is empty: {tuple(im.shape)}")
        if im.device.type == "meta":
            raise ValueError(f"image {i} is on the meta device, which holds no pixel values")
        if not im.is_floating_point():
            raise ValueError(f"image {i} must be float in [0, 1], got {im.dtype} (for uint8 pixels: image / 255)")
        out.append(im if im.dtype == dtype else im.to(dtype))
    if out:
        # one device sync for the batch: finite, then lowest and highest value of each image
        stats = torch.stack([torch.stack([torch.isfinite(im).all().to(im.dtype), im.min(), im.max()]).float()
                             for im in out]).cpu()
        if not bool(stats[:, 0].all()):
            bad = [i for i, ok in enumerate(stats[:, 0].tolist()) if not ok]
            raise ValueError(f"images {bad} hold NaN or infinite values")
        outside = (stats[:, 1] < -RANGE_SLACK) | (stats[:, 2] > 1 + RANGE_SLACK)
        if bool(outside.any()):
            bad = outside.nonzero()[:, 0].tolist()
            lo, hi = float(stats[bad, 1].min()), float(stats[bad, 2].max())
            raise ValueError(f"images {bad} hold values outside [0, 1] (from {lo:.4g} to {hi:.4g}); images are "
                             "float in [0, 1]: divide 0..255 pixels by 255")
    return out


def check_targets(images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]], *, masks: bool,
                  num_classes: int | None = None) -> None:
    """One target per image; ``boxes [N, 4]`` (xyxy pixels, each overlapping its image), ``labels [N]``
    (1 .. ``num_classes - 1``: 0 is the background) and (when ``masks``) ``masks [N, H, W]`` with the
    image's ``H, W`` and one mask per box."""
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"need one target per image: {len(images)} images, {n} targets")
    for i, (im, t) in enumerate(zip(images, targets)):
        for key in ("boxes", "labels") + (("masks",) if masks else ()):
            if key not in t:
                raise ValueError(f"target {i} has no {key!r}")
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"target {i}: boxes must be [N, 4], got {tuple(boxes.shape)}")
        n = boxes.shape[0]
        if labels.shape != (n,):
            raise ValueError(f"target {i}: {n} boxes but labels of shape {tuple(labels.shape)}")
        if boxes.is_floating_point() and not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"target {i}: boxes hold NaN or infinite values")
        if n:
            _check_labels(i, labels, num_classes)
            h, w = im.shape[-2:]
            # a box wholly outside its image matches no anchor, yet its regression target still counts
            outside = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= w) | (boxes[:, 1] >= h)
            if bool(outside.any()):
                k = int(outside.nonzero()[0, 0])
                raise ValueError(f"target {i}: box {k} {[round(float(v), 2) for v in boxes[k]]} lies wholly "
                                 f"outside its {w}x{h} image (boxes are xyxy pixels of the image)")
        if masks:
            m, (h, w) = t["masks"], im.shape[-2:]
            if m.dim() != 3 or m.shape[0] != n or tuple(m.shape[1:]) != (h, w):
                raise ValueError(f"target {i}: masks must be [N, H, W] = [{n}, {h}, {w}] (one per box, the "
                                 f"image's size), got {tuple(m.shape)}")


def _check_labels(i: int, labels: Tensor, num_classes: int | None) -> None:
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"target {i}: labels must be integers, got {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 1:  # torchvision would train these as background, silently
        raise ValueError(f"target {i}: label {low} < 1 (labels are 1 .. num_classes - 1; 0 is the background)")
    if num_classes is not None and high >= num_classes:
        raise ValueError(f"target {i}: label {high} ≥ num_classes {num_classes} (labels are 1 .. {num_classes - 1})")
