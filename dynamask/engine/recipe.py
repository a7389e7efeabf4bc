"""The training recipe as arithmetic: DynaMask's method settings in the model's arguments, the optimiser and
its two-phase lr schedule, the paper's recipe (§4), and a plain-text plan of a run.

Settings travel into the model as builder arguments (so a checkpoint rebuilds the model that was trained):
multi-scale sizes as the transform's ``min_size`` tuple (torchvision draws one per image in training and
uses the last at test), and λ1, λ2, C_t, τ as :class:`~dynamask.models.DynaMaskRCNN` arguments.
"""

from __future__ import annotations

import bisect
import os
from typing import Any

import torch

# The paper's 54%↓ row (Tab. 5): C_t = 0.4 GMAC against its head's 1.40 GMAC at 112², with λ2 = 0.4. Our
# head's costs differ from the paper's (docs/method.md §3, "Per-RoI cost bound"), so the default budget keeps
# the paper's ratio of target to top-resolution cost rather than its absolute 0.4.
PAPER_TARGET_GMACS = 0.4
PAPER_TOP_GMACS = 1.40
PAPER_TARGET_RATIO = PAPER_TARGET_GMACS / PAPER_TOP_GMACS

DYNAMASK_ARCHS = ("dynamask_resnet_fpn", "dynamask_resnet50_fpn")
METHOD_SETTINGS = ("target_gmacs", "budget_weight", "edge_weight", "gumbel_tau", "routing_signal", "coupled",
                   "switch_input")
# builder arguments that name files: used to build the model once, not stored in a checkpoint's architecture
WEIGHT_FILES = ("weights", "weights_backbone", "torchvision_weights", "torchvision_label_ids")

# ImageNet ResNet-50 of torchvision (ResNet50_Weights.IMAGENET1K_V1, the `torchvision://resnet50` that
# MMDetection's Mask R-CNN 1x starts from); `--recipe paper` reads it from torch's hub cache.
RESNET50_IMAGENET_FILE = "resnet50-0676ba61.pth"
RESNET50_IMAGENET_URL = "https://download.pytorch.org/models/" + RESNET50_IMAGENET_FILE


def default_backbone_weights() -> str:
    """Where ``--recipe paper`` looks for the ImageNet ResNet-50 weights: ``$TORCH_HOME/hub/checkpoints/``
    (``~/.cache/torch/hub/checkpoints/`` by default, where torchvision itself caches them)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", RESNET50_IMAGENET_FILE)


# `dynamask train --recipe paper`: paper §4 for ResNet-50-FPN on COCO. 8 processes × 2 images = batch 16
# at lr 0.02; 1 epoch with every resolution supervised, then 12 dynamic epochs, lr × 0.1 after dynamic
# epochs 8 and 11; shorter side drawn from 640–800 in training, 800 at test (longer side ≤ 1333).
PAPER_RECIPE: dict[str, Any] = {
    # the paper's MSM: one head (the library's default averages three, docs/method.md §3 "Heads")
    "arch": "dynamask_resnet_fpn", "arch_kwargs": {"depth": 50, "msm_heads": 1}, "pretrain_epochs": 1, "epochs": 12,
    "batch_size": 2, "optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4,
    "warmup_iters": 500, "warmup_factor": 0.001, "lr_steps": [8, 11], "gamma": 0.1, "resize": [640, 800],
    "max_size": 1333, "budget_weight": 0.4, "edge_weight": 0.1, "gumbel_tau": 0.5,
    # the paper's model: the switch its dynamic phase trains (Eq. 3), not the fit dynamask train ends with
    "switch": "paper",
}
# The cost the paper's C_t 0.4 row actually ran at (Tab. 5: 0.64 GFLOPs of its 1.40-GFLOP head): its soft
# budget overshoots the target. A fitted switch meets C_t exactly, so to land where the paper's model does,
# fit to this share of the top resolution's cost (`--switch fit --target-gmacs`, printed by the plan).
PAPER_REALISED_RATIO = 0.64 / PAPER_TOP_GMACS
PAPER_TOTAL_BATCH = 16


def model_kwargs(arch: str, kwargs: dict[str, Any], *, resize: tuple[int, int] | None, max_size: int | None,
                 budget: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """Builder arguments with the trainer's multi-scale and method settings merged in.

    Args:
        kwargs: the user's ``arch_kwargs``; a setting given both there and as a flag is an error.
        resize: (low, high): the transform draws the shorter side from low..high (every integer) in
            training and uses high at test; None leaves ``min_size`` as it is.
        max_size: cap of the longer side, or None.
        budget: False turns the FLOPs budget off (``target_gmacs=None``).
        settings: ``target_gmacs``, ``budget_weight``, ``edge_weight``, ``gumbel_tau``, ``routing_signal``,
            ``coupled``, ``switch_input``; None = the model's default (for C_t: :func:`default_target_gmacs`,
            set after the model is built).
    """
    out = dict(kwargs)
    given = {k: v for k, v in settings.items() if v is not None}
    if resize is not None:
        low, high = int(resize[0]), int(resize[1])
        if not 0 < low <= high:
            raise ValueError(f"--resize LOW HIGH needs 0 < LOW <= HIGH, got {low} {high}")
        given["min_size"] = list(range(low, high + 1))
    if max_size is not None:
        given["max_size"] = int(max_size)
    if not budget:
        if settings.get("target_gmacs") is not None:
            raise ValueError("--no-budget and --target-gmacs contradict each other")
        given["target_gmacs"] = None
    both = sorted(k for k in given if k in out)
    if both:
        flags = ", ".join(f"{k} (--{'resize' if k == 'min_size' else k.replace('_', '-')})" for k in both)
        raise ValueError(f"{flags} given both in --arch-kwargs and as a flag; give each once")
    method = sorted(k for k in given if k in METHOD_SETTINGS and given[k] is not None)
    if method and arch not in DYNAMASK_ARCHS:
        raise ValueError(f"{', '.join(method)}: settings of DynaMask, not of architecture {arch!r}")
    if given.get("target_gmacs") is not None and not given["target_gmacs"] > 0:
        raise ValueError(f"target_gmacs must be positive, got {given['target_gmacs']}")
    out.update(given)
    return out


def default_target_gmacs(model: torch.nn.Module) -> float:
    """C_t = (0.4 / 1.40) × this head's per-RoI cost at its top resolution: the paper's 54%↓ setting
    (C_t 0.4 against its 1.40-GMAC head) rescaled to the head being trained."""
    from dynamask.models import flops

    return PAPER_TARGET_RATIO * max(flops.mask_head_gmacs(model).values())


def stored_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The architecture a checkpoint records: weight files dropped (the trained state dict replaces them),
    with ``frozen_bn`` kept so that the model rebuilds with the same layers without those files."""
    out = {k: v for k, v in kwargs.items() if k not in WEIGHT_FILES}
    if any(kwargs.get(k) is not None for k in WEIGHT_FILES):
        out.setdefault("frozen_bn", True)
    return out


