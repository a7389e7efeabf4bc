"""Fitting the Mask Switch to a trained model: a regression switch priced per resolution (issue 16).

The paper trains the switch through a Gumbel sample of the per-resolution losses, under a budget term; on our
studies that switch captures 0.26-0.5 of what routing can gain (``benchmarks/results/accuracy_cpu_paper_levels.md``). A
switch that sees each training RoI's outcome at every resolution can learn more directly:

1. :func:`collect`: with the model frozen, run its training batches through the mask head at every resolution
   and keep, per RoI, the switch's input (``switch_input`` view, float16) and each resolution's
   mask IoU with the ground truth on the finest grid (:func:`~dynamask.engine.routing_probe.mask_iou_top_grid`:
   the quantity the routing value judges). The RoIs are the positives training samples (RPN proposals);
   ``on_detections=True`` learns from the model's own detections on objects instead
   (:func:`detected_head_outputs`), which the accuracy study measured and did not adopt (docs/method.md §3).
2. :func:`fit_switch`: a fresh MSM regresses each RoI's IoUs, centred per RoI (only the differences between
   resolutions decide), each of its heads on its own (their mean is the switch's output), for some epochs over the
   cache, and keeps the mean of its weights after each of the
   last epochs (stochastic weight averaging: the share of the routing gain a single epoch's weights capture
   moved by up to ±0.1 from one epoch to the next, and so between inits; the average removes most of that;
   benchmarks/results/accuracy_cpu_paper_levels.md); then the price μ per GMAC is set by bisection so that
   the training RoIs' mean head cost meets the budget C_t (:func:`calibrate_mu`), and stored in the MSM as its
   ``cost_penalty`` μ·C_k. The switch then chooses argmax_k(predicted IoU_k − μ C_k): the Lagrangian choice.
3. On detections the switch weighs the predicted IoUs by each detection's confidence s_i, argmax_k(s_i ·
   predicted IoU_k − μ C_k) (``confidence_weighted``; :func:`calibrate_on_detections` sets μ under the same
   rule): a budget is a mean over every detection the head runs on, most of them low-score ones, and a
   detection's mask adds to AP only as far as the detection is a true one. On the accuracy study's decision
   seed this moved the fitted switch from 48.9 to 51.6 segm AP at C_t 0.045, at the same cost (mean of three
   inits; docs/method.md §3).

Costs nothing at inference beyond the MSM (K subtractions, K multiplications). The model's stages are untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dynamask.engine import distributed as dist_utils
from dynamask.engine import switch_fit_defaults as defaults
from dynamask.engine.routing_probe import mask_iou_top_grid
from dynamask.models import mask_losses
from dynamask.models.detector import DynaMaskRCNN
from dynamask.models.flops import mask_head_gmacs
from dynamask.models.msm import MaskSwitchModule
from dynamask.models.roi_heads import DynaMaskRoIHeads
from dynamask.models.switch_input import switch_view

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


# at most about this many training RoIs in a fit by default: their switch inputs stay in memory (100 KB each for a
# 256-channel 14x14 RoI feature in float16: 4.5 GB), and under DDP every process holds all of them. A COCO batch can
# hold 100+ positives per image. Why this many (issue 32): on the accuracy study's seed 0, a regression fitted on
# 34 560 training RoIs explained R² 0.62 of the per-RoI IoU differences of held-out training RoIs, against 0.49 from
# 11 520, and the defaults (2700 batches) collect 43 200 there.
MAX_ROIS = 45_000


class NoRoIsError(ValueError):
    """The training batches held no positive RoI for the switch to learn from."""

    def __init__(self) -> None:
        super().__init__("switch fit: the batches held no positive RoI to learn from")


class FrozenHead(NamedTuple):
    """The frozen mask head on one training batch's positive RoIs (sampled as training samples them)."""

    roi_features: Tensor  # [R, C, S_0, S_0]
    trunk: Tensor  # [R, C_0, S_0, S_0]
    mask_logits: list[Tensor]  # K × [R, S_k, S_k]
    edge_logits: list[Tensor]  # K × [R, S_k, S_k]
    mask_targets: list[Tensor]  # K × [R, S_k, S_k]
    edge_targets: list[Tensor]  # K × [R, S_k, S_k]


