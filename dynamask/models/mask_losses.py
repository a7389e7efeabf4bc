"""Mask-branch losses of DynaMask as pure functions (docs/method.md §3 "Rules that the paper leaves open").

Terms, each returned under its own key and already weighted (the detector's total loss is the sum):

- pretrain: ``loss_mask`` = mean_k ℓ_mask,k and ``loss_edge`` = λ1 · mean_k ℓ_edge,k, averaged over the
  positive RoIs; ℓ_k is BCE-with-logits averaged over the S_k² pixels of resolution k.
- dynamic (Eq. 3–7): y = straight-through hard Gumbel-softmax of the MSM logits (τ);
  ``loss_mask`` = mean_i Σ_k y_ik ℓ_mask,ik, ``loss_edge`` = λ1 · mean_i Σ_k y_ik ℓ_edge,ik,
  ``loss_budget`` = λ2 · max(E[C]/C_t − 1, 0) with E[C] = mean_i Σ_k p_ik C_k (only when C_t is set),
  ``loss_entropy`` = λ2 · (1/K) Σ_k f_k log f_k with f_k = mean_i p_ik (all-reduced under DDP).

Routing options of the dynamic phase (issue 16; the defaults are the paper's Eq. 3):

- ``coupled=True``: one term trains the stages and the switch, Σ_k y_ik ℓ_ik (the stages learn only at
  the resolution the switch picked). ``coupled=False`` (decoupled): the stages keep the pretrain
  supervision (every resolution, ``loss_mask``/``loss_edge`` as in pretraining), and the switch learns
  from the detached per-resolution losses through ``loss_route`` = mean_i Σ_k y_ik s_ik.detach().
- ``routing_signal``, the per-RoI, per-resolution loss s_ik the switch's gradient sees:
  ``"paper"`` (ℓ_mask,ik + λ1 ℓ_edge,ik against each resolution's own target), ``"grid"`` (BCE of every
  resolution's logits upsampled to the finest grid, against the finest target: all resolutions scored on
  one common grid), ``"boundary"`` (the same, averaged over a band around the ground-truth outline only),
  ``"iou"`` (1 − the soft IoU of each resolution's probabilities, upsampled to the finest grid, with the
  finest target: the quantity the routing is judged by, in a smooth form).
  With ``coupled=True`` and a signal other than ``"paper"``, the stages still learn from
  Σ_k y_ik ℓ_ik (y detached) and the switch from ``loss_route``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dynamask import ops

LAPLACIAN = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))
RoutingSignal = Literal["paper", "grid", "boundary", "iou"]
ROUTING_SIGNALS: tuple[str, ...] = ("paper", "grid", "boundary", "iou")
BOUNDARY_BAND = 1 / 28  # half-width of the "boundary" signal's band, as a fraction of the RoI side


def mask_targets(gt_masks: Sequence[Tensor], proposals: Sequence[Tensor], matched_idxs: Sequence[Tensor],
                 resolutions: Sequence[int]) -> list[Tensor]:
    """Binary mask targets of every positive RoI at every resolution, in ONE RoIAlign call.

    The GT masks of the batch become a 1-channel feature map with one "image" per GT instance (padded
    to the largest image: one replicated row/column, then zeros, so that a RoI inside its image gets
    exactly what ``roi_align`` on the unpadded mask gives); each RoI is cut from the mask of its
    matched GT at every resolution by
    :func:`dynamask.ops.roi_align_stages` (aligned=True, adaptive sampling), then binarised at 0.5.

    Args:
        gt_masks: per image ``[G_i, H_i, W_i]`` (any dtype; > 0.5 is foreground after resampling).
        proposals: per image ``[n_i, 4]`` positive RoIs (x1, y1, x2, y2) in the same frame.
        matched_idxs: per image ``[n_i]`` int64 index of the matched GT in ``gt_masks[i]``.
        resolutions: the K output sides (14, 28, 56, 112).

    Returns:
        K float tensors, entry k ``[R, S_k, S_k]`` of 0/1 values (R = Σ n_i).
    """
    device = proposals[0].device if len(proposals) else torch.device("cpu")
    r = sum(int(p.shape[0]) for p in proposals)
    if r == 0:
        return [torch.zeros((0, s, s), device=device) for s in resolutions]
    h = max(int(m.shape[-2]) for m in gt_masks)
    w = max(int(m.shape[-1]) for m in gt_masks)
    g = sum(int(m.shape[0]) for m in gt_masks)
    canvas = torch.zeros((g, 1, h, w), dtype=torch.float32, device=device)
    offsets, start = [], 0
    for m in gt_masks:
        mh, mw, sl = int(m.shape[-2]), int(m.shape[-1]), slice(start, start + m.shape[0])
        canvas[sl, 0, :mh, :mw] = m.to(canvas)
        # one replicated row/column beyond the image keeps RoIAlign's border clamping for boxes inside it
        if mh < h:
            canvas[sl, 0, mh, :mw] = canvas[sl, 0, mh - 1, :mw]
        if mw < w:
            canvas[sl, 0, : mh + (mh < h), mw] = canvas[sl, 0, : mh + (mh < h), mw - 1]
        offsets.append(start)
        start += int(m.shape[0])
    index = torch.cat([i.to(torch.float32) + o for i, o in zip(matched_idxs, offsets)])
    rois = torch.cat([index[:, None], torch.cat(list(proposals)).to(torch.float32)], dim=1)
    stages = [(0, int(s), r) for s in resolutions]
    cuts = ops.roi_align_stages([canvas], rois, stages, [1.0], sampling_ratio=0, aligned=True)
    return [(c[:, 0] >= 0.5).to(torch.float32) for c in cuts]


def _laplacian_edges(mask: Tensor, stride: int) -> Tensor:
    kernel = torch.tensor(LAPLACIAN, dtype=mask.dtype, device=mask.device)[None, None]
    padded = F.pad(mask[:, None], (1, 1, 1, 1), mode="replicate")
    return (F.conv2d(padded, kernel, stride=stride).clamp(min=0) > 0.1)


def edge_targets(masks: Tensor) -> Tensor:
    """Edge targets of binary masks: Laplacian with replicate padding, clamp ≥ 0, > 0.1, OR the same
    at stride 2 upsampled (nearest).

    A mask touching the RoI border is not an edge there (replicate padding).

    Args:
        masks: ``[R, S, S]`` 0/1 float.

    Returns:
        ``[R, S, S]`` 0/1 float.
    """
    if masks.shape[0] == 0:
        return masks.clone()
    s = masks.shape[-2:]
    full = _laplacian_edges(masks, 1)
    half = _laplacian_edges(masks, 2).to(masks.dtype)
    half = F.interpolate(half, size=s, mode="nearest") > 0.5
    return (full | half)[:, 0].to(masks.dtype)


def per_roi_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE-with-logits averaged over the pixels of each RoI: ``[R, S, S]`` × 2 → ``[R]``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(dim=1)


def pretrain_losses(mask_logits: Sequence[Tensor], edge_logits: Sequence[Tensor], mask_t: Sequence[Tensor],
                    edge_t: Sequence[Tensor], *, edge_weight: float) -> dict[str, Tensor]:
    """All K resolutions supervised: ``loss_mask`` = mean_k mean_i ℓ_mask,ik,
    ``loss_edge`` = λ1 · mean_k mean_i ℓ_edge,ik. Inputs: K tensors ``[R, S_k, S_k]`` each, R > 0."""
    lm = torch.stack([per_roi_bce(x, t).mean() for x, t in zip(mask_logits, mask_t)]).mean()
    le = torch.stack([per_roi_bce(x, t).mean() for x, t in zip(edge_logits, edge_t)]).mean()
    return {"loss_mask": lm, "loss_edge": edge_weight * le}


def gumbel_hard(logits: Tensor, tau: float) -> Tensor:
    """Straight-through hard Gumbel-softmax: one-hot forward, soft gradient. ``[R, K]`` → ``[R, K]``."""
    return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)


def budget_loss(probs: Tensor, costs: Tensor, target: float) -> Tensor:
    """L_budget = max(E[C]/C_t − 1, 0), E[C] = mean_i Σ_k p_ik C_k.

    Args:
        probs: ``[R, K]`` MSM softmax. costs: ``[K]`` per-RoI GMAC of each resolution. target: C_t (GMAC).
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    expected = (probs * costs.to(probs)).sum(dim=1).mean()
    return torch.clamp(expected / target - 1.0, min=0.0)


