"""Paste of variable-resolution masks into a full image, in one kernel call.

Convention (detectron2's): pixel (x, y) has its centre at (x + 0.5, y + 0.5); a box is continuous,
so its mask of S x S cells is stretched over [x1, x2) x [y1, y2) and sampled bilinearly with zero
padding, i.e. ``F.grid_sample(mask, grid, align_corners=False)`` on the box's normalised grid
``g = (x + 0.5 - x1) / (x2 - x1) * 2 - 1``. Only the pixels within the box grown by half a mask
cell can be non-zero, and only those are sampled: the work is proportional to the boxes' areas
(plus writing the dense output once), not to N·H·W.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dynamask.ops import (
    _paste_masks_registrations,  # noqa: F401  (fake kernels)
    debug,
)


def _mask_groups(masks: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(masks, Tensor):
        return [masks]
    if isinstance(masks, (list, tuple)) and all(isinstance(m, Tensor) for m in masks):
        return list(masks)
    raise TypeError(
        f"masks must be an [M, S, S] tensor or a list of [m_j, S_j, S_j] tensors, got {type(masks).__name__}"
    )


def _image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def paste_masks(
    masks: Tensor | Sequence[Tensor],
    boxes: Tensor,
    image_size: tuple[int, int],
    threshold: float | None = 0.5,
    *,
    index: Tensor | None = None,
) -> Tensor:
    """Pastes every mask into its box on an image canvas; all masks, of all resolutions, in one call.

    Args:
        masks: probabilities (after the sigmoid): one ``[M, S, S]`` tensor, or a list of
            ``[m_j, S_j, S_j]`` tensors, one per resolution; their rows, counted across the list in
            order, are the M masks. float32, float16, bfloat16 or float64 (computed in float32).
        boxes: ``[N, 4]`` (x1, y1, x2, y2) in image pixels, floating, on the masks' device. A box
            may lie partly or wholly outside the image; one of non-positive width or height pastes
            nothing.
        image_size: (H, W) of the canvas.
        threshold: the output is ``value >= threshold`` (bool) when given, else the float32
            probabilities.
        index: ``[N]`` int64 on the boxes' device: box n's mask is row ``index[n]`` of the masks, in
            ``[0, M)``. The kernel writes each mask into its box's output slot, so masks grouped by
            resolution (in any order) come out in box order without a copy. None: the masks follow
            the rows of ``boxes`` in order (M = N).

    Returns:
        ``[N, H, W]``, bool or float32, on the boxes' device; row n is box n's.

    Raises:
        ValueError: a wrong shape, dtype or device (naming the argument); on the CPU, a box with a
            non-finite coordinate (in float32) or whose width or height overflows float32, or an
            ``index`` entry out of ``[0, M)``, before any work. On CUDA such a box or entry pastes
            nothing instead, unless :func:`dynamask.ops.full_checks` is on.
    """
    groups = _mask_groups(masks)
    H, W = _image_size(image_size)
    thr = None if threshold is None else float(threshold)
    if debug.full_checks_enabled() and isinstance(boxes, Tensor):
        debug.check_paste_boxes("paste_masks", boxes)
        if isinstance(index, Tensor):
            debug.check_paste_index("paste_masks", index, sum(int(g.shape[0]) for g in groups))
    return torch.ops.dynamask.paste_masks(groups, boxes, H, W, thr, index)


def paste_masks_rle(
    masks: Tensor | Sequence[Tensor],
    boxes: Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
    *,
    index: Tensor | None = None,
) -> list[dict]:
    """The thresholded masks of :func:`paste_masks` as COCO compressed RLEs, without the canvases.

    Each mask's column-major runs are produced from its box span only (whole columns outside the box
    are single runs) and compressed to COCO's string format in C++, so no ``[N, H, W]`` canvas is
    ever built.

    Args:
        masks, boxes, image_size, index: as :func:`paste_masks`.
        threshold: a pixel is set when its value is ``>= threshold``; must be positive.

    Returns:
        N dicts ``{"size": [H, W], "counts": bytes}`` in box order, as ``pycocotools.mask.encode``
        returns them. CUDA inputs are copied to the host first (the masks are small; the runs are
        built there).
    """
    groups = _mask_groups(masks)
    H, W = _image_size(image_size)
    if boxes.device.type != "cpu":
        groups = [m.cpu() for m in groups]
        boxes = boxes.cpu()
        index = index.cpu() if isinstance(index, Tensor) else index
    chars, offsets = torch.ops.dynamask.paste_masks_rle(groups, boxes, H, W, float(threshold), index)
    data = chars.numpy().tobytes()
    o = offsets.tolist()
    return [{"size": [H, W], "counts": data[o[i] : o[i + 1]]} for i in range(len(o) - 1)]
