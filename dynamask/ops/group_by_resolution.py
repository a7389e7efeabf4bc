"""The per-resolution dispatcher: orders RoIs by chosen depth (stable counting sort).

PLACEHOLDER until the kernel lands: a torch.sort-based version with the final contract.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_by_resolution(choice: Tensor, num_resolutions: int) -> tuple[Tensor, Tensor]:
    """Args: choice ``[R]`` int64 in [0, num_resolutions).

    Returns ``(perm [R], counts [num_resolutions])``, int64 on ``choice``'s device: ``perm`` orders
    RoIs by descending choice, stable among equal choices; ``counts[k]`` = #RoIs with choice k.
    """
    if choice.numel() and (int(choice.min()) < 0 or int(choice.max()) >= num_resolutions):
        raise ValueError(f"choice values must be in [0, {num_resolutions})")
    perm = torch.sort(-choice, stable=True).indices
    counts = torch.bincount(choice, minlength=num_resolutions)
    return perm, counts