@torch.no_grad()
def frozen_head_outputs(model: DynaMaskRCNN, images: list[Tensor],
                        targets: list[dict[str, Tensor]]) -> FrozenHead | None:
    """Every stage of ``model``'s mask head on the positives of one training batch (the model in eval mode:
    its RPN proposes as at test time, the box sampler picks positives as in training). None without
    positives."""
    heads = cast(DynaMaskRoIHeads, model.roi_heads)
    il, tg = model.transform(images, targets)
    features = model.backbone(il.tensors)
    proposals, _ = model.rpn(il, features)
    pos = heads.sample_training_positives(proposals, tg)
    if sum(b.shape[0] for b in pos.boxes) == 0:
        return None
    out = heads.masks_every_resolution(features, pos.boxes, il.image_sizes, pos.labels)
    mask_t = mask_losses.mask_targets([t["masks"] for t in tg], pos.boxes, pos.matched_idxs,
                                      heads.mask_head.resolutions)
    edge_t = [mask_losses.edge_targets(m) for m in mask_t]
    return FrozenHead(out.roi_features, out.trunk, out.mask_logits, out.edge_logits, mask_t, edge_t)


def match_detections(boxes: Tensor, gt_boxes: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """The detections that overlap a ground-truth object, then the ground-truth boxes themselves.

    Args:
        boxes: ``[D, 4]`` one image's detections. gt_boxes: ``[G, 4]`` its objects (same frame).
        threshold: the box IoU at or above which a detection is on an object (the box head's foreground IoU).

    Returns:
        ``keep`` ``[D']`` int64: the kept detections' indices, in order; ``matched`` ``[D' + G]`` int64: the
        object each kept detection overlaps most, then ``0 .. G-1`` for the ground-truth boxes.
    """
    from torchvision.ops import box_iou

    own = torch.arange(gt_boxes.shape[0], device=gt_boxes.device)
    if boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), own
    best, idx = box_iou(boxes, gt_boxes).max(dim=1)
    keep = torch.where(best >= threshold)[0]
    return keep, torch.cat([idx[keep], own])


@torch.no_grad()
def detected_head_outputs(model: DynaMaskRCNN, images: list[Tensor],
                          targets: list[dict[str, Tensor]]) -> FrozenHead | None:
    """Every stage of ``model``'s mask head on what it meets on objects at inference, for one training batch:
    its detections (any class and score, as the head runs on them) that overlap a ground-truth object by the
    box head's foreground IoU, each against that object's mask, and the ground-truth boxes. The model is
    in eval mode. None when the batch holds no object.

    An alternative to the training positives (:func:`frozen_head_outputs`, RPN proposals before the box
    head's regression), closer to what the switch chooses for; the accuracy study measured it and kept the
    positives: no gain beyond the spread of its three seeds (docs/method.md §3, "RoIs of the fit")."""
    heads = cast(DynaMaskRoIHeads, model.roi_heads)
    il, tg = model.transform(images, targets)
    features = model.backbone(il.tensors)
    proposals, _ = model.rpn(il, features)
    det_boxes, _, det_labels = heads.detect_boxes(features, proposals, il.image_sizes)
    threshold = float(heads.proposal_matcher.high_threshold)
    boxes, matched, labels = [], [], []
    for b, lab, t in zip(det_boxes, det_labels, tg):
        keep, idx = match_detections(b, t["boxes"], threshold)
        boxes.append(torch.cat([b[keep], t["boxes"]]))
        matched.append(idx)
        labels.append(torch.cat([lab[keep], t["labels"]]))
    if sum(b.shape[0] for b in boxes) == 0:
        return None
    out = heads.masks_every_resolution(features, boxes, il.image_sizes, torch.cat(labels))
    mask_t = mask_losses.mask_targets([t["masks"] for t in tg], boxes, matched, heads.mask_head.resolutions)
    edge_t = [mask_losses.edge_targets(m) for m in mask_t]
    return FrozenHead(out.roi_features, out.trunk, out.mask_logits, out.edge_logits, mask_t, edge_t)


