"""Pure-PyTorch twin of ``group_by_resolution``: a stable sort instead of the kernels' counting sort."""

from __future__ import annotations

import torch
from torch import Tensor


def group_by_resolution_reference(choice: Tensor, num_resolutions: int) -> tuple[Tensor, Tensor]:
    if choice.numel() and (int(choice.min()) < 0 or int(choice.max()) >= num_resolutions):
        raise ValueError(f"choice values must be in [0, {num_resolutions})")
    perm = torch.sort(choice, descending=True, stable=True).indices
    counts = torch.zeros(num_resolutions, dtype=torch.int64, device=choice.device)
    counts.scatter_add_(0, choice, torch.ones_like(choice))
    return perm, counts
