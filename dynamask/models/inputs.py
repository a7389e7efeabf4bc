"""Checks of the images and targets a detector is called with, so that a bad input is an error naming it
rather than a silently wrong result (a NaN pixel spreads until no detection survives; a mask of another
size than its image trains on the wrong pixels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_images(images: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``images``: ``[3, H, W]`` float tensors in [0, 1], finite. Other float precisions (float16,
    bfloat16) are converted to ``dtype``, the model's, so a half-precision image works as its float32 copy
    would; mixed precision is ``torch.autocast``'s job."""
    if isinstance(images, Tensor) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of [3, H, W] tensors, got {type(images).__name__}")
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.dim() != 3:
            shape = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
            raise ValueError(f"image {i} must be a [3, H, W] tensor, got {shape}")
        if not im.is_floating_point():
            raise ValueError(f"image {i} must be float in [0, 1], got {im.dtype} (for uint8 pixels: image / 255)")
        out.append(im if im.dtype == dtype else im.to(dtype))
    if out:
        finite = torch.stack([torch.isfinite(im).all() for im in out])  # one device sync for the batch
        if not bool(finite.all()):
            bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
            raise ValueError(f"images {bad} hold NaN or infinite values")
    return out


def check_targets(images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]], *, masks: bool) -> None:
    """One target per image; ``boxes [N, 4]``, ``labels [N]`` and (when ``masks``) ``masks [N, H, W]`` with
    the image's ``H, W`` and one mask per box."""
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
        if masks:
            m, (h, w) = t["masks"], im.shape[-2:]
            if m.dim() != 3 or m.shape[0] != n or tuple(m.shape[1:]) != (h, w):
                raise ValueError(f"target {i}: masks must be [N, H, W] = [{n}, {h}, {w}] (one per box, the "
                                 f"image's size), got {tuple(m.shape)}")
