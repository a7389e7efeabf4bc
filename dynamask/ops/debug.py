"""Opt-in full checks of the values the CUDA kernels never read on the host.

On the CPU every kernel checks its inputs in full and raises (a RoI batch index that is not an integer in
``[0, N)``, a non-finite box, a level or resolution index out of range). The CUDA kernels do not read
their inputs on the host, so that a call never waits on the device, and they do not assert on the device
either, because a device-side assert leaves the CUDA context unusable for every later call of the
process. Instead they give a defined result for such input:

- ``roi_align_multilevel`` / ``roi_align_stages``: the RoI pools to zeros and gets no gradient;
- ``paste_masks``: a box with a non-finite coordinate, or whose width or height overflows float32, pastes
  nothing, and so does a box whose ``index`` entry is not a mask row;
- ``group_by_resolution``: a choice outside ``[0, K)`` goes last in ``perm`` and is not counted, so
  ``counts.sum() < R``.

Under :func:`full_checks` (or with ``DYNAMASK_FULL_CHECKS=1`` in the environment) the Python wrappers
check those values on any device before the kernel runs, and raise a ``ValueError`` naming the argument.
On CUDA that costs one host synchronisation per call: use it while debugging.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

_enabled = os.environ.get("DYNAMASK_FULL_CHECKS", "0") not in ("", "0")


def full_checks_enabled() -> bool:
    """Whether the wrappers check input values before every kernel call."""
    return _enabled


def set_full_checks(enabled: bool) -> None:
    """Turns the full checks on or off for the whole process."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def full_checks(enabled: bool = True) -> Iterator[None]:
    """``with dynamask.ops.full_checks(): ...`` checks input values inside the block."""
    previous = _enabled
    set_full_checks(enabled)
    try:
        yield
    finally:
        set_full_checks(previous)


def _first_bad(bad: Tensor) -> int | None:
    rows = bad.nonzero()
    return None if rows.numel() == 0 else int(rows[0, 0])


def check_rois(op: str, rois: Tensor, batch_size: int, count: int | None = None) -> None:
    """Every row of ``rois[:count]``: batch index an integer in ``[0, batch_size)``, finite coordinates."""
    r = rois[:count] if count is not None else rois
    if r.numel() == 0:
        return
    r = r.detach().double()
    b = r[:, 0]
    i = _first_bad(~((b >= 0) & (b < batch_size) & (b == b.floor())))
    if i is not None:
        raise ValueError(
            f"{op}: rois[{i}, 0] (batch index) is {float(b[i])} but must be an integer in [0, {batch_size})"
        )
    i = _first_bad(~torch.isfinite(r[:, 1:]).all(1))
    if i is not None:
        raise ValueError(f"{op}: rois[{i}] has a non-finite coordinate ({r[i, 1:].tolist()})")


def _check_in_range(op: str, name: str, t: Tensor, upper: int, what: str = "") -> None:
    """Every entry of the integer tensor ``t`` in ``[0, upper)``; else one line naming the first one out."""
    i = _first_bad((t < 0) | (t >= upper))
    if i is not None:
        raise ValueError(f"{op}: {name}[{i}] is {int(t[i])} but must be {what}in [0, {upper})")


def check_levels(op: str, levels: Tensor, num_levels: int) -> None:
    _check_in_range(op, "levels", levels, num_levels)


def check_paste_boxes(op: str, boxes: Tensor) -> None:
    """Finite in float32, and a width and height that float32 can hold (the kernels compute in float32)."""
    if boxes.numel() == 0:
        return
    b = boxes.detach().float()
    ok = torch.isfinite(b).all(1) & torch.isfinite(b[:, 2] - b[:, 0]) & torch.isfinite(b[:, 3] - b[:, 1])
    i = _first_bad(~ok)
    if i is not None:
        raise ValueError(f"{op}: boxes[{i}] = {boxes[i].tolist()} is not finite in float32, or its width or "
                         "height overflows float32")


def check_paste_index(op: str, index: Tensor, num_masks: int) -> None:
    _check_in_range(op, "index", index, num_masks, "a mask row ")


def check_choice(op: str, choice: Tensor, num_resolutions: int) -> None:
    _check_in_range(op, "choice", choice, num_resolutions)