@dataclass
class SwitchData:
    """What a switch fit learns from: per training RoI, the switch's input and each resolution's IoU."""

    inputs: Tensor  # [N, C_in, S_0, S_0] float16 (the model's switch_input view)
    iou: Tensor  # [N, K] float32: mask IoU with the ground truth on the finest grid, per resolution

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.iou.shape[0]:
            raise ValueError(f"SwitchData: {self.inputs.shape[0]} inputs but {self.iou.shape[0]} IoU rows")


def sample_batches(dataset: Any, *, batch_size: int, num_batches: int, seed: int,
                   shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """``num_batches`` batches of ``batch_size`` from a seeded shuffle of ``dataset`` (epochs as needed);
    the dataset's own transforms (e.g. flips) apply. ``shard = (rank, world)``: only the batches whose
    number is ``rank`` modulo ``world`` are loaded and yielded (one process's share; the shares of all
    processes are the whole sequence)."""
    from dynamask.data import collate_fn

    if batch_size < 1 or num_batches < 0:
        raise ValueError(f"batch_size must be >= 1 and num_batches >= 0, got {batch_size} and {num_batches}")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"sample_batches: shard must be (rank, world) with 0 <= rank < world, got {shard}")
    if len(dataset) == 0:
        raise ValueError("sample_batches: the dataset is empty")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for b in range(num_batches):
        idx: list[int] = []
        while len(idx) < batch_size:
            if not order:
                order = rng.permutation(len(dataset)).tolist()
            idx.append(order.pop())
        if b % world != rank:
            continue
        images, targets = collate_fn([dataset[i] for i in idx])
        yield list(images), list(targets)


def shard_size(num_batches: int, shard: tuple[int, int]) -> int:
    """How many of ``num_batches`` batches :func:`sample_batches` yields to ``shard = (rank, world)``."""
    rank, world = shard
    return len(range(rank, num_batches, world))


@torch.no_grad()
def collect(model: DynaMaskRCNN, batches: Iterable[Batch], *, total: int | None = None,
            progress: bool = True, allow_empty: bool = False, max_rois_per_batch: int | None = None,
            seed: int = 0, on_detections: bool = False) -> SwitchData:
    """Runs the frozen ``model`` (a DynaMask detector; put in eval mode here) on ``batches`` of training
    images and targets and returns the switch's inputs and per-resolution IoUs of the positive RoIs training
    samples (:func:`frozen_head_outputs`), or with ``on_detections`` of the detections that overlap an object
    and the objects' boxes (:func:`detected_head_outputs`).
    ``max_rois_per_batch``: keep at most this many of each batch's RoIs (a random subset, seeded by
    ``seed``): the inputs are kept in memory, 100 KB per RoI for a 256-channel RoI feature. No RoI to learn
    from is an error unless ``allow_empty`` (one process's share, gathered with the others')."""
    from tqdm import tqdm

    heads = cast(DynaMaskRoIHeads, model.roi_heads)
    head = heads.mask_head
    model.eval()
    device = next(model.parameters()).device
    if max_rois_per_batch is not None and max_rois_per_batch < 1:
        raise ValueError(f"max_rois_per_batch must be None or >= 1, got {max_rois_per_batch}")
    gen = torch.Generator().manual_seed(seed)
    xs: list[Tensor] = []
    ious: list[Tensor] = []
    for images, targets in tqdm(batches, total=total, desc="switch fit: collecting", disable=not progress,
                                dynamic_ncols=True, mininterval=5.0):
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        out = (detected_head_outputs if on_detections else frozen_head_outputs)(model, images, targets)
        if out is None:
            continue
        x = switch_view(heads.switch_input, head, out.roi_features, out.trunk).half().cpu()
        probs = [p.float().sigmoid() for p in out.mask_logits]
        iou = mask_iou_top_grid(probs, out.mask_targets[-1]).float().cpu()
        if max_rois_per_batch is not None and x.shape[0] > max_rois_per_batch:
            keep = torch.randperm(x.shape[0], generator=gen)[:max_rois_per_batch].sort().values
            x, iou = x[keep], iou[keep]
        xs.append(x)
        ious.append(iou)
    if not xs:
        if not allow_empty:
            raise NoRoIsError()
        shape = switch_view_shape(heads)
        return SwitchData(torch.zeros((0, *shape), dtype=torch.float16), torch.zeros((0, head.num_resolutions)))
    return SwitchData(torch.cat(xs), torch.cat(ious))


