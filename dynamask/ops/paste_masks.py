"""Paste of variable-resolution masks into a full image.

PLACEHOLDER until the kernel lands (issue 5): a grid_sample version with the final contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def paste_masks(
    masks: Tensor | Sequence[Tensor], boxes: Tensor, image_size: tuple[int, int], threshold: float | None = 0.5
) -> Tensor:
    """Args: masks: probabilities, ``[N, S, S]`` or a list of ``[n_j, S_j, S_j]`` (in box order);
    boxes ``[N, 4]`` xyxy; image_size (H, W). Returns ``[N, H, W]``: bool (>= threshold) or float32."""
    H, W = image_size
    mlist = [masks] if isinstance(masks, Tensor) else list(masks)
    out = []
    i = 0
    for m in mlist:
        for k in range(m.shape[0]):
            x1, y1, x2, y2 = boxes[i].tolist()
            i += 1
            xs = (torch.arange(W, dtype=torch.float32, device=boxes.device) + 0.5 - x1) / max(x2 - x1, 1e-6) * 2 - 1
            ys = (torch.arange(H, dtype=torch.float32, device=boxes.device) + 0.5 - y1) / max(y2 - y1, 1e-6) * 2 - 1
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.stack([gx, gy], -1)[None]
            out.append(F.grid_sample(m[k][None, None].float(), grid, align_corners=False)[0, 0])
    res = torch.stack(out) if out else boxes.new_zeros((0, H, W), dtype=torch.float32)
    return res >= threshold if threshold is not None else res