def milestones(lr_steps: list[int] | tuple[int, ...], *, pretrain_epochs: int, iters_per_epoch: int) -> list[int]:
    """Iterations at which the lr is multiplied by gamma: ``lr_steps`` count dynamic epochs, which begin
    after the ``pretrain_epochs`` (the paper's "lr × 0.1 after epochs 8 and 11" of its 12)."""
    return [(pretrain_epochs + int(e)) * iters_per_epoch for e in lr_steps]


def make_optimizer(params: list[torch.nn.Parameter], *, optimizer: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's), or AdamW, which trains a randomly initialised model much faster
    in a short schedule (the CPU demo)."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")


def lr_factor(it: int, *, warmup_iters: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    """Multiplier of the base lr at iteration ``it``: linear warm-up from ``warmup_factor``, step decay."""
    f = gamma ** bisect.bisect_right(milestones, it)
    if it < warmup_iters:
        alpha = it / warmup_iters
        f *= warmup_factor * (1 - alpha) + alpha
    return f


class WarmupStepSchedule:
    """:func:`lr_factor` as an object, so that ``LambdaLR.state_dict`` saves its settings (its attributes)
    as plain values in the checkpoint; the attributes' names are that checkpoint's keys."""

    def __init__(self, *, warmup_iters: int, warmup_factor: float, milestones: list[int], gamma: float) -> None:
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor
        self.milestones, self.gamma = list(milestones), gamma

    def __call__(self, it: int) -> float:
        return lr_factor(it, warmup_iters=self.warmup_iters, warmup_factor=self.warmup_factor,
                         milestones=self.milestones, gamma=self.gamma)


def describe_plan(*, model: torch.nn.Module, pretrain_epochs: int, epochs: int, iters_per_epoch: int,
                  batch_size: int, world: int, optimizer: str, lr: float, warmup_iters: int,
                  warmup_factor: float, lr_steps: list[int] | tuple[int, ...], gamma: float) -> list[str]:
    """What a run will do, as lines of text (printed at the start of ``dynamask train``)."""
    total = pretrain_epochs + epochs
    lines = []
    if pretrain_epochs:
        lines.append(f"schedule: {pretrain_epochs} pretrain epoch(s) (every resolution supervised, no mask switch) "
                     f"+ {epochs} dynamic epoch(s) (mask switch) = {total} epochs of {iters_per_epoch} iterations")
    else:
        lines.append(f"schedule: {total} epochs of {iters_per_epoch} iterations")
    lines.append(f"batch: {batch_size} images per process x {world} process(es) = {batch_size * world}")
    steps = milestones(lr_steps, pretrain_epochs=pretrain_epochs, iters_per_epoch=iters_per_epoch)
    unit = "dynamic epoch" if hasattr(model, "mask_training") else "epoch"
    where = ", ".join(f"{unit} {e} (iteration {it})" for e, it in zip(lr_steps, steps)) or "none"
    lines.append(
        f"lr: {optimizer} {lr:g}, linear warm-up over the first {warmup_iters} iterations from x{warmup_factor:g}; "
        f"x{gamma:g} after {where}"
    )
    transform = getattr(model, "transform", None)
    if transform is not None:
        sizes = [int(s) for s in transform.min_size]
        train = f"{min(sizes)}-{max(sizes)}" if len(sizes) > 1 else f"{sizes[0]}"
        lines.append(f"input: shorter side {train} in training (drawn per image), {sizes[-1]} at test; "
                     f"longer side at most {transform.max_size}")
    heads = getattr(model, "roi_heads", None)
    if heads is not None and hasattr(heads, "target_gmacs"):
        from dynamask.models import flops

        top = max(flops.mask_head_gmacs(model).values())
        budget = ("off" if heads.target_gmacs is None else
                  f"C_t {heads.target_gmacs:.4f} GMAC per RoI ({heads.target_gmacs / top:.3f} of the head's "
                  f"top-resolution {top:.4f})")
        lines.append(f"method: budget {budget}, lambda2 {heads.budget_weight:g}, lambda1 {heads.edge_weight:g}, "
                     f"tau {heads.gumbel_tau:g}")
        head = heads.mask_head
        fused = ", ".join(f"{s}² fuses P{level + 2}" for s, level in zip(head.resolutions[1:], head.stage_levels))
        lines.append(f"mask head: {fused} (stage_levels {list(head.stage_levels)}, set by the image size unless "
                     "given: the paper's P4, P3, P2 at 800 px, one level finer per halving)")
    return lines


def check_budget(model: torch.nn.Module) -> None:
    """Refuse a C_t below the head's cheapest resolution: no routing can meet it (every RoI at the lowest
    resolution still costs more), so the dynamic phase would chase it in vain and the fit would fail after
    training."""
    heads = getattr(model, "roi_heads", None)
    target = getattr(heads, "target_gmacs", None)
    if target is None:
        return
    from dynamask.models import flops

    costs = flops.mask_head_gmacs(model)
    low = min(costs, key=lambda r: costs[r])
    if target < costs[low]:
        raise ValueError(
            f"--target-gmacs {target:g} is below the head's cheapest resolution ({low}²: {costs[low]:.4f} GMAC per "
            f"RoI): no switch can meet it. Per-RoI costs: "
            + ", ".join(f"{r}² {c:.4f}" for r, c in sorted(costs.items())))


def describe_switch(model: torch.nn.Module, *, fit: bool, batches: int, epochs: int) -> str:
    """The plan's ``switch:`` line: which mask switch the run ends with, and its budget."""
    heads = getattr(model, "roi_heads", None)
    if heads is None or not hasattr(heads, "msm"):
        return f"switch: none ({type(model).__name__} has no mask switch)"
    from dynamask.models import flops

    top = max(flops.mask_head_gmacs(model).values())
    target = heads.target_gmacs
    share = "" if target is None else f"{target:.4f} GMAC per RoI, {target / top:.3f} of the top resolution's {top:.4f}"
    if not fit:
        budget = "no budget" if target is None else f"soft budget C_t {share}, lambda2 {heads.budget_weight:g}"
        return (f"switch: the paper's, trained through Gumbel-softmax in the dynamic phase (Eq. 3); {budget} "
                f"(--switch fit fits one to C_t when training ends)")
    budget = ("no budget: unpriced (mu = 0), each RoI at the resolution predicted best" if target is None else
              f"each detection's predicted gain weighed by its score and priced so that the mean head cost over "
              f"detections is C_t = {share} (the paper's C_t 0.4 model "
              f"ran at {PAPER_REALISED_RATIO:.3f} of its top cost: --target-gmacs {PAPER_REALISED_RATIO * top:.4f} "
              "lands there)")
    return (f"switch: fitted when training ends (regression of each RoI's mask IoU, {batches} batches, {epochs} "
            f"epochs); {budget}. --switch paper keeps the dynamic phase's Gumbel-trained switch")


def check_paper_batch(batch_size: int, world: int) -> str | None:
    """A warning when the total batch differs from the paper's 16 (its lr 0.02 is for 16 images)."""
    if batch_size * world == PAPER_TOTAL_BATCH:
        return None
    return (f"warning: the paper's lr 0.02 is for a total batch of {PAPER_TOTAL_BATCH}; this run has "
            f"{batch_size} x {world} = {batch_size * world} (scale --lr linearly: "
            f"{0.02 * batch_size * world / PAPER_TOTAL_BATCH:g})")