def resolution_frequencies(probs: Tensor) -> Tensor:
    """f_k = mean_i p_ik over the RoIs of all processes (differentiable all-reduce under DDP). ``[R, K]`` →
    ``[K]`` float32; R may be 0 (every process must call this on every step under DDP)."""
    # one collective for the sums and the count; a process with no RoI (R = 0) still takes part
    sums = torch.cat([probs.float().sum(dim=0), probs.new_full((1,), float(probs.shape[0]), dtype=torch.float32)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # the differentiable all-reduce (its backward all-reduces the gradient); what PyTorch's deprecation
        # of torch.distributed.nn.functional.all_reduce points to
        from torch.distributed._functional_collectives import all_reduce

        world = dist.group.WORLD
        assert world is not None  # set once the process group is initialised, as checked above
        sums = all_reduce(sums, "sum", world)  # waits for the result when it is first used
    return sums[:-1] / sums[-1].clamp(min=1.0)


def entropy_loss(probs: Tensor) -> Tensor:
    """L_entropy = (1/K) Σ_k f_k log f_k (≤ 0, lowest at a uniform choice). probs ``[R, K]``."""
    f = resolution_frequencies(probs)
    return torch.special.xlogy(f, f).mean()


def check_routing(routing_signal: str, coupled: bool) -> None:
    """Raises a ValueError naming a bad routing option."""
    if routing_signal not in ROUTING_SIGNALS:
        raise ValueError(f"routing_signal must be one of {ROUTING_SIGNALS}, got {routing_signal!r}")
    if not isinstance(coupled, bool):
        raise ValueError(f"coupled must be a bool, got {coupled!r}")


def boundary_band(target: Tensor, half_width: int) -> Tensor:
    """Pixels within ``half_width`` (Chebyshev distance) of the outline of binary masks. ``[R, S, S]`` → bool."""
    edges = edge_targets(target)
    return F.max_pool2d(edges[:, None], 2 * half_width + 1, stride=1, padding=half_width)[:, 0] > 0.5


def routing_signal_losses(mask_logits: Sequence[Tensor], edge_logits: Sequence[Tensor], mask_t: Sequence[Tensor],
                          edge_t: Sequence[Tensor], *, signal: RoutingSignal, edge_weight: float) -> Tensor:
    """The per-RoI loss of each resolution that the switch learns from, ``[R, K]`` (not detached).

    ``"paper"``: ℓ_mask,ik + λ1 ℓ_edge,ik against each resolution's own target. ``"grid"``: BCE of the
    logits upsampled (bilinear) to the finest grid S_K against the finest target, mean over its pixels.
    ``"boundary"``: the same BCE averaged over the band within S_K · ``BOUNDARY_BAND`` pixels of the
    target's outline (the whole grid for a RoI whose target has no outline). ``"iou"``: 1 − soft IoU of the
    upsampled probabilities with the finest target.
    """
    if signal == "paper":
        lm = torch.stack([per_roi_bce(x, t) for x, t in zip(mask_logits, mask_t)], dim=1)
        le = torch.stack([per_roi_bce(x, t) for x, t in zip(edge_logits, edge_t)], dim=1)
        return lm + edge_weight * le
    top = mask_t[-1]  # [R, S, S]
    size = top.shape[-2:]
    ups = [x if x.shape[-2:] == size else F.interpolate(x[:, None], size=size, mode="bilinear",
                                                         align_corners=False)[:, 0] for x in mask_logits]
    if signal == "iou":
        p = torch.stack([u.sigmoid() for u in ups], dim=1).flatten(2)  # [R, K, S²]
        t = top.flatten(1)[:, None]  # [R, 1, S²]
        inter = (p * t).sum(dim=2)
        union = (p + t - p * t).sum(dim=2)
        # an empty target and an empty prediction agree perfectly (IoU 1), as the probe scores them
        return 1.0 - torch.where(union > 0, inter / union.clamp(min=1e-6), torch.ones_like(union))
    per_res = [F.binary_cross_entropy_with_logits(u, top, reduction="none") for u in ups]  # [R, S, S] each
    bce = torch.stack(per_res, dim=1)  # [R, K, S, S]
    if signal == "grid":
        return bce.flatten(2).mean(dim=2)
    if signal == "boundary":
        band = boundary_band(top, max(1, round(size[-1] * BOUNDARY_BAND)))  # [R, S, S]
        empty = ~band.flatten(1).any(dim=1)
        band = band | empty[:, None, None]
        w = band.to(bce.dtype)[:, None]  # [R, 1, S, S]
        return (bce * w).flatten(2).sum(dim=2) / w.flatten(2).sum(dim=2)
    raise ValueError(f"routing_signal must be one of {ROUTING_SIGNALS}, got {signal!r}")


def dynamic_losses(mask_logits: Sequence[Tensor], edge_logits: Sequence[Tensor], mask_t: Sequence[Tensor],
                   edge_t: Sequence[Tensor], msm_logits: Tensor, *, edge_weight: float, budget_weight: float,
                   target_gmacs: float | None, costs_gmacs: Sequence[float], tau: float,
                   routing_signal: RoutingSignal = "paper", coupled: bool = True) -> dict[str, Tensor]:
    """The paper's Eq. 3–7, or a routing variant (see the module docstring).

    Args:
        mask_logits, edge_logits, mask_t, edge_t: K tensors ``[R, S_k, S_k]`` each.
        msm_logits: ``[R, K]``.
        costs_gmacs: K per-RoI inference costs (GMAC) of the head at each resolution.
        routing_signal: what the switch learns from ("paper", "grid", "boundary").
        coupled: True (Eq. 3) or False (stages supervised at every resolution, switch on detached losses).

    Returns:
        ``loss_mask``, ``loss_edge``, ``loss_entropy``, ``loss_route`` unless the variant is the paper's
        (coupled, "paper"), and, when ``target_gmacs`` is set, ``loss_budget``.
    """
    check_routing(routing_signal, coupled)
    msm_logits = msm_logits.float()  # half-precision logits (autocast) would make coarse Gumbel noise
    y = gumbel_hard(msm_logits, tau)  # [R, K]
    lm = torch.stack([per_roi_bce(x, t) for x, t in zip(mask_logits, mask_t)], dim=1)  # [R, K]
    le = torch.stack([per_roi_bce(x, t) for x, t in zip(edge_logits, edge_t)], dim=1)  # [R, K]
    probs = msm_logits.softmax(dim=1)
    if coupled and routing_signal == "paper":  # Eq. 3: one term trains stages and switch
        out = {
            "loss_mask": (y * lm).sum(dim=1).mean(),
            "loss_edge": edge_weight * (y * le).sum(dim=1).mean(),
        }
    else:
        if coupled:  # the stages learn at the picked resolution only, the switch from its own signal
            stage_w = y.detach()
            out = {"loss_mask": (stage_w * lm).sum(dim=1).mean(),
                   "loss_edge": edge_weight * (stage_w * le).sum(dim=1).mean()}
        else:  # decoupled: the stages keep the pretrain supervision
            out = {"loss_mask": lm.mean(dim=1).mean(), "loss_edge": edge_weight * le.mean(dim=1).mean()}
        with torch.no_grad():
            signal = routing_signal_losses(mask_logits, edge_logits, mask_t, edge_t, signal=routing_signal,
                                           edge_weight=edge_weight)
        out["loss_route"] = (y * signal).sum(dim=1).mean()
    out["loss_entropy"] = budget_weight * entropy_loss(probs)
    if target_gmacs is not None:
        costs = torch.tensor(list(costs_gmacs), dtype=probs.dtype, device=probs.device)
        out["loss_budget"] = budget_weight * budget_loss(probs, costs, float(target_gmacs))
    return out