def switch_view_shape(heads: DynaMaskRoIHeads) -> tuple[int, int, int]:
    """``(C_in, S_0, S_0)``: the shape of one RoI's switch input (:func:`switch_view`)."""
    s = heads.mask_head.resolutions[0]
    return (int(heads.msm.conv1.in_channels), s, s)


def calibrate_mu(scores: Tensor, costs: Tensor, target: float, weights: Tensor | None = None) -> float:
    """The smallest price μ ≥ 0 at which the mean cost of argmax_k(w_i · scores_ik − μ C_k) over the rows of
    ``scores`` ``[N, K]`` is at most ``target`` (bisection; the mean cost does not increase with μ).
    ``weights`` ``[N]``: w_i ≥ 0 (None: all 1). 0 when even μ = 0 meets it or there are no rows."""
    if weights is not None:
        if weights.shape != scores.shape[:1]:
            raise ValueError(f"weights must have shape [{scores.shape[0]}], got {tuple(weights.shape)}")
        scores = scores * weights.to(scores.dtype)[:, None]

    def mean_cost(mu: float) -> float:
        return float(costs[(scores - mu * costs).argmax(dim=1)].mean())

    if scores.shape[0] == 0 or mean_cost(0.0) <= target:
        return 0.0
    if target < float(costs.min()):
        raise ValueError(f"target {target:g} GMAC is below the cheapest resolution's cost {float(costs.min()):g}")
    lo, hi = 0.0, 1.0
    while mean_cost(hi) > target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_cost(mid) > target else (lo, mid)
    return hi


@dataclass
class FitReport:
    rois: int  # training RoIs the switch learned from
    epochs: int
    averaged_epochs: int  # the kept weights are the mean of those after each of the last this many epochs
    mu: float  # price per GMAC
    target_gmacs: float | None
    calibrated_on: str  # "positives" (the training RoIs) or "detections" (of training images, at inference)
    calibration_rois: int  # RoIs μ was set on
    mean_gmacs: float  # their mean head cost under the priced choice
    shares: list[float]  # their share at each resolution
    losses: list[float]  # mean regression loss per epoch
    seconds: float
    confidence_weighted: bool = True  # the switch weighs its choice on detections by their confidence

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self, resolutions: Sequence[int]) -> str:
        """One line on the fit, with the share at each of the head's ``resolutions``."""
        shares = ", ".join(f"{s}²: {100 * f:.0f}%" for s, f in zip(resolutions, self.shares))
        on = "training positives" if self.calibrated_on == "positives" else "detections of training images"
        if self.confidence_weighted:
            on += ", each weighted by its confidence"
        budget = "none" if self.target_gmacs is None else f"{self.target_gmacs:.4g}"
        return (f"switch fit: {self.rois} training RoIs, {self.epochs} epochs (weights averaged over the last "
                f"{self.averaged_epochs}), {self.seconds:.0f} s; price {self.mu:.4g} per GMAC set on "
                f"{self.calibration_rois} {on}: {shares}; mean head cost {self.mean_gmacs:.4g} GMAC (budget {budget})")


@torch.no_grad()
def _raw(msm: MaskSwitchModule, inputs: Tensor, batch: int = 256) -> Tensor:
    device = next(msm.parameters()).device
    out = [msm.raw(inputs[i:i + batch].to(device).float()).float().cpu() for i in range(0, inputs.shape[0], batch)]
    return torch.cat(out) if out else inputs.new_zeros((0, msm.num_resolutions), dtype=torch.float32)


