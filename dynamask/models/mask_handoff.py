"""The typed hand-off of mask probabilities from the RoI heads to the paste, as pure functions.

From the RoIs to the canvases the masks change order at most twice: :func:`dynamask.ops.group_by_resolution`
sorts the RoIs by chosen resolution once, the head runs in that order, and the paste writes each mask
into its box's canvas (its ``index`` argument). In between, an image's masks are views of the head's
outputs and nothing is copied or reordered; the whole hand-off costs one host synchronisation per batch
(:func:`count_groups`' table, which also sizes the head's stages). docs/architecture.md lists every hop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dynamask import ops

# The key under which :class:`~dynamask.models.roi_heads.DynaMaskRoIHeads` hands each image's
# :class:`MaskHandoff` over; torchvision's ``transform.postprocess`` passes it through untouched.
HANDOFF_KEY = "mask_handoff"


class MaskHandoff(NamedTuple):
    """One image's mask probabilities on their way from the head to the paste.

    Attributes:
        masks: K tensors; ``masks[k]`` is ``[n_k, S_k, S_k]``, the probabilities of the image's
            detections routed to resolution index k (S_k = the head's ``resolutions[k]``), in detection
            order. Views of the head's outputs.
        rows: ``[N]`` int64: detection n's mask is row ``rows[n]`` of the masks counted across the K
            groups in order (Σ n_k = N): the ``index`` argument of :func:`dynamask.ops.paste_masks`.
    """

    masks: tuple[Tensor, ...]
    rows: Tensor


def count_groups(choice: Tensor, image_ids: Tensor, num_resolutions: int, num_images: int) -> Tensor:
    """``[K, B]`` int64 on ``choice``'s device: how many RoIs of image b are routed to resolution k.

    Args:
        choice, image_ids: ``[R]`` int64, each RoI's resolution index in [0, K) and image in [0, B).
    """
    key = choice * num_images + image_ids  # [R]
    cells = torch.arange(num_resolutions * num_images, device=choice.device)
    # a comparison table rather than bincount, which on CUDA reads its input's max on the host
    return (key[:, None] == cells).sum(0).view(num_resolutions, num_images)


def split_by_image(mask_probs: Sequence[Tensor], perm: Tensor, choice: Tensor, image_ids: Tensor,
                   counts: Tensor, counts_host: Sequence[Sequence[int]]) -> list[MaskHandoff]:
    """Each image's :class:`MaskHandoff` from the head's outputs, without a copy or a host sync.

    Args:
        mask_probs: K tensors, entry k ``[c_k, S_k, S_k]``: the head's probabilities in the order of
            ``perm`` (descending resolution, stable: within one resolution the RoIs keep their
            image-major detection order).
        perm: ``[R]`` int64 from :func:`dynamask.ops.group_by_resolution`: sorted position j holds RoI
            ``perm[j]``.
        choice, image_ids: ``[R]`` int64 per RoI (image-major order): resolution index and image.
        counts: ``[K, B]`` from :func:`count_groups`; counts_host: the same as nested lists.

    Returns:
        B hand-offs, image b's ``rows`` of length Σ_k counts[k, b].
    """
    per_k = counts.sum(1)  # [K]
    # perm holds group K-1 first, then K-2, ...: group k starts after the groups above it
    start = per_k.flip(0).cumsum(0).flip(0) - per_k  # [K]
    earlier = counts.cumsum(1) - counts  # [K, B] group k's RoIs of the images before b
    lower = counts.cumsum(0) - counts  # [K, B] image b's RoIs in the groups below k
    position = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.shape[0], device=perm.device))  # [R]
    # RoI r of group k, image b: position = start_k + earlier[k, b] + its rank among them; its row in
    # image b's own groups (ascending k) = lower[k, b] + that rank
    rows = position - (start[:, None] + earlier - lower)[choice, image_ids]  # [R]
    num_images = counts.shape[1]
    per_image = rows.split([sum(c[b] for c in counts_host) for b in range(num_images)])
    parts = [probs.split(list(c)) for probs, c in zip(mask_probs, counts_host)]  # [K][B] views
    return [MaskHandoff(masks=tuple(p[b] for p in parts), rows=per_image[b]) for b in range(num_images)]


def handoff_from_choice(masks: Sequence[Tensor], choice: Tensor) -> MaskHandoff:
    """The hand-off of one image from masks at every resolution (a probe's, or an evaluation's that tries
    several routings) and a choice per detection.

    Args:
        masks: K tensors ``[N, S_k, S_k]``, every detection at every resolution, in detection order.
        choice: ``[N]`` int64 resolution index per detection.
    """
    order = torch.sort(choice, stable=True).indices  # ascending resolution, detection order within
    rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    return MaskHandoff(masks=tuple(m[choice == k] for k, m in enumerate(masks)), rows=rows)


def paste(handoff: MaskHandoff, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``[N, 1, H, W]`` float32 probabilities: detection n's mask pasted into ``boxes[n]`` (``[N, 4]``, in the
    frame of ``image_size`` = (H, W)), all resolutions in one :func:`dynamask.ops.paste_masks` call."""
    h, w = int(image_size[0]), int(image_size[1])
    return ops.paste_masks(list(handoff.masks), boxes, (h, w), threshold=None, index=handoff.rows)[:, None]


def paste_binary(handoff: MaskHandoff, boxes: Tensor, image_size: tuple[int, int], threshold: float,
                 keep: Tensor | None = None) -> Tensor:
    """``[n, H, W]`` bool: the masks of the detections ``keep`` selects (``[N]`` bool, or None for all),
    pasted into their ``boxes`` (``[N, 4]``, in the frame of ``image_size``) and thresholded (``>= threshold``)
    by the kernel: exactly ``paste(...)[keep, 0] >= threshold``, without the other detections' canvases nor
    any float canvas."""
    rows = handoff.rows if keep is None else handoff.rows[keep]
    boxes = boxes if keep is None else boxes[keep]
    h, w = int(image_size[0]), int(image_size[1])
    return ops.paste_masks(list(handoff.masks), boxes, (h, w), threshold=float(threshold), index=rows)


def paste_rle(handoff: MaskHandoff, boxes: Tensor, image_size: tuple[int, int], threshold: float) -> list[dict]:
    """Each detection's thresholded pasted mask (``>= threshold``, which must be positive) as a JSON-ready COCO
    RLE ``{"counts": str, "size": [H, W]}`` (the form of :func:`dynamask.data.masks.encode_masks`), built from
    the box spans by :func:`dynamask.ops.paste_masks_rle`: no ``[N, H, W]`` canvas is made. ``boxes``:
    ``[N, 4]`` in the frame of ``image_size``."""
    h, w = int(image_size[0]), int(image_size[1])
    rles = ops.paste_masks_rle(list(handoff.masks), boxes, (h, w), threshold=float(threshold), index=handoff.rows)
    return [{"counts": r["counts"].decode("ascii"), "size": [int(v) for v in r["size"]]} for r in rles]


def paste_instance_masks(detection: dict[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
    """Replaces one image's ``mask_handoff`` entry by ``masks [N, 1, H, W]`` (float probabilities, pasted
    with :func:`paste`), in place. ``boxes`` must already be in the frame of ``image_size`` (after the
    transform's postprocess)."""
    handoff: MaskHandoff = detection.pop(HANDOFF_KEY)
    detection["masks"] = paste(handoff, detection["boxes"], image_size)
    return detection
