"""What the Mask Switch Module reads (``switch_input``), one place for the model, the probes and the study.

- ``"roi"``: the detached 14×14 RoI feature (the paper's MSM; docs/method.md §3).
- ``"trunk"``: the trunk's output at 14×14. Inference runs the trunk for every RoI anyway, so the switch
  costs only its own MACs.
- ``"mask"``: the trunk's output with the 14² mask and edge logits appended (two channels; a class-specific
  head's every class channel, ``mask_classes + 1``). The coarse mask
  and its predicted outline say directly how much of the RoI is boundary, which is what a finer mask
  improves; the two 1×1 predictors add ``(mask_classes + 1) · C_0 · 14²`` MACs per RoI, counted by
  :func:`dynamask.models.flops.msm_macs`.

Every view is detached: the routing losses train the switch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynamask.models.mask_head import DynaMaskHead

SWITCH_INPUTS: tuple[str, ...] = ("roi", "trunk", "mask")


def check_switch_input(kind: str) -> None:
    if kind not in SWITCH_INPUTS:
        raise ValueError(f"switch_input must be one of {SWITCH_INPUTS}, got {kind!r}")


def needs_trunk(kind: str) -> bool:
    """True when the view is computed from the trunk's output (inference then runs the trunk first)."""
    return kind != "roi"


def switch_channels(kind: str, *, fpn_channels: int, trunk_channels: int, mask_classes: int = 1) -> int:
    """Input width of an MSM that reads ``kind`` (``mask_classes``: the head's, see ``DynaMaskHead``)."""
    check_switch_input(kind)
    return fpn_channels if kind == "roi" else trunk_channels + (mask_classes + 1 if kind == "mask" else 0)


def switch_view(kind: str, head: DynaMaskHead, roi_features: Tensor, trunk: Tensor | None = None) -> Tensor:
    """The switch's input, detached.

    Args:
        kind: one of :data:`SWITCH_INPUTS`.
        head: the :class:`~dynamask.models.mask_head.DynaMaskHead`.
        roi_features: ``[R, C, S_0, S_0]``.
        trunk: the trunk's output on ``roi_features`` ``[R, C_0, S_0, S_0]`` if already computed.

    Returns:
        ``[R, switch_channels(kind), S_0, S_0]``.
    """
    check_switch_input(kind)
    if kind == "roi":
        return roi_features.detach()
    with torch.no_grad():
        t = head.run_trunk(roi_features) if trunk is None else trunk
        if kind == "trunk":
            return t.detach()
        return torch.cat([t, head.mask_predictors[0](t), head.edge_predictors[0](t)], dim=1).detach()