def fit_switch(msm: MaskSwitchModule, data: SwitchData, *, costs: Sequence[float], target_gmacs: float | None,
               epochs: int = defaults.EPOCHS, batch_size: int = 16, lr: float = 5e-4, weight_decay: float = 1e-4,
               seed: int = 0, average_epochs: int | None = None, confidence_weighted: bool = True,
               progress: bool = True) -> FitReport:
    """Fits ``msm`` (reset first) to ``data`` and prices its resolutions for ``target_gmacs`` (GMAC per RoI;
    None: no price, each RoI gets its predicted best). ``costs``: the head's GMAC per RoI at each resolution
    (:func:`dynamask.models.flops.mask_head_gmacs`). ``average_epochs``: the MSM keeps the mean of its parameters
    after each of the last this many epochs (default: the last half, ``(epochs + 1) // 2``; 1 keeps the last
    epoch's). ``confidence_weighted``: at inference the switch weighs each detection's predicted IoUs by its
    score (the training positives, sure ones, are priced with weight 1). The MSM is left in eval mode."""
    from tqdm import tqdm

    k = msm.num_resolutions
    if data.iou.shape[1] != k or len(costs) != k:
        raise ValueError(f"fit_switch: the MSM has {k} resolutions, the data {data.iou.shape[1]}, the costs "
                         f"{len(costs)}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"fit_switch: epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, "
                         f"{lr}")
    averaged = (epochs + 1) // 2 if average_epochs is None else average_epochs
    if not 1 <= averaged <= epochs:
        raise ValueError(f"fit_switch: average_epochs must be in [1, epochs = {epochs}], got {average_epochs}")
    n = data.inputs.shape[0]
    if n == 0:
        raise ValueError("fit_switch: no RoIs to learn from")
    cost = torch.tensor([float(c) for c in costs], dtype=torch.float32)
    if target_gmacs is not None and target_gmacs < float(cost.min()):
        raise ValueError(f"target_gmacs {target_gmacs:g} is below the cheapest resolution's cost {float(cost.min()):g}")
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        msm.reset_parameters()
    device = next(msm.parameters()).device
    opt = torch.optim.AdamW(msm.parameters(), lr=lr, weight_decay=weight_decay)
    target = data.iou - data.iou.mean(dim=1, keepdim=True)  # only the differences between resolutions decide
    losses = []
    params = list(msm.parameters())
    mean = [torch.zeros_like(p) for p in params]  # running mean of the parameters over the averaged epochs
    msm.train()
    bar = tqdm(total=epochs, desc="switch fit: training", disable=not progress, dynamic_ncols=True)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for j in range(0, n, batch_size):
            idx = perm[j:j + batch_size]
            # each head regresses the targets on its own (not their mean: the heads are the members of an
            # average, and a loss on the mean would fit them as one model); the loss is their sum
            pred = msm.raw_heads(data.inputs[idx].to(device).float())  # [H, B, K]
            loss = F.mse_loss(pred - pred.mean(dim=2, keepdim=True), target[idx].to(device).expand_as(pred))
            opt.zero_grad(set_to_none=True)
            (loss * pred.shape[0]).backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(total / n)
        seen = epoch - (epochs - averaged)  # how many averaged epochs are done before this one
        if seen >= 0:
            with torch.no_grad():
                for m, p in zip(mean, params):
                    m.add_(p.detach() - m, alpha=1.0 / (seen + 1))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
    bar.close()
    with torch.no_grad():
        for m, p in zip(mean, params):
            p.copy_(m)
    msm.eval()
    msm.set_confidence_weighted(confidence_weighted)
    mu, mean_cost, shares = price(msm, _raw(msm, data.inputs), cost, target_gmacs)
    return FitReport(rois=n, epochs=epochs, averaged_epochs=averaged, mu=mu, target_gmacs=target_gmacs,
                     calibrated_on="positives", calibration_rois=n, mean_gmacs=mean_cost, shares=shares,
                     losses=losses, seconds=time.time() - t0, confidence_weighted=confidence_weighted)


