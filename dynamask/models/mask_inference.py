"""Mask-branch inference as pure functions: routing policy → dispatcher → per-instance masks → paste.

Flow (docs/method.md §3): a policy picks a resolution index per RoI; :func:`dynamask.ops.group_by_resolution`
sorts the RoIs by descending choice, so stage s of the head runs on a contiguous prefix; each RoI's mask
leaves the head at its own resolution and is pasted into the image by :func:`dynamask.ops.paste_masks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dynamask import ops

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


def choose_resolutions(policy: Policy, *, msm: nn.Module, roi_features: Tensor, boxes: list[Tensor],
                       image_sizes: list[tuple[int, int]], resolutions: Sequence[int]) -> Tensor:
    """Resolution index per RoI under ``policy``.

    Args:
        policy: ``"msm"`` (argmax of the MSM logits), ``"size"`` (Eq. 8), a resolution (14/28/56/112),
            or a callable ``policy(roi_features, boxes, image_sizes) -> [R] int64`` in [0, K).
        roi_features: ``[R, 256, 14, 14]``. boxes: per image ``[n_i, 4]`` (input frame).

    Returns:
        ``[R]`` int64 in [0, K).
    """
    check_policy(policy, resolutions)
    r = roi_features.shape[0]
    device = roi_features.device
    k = len(resolutions)
    if policy == "msm":
        return msm(roi_features.detach()).argmax(dim=1)
    if policy == "size":
        cat = torch.cat(boxes) if boxes else roi_features.new_zeros((0, 4))
        return size_policy(cat, k)
    if isinstance(policy, int):
        return torch.full((r,), list(resolutions).index(policy), dtype=torch.int64, device=device)
    assert callable(policy)  # for mypy: check_policy let nothing else through
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


def split_by_image(mask_probs: Sequence[Tensor], choice_sorted: Tensor, image_ids_sorted: Tensor,
                   num_images: int) -> list[list[Tensor]]:
    """Splits the head's per-resolution outputs (sorted order) into per-image lists.

    Args:
        mask_probs: K tensors, entry k ``[count_k, S_k, S_k]`` in sorted order (descending choice,
            stable, so within one resolution the RoIs keep their image-major order).
        choice_sorted, image_ids_sorted: ``[R]`` for the sorted RoIs.

    Returns:
        per image, K tensors ``[n_ik, S_k, S_k]`` (image i's RoIs routed to k, in box order).
    """
    per_image: list[list[Tensor]] = [[] for _ in range(num_images)]
    for k, probs in enumerate(mask_probs):
        ids = image_ids_sorted[choice_sorted == k]
        sizes = torch.bincount(ids, minlength=num_images).tolist() if ids.numel() else [0] * num_images
        for i, part in enumerate(probs.split(sizes, dim=0)):
            per_image[i].append(part)
    return per_image


def mask_probs_key(resolution: int) -> str:
    """Key under which a detection dict carries the masks of resolution S before pasting."""
    return f"mask_probs_{resolution}"


def paste_instance_masks(detection: dict[str, Tensor], image_size: tuple[int, int],
                         resolutions: Sequence[int]) -> dict[str, Tensor]:
    """Replaces the per-resolution ``mask_probs_S`` entries of one image's detections by
    ``masks [N, 1, H, W]`` float probabilities pasted with :func:`dynamask.ops.paste_masks`.

    ``boxes`` must already be in the frame of ``image_size`` (after the transform's postprocess);
    ``mask_resolution [N]`` (14/28/56/112) says which entry holds each instance.
    """
    parts = [detection.pop(mask_probs_key(s)) for s in resolutions]
    boxes = detection["boxes"]
    res = detection["mask_resolution"]
    index = torch.bucketize(res, torch.tensor(list(resolutions), device=res.device))
    h, w = int(image_size[0]), int(image_size[1])
    if boxes.shape[0] == 0:
        detection["masks"] = boxes.new_zeros((0, 1, h, w), dtype=torch.float32)
        return detection
    # paste_masks takes groups of masks in the order of the boxes, each group of one resolution; the
    # runs of consecutive detections with the same resolution are such groups (views into parts), so
    # the canvases come out in detection order and are never permuted (100 canvases of 800x1216 are
    # 390 MB: a scatter copy of them cost ~0.2 s).
    groups: list[Tensor] = []
    taken = [0] * len(parts)
    run_start = 0
    kinds = index.tolist()
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[run_start]:
            k, n = kinds[run_start], i - run_start
            groups.append(parts[k][taken[k]:taken[k] + n])
            taken[k] += n
            run_start = i
    detection["masks"] = ops.paste_masks(groups, boxes, (h, w), threshold=None)[:, None]  # [N, 1, H, W]
    return detection
