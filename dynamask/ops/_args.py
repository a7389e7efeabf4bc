"""The ops' argument forms, normalised once: a size given as ``S`` or ``(S_h, S_w)``, and boxes given as
one ``[R, 5]`` RoI tensor or as per-image ``[n_i, 4]`` lists."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import SupportsIndex

import torch
from torch import Tensor


def pair(value: int | Sequence[int], *, op: str, name: str) -> tuple[int, int]:
    """``S`` → ``(S, S)``; ``(S_h, S_w)`` → itself, as Python ints.

    Raises:
        TypeError: naming ``op`` and ``name``, for anything but an integer or a pair of integers (numpy and
            0-d integer tensors count; floats do not, since a size or stride of 2.5 is a mistake).
    """
    try:
        if isinstance(value, SupportsIndex):
            size = operator.index(value)
            return size, size
        if isinstance(value, (list, tuple, torch.Size)) and len(value) == 2:
            return operator.index(value[0]), operator.index(value[1])
    except TypeError:  # e.g. a float, or a tensor of more than one element
        pass
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def check_sampling_ratio(value: int, *, op: str) -> int:
    """The kernels' ``sampling_ratio``: ``n > 0`` samples per bin and axis, or 0 for adaptive
    (``ceil(roi side / output side)``). torchvision's spelling of adaptive, -1, is accepted and means 0.

    Raises:
        TypeError: naming ``op``, for anything but an integer (a ratio of 2.5 is a mistake, not 2).
        ValueError: naming ``op``, for another negative value (torchvision takes any value <= 0 as adaptive;
            here only the two spellings of it are, so that a sign slip does not pass unnoticed).
    """
    try:
        ratio = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: sampling_ratio must be an int (0 or -1: adaptive), got {value!r}") from None
    if ratio < -1:
        raise ValueError(f"{op}: sampling_ratio must be >= 0, or -1 (torchvision's adaptive, the same as 0), "
                         f"got {ratio}")
    return max(ratio, 0)


def to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image ``[n_i, 4]`` boxes → ``[R, 5]`` rows of (batch index, x1, y1, x2, y2), image by image.

    The batch index takes the boxes' dtype and device. ``boxes`` must hold at least one tensor (an empty
    list has no dtype or device to give the result).
    """
    ids = [torch.full((b.shape[0], 1), float(i), dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)


def as_rois(rois: Tensor | Sequence[Tensor], name: str = "rois") -> Tensor:
    """The ``rois`` argument of the RoIAlign ops: an ``[R, 5]`` tensor as it is, or a list of per-image
    ``[n_i, 4]`` boxes through :func:`to_rois`; a ``ValueError`` / ``TypeError`` naming ``name`` otherwise."""
    if isinstance(rois, Tensor):
        return rois
    if isinstance(rois, (list, tuple)) and all(isinstance(b, Tensor) for b in rois):
        if len(rois) == 0:
            raise ValueError(f"{name}: an empty list of boxes has no dtype/device; pass a [0, 5] tensor")
        return to_rois(rois)
    raise TypeError(f"{name} must be a [R, 5] tensor or a list of [n_i, 4] tensors, got {type(rois).__name__}")
