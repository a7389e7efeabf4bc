"""Pure-PyTorch twin of ``paste_masks``: one ``F.grid_sample`` over the whole image per mask, in float64."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def paste_masks_reference(
    masks: Tensor | Sequence[Tensor], boxes: Tensor, image_size: tuple[int, int], threshold: float | None = 0.5,
    *, index: Tensor | None = None
) -> Tensor:
    """Same contract as :func:`dynamask.ops.paste_masks`; work ∝ N·H·W, for tests only.

    Pixel x (centre x + 0.5) samples the box's normalised grid at g = (x + 0.5 - x1) / (x2 - x1) * 2 - 1,
    bilinearly with zero padding (``align_corners=False``). A box of non-positive width or height
    pastes nothing.
    """
    H, W = image_size
    groups = [masks] if isinstance(masks, Tensor) else list(masks)
    flat = [m for g in groups for m in g]
    if index is not None:  # box n's mask is row index[n]
        flat = [flat[i] for i in index.tolist()]
    if len(flat) != boxes.shape[0]:
        raise ValueError(f"masks hold {len(flat)} masks but boxes has {boxes.shape[0]} rows")
    out = torch.zeros(len(flat), H, W, dtype=torch.float64)
    xs = torch.arange(W, dtype=torch.float64) + 0.5
    ys = torch.arange(H, dtype=torch.float64) + 0.5
    for i, m in enumerate(flat):
        x1, y1, x2, y2 = boxes[i].double().tolist()
        if not (x2 > x1 and y2 > y1) or H == 0 or W == 0:
            continue
        gx = (xs - x1) / (x2 - x1) * 2 - 1
        gy = (ys - y1) / (y2 - y1) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]  # [1, H, W, (x, y)]
        src = m.detach().to("cpu", torch.float64)[None, None]
        out[i] = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]
    out = out.to(boxes.device)
    return out >= threshold if threshold is not None else out.float()
