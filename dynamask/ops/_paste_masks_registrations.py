"""Fake (meta) kernels of the paste ops. No autograd: pasting is inference-only."""

from __future__ import annotations

import torch


@torch.library.register_fake("dynamask::paste_masks")
def _paste_masks_fake(masks, boxes, height, width, threshold, index=None):
    dtype = torch.bool if threshold is not None else torch.float32
    return boxes.new_empty((boxes.shape[0], height, width), dtype=dtype)


@torch.library.register_fake("dynamask::paste_masks_rle")
def _paste_masks_rle_fake(masks, boxes, height, width, threshold, index=None):
    total = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((total,), dtype=torch.uint8), boxes.new_empty((boxes.shape[0] + 1,), dtype=torch.int64)
