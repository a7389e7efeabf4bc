"""Mask-branch inference as pure functions: the routing policies.

Flow (docs/method.md §3): a policy picks a resolution index per RoI; :func:`dynamask.ops.group_by_resolution`
sorts the RoIs by descending choice, so stage s of the head runs on a contiguous prefix; each RoI's mask
leaves the head at its own resolution and goes to the paste through :mod:`dynamask.models.mask_handoff`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dynamask.models.msm import MaskSwitchModule

Policy = str | int | Callable[[Tensor, list[Tensor], list[tuple[int, int]]], Tensor]


def size_policy(boxes: Tensor, num_resolutions: int = 4) -> Tensor:
    """The paper's Eq. 8 as docs/method.md §3 reads it: ``clamp(floor(3 + log2(sqrt(wh) / 224)), 0, K-1)``.

    Args:
        boxes: ``[R, 4]`` in the network's input frame.

    Returns:
        ``[R]`` int64 resolution indices.
    """
    wh = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    k = torch.floor(3.0 + torch.log2(wh.clamp(min=1e-12).sqrt() / 224.0))
    return k.clamp(0, num_resolutions - 1).to(torch.int64)


def check_policy(policy: object, resolutions: Sequence[int]) -> None:
    """Raises ``ValueError`` unless ``policy`` is ``"msm"``, ``"size"``, one of ``resolutions`` or a callable."""
    if isinstance(policy, str):
        ok = policy in ("msm", "size")
    elif isinstance(policy, int) and not isinstance(policy, bool):
        ok = policy in resolutions
    else:
        ok = callable(policy)
    if not ok:
        raise ValueError(f"mask_policy must be 'msm', 'size', one of {tuple(resolutions)} or a callable, "
                         f"got {policy!r}")


def choose_resolutions(policy: Policy, *, msm: MaskSwitchModule, roi_features: Tensor, boxes: list[Tensor],
                       image_sizes: list[tuple[int, int]], resolutions: Sequence[int],
                       confidence: Tensor | None = None) -> Tensor:
    """Resolution index per RoI under ``policy``.

    Args:
        policy: ``"msm"`` (the MSM's choice, :meth:`~dynamask.models.msm.MaskSwitchModule.choose`), ``"size"``
            (Eq. 8), a resolution (14/28/56/112), or a callable ``policy(roi_features, boxes, image_sizes) -> [R]
            int64`` in [0, K).
        roi_features: ``[R, 256, 14, 14]``. boxes: per image ``[n_i, 4]`` (input frame).
        confidence: ``[R]`` the detections' scores (image-major), read by a fitted switch; None: every RoI
            counts as a sure detection.

    Returns:
        ``[R]`` int64 in [0, K). A policy that is none of these is refused (:func:`check_policy`).
    """
    r = roi_features.shape[0]
    device = roi_features.device
    k = len(resolutions)
    if policy == "msm":
        return msm.choose(roi_features.detach(), confidence)
    if policy == "size":
        cat = torch.cat(boxes) if boxes else roi_features.new_zeros((0, 4))
        return size_policy(cat, k)
    if isinstance(policy, int) and not isinstance(policy, bool) and policy in resolutions:
        return torch.full((r,), list(resolutions).index(policy), dtype=torch.int64, device=device)
    if not callable(policy) or isinstance(policy, (str, int)):
        # the model checked its policy when it was set; a direct caller's bad policy is refused here,
        # not every batch on the way to a valid one
        check_policy(policy, resolutions)
        raise AssertionError(f"check_policy let {policy!r} through")
    choice = policy(roi_features, boxes, image_sizes)
    if not isinstance(choice, torch.Tensor) or choice.shape != (r,) or choice.dtype != torch.int64:
        got = (f"{tuple(choice.shape)} {choice.dtype}" if isinstance(choice, torch.Tensor)
               else f"a {type(choice).__name__}")
        raise ValueError(f"a policy callable must return an int64 tensor of shape [{r}] (resolution indices "
                         f"in [0, {k})), got {got}")
    if r and (int(choice.min()) < 0 or int(choice.max()) >= k):
        raise ValueError(f"a policy callable must return resolution indices in [0, {k}), got values "
                         f"from {int(choice.min())} to {int(choice.max())}")
    return choice.to(device)
