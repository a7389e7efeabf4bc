"""Joint image + target transforms for detection: resize by the shorter side, horizontal flip, compose.

Each transform is a callable ``(image [3, H, W], target) -> (image, target)``. Randomness comes from torch's
global generator, so the training loop can make it a function of (seed, epoch, index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Target = dict[str, torch.Tensor]


class Compose:
    def __init__(self, transforms: Sequence[Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Scale so the shorter side is ``min_size`` (the longer one at most ``max_size``).

    Args:
        min_size: an int, or a ``(low, high)`` range from which each call draws the shorter side uniformly
            (multi-scale training).
        max_size: cap on the longer side, or None.
    Boxes and areas are scaled, masks resized by nearest neighbour.
    """

    def __init__(self, min_size: int | tuple[int, int], max_size: int | None = None) -> None:
        if isinstance(min_size, (tuple, list)):
            if len(min_size) != 2 or min_size[0] > min_size[1] or min_size[0] <= 0:
                raise ValueError(f"min_size range must be (low, high) with 0 < low <= high, got {min_size}")
            self.min_size = (int(min_size[0]), int(min_size[1]))
        else:
            if int(min_size) <= 0:
                raise ValueError(f"min_size must be positive, got {min_size}")
            self.min_size = (int(min_size), int(min_size))
        self.max_size = max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        low, high = self.min_size
        size = low if low == high else int(torch.randint(low, high + 1, ()).item())
        h, w = image.shape[-2:]
        scale = size / min(h, w)
        if self.max_size is not None and max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) == (h, w):
            return image, target
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        target = dict(target)
        sx, sy = nw / w, nh / h
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        if "masks" in target:
            m = target["masks"]
            if m.shape[0] > 0:
                target["masks"] = F.interpolate(m[None].float(), size=(nh, nw), mode="nearest")[0].to(m.dtype)
            else:
                target["masks"] = m.new_zeros((0, nh, nw))
        return image, target

    def __repr__(self) -> str:
        return f"Resize(min_size={self.min_size}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror image, boxes and masks left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if self.p <= 0 or (self.p < 1 and torch.rand(()).item() >= self.p):
            return image, target
        return hflip(image, target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    w = image.shape[-1]
    image = image.flip(-1)
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image, target
