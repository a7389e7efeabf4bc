"""The per-resolution dispatcher: orders RoIs by chosen depth with a stable counting sort.

After ``perm, counts = group_by_resolution(choice, K)``, ``choice[perm]`` is non-increasing, so the
RoIs that need mask-head stage s (choice >= s) form the prefix ``perm[:counts[s:].sum()]``: every
stage of the head runs on a contiguous prefix of the reordered RoIs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynamask.ops import (
    _group_by_resolution_registrations,  # noqa: F401  (fake kernel)
    debug,
)


def group_by_resolution(choice: Tensor, num_resolutions: int) -> tuple[Tensor, Tensor]:
    """Stable counting sort of RoIs by descending resolution index.

    Args:
        choice: ``[R]`` int64, the resolution index of every RoI, in ``[0, num_resolutions)``.
        num_resolutions: K, the number of resolutions (4 in DynaMask: 14, 28, 56, 112).

    Returns:
        ``(perm [R], counts [K])``, int64 on ``choice``'s device. ``perm`` orders the RoIs by
        descending choice and keeps the input order among equal choices; ``counts[k]`` is the number
        of RoIs with choice k.

    Raises:
        ValueError: ``choice`` is not a 1-D int64 tensor, ``num_resolutions`` is not positive, or (on
            the CPU) a choice lies outside ``[0, num_resolutions)``; the message names the value. On
            CUDA such a RoI goes last in ``perm`` and is not counted (``counts.sum() < R``), so the call
            never waits on the host, unless :func:`dynamask.ops.full_checks` is on.
    """
    if not isinstance(choice, Tensor):
        raise TypeError(f"choice must be a [R] int64 tensor, got {type(choice).__name__}")
    if debug.full_checks_enabled() and choice.dtype == torch.int64:
        debug.check_choice("group_by_resolution", choice, int(num_resolutions))
    return torch.ops.dynamask.group_by_resolution(choice, int(num_resolutions))