def price(msm: MaskSwitchModule, scores: Tensor, cost: Tensor, target_gmacs: float | None,
          confidence: Tensor | None = None) -> tuple[float, float, list[float]]:
    """Sets ``msm``'s cost penalty to μ·C for the μ that meets ``target_gmacs`` on ``scores`` ``[N, K]`` (its
    unpriced outputs on some RoIs; None: μ = 0) as ``msm`` chooses on them: weighted by ``confidence`` ``[N]``
    (the RoIs' detection scores; None: sure ones) when the switch is ``confidence_weighted``. Returns μ, the
    RoIs' mean cost and their share at each resolution under the priced choice."""
    if confidence is not None and bool(msm.confidence_weighted):
        if confidence.shape != scores.shape[:1]:
            raise ValueError(f"confidence must have shape [{scores.shape[0]}], got {tuple(confidence.shape)}")
        scores = scores * confidence.to(scores.dtype)[:, None]  # weighed once: the price and the shares read it
    mu = 0.0 if target_gmacs is None else calibrate_mu(scores, cost, target_gmacs)
    msm.set_cost_penalty((mu * cost).to(cast(Tensor, msm.cost_penalty)))
    if scores.shape[0] == 0:
        return mu, 0.0, [0.0] * cost.numel()
    choice = (scores - mu * cost).argmax(dim=1)
    shares = torch.bincount(choice, minlength=cost.numel()).double() / scores.shape[0]
    return mu, float(cost[choice].mean()), [float(x) for x in shares]


class DetectionScores(NamedTuple):
    """The switch's view of the detections of some images: what a price is set on."""

    raw: Tensor  # [N, K] the switch's unpriced outputs (before its cost penalty)
    confidence: Tensor  # [N] the detections' scores


@torch.no_grad()
def detection_scores(model: DynaMaskRCNN, batches: Iterable[list[Tensor]], *, total: int | None = None,
                     progress: bool = True) -> DetectionScores:
    """The switch's unpriced outputs ``[N, K]`` (before its cost penalty) and the detection scores ``[N]`` of
    every detection the mask head runs on when ``model`` (put in eval mode) segments ``batches`` of images:
    the RoIs a budget is spent on at inference."""
    from tqdm import tqdm

    heads = cast(DynaMaskRoIHeads, model.roi_heads)
    model.eval()
    device = next(model.parameters()).device
    out: list[Tensor] = []
    conf: list[Tensor] = []
    for images in tqdm(batches, total=total, desc="switch fit: pricing on detections", disable=not progress,
                       dynamic_ncols=True, mininterval=5.0):
        il, _ = model.transform([im.to(device) for im in images])
        features = model.backbone(il.tensors)
        proposals, _ = model.rpn(il, features)
        boxes, scores, _ = heads.detect_boxes(features, proposals, il.image_sizes)
        out.append(heads.switch_scores(features, boxes, il.image_sizes).float().cpu())
        conf.append(torch.cat(scores).float().cpu() if scores else torch.zeros(0))
    if not out:
        return DetectionScores(torch.zeros((0, heads.msm.num_resolutions)), torch.zeros(0))
    return DetectionScores(torch.cat(out), torch.cat(conf))


