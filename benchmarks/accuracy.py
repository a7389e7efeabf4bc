"""Accuracy per FLOP on shapes whose objects are large enough for mask resolution to matter (issue 16).

    python benchmarks/accuracy.py --split --out /tmp/accuracy    # the study (≈ 112 min on 2 idle cores, est.)
    python benchmarks/accuracy.py --quick --out /tmp/acc-quick   # smoke test (CI), about a minute

What it trains (one seed, one data set; every row evaluated on the same validation split):

1. ``pretrain``: DynaMask with every resolution supervised (no switch), ``pretrain_iters`` iterations.
2. ``base``: the pretrain continued for ``phase_iters`` at the lower learning rate (every resolution still
   supervised). Rows on it: every fixed resolution (Tab. 1/7), the size rule (Eq. 8, Tab. 8), the
   oracle (per detection the cheapest resolution within 0.01 IoU of the best: the ceiling).
3. ``switches``: switches trained on the frozen ``base`` model (decoupled: the stages keep their own
   supervision; each switch learns from detached per-resolution losses), all at once on the same
   batches, for ``switch_iters``: the routing signal (paper / common grid / boundary band), what the switch
   reads (RoI feature / trunk output), the budget C_t, the Gumbel temperature, the budget weight.
3b. ``fit``: the library's switch fit (:mod:`dynamask.engine.switch_fit`, as ``dynamask fit-switch`` runs it) on
   the frozen ``base`` model: ``FitPlan.batches`` training batches collected once, a regression switch fitted per
   init, priced at each budget on the detections of ``FitPlan.calibration_images`` training images.
4. ``coupled``: the paper's dynamic phase (Eq. 3: the switch's Gumbel choice selects the supervised
   resolution) from the pretrain, ``phase_iters``, at each budget C_t (Tab. 5), and variants.
5. ``maskrcnn``: torchvision's Mask R-CNN head (28², class-specific) on the same backbone, trained with the
   same recipe for ``pretrain_iters + phase_iters`` (Tab. 2/6).

Every row reports segm AP/AP50/AP75, Boundary AP, the mask-head GMAC per instance over all detections the
head runs on (switch included), the per-category share of each resolution and, for switch rows, the routing
value on the ground-truth boxes (:mod:`dynamask.engine.routing`). The study is resumable: a trained phase
is a checkpoint, a finished row a JSON file in ``OUT/rows``; a rerun skips both. The report
(``accuracy_cpu.md``/``.json`` and two PNGs) is rewritten after every row, so a partial run has one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _accuracy_eval import evaluate_fixed_model, evaluate_policies, maskrcnn_gt_box_iou  # noqa: E402
from _accuracy_report import write_report  # noqa: E402


@dataclass(frozen=True)
class SwitchVariant:
    """A switch trained on the frozen base model."""

    name: str
    signal: str = "paper"  # routing signal (dynamask.models.mask_losses.ROUTING_SIGNALS)
    reads: str = "roi"  # "roi" | "trunk"
    target_gmacs: float = 0.0
    tau: float = 0.5
    budget_weight: float = 0.4
    # "gumbel": the route loss on a straight-through Gumbel sample (as the model trains a coupled switch);
    # "expected": its exact expectation under the switch's softmax, Σ_k p_k ℓ_k (the signal is detached, so
    # nothing needs a sample; no sampling noise); "regress": the switch regresses each resolution's signal
    # (centred per RoI: only the differences decide) and chooses argmin_k(predicted ℓ_k + μ·C_k), μ set after
    # training so that the training RoIs' mean cost meets C_t (:class:`CostAwareSwitch`; no budget, no entropy
    # term: a Lagrangian choice, which is what a budgeted switch should converge to)
    estimator: str = "gumbel"


@dataclass(frozen=True)
class CoupledVariant:
    """A full dynamic phase from the pretrain checkpoint (the model's own routing options)."""

    name: str
    target_gmacs: float
    signal: str = "paper"
    coupled: bool = True
    reads: str = "roi"
    tau: float = 0.5
    budget_weight: float = 0.4


@dataclass(frozen=True)
class FitPlan:
    """Switches fitted by the library (:mod:`dynamask.engine.switch_fit`) to a frozen model of the study,
    ``on``: the base model (rows ``fit-iou-roi-ct*-init*``), or a dynamic-phase row's model (rows
    ``train-fit-ct*-init*``: the switch ``dynamask train`` ends with). One cache of ``batches`` training
    batches, one fit of ``epochs`` per init, priced at each budget on the detections of
    ``calibration_images`` training images."""

    batches: int = 900
    epochs: int = 15
    inits: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[float, ...] = ()
    calibration_images: int = 200  # training images whose detections each row's price is set on
    average_epochs: int | None = None  # switch_fit.fit_switch's (None: its default, the last half of the epochs)
    on: str = "base"  # the checkpoint (ckpt/ON.pth) whose switch is fitted

    def averaged(self) -> int:
        return (self.epochs + 1) // 2 if self.average_epochs is None else self.average_epochs

    def state_key(self, init: int) -> str:
        """The cached fit of one init in :meth:`cache` ``("fit")`` (fits that average other epochs are other
        entries; stop 16's, of the last epoch's weights, are under ``init{i}``)."""
        return f"init{init}-avg{self.averaged()}"

    def cache(self, what: str) -> str:
        """The checkpoint name of this plan's ``what`` ("fit" or "switch_data")."""
        return what if self.on == "base" else f"{what}-{self.on}"

    def names(self) -> list[str]:
        prefix = "fit-iou-roi" if self.on == "base" else "train-fit"
        return [f"{prefix}-ct{c:g}-init{i}" for i in self.inits for c in self.budgets]


VARIANT_FIELDS = ("switches", "coupled", "maskrcnn_after", "fit", "train_fit")


@dataclass(frozen=True)
class StudyConfig:
    size: int = 192
    n_train: int = 1200
    n_val: int = 120
    max_objects: int = 4
    radius_range: tuple[float, float] = (0.1, 0.45)
    seed: int = 0
    batch: int = 2
    lr: float = 5e-4  # AdamW; the phases after the pretrain run at lr / 10, the switch at lr
    warmup: int = 100
    # Measured (stop 14, Intel Xeon 2.8 GHz, AVX-512): pretrain 1.47 s/it at 2 threads on a quiet machine
    # (37 min); then at 1 thread: base 2.0 s/it (10 min), the 21 frozen-model switches together 0.72 s/it
    # (3.6 min), the base model's evaluation 6 min, a coupled row 1.7-2.2 s/it (8-11 min + 1 min
    # evaluation); Mask R-CNN 1.25-1.5 s/it (38 min in all) in a second process (--part maskrcnn). So
    # about 37 + 20 + 5 x 11 = 112 min on 2 cores with the Mask R-CNN row beside the DynaMask ones.
    pretrain_iters: int = 1500
    phase_iters: int = 300
    switch_iters: int = 300
    arch: dict[str, Any] = field(default_factory=dict)
    maskrcnn: dict[str, Any] = field(default_factory=dict)
    switches: tuple[SwitchVariant, ...] = ()
    coupled: tuple[CoupledVariant, ...] = ()
    maskrcnn_after: int = 1  # run Mask R-CNN after this many coupled variants (priority order)
    fit: FitPlan | None = None
    train_fit: FitPlan | None = None  # the fit that ends `dynamask train`: on the default dynamic-phase row's model
    iters_scale: float = 1.0  # the iteration counts above are the full schedule times this


def _arch(size: int, *, trunk: int, stages: tuple[int, int, int], roi: int, fpn: int, rois: int) -> dict[str, Any]:
    # class-specific mask predictors, as the Mask R-CNN row's: here a ring's box often holds another object
    # in its hole, and a class-agnostic head (stop 14's study) segmented that object instead (ring IoU 0.15-0.22
    # at every resolution against Mask R-CNN's 0.54 at 28²); the predictors add (8 - 1) · C_k · S_k² MACs
    return {"depth": 18, "num_classes": 8, "class_specific_masks": True, "fpn_channels": fpn,
            "box_representation_size": 512, "trunk_channels": trunk, "stage_channels": list(stages),
            "mask_roi_size": roi,
            "min_size": size, "max_size": size, "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 128,
            "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 200, "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 100, "box_detections_per_img": 30, "mask_rois_per_image": rois}


def _maskrcnn(size: int, *, fpn: int, width: int) -> dict[str, Any]:
    return {"depth": 18, "num_classes": 8, "norm": "bn", "fpn_channels": fpn, "box_representation_size": 512,
            "mask_head_layers": [width] * 4, "min_size": size, "max_size": size, "rpn_batch_size_per_image": 128,
            "box_batch_size_per_image": 128, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 200,
            "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100, "box_detections_per_img": 30}


def _variants(budgets: tuple[float, float, float]) -> tuple[tuple[SwitchVariant, ...], tuple[CoupledVariant, ...]]:
    lo, mid, hi = budgets
    switches = (
        *(SwitchVariant(f"frozen-paper-roi-ct{c:g}", target_gmacs=c) for c in budgets),
        SwitchVariant(f"frozen-grid-roi-ct{mid:g}", signal="grid", target_gmacs=mid),
        SwitchVariant(f"frozen-boundary-roi-ct{mid:g}", signal="boundary", target_gmacs=mid),
        *(SwitchVariant(f"frozen-paper-trunk-ct{c:g}", reads="trunk", target_gmacs=c) for c in budgets),
        SwitchVariant(f"frozen-grid-trunk-ct{mid:g}", signal="grid", reads="trunk", target_gmacs=mid),
        SwitchVariant(f"frozen-boundary-trunk-ct{mid:g}", signal="boundary", reads="trunk", target_gmacs=mid),
        SwitchVariant(f"frozen-paper-roi-ct{mid:g}-tau1", target_gmacs=mid, tau=1.0),
        SwitchVariant(f"frozen-paper-roi-ct{mid:g}-bw0.1", target_gmacs=mid, budget_weight=0.1),
        # the switch that also reads the coarse mask and outline (dynamask.models.switch_input)
        *(SwitchVariant(f"frozen-paper-mask-ct{c:g}", reads="mask", target_gmacs=c) for c in budgets),
        SwitchVariant(f"frozen-grid-mask-ct{mid:g}", signal="grid", reads="mask", target_gmacs=mid),
        SwitchVariant(f"frozen-boundary-mask-ct{mid:g}", signal="boundary", reads="mask", target_gmacs=mid),
        # the signal the switch is judged by (1 − soft IoU on the finest grid), and the exact expectation in
        # place of the Gumbel sample
        SwitchVariant(f"frozen-iou-roi-ct{mid:g}", signal="iou", target_gmacs=mid),
        SwitchVariant(f"frozen-iou-mask-ct{mid:g}", signal="iou", reads="mask", target_gmacs=mid),
        SwitchVariant(f"frozen-paper-roi-ct{mid:g}-expected", target_gmacs=mid, estimator="expected"),
        SwitchVariant(f"frozen-iou-mask-ct{mid:g}-expected", signal="iou", reads="mask", target_gmacs=mid,
                      estimator="expected"),
        # regression switches (estimator "regress"); "probe": 1 − the probe's own hard IoU on the finest grid
        # (the quantity the routing value is computed from)
        *(SwitchVariant(f"regress-probe-mask-ct{c:g}", signal="probe", reads="mask", target_gmacs=c,
                        estimator="regress") for c in budgets),
        SwitchVariant(f"regress-probe-roi-ct{mid:g}", signal="probe", target_gmacs=mid, estimator="regress"),
        SwitchVariant(f"regress-probe-trunk-ct{mid:g}", signal="probe", reads="trunk", target_gmacs=mid,
                      estimator="regress"),
        SwitchVariant(f"regress-iou-mask-ct{mid:g}", signal="iou", reads="mask", target_gmacs=mid,
                      estimator="regress"),
        SwitchVariant(f"regress-paper-roi-ct{mid:g}", target_gmacs=mid, estimator="regress"),
    )
    # priority order (a study cut short measures the first ones); Mask R-CNN after the first. Each costs
    # ~11 min on one core (300 it. + evaluation): five keep the study within ~2 hours on 2 cores
    coupled = (
        CoupledVariant(f"coupled-paper-roi-ct{mid:g}", mid),
        CoupledVariant(f"coupled-paper-mask-ct{mid:g}", mid, reads="mask"),
        CoupledVariant(f"decoupled-paper-roi-ct{mid:g}", mid, coupled=False),
        CoupledVariant(f"coupled-paper-roi-ct{lo:g}", lo),
        CoupledVariant(f"coupled-paper-roi-ct{hi:g}", hi),
    )
    return switches, coupled


def full_config(seed: int = 0) -> StudyConfig:
    # 14→112 ladder; head costs {14: .0217, 28: .0487, 56: .0880, 112: .1517} GMAC per RoI
    switches, coupled = _variants((0.05, 0.08, 0.11))
    # fit rows: the study's budgets, the Mask R-CNN head's cost (0.0397 GMAC, Tab. 2 compares at equal cost) and
    # 0.09, just under 0.6x the 112² cost (0.0914: Tab. 5's operating point, with room for the price being set on
    # training images)
    return StudyConfig(seed=seed, arch=_arch(192, trunk=64, stages=(32, 16, 8), roi=14, fpn=128, rois=8),
                       maskrcnn=_maskrcnn(192, fpn=128, width=64), switches=switches, coupled=coupled,
                       fit=FitPlan(budgets=(0.04, 0.05, 0.08, 0.09, 0.11)),
                       train_fit=FitPlan(budgets=(0.05, 0.08, 0.11), on=coupled[0].name))


# The budgets the default switch is judged at: 0.045 and 0.05 GMAC (the size rule's 0.0496 and 1.3x the Mask
# R-CNN head's 0.0397 = 0.052: Tab. 8 and Tab. 6), 0.08, 0.09 (just under 0.6x the 112² cost, Tab. 5) and 0.11.
CORE_FIT_BUDGETS = (0.045, 0.05, 0.08, 0.09, 0.11)


def core_variants(cfg: StudyConfig) -> StudyConfig:
    """The study without the switch variants the fit superseded: the default dynamic-phase row (its
    Gumbel-trained switch is the paper's) and the fit ``dynamask train`` ends with on its model (the default
    switch), at :data:`CORE_FIT_BUDGETS`."""
    default = cfg.coupled[0]
    train_fit = replace(cfg.train_fit or FitPlan(on=default.name), budgets=CORE_FIT_BUDGETS, on=default.name)
    return replace(cfg, switches=(), fit=None, coupled=(default,), train_fit=train_fit)


def quick_config(seed: int = 0) -> StudyConfig:
    # a tiny model on 64-px images (7→56 ladder): every kind of phase and row, in well under a minute
    switches, coupled = _variants((0.004, 0.006, 0.008))
    pick = {"frozen-paper-roi-ct0.004", "frozen-grid-roi-ct0.006", "frozen-boundary-trunk-ct0.006",
            "frozen-paper-mask-ct0.006", "regress-probe-mask-ct0.006"}
    return StudyConfig(size=64, n_train=4, n_val=2, max_objects=2, seed=seed, batch=2, warmup=1, pretrain_iters=2,
                       phase_iters=1, switch_iters=1,
                       arch=_arch(64, trunk=16, stages=(8, 8, 8), roi=7, fpn=32, rois=2),
                       maskrcnn=_maskrcnn(64, fpn=32, width=16),
                       switches=tuple(v for v in switches if v.name in pick), coupled=coupled[:1],
                       fit=FitPlan(batches=2, epochs=2, inits=(0,), budgets=(0.006,), calibration_images=2),
                       train_fit=FitPlan(batches=2, epochs=2, inits=(0,), budgets=(0.006,), calibration_images=2,
                                         on=coupled[0].name))


# ---------------------------------------------------------------------------------------------- utils
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_state(path: str, state: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def datasets(cfg: StudyConfig, out: str):
    from dynamask.data import CocoDetection, Compose, RandomHorizontalFlip
    from dynamask.data.shapes import generate, split_paths

    root = os.path.join(out, "data")
    if not os.path.exists(split_paths(root, "val")[1]):
        log(f"generating {cfg.n_train} + {cfg.n_val} images of {cfg.size} px")
        generate(root, train=cfg.n_train, val=cfg.n_val, size=cfg.size, seed=cfg.seed, max_objects=cfg.max_objects,
                 radius_range=cfg.radius_range)
    train = CocoDetection(*split_paths(root, "train"), Compose([RandomHorizontalFlip(0.5)]))
    val = CocoDetection(*split_paths(root, "val"))
    return train, val


def build_dynamask(cfg: StudyConfig, **routing: Any):
    from dynamask.models import dynamask_resnet_fpn

    return dynamask_resnet_fpn(**cfg.arch, **routing)


def build_maskrcnn(cfg: StudyConfig):
    from dynamask.engine.baselines import maskrcnn_resnet_fpn

    return maskrcnn_resnet_fpn(**cfg.maskrcnn)


def batches(dataset, batch: int, iters: int, seed: int):
    """``iters`` batches of a seeded shuffle (epochs as needed): :func:`dynamask.engine.switch_fit.sample_batches`."""
    from dynamask.engine.switch_fit import sample_batches

    return sample_batches(dataset, batch_size=batch, num_batches=iters, seed=seed)


def train_phase(model, dataset, cfg: StudyConfig, *, iters: int, seed: int, lr: float, warmup: int,
                drop_at: float | None, desc: str, msm_lr: float | None = None) -> dict[str, float]:
    """AdamW (weight decay 1e-4), linear warm-up, lr ÷10 after ``drop_at`` of the iterations; gradients
    clipped at norm 10. The switch (if any) trains at ``msm_lr``. Returns timing and the last losses."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model.train()
    msm = getattr(getattr(model, "roi_heads", None), "msm", None)
    msm_ids = {id(p) for p in msm.parameters()} if msm is not None and msm_lr is not None else set()
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in msm_ids]
    groups = [{"params": rest, "lr": lr}]
    if msm_ids:
        groups.append({"params": list(msm.parameters()), "lr": msm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    base = [g["lr"] for g in groups]
    params = [p for g in groups for p in g["params"]]
    t0 = time.time()
    last: dict[str, float] = {}
    bar = tqdm(total=iters, desc=desc, dynamic_ncols=True, mininterval=5.0)
    for it, (images, targets) in enumerate(batches(dataset, cfg.batch, iters, seed)):
        f = min(1.0, 0.001 + (1 - 0.001) * it / warmup) if warmup and it < warmup else 1.0
        if drop_at is not None and it >= drop_at * iters:
            f *= 0.1
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss at iteration {it}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        last = {k: float(v.detach()) for k, v in losses.items()}
        bar.update(1)
        if it % 25 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    secs = time.time() - t0
    return {"seconds": secs, "sec_per_iter": secs / max(iters, 1), **{f"last_{k}": v for k, v in last.items()}}


class CostAwareSwitch(torch.nn.Module):
    """An MSM that regresses each resolution's (centred) loss, ``[R, K]``; its forward returns
    ``-(predicted ℓ_k + μ·C_k)``, so that the argmax every caller takes is the Lagrangian choice
    argmin_k(ℓ̂_k + μ C_k). Costs exactly the MSM's MACs (the μ·C term is K additions)."""

    def __init__(self, msm: torch.nn.Module, costs: list[float]) -> None:
        super().__init__()
        self.msm = msm
        self.register_buffer("costs", torch.tensor(costs, dtype=torch.float32))
        self.register_buffer("mu", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(self.msm(x) + self.mu * self.costs)


def calibrate_mu(pred: torch.Tensor, costs: torch.Tensor, target: float) -> float:
    """μ for predicted losses ``pred`` ``[N, K]`` (choice argmin_k(pred_ik + μ C_k)): the library's
    :func:`dynamask.engine.switch_fit.calibrate_mu` on the scores ``-pred``."""
    from dynamask.engine.switch_fit import calibrate_mu as calibrate

    return calibrate(-pred, costs, target)


def new_switch(model, reads: str, estimator: str = "gumbel"):
    """A fresh MSM for ``model`` that reads ``reads`` (:mod:`dynamask.models.switch_input`); for the
    "regress" estimator wrapped in a :class:`CostAwareSwitch`."""
    from dynamask.flops import mask_head_gmacs
    from dynamask.models.msm import MaskSwitchModule
    from dynamask.models.switch_input import switch_channels

    head = model.roi_heads.mask_head
    width = switch_channels(reads, fpn_channels=head.in_channels, trunk_channels=head.channels[0],
                            mask_classes=head.mask_classes)
    msm = MaskSwitchModule(in_channels=width, in_size=head.resolutions[0])
    if estimator == "regress":
        return CostAwareSwitch(msm, list(mask_head_gmacs(head).values()))
    return msm


def frozen_head_outputs(model, images, targets):
    """:func:`dynamask.engine.switch_fit.frozen_head_outputs` (the study's switch phases and the headroom
    script read it from here)."""
    from dynamask.engine.switch_fit import frozen_head_outputs as outputs

    return outputs(model, images, targets)


def train_switches(model, dataset, cfg: StudyConfig, variants, *, seed: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Trains one new switch per variant on the FROZEN model, all on the same batches. Each learns from
    its signal (detached per-resolution losses of the frozen head) under its budget and temperature."""
    import torch.nn.functional as F
    from tqdm import tqdm

    from dynamask.engine.routing_probe import mask_iou_top_grid
    from dynamask.flops import mask_head_gmacs
    from dynamask.models import mask_losses
    from dynamask.models.switch_input import switch_view

    torch.manual_seed(seed)
    model.eval()
    heads = model.roi_heads
    head = heads.mask_head
    costs = torch.tensor(list(mask_head_gmacs(head).values()), dtype=torch.float32)
    switches = {v.name: new_switch(model, v.reads, v.estimator) for v in variants}
    params = [p for m in switches.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    signals = sorted({v.signal for v in variants} - {"probe"})
    # the regression switches' predictions on the last training batches, for setting μ
    calib: dict[str, list[torch.Tensor]] = {v.name: [] for v in variants if v.estimator == "regress"}
    calib_from = cfg.switch_iters - max(1, cfg.switch_iters // 3)
    t0 = time.time()
    for m in switches.values():
        m.train()
    bar = tqdm(total=cfg.switch_iters, desc="switches (frozen model)", dynamic_ncols=True, mininterval=5.0)
    for it, (images, targets) in enumerate(batches(dataset, cfg.batch, cfg.switch_iters, seed)):
        with torch.no_grad():
            frozen = frozen_head_outputs(model, images, targets)
            if frozen is None:
                bar.update(1)
                continue
            roi_features, trunk, mask_logits, edge_logits, mask_t, edge_t = frozen
            sig = {s: mask_losses.routing_signal_losses(mask_logits, edge_logits, mask_t, edge_t, signal=s,
                                                        edge_weight=heads.edge_weight) for s in signals}
            if any(v.signal == "probe" for v in variants):
                sig["probe"] = 1.0 - mask_iou_top_grid([x.sigmoid() for x in mask_logits], mask_t[-1]).float()
        total = 0.0
        for v in variants:
            view = switch_view(v.reads, head, roi_features, trunk)
            if v.estimator == "regress":
                pred = switches[v.name].msm(view)
                centred = sig[v.signal] - sig[v.signal].mean(dim=1, keepdim=True)
                total = total + F.mse_loss(pred - pred.mean(dim=1, keepdim=True), centred)
                if it >= calib_from:
                    calib[v.name].append(pred.detach())
                continue
            logits = switches[v.name](view)
            probs = logits.softmax(dim=1)
            y = mask_losses.gumbel_hard(logits, v.tau) if v.estimator == "gumbel" else probs
            total = total + (y * sig[v.signal]).sum(dim=1).mean() + v.budget_weight * (
                mask_losses.entropy_loss(probs) + mask_losses.budget_loss(probs, costs, v.target_gmacs))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        bar.update(1)
    bar.close()
    for v in variants:
        if v.estimator == "regress":
            sw = switches[v.name]
            sw.mu.fill_(calibrate_mu(torch.cat(calib[v.name]) if calib[v.name] else torch.zeros(0, len(costs)),
                                     sw.costs, v.target_gmacs))
    secs = time.time() - t0
    state = {name: m.state_dict() for name, m in switches.items()}
    return state, {"seconds": secs, "sec_per_iter": secs / max(cfg.switch_iters, 1)}


# ---------------------------------------------------------------------------------------------- study
class Study:
    def __init__(self, cfg: StudyConfig, out: str, *, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self.maskrcnn_ckpt: str | None = None  # --part grid: a Mask R-CNN row trained in another folder
        for d in ("ckpt", "rows"):
            os.makedirs(os.path.join(out, d), exist_ok=True)
        self.train, self.val = datasets(cfg, out)
        self.meta_path = os.path.join(out, "meta.json")
        self.meta: dict[str, Any] = json.load(open(self.meta_path)) if os.path.exists(self.meta_path) else {}
        saved = self.meta.get("config")
        now = json.loads(json.dumps(asdict(cfg)))
        # the variant lists may grow between runs (each row is its own file; a missing switch is trained on
        # the same frozen model); anything else changed would mix two studies
        fixed = [k for k in now if k not in VARIANT_FIELDS]
        if saved is not None and any(saved.get(k) != now[k] for k in fixed):
            raise SystemExit(f"{out} holds a study with another configuration; use a new --out (or delete it)")
        self.meta["config"] = now
        self.meta.setdefault("timings", {})
        self.save_meta()

    # -- bookkeeping
    def save_meta(self) -> None:
        """Writes meta.json, merged with what another process on the same study wrote since this one read it
        (two single-thread processes sharing the rows): the timings are united, and a key this process has
        not set (e.g. the base model's ``iou_gain``, set by the other) is kept; this process's values win."""
        if os.path.exists(self.meta_path):
            with open(self.meta_path) as f:
                disk = json.load(f)
            for name, info in disk.get("timings", {}).items():
                self.meta.setdefault("timings", {}).setdefault(name, info)
            for key, value in disk.items():
                self.meta.setdefault(key, value)
        save_json(self.meta_path, self.meta)

    def ckpt(self, name: str) -> str:
        return os.path.join(self.out, "ckpt", f"{name}.pth")

    def row_path(self, name: str) -> str:
        return os.path.join(self.out, "rows", f"{name}.json")

    def have_rows(self, names) -> bool:
        return all(os.path.exists(self.row_path(n)) for n in names)

    def timing(self, name: str, info: dict[str, float]) -> None:
        self.meta["timings"][name] = info
        self.save_meta()
        log(f"{name}: {info['seconds'] / 60:.1f} min ({info.get('sec_per_iter', 0):.2f} s/it)")

    def save_rows(self, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        for row in rows:
            save_json(self.row_path(row["name"]), row)
        if extra:
            self.meta.update(extra)
            self.save_meta()
        self.report()

    def report(self) -> None:
        rows = []
        for fn in sorted(os.listdir(os.path.join(self.out, "rows"))):
            if fn.endswith(".json"):
                with open(os.path.join(self.out, "rows", fn)) as f:
                    rows.append(json.load(f))
        write_report(self.out, self.cfg, self.meta, rows, self.planned_rows())

    def planned_rows(self) -> list[str]:
        res = [self.cfg.arch["mask_roi_size"] * 2**k for k in range(4)]
        return ([f"fixed-{s}" for s in res] + ["size-rule", "oracle"] + [v.name for v in self.cfg.switches]
                + (self.cfg.fit.names() if self.cfg.fit else [])
                + (self.cfg.train_fit.names() if self.cfg.train_fit else [])
                + [v.name for v in self.cfg.coupled] + ["maskrcnn-28"])

    # -- phases
    def model_from(self, name: str, **routing: Any):
        model = build_dynamask(self.cfg, **routing)
        model.load_state_dict(load_state(self.ckpt(name))["model"], strict=True)
        return model

    def pretrain(self) -> None:
        if os.path.exists(self.ckpt("pretrain")):
            return
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_dynamask(cfg)
        model.mask_training = "pretrain"
        info = train_phase(model, self.train, cfg, iters=cfg.pretrain_iters, seed=cfg.seed, lr=cfg.lr,
                           warmup=cfg.warmup, drop_at=None, desc="pretrain (every resolution)")
        save_state(self.ckpt("pretrain"), {"model": model.state_dict()})
        self.timing("pretrain", info)

    def base(self) -> None:
        if os.path.exists(self.ckpt("base")):
            return
        model = self.model_from("pretrain")
        model.mask_training = "pretrain"
        info = train_phase(model, self.train, self.cfg, iters=self.cfg.phase_iters, seed=self.cfg.seed + 1,
                           lr=self.cfg.lr / 10, warmup=0, drop_at=None, desc="base (pretrain continued)")
        save_state(self.ckpt("base"), {"model": model.state_dict()})
        self.timing("base", info)

    def switches(self) -> dict[str, Any]:
        """Every frozen-model switch's weights; the ones not trained yet (a variant added since) are trained
        now, on the same batches as the others (same seed)."""
        path = self.ckpt("switches")
        state = load_state(path) if os.path.exists(path) else {}
        todo = [v for v in self.cfg.switches if v.name not in state]
        if todo:
            model = self.model_from("base")
            new, info = train_switches(model, self.train, self.cfg, todo, seed=self.cfg.seed + 2)
            state.update(new)
            save_state(path, state)
            self.timing("switches" if len(todo) == len(self.cfg.switches) else f"switches+{len(todo)}", info)
        return state

    def base_rows(self) -> None:
        from dynamask.engine.routing_probe import gt_box_routing
        from dynamask.flops import mask_head_gmacs, msm_gmacs, switch_input_macs

        cfg = self.cfg
        model = self.model_from("base")
        res = list(model.roi_heads.mask_head.resolutions)
        names = [f"fixed-{s}" for s in res] + ["size-rule", "oracle"] + [v.name for v in cfg.switches]
        if self.have_rows(names):
            return
        policies = [f"fixed-{s}" for s in res] + ["size-rule", "oracle"]
        # a rerun after variants were added evaluates only the missing switch rows
        redo = not self.have_rows(policies)
        names = [n for n in names if redo or not self.have_rows([n])]
        state = self.switches()
        head = model.roi_heads.mask_head
        switches = {}
        for v in cfg.switches:
            if v.name not in names:
                continue
            m = new_switch(model, v.reads, v.estimator)
            m.load_state_dict(state[v.name])
            m.eval()
            switches[v.name] = ((m, v.reads), msm_gmacs(m) + switch_input_macs(v.reads, head) / 1e9)
        costs = mask_head_gmacs(model)
        t0 = time.time()
        log("base model: every policy on the validation detections")
        metrics = evaluate_policies(model, self.val, costs=costs, switches=switches, fixed=redo, size_rule=redo,
                                    oracle=redo, progress=self.progress)
        log("base model: ground-truth boxes")
        probe = gt_box_routing(model, self.val, switches={n: s for n, (s, _) in switches.items()},
                               progress=self.progress)
        from dynamask.engine.routing import oracle_choice, per_category
        from dynamask.models.mask_inference import size_policy  # noqa: F401  (GT-box size rule below)

        gt_choices = dict(probe["choices"])
        k = len(res)
        for j, s in enumerate(res):
            gt_choices[f"fixed-{s}"] = np.full(len(probe["categories"]), j)
        gt_choices["oracle"] = oracle_choice(probe["iou"])
        gt_choices["size-rule"] = self._gt_size_choice(k)
        cats = per_category(probe["iou"], probe["categories"], kinds=probe["kinds"])
        self.meta["iou_gain"] = {n: c["iou_gain"] for n, c in cats.items()}
        self.meta["mean_iou"] = {n: c["mean_iou"] for n, c in cats.items()}
        self.meta["categories"] = probe["kinds"]
        self.meta["resolutions"] = res
        self.meta["costs"] = {str(r): g for r, g in costs.items()}
        self.timing("base_eval" if redo else f"base_eval+{len(names)}", {"seconds": time.time() - t0})
        rows = []
        for name in names:
            variant = next((v for v in cfg.switches if v.name == name), None)
            policy = ("fixed" if name.startswith("fixed") else "size" if name == "size-rule"
                      else "oracle" if name == "oracle" else "msm")
            rows.append(self._row(name, policy, metrics[name], probe, gt_choices[name],
                                  resolution=int(name.split("-")[1]) if policy == "fixed" else None,
                                  variant=variant, trained="frozen base" if variant else "base"))
        self.save_rows(rows)

    def fit_rows(self, plan: FitPlan | None) -> None:
        """Switches fitted by the library to a frozen model of the study (:class:`FitPlan`): the collected
        training RoIs are cached in ``ckpt/switch_data[-ON].pt``, each init's fitted (unpriced) switch in
        ``ckpt/fit[-ON].pth``; each row's price is set on the detections of ``plan.calibration_images``
        training images (:func:`dynamask.engine.switch_fit.calibrate_on_detections`, as ``dynamask
        fit-switch`` and ``dynamask train`` do). A plan on a dynamic-phase row's model waits for that row."""
        from dynamask.engine import switch_fit
        from dynamask.engine.routing_probe import gt_box_routing
        from dynamask.flops import mask_head_gmacs, msm_gmacs

        if plan is None or self.have_rows(plan.names()) or not os.path.exists(self.ckpt(plan.on)):
            return
        model = self.model_from(plan.on)
        heads = model.roi_heads
        costs = list(mask_head_gmacs(heads.mask_head).values())
        path = self.ckpt(plan.cache("fit"))
        state: dict[str, Any] = load_state(path) if os.path.exists(path) else {}
        if any(plan.state_key(i) not in state for i in plan.inits):
            data = self._switch_data(model, plan)
            for init in plan.inits:
                if plan.state_key(init) in state:
                    continue
                rep = switch_fit.fit_switch(heads.msm, data, costs=costs, target_gmacs=None, epochs=plan.epochs,
                                            seed=init, average_epochs=plan.average_epochs, progress=self.progress)
                self.timing(f"{plan.cache('fit')}_{plan.state_key(init)}",
                            {"seconds": rep.seconds, "losses": rep.losses})
                state[plan.state_key(init)] = {k: v.clone() for k, v in heads.msm.state_dict().items()}
                save_state(path, state)
        names = [n for n in plan.names() if not self.have_rows([n])]
        switches, penalties = {}, {}
        cost_t = torch.tensor(costs)
        for init in plan.inits:
            todo = [n for n in names if n.endswith(f"-init{init}")]
            if not todo:
                continue
            heads.msm.load_state_dict(state[plan.state_key(init)])
            t0 = time.time()
            batches = switch_fit.sample_batches(self.train, batch_size=self.cfg.batch,
                                                num_batches=-(-plan.calibration_images // self.cfg.batch),
                                                seed=self.cfg.seed + 4)
            scores = switch_fit.detection_scores(model, (images for images, _ in batches), progress=False)
            self.timing(f"{plan.cache('fit')}_price_init{init}",
                        {"seconds": time.time() - t0, "detections": int(scores.shape[0])})
            for name in todo:
                m = new_switch(model, "roi")
                m.load_state_dict(state[plan.state_key(init)])
                switch_fit.price(m, scores, cost_t, float(name.split("-ct")[1].split("-")[0]))
                m.eval()
                penalties[name] = [float(x) for x in m.cost_penalty]
                switches[name] = ((m, "roi"), msm_gmacs(m))
        t0 = time.time()
        log(f"fitted switches: {len(names)} rows on the validation detections")
        metrics = evaluate_policies(model, self.val, costs=mask_head_gmacs(model), switches=switches, fixed=False,
                                    size_rule=False, oracle=False, progress=self.progress)
        probe = gt_box_routing(model, self.val, switches={n: s for n, (s, _) in switches.items()},
                               progress=self.progress)
        self.timing(f"{plan.cache('fit')}_eval+{len(names)}", {"seconds": time.time() - t0})
        rows = []
        for name in names:
            c = float(name.split("-ct")[1].split("-")[0])
            v = SwitchVariant(name, signal="iou", reads="roi", target_gmacs=c, estimator="fit")
            row = self._row(name, "msm", metrics[name], probe, probe["choices"][name], variant=v,
                            trained="frozen base" if plan.on == "base" else f"frozen {plan.on}")
            # the fit on the default dynamic-phase row's model is what `dynamask train` ends with by default
            row["default_switch"] = plan.on != "base"
            row["fit"] = {"on": plan.on, "batches": plan.batches, "epochs": plan.epochs,
                          "averaged_epochs": plan.averaged(),
                          "init": int(name.rsplit("init", 1)[1]),
                          "calibrated_on": "detections", "calibration_images": plan.calibration_images,
                          "cost_penalty": penalties[name]}
            rows.append(row)
        self.save_rows(rows)

    def _switch_data(self, model, plan: FitPlan):
        """The switch fit's training RoIs (collected once, cached)."""
        from dynamask.engine import switch_fit

        data_path = self.ckpt(plan.cache("switch_data"))
        if os.path.exists(data_path):
            d = load_state(data_path)
            return switch_fit.SwitchData(d["inputs"], d["iou"])
        t0 = time.time()
        log(f"switch fit: collecting {plan.batches} training batches on the frozen {plan.on} model")
        batches = switch_fit.sample_batches(self.train, batch_size=self.cfg.batch, num_batches=plan.batches,
                                            seed=self.cfg.seed + 3)
        data = switch_fit.collect(model, batches, total=plan.batches, progress=self.progress)
        save_state(data_path, {"inputs": data.inputs, "iou": data.iou})
        self.timing(f"{plan.cache('fit')}_collect", {"seconds": time.time() - t0, "rois": data.inputs.shape[0]})
        return data

    def _gt_size_choice(self, k: int) -> np.ndarray:
        """Eq. 8 on every ground-truth box of the validation split (input frame), in probe order."""
        from dynamask.models.mask_inference import size_policy

        model_size = self.cfg.arch["min_size"]
        out = []
        for i in range(len(self.val)):
            _, target = self.val[i]
            info = self.val.coco.imgs[int(target["image_id"])]
            scale = model_size / min(int(info["height"]), int(info["width"]))
            out.append(size_policy(target["boxes"] * scale, k).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _row(self, name: str, policy: str, m: dict[str, Any], probe: dict[str, Any] | None,
             gt_choice: np.ndarray | None, *, resolution: int | None = None, variant=None,
             trained: str = "") -> dict[str, Any]:
        from dynamask.engine.routing import category_routing, routing_value, shares

        k = len(probe["resolutions"]) if probe is not None else 4
        row: dict[str, Any] = {
            "name": name, "policy": policy, "resolution": resolution,
            "routing_loss": None, "target_gmacs": None,
            "seed": self.cfg.seed, "bbox_ap": m["bbox"]["AP"] if "bbox" in m else None,
            "segm_ap": m["segm"]["AP"], "segm_ap50": m["segm"]["AP50"], "segm_ap75": m["segm"]["AP75"],
            "boundary_ap": m["boundary"]["AP"], "mask_gmacs_per_instance": m["mask_gmacs_per_instance"],
            "resolution_share": None, "routing_captured": None, "trained": trained, "detections": m["detections"],
        }
        if probe is not None and gt_choice is not None:
            names = list(probe["kinds"])
            row["resolution_share"] = shares(gt_choice, probe["categories"], k, names)
            row["mean_index"] = {n: (float(np.mean(gt_choice[np.asarray(probe["categories"]) == n]))
                                     if n in probe["categories"] else None) for n in names}
        if variant is not None:
            frozen = trained.startswith("frozen")  # a switch trained or fitted on a frozen model
            coupled = getattr(variant, "coupled", False) if not frozen else False
            mode = "frozen" if frozen else ("coupled" if coupled else "decoupled")
            row["routing_loss"] = f"{variant.signal}-{mode}"
            row["target_gmacs"] = variant.target_gmacs
            row["switch_input"] = variant.reads
            row["gumbel_tau"] = variant.tau
            row["budget_weight"] = variant.budget_weight
            value = routing_value(probe["iou"], gt_choice)
            row["routing_value"] = value.as_dict()
            row["routing_captured"] = value.captured
            row["estimator"] = getattr(variant, "estimator", "gumbel")
            # what a router that knows only the category captures with the same counts (a yardstick)
            counts = np.bincount(gt_choice, minlength=k)
            cat = category_routing(probe["iou"], probe["categories"], counts)
            row["routing_category_captured"] = routing_value(probe["iou"], cat).captured
        return row

    def coupled_row(self, v: CoupledVariant) -> None:
        from dynamask.engine.routing_probe import gt_box_routing
        from dynamask.flops import mask_head_gmacs, msm_gmacs

        if self.have_rows([v.name]):
            return
        routing = {"routing_signal": v.signal, "coupled": v.coupled, "switch_input": v.reads,
                   "gumbel_tau": v.tau, "budget_weight": v.budget_weight, "target_gmacs": v.target_gmacs}
        path = self.ckpt(v.name)
        if not os.path.exists(path):
            model = build_dynamask(self.cfg, **routing)
            pre = load_state(self.ckpt("pretrain"))["model"]
            if v.reads != "roi":  # a switch of another input width starts fresh
                pre = {k: t for k, t in pre.items() if not k.startswith("roi_heads.msm.")}
            model.load_state_dict(pre, strict=v.reads == "roi")
            model.mask_training = "dynamic"
            info = train_phase(model, self.train, self.cfg, iters=self.cfg.phase_iters, seed=self.cfg.seed + 1,
                               lr=self.cfg.lr / 10, warmup=0, drop_at=None, desc=v.name, msm_lr=self.cfg.lr)
            save_state(path, {"model": model.state_dict()})
            self.timing(v.name, info)
        model = self.model_from(v.name, **routing)
        t0 = time.time()
        sw = {v.name: ((model.roi_heads.msm, v.reads), msm_gmacs(model))}
        metrics = evaluate_policies(model, self.val, costs=mask_head_gmacs(model), switches=sw, fixed=False,
                                    size_rule=False, oracle=False, progress=self.progress)
        probe = gt_box_routing(model, self.val, switches={v.name: sw[v.name][0]}, progress=self.progress)
        self.timing(f"{v.name}_eval", {"seconds": time.time() - t0})
        row = self._row(v.name, "msm", metrics[v.name], probe, probe["choices"][v.name], variant=v,
                        trained="coupled" if v.coupled else "decoupled")
        self.save_rows([row])

    def maskrcnn_row(self) -> None:
        from dynamask.flops import maskrcnn_mask_head_gmacs

        if self.have_rows(["maskrcnn-28"]):
            return
        cfg = self.cfg
        path = self.ckpt("maskrcnn")
        torch.manual_seed(cfg.seed)
        model = build_maskrcnn(cfg)
        if not os.path.exists(path):
            pre = self.ckpt("maskrcnn-pretrain")
            if os.path.exists(pre):
                model.load_state_dict(load_state(pre)["model"])
            else:
                info = train_phase(model, self.train, cfg, iters=cfg.pretrain_iters, seed=cfg.seed, lr=cfg.lr,
                                   warmup=cfg.warmup, drop_at=None, desc="Mask R-CNN (pretrain schedule)")
                save_state(pre, {"model": model.state_dict()})
                self.timing("maskrcnn-pretrain", info)
            info = train_phase(model, self.train, cfg, iters=cfg.phase_iters, seed=cfg.seed + 1, lr=cfg.lr / 10,
                               warmup=0, drop_at=None, desc="Mask R-CNN (phase schedule)")
            save_state(path, {"model": model.state_dict()})
            self.timing("maskrcnn", info)
        model.load_state_dict(load_state(path)["model"])
        gmacs = maskrcnn_mask_head_gmacs(model)
        m = evaluate_fixed_model(model, self.val, gmacs_per_instance=gmacs, progress=self.progress)
        row = self._row("maskrcnn-28", "maskrcnn", m, None, None, resolution=28, trained="maskrcnn")
        # its 28² masks on the ground-truth boxes, scored on the grid DynaMask's resolutions are scored on
        probe = maskrcnn_gt_box_iou(model, self.val, top=cfg.arch["mask_roi_size"] * 8, progress=self.progress)
        cats = np.asarray(probe["categories"])
        row["gt_box_iou"] = float(probe["iou"].mean()) if len(cats) else None
        row["gt_box_iou_per_category"] = {str(c): float(probe["iou"][cats == c].mean()) for c in sorted(set(cats))}
        self.save_rows([row])

    def grid(self, maskrcnn_ckpt: str | None = None) -> None:
        """``OUT/grid.png``: the same validation instances at each resolution of the base model and from the
        Mask R-CNN row's head (its checkpoint here, or ``maskrcnn_ckpt``: a Mask R-CNN row trained in another
        folder with the same data and seed)."""
        from _accuracy_grid import picture_grid

        path = maskrcnn_ckpt or self.ckpt("maskrcnn")
        maskrcnn = None
        if os.path.exists(path):
            maskrcnn = build_maskrcnn(self.cfg)
            maskrcnn.load_state_dict(load_state(path)["model"])
        picture_grid(self.model_from("base"), maskrcnn, self.val, os.path.join(self.out, "grid.png"))
        log(f"picture grid: {os.path.join(self.out, 'grid.png')}")

    def run(self, part: str = "all", split_argv: list[str] | None = None) -> None:
        """``part``: "all"; "dynamask" (every row but Mask R-CNN's); "maskrcnn" (only that row); "ladder" (the
        base model's rows only: fixed resolutions, size rule, oracle, and whatever switch variants the config
        holds).

        ``split_argv`` (with "all"): after the pretrain, which uses every thread, the Mask R-CNN row runs in
        a second process on one thread (this script with these arguments, ``--part maskrcnn``, in
        ``OUT/maskrcnn``) while this one continues on one thread; its row is copied in when both are done.
        On 2 cores that is ~40 min faster than one process doing everything in turn.
        """
        t0 = time.time()
        self.report()
        helper = None
        if part == "ladder":
            self.pretrain()
            self.base()
            self.base_rows()
        if part == "grid":
            self.grid(self.maskrcnn_ckpt)
            return
        if part in ("all", "dynamask"):
            self.pretrain()
            if split_argv is not None and part == "all" and not self.have_rows(["maskrcnn-28"]):
                import subprocess

                cmd = [sys.executable, os.path.abspath(__file__), *split_argv, "--part", "maskrcnn", "--threads", "1",
                       "--out", os.path.join(self.out, "maskrcnn")]
                log("Mask R-CNN row in a second process: " + " ".join(cmd[1:]))
                helper = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                torch.set_num_threads(1)
            self.base()
            self.base_rows()
            self.fit_rows(self.cfg.fit)
            for i, v in enumerate(self.cfg.coupled):
                if i == self.cfg.maskrcnn_after and part == "all" and helper is None:
                    self.maskrcnn_row()
                self.coupled_row(v)
                if i == 0:  # the default dynamic-phase row: the fit `dynamask train` ends with, on its model
                    self.fit_rows(self.cfg.train_fit)
        if helper is not None:
            self._join_maskrcnn(helper)
        if part in ("all", "maskrcnn"):
            self.maskrcnn_row()  # (a no-op when the second process wrote the row)
        self.meta["timings"]["this_run_minutes"] = {"seconds": time.time() - t0}
        self.save_meta()
        self.report()
        log(f"done: {self.out}")

    def _join_maskrcnn(self, helper) -> None:
        """Waits for the second process; copies its row and timings in."""
        import shutil

        if helper.wait() != 0:
            raise SystemExit(f"the Mask R-CNN process failed (exit {helper.returncode}); rerun with --part maskrcnn "
                             f"--out {os.path.join(self.out, 'maskrcnn')} to see why")
        sub = os.path.join(self.out, "maskrcnn")
        shutil.copyfile(os.path.join(sub, "rows", "maskrcnn-28.json"), self.row_path("maskrcnn-28"))
        with open(os.path.join(sub, "meta.json")) as f:
            for name, info in json.load(f).get("timings", {}).items():
                if name.startswith("maskrcnn"):
                    self.meta["timings"][name] = info
        self.save_meta()


def _levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(t) for t in text.split(","))
    if len(levels) != 3 or any(v not in range(4) for v in levels):
        raise argparse.ArgumentTypeError(f"three levels in 0-3 (P2-P5), e.g. 0,0,0; got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "accuracy"), help="study folder (resumable)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (about a minute)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--iters-scale", type=float, default=1.0,
                   help="multiply every phase's iterations (e.g. 0.4 on a machine shared with other jobs; "
                        "the report states it)")
    p.add_argument("--part", choices=("all", "dynamask", "maskrcnn", "ladder", "grid"), default="all",
                   help="run every row (all), or only dynamask (every row but Mask R-CNN's) or maskrcnn (that row, "
                        "e.g. in its own --out with the same --seed; copy its rows/maskrcnn-28.json into the study's "
                        "rows/), or ladder (the base model's fixed-resolution, size-rule and oracle rows, without "
                        "the switch variants). --split does this by itself")
    p.add_argument("--roi-canonical-scale", type=float, default=None,
                   help="the box side the RoI poolers send to P4 (the builders' roi_canonical_scale; default FPN's "
                        "224, for ~800-px images): a study of another value needs its own --out")
    p.add_argument("--split", action="store_true",
                   help="after the pretrain, train the Mask R-CNN row in a second process on one thread while the "
                        "DynaMask rows continue on one thread (2 cores: the fastest way through the study)")
    p.add_argument("--mask-rois", type=int, default=None,
                   help="positive RoIs per image that train DynaMask's mask head (default 8; 0: all of them, as "
                        "the Mask R-CNN row's and the paper's)")
    p.add_argument("--stage-levels", type=_levels, default=None,
                   help="the FPN level each r-FPN stage fuses, comma-separated indices into P2,P3,P4,P5 (default "
                        "2,1,0: the paper's P4, P3, P2); e.g. 0,0,0 for these 192-px images (docs/method.md §3)")
    p.add_argument("--variants", choices=("core", "all"), default="core",
                   help="core: the default switch (the fit dynamask train ends with, on the default dynamic-phase "
                        "row's model, at the budgets the claims are judged at) and the paper's Gumbel switch of that "
                        "row; all: also every switch variant the fit superseded (frozen-model Gumbel and regression "
                        "switches, fits on the base model, four more dynamic-phase rows)")
    p.add_argument("--maskrcnn-ckpt", default=None,
                   help="--part grid: the Mask R-CNN row's checkpoint when it was trained in another folder")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.iters_scale <= 10:
        p.error(f"--iters-scale must be in (0, 10], got {args.iters_scale}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = quick_config(args.seed) if args.quick else full_config(args.seed)
    if args.roi_canonical_scale is not None:  # both models map boxes to levels alike
        cfg = replace(cfg, arch={**cfg.arch, "roi_canonical_scale": args.roi_canonical_scale},
                      maskrcnn={**cfg.maskrcnn, "roi_canonical_scale": args.roi_canonical_scale})
    if args.mask_rois is not None:  # 0: every positive trains the mask head, as Mask R-CNN's and the paper's
        cfg = replace(cfg, arch={**cfg.arch, "mask_rois_per_image": args.mask_rois or None})
    # equal mask supervision: Mask R-CNN's head trains on the same number of positives per image as DynaMask's
    cfg = replace(cfg, maskrcnn={**cfg.maskrcnn, "mask_rois_per_image": cfg.arch["mask_rois_per_image"]})
    if args.stage_levels is not None:
        cfg = replace(cfg, arch={**cfg.arch, "stage_levels": list(args.stage_levels)})
    if args.part == "ladder":  # the switch variants leave the config (a ladder-only study)
        cfg = replace(cfg, switches=(), coupled=(), fit=None, train_fit=None)
    elif args.variants == "core" and not args.quick:
        cfg = core_variants(cfg)
    if args.iters_scale != 1.0:
        cfg = replace(cfg, iters_scale=args.iters_scale,
                      **{k: max(1, round(getattr(cfg, k) * args.iters_scale))
                         for k in ("pretrain_iters", "phase_iters", "switch_iters")})
    log(f"accuracy study ({'quick' if args.quick else 'full'}, {args.part}) in {args.out}; "
        f"torch threads {torch.get_num_threads()}")
    split_argv = None
    if args.split:
        split_argv = ["--seed", str(args.seed), "--iters-scale", repr(args.iters_scale), "--no-progress"]
        split_argv += ["--quick"] if args.quick else []
        for flag, value in (("--mask-rois", args.mask_rois), ("--roi-canonical-scale", args.roi_canonical_scale)):
            split_argv += [flag, str(value)] if value is not None else []
    study = Study(cfg, args.out, progress=not args.no_progress)
    study.maskrcnn_ckpt = args.maskrcnn_ckpt
    study.run(args.part, split_argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