def fit_model_switch(model: DynaMaskRCNN, dataset: Any, *, target_gmacs: float | None,
                     num_batches: int = defaults.BATCHES, batch_size: int = 4, epochs: int = defaults.EPOCHS,
                     seed: int = 0, calibration_images: int = defaults.CALIBRATION_IMAGES,
                     average_epochs: int | None = None, max_rois: int | None = MAX_ROIS,
                     confidence_weighted: bool = True, progress: bool = True) -> FitReport:
    """:func:`collect` on ``num_batches`` batches of ``dataset`` (training images, with their transforms),
    then :func:`fit_switch` of ``model.roi_heads.msm``, then the price μ set again on the detections of
    ``calibration_images`` training images (:func:`detection_scores`): a budget is a mean over every RoI the
    head runs on at inference, and detections (any score) are not distributed as training positives are;
    0 keeps the price set on the positives. ``average_epochs``: see :func:`fit_switch`. ``max_rois``: at most
    about this many training RoIs in all (each batch keeps at most ``ceil(max_rois / num_batches)`` of its
    positives; None: all). ``confidence_weighted``: see :func:`fit_switch`. The model is left in eval mode, its
    switch fitted."""
    if not isinstance(model.roi_heads, DynaMaskRoIHeads):
        raise ValueError("fit_model_switch needs a DynaMask model (roi_heads with an MSM)")
    if average_epochs is not None and not 1 <= average_epochs <= epochs:  # before the minutes of collecting
        raise ValueError(f"fit_switch: average_epochs must be in [1, epochs = {epochs}], got {average_epochs}")
    if calibration_images < 0:
        raise ValueError(f"calibration_images must be >= 0, got {calibration_images}")
    if max_rois is not None and max_rois < 1:
        raise ValueError(f"max_rois must be None or >= 1, got {max_rois}")
    heads = model.roi_heads
    shard = (dist_utils.rank(), dist_utils.world_size())
    device = next(model.parameters()).device
    per_batch = None if max_rois is None else -(-max_rois // max(num_batches, 1))
    data = collect(model, sample_batches(dataset, batch_size=batch_size, num_batches=num_batches, seed=seed,
                                         shard=shard),
                   total=shard_size(num_batches, shard), progress=progress, allow_empty=shard[1] > 1,
                   max_rois_per_batch=per_batch, seed=seed + 1000 * shard[0])
    if shard[1] > 1:
        # every process fits the same switch on everyone's RoIs (no process waits on another's fit); rank 0's
        # result is broadcast at the end, in case the device's arithmetic differs between processes
        data = SwitchData(dist_utils.all_gather_rows(data.inputs, device), dist_utils.all_gather_rows(data.iou, device))
        if data.inputs.shape[0] == 0:  # the same on every process: all raise together
            raise NoRoIsError()
    costs = list(mask_head_gmacs(heads.mask_head).values())
    report = fit_switch(heads.msm, data, costs=costs, target_gmacs=target_gmacs, epochs=epochs, seed=seed,
                        average_epochs=average_epochs, confidence_weighted=confidence_weighted, progress=progress)
    if calibration_images > 0 and target_gmacs is not None:
        report = calibrate_on_detections(model, dataset, report, num_images=calibration_images, seed=seed,
                                         progress=progress)
    dist_utils.broadcast_module(heads.msm)
    return report


def calibrate_on_detections(model: DynaMaskRCNN, dataset: Any, report: FitReport, *, num_images: int,
                            seed: int = 0, batch_size: int = 2, progress: bool = True) -> FitReport:
    """Sets the fitted switch's price μ again so that the mean cost over the detections of ``num_images``
    images of ``dataset`` (a seeded sample) meets ``report.target_gmacs``, each detection chosen for as the
    switch chooses at inference (weighted by its confidence when the switch is); returns the updated report."""
    heads = cast(DynaMaskRoIHeads, model.roi_heads)
    t0 = time.time()
    cost = torch.tensor(list(mask_head_gmacs(heads.mask_head).values()), dtype=torch.float32)
    num_batches = -(-min(num_images, len(dataset)) // batch_size)
    shard = (dist_utils.rank(), dist_utils.world_size())
    batches = sample_batches(dataset, batch_size=batch_size, num_batches=num_batches, seed=seed + 1, shard=shard)
    dets = detection_scores(model, (images for images, _ in batches), total=shard_size(num_batches, shard),
                            progress=progress)
    device = next(model.parameters()).device
    scores = dist_utils.all_gather_rows(dets.raw, device)  # every process: the same μ
    confidence = dist_utils.all_gather_rows(dets.confidence, device)
    if scores.shape[0] == 0:  # nothing detected (an untrained model): the price set on the positives stays
        return report
    mu, mean, shares = price(heads.msm, scores, cost, report.target_gmacs, confidence)
    return replace(report, mu=mu, calibrated_on="detections", calibration_rois=int(scores.shape[0]), mean_gmacs=mean,
                   shares=shares, seconds=report.seconds + time.time() - t0)
