"""What the accuracy study trains and evaluates: :class:`StudyConfig`, its switch variants and fit plans, the
full study's configuration (:func:`full_config`, :func:`core_variants`) and the smoke test's
(:func:`quick_config`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from dynamask.engine import switch_fit_defaults

# the repository root (the study's default --out is under it; --split's second process imports this package
# from it)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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

    batches: int = switch_fit_defaults.BATCHES  # as `dynamask train`'s; here of 2 images, 8 RoIs each: 43 200 RoIs
    epochs: int = switch_fit_defaults.EPOCHS
    inits: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[float, ...] = ()
    calibration_images: int = switch_fit_defaults.CALIBRATION_IMAGES  # the training images each row is priced on
    average_epochs: int | None = None  # switch_fit.fit_switch's (None: its default, the last half of the epochs)
    on: str = "base"  # the checkpoint (ckpt/ON.pth) whose switch is fitted
    # the switch weighs its choice on detections by their confidence (the library's default); False: the same
    # fitted switches priced and evaluated blind to it (an ablation, rows tagged "-unweighted")
    confidence_weighted: bool = True

    def averaged(self) -> int:
        return (self.epochs + 1) // 2 if self.average_epochs is None else self.average_epochs

    def state_key(self, init: int, num_heads: int) -> str:
        """The cached fit of one init of an MSM of ``num_heads`` heads in :meth:`cache` ``("fit")`` (fits that
        average other epochs are other entries; stop 16's, of the last epoch's weights, are under ``init{i}``; a
        one-head MSM's, from before the heads, have no ``-heads`` part)."""
        return f"init{init}-avg{self.averaged()}" + (f"-heads{num_heads}" if num_heads != 1 else "")

    def cache(self, what: str) -> str:
        """The checkpoint name of this plan's ``what`` ("fit" or "switch_data"); the number of batches is part of
        it, so that a study folder never prices a fit collected on another number (stop 39's folders hold
        ``WHAT-ON``, 900 batches)."""
        return (what if self.on == "base" else f"{what}-{self.on}") + f"-b{self.batches}"

    def names(self) -> list[str]:
        prefix = "fit-iou-roi" if self.on == "base" else "train-fit"
        tag = "" if self.confidence_weighted else "-unweighted"
        return [f"{prefix}{tag}-ct{c:g}-init{i}" for i in self.inits for c in self.budgets]

    def own_rows(self, resolutions: list[int]) -> list[str]:
        """The fitted model's own fixed resolutions, size rule and oracle, beside the default switch's rows (the
        same detector: Tables 5 and 8 and the equal-cost mix compare on one model); none for the base model,
        whose rows are the study's ``fixed-*``, ``size-rule`` and ``oracle``, nor for the ablation."""
        if not self.is_default():
            return []
        return [f"train-fixed-{s}" for s in resolutions] + ["train-size-rule", "train-oracle"]

    def is_default(self) -> bool:
        """The switch ``dynamask train`` ends with: fitted on the dynamic-phase model, weighted by confidence."""
        return self.on != "base" and self.confidence_weighted


VARIANT_FIELDS = ("switches", "coupled", "maskrcnn_after", "fit", "train_fit", "train_fit_unweighted")


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
    train_fit_unweighted: FitPlan | None = None  # the same fits blind to the detections' confidence (ablation)
    iters_scale: float = 1.0  # the iteration counts above are the full schedule times this


def _arch(size: int, *, trunk: int, stages: tuple[int, int, int], roi: int, fpn: int, rois: int) -> dict[str, Any]:
    # class-specific mask predictors, as the Mask R-CNN row's: here a ring's box often holds another object
    # in its hole, and a class-agnostic head (stop 14's study) segmented that object instead (ring IoU 0.15-0.22
    # at every resolution against Mask R-CNN's 0.54 at 28²); the predictors add (8 - 1) · C_k · S_k² MACs.
    # The stage levels are the builders' default for the image size (P2 at every stage at 192 px), written out so
    # that the study's record names them; --stage-levels 2,1,0 measures the paper's P4, P3, P2
    from dynamask.models.builders import stage_levels_for

    return {"depth": 18, "num_classes": 8, "class_specific_masks": True, "fpn_channels": fpn,
            "box_representation_size": 512, "trunk_channels": trunk, "stage_channels": list(stages),
            "stage_levels": list(stage_levels_for(size)), "mask_roi_size": roi,
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


# The budgets the default switch is judged at: 0.03 and 0.035 (the cheap end of the curve, between the 14² and 28²
# costs, where no row stood before), 0.04, 0.045 and 0.05 GMAC (around the size rule's 0.0475-0.0493 and
# under 1.3x the Mask R-CNN head's 0.0397 = 0.052: Tab. 8 and Tab. 6), 0.08, 0.09 (just under 0.6x the 112² cost,
# Tab. 5) and 0.11. The price is set on training images, and on the validation images every seed's fit landed
# 5-9% above its budget (C_t 0.045 at 0.0475-0.0492 GMAC): 0.04 keeps a row under the size rule's cost on a seed
# whose size rule is cheap (seed 2: 0.0475).
CORE_FIT_BUDGETS = (0.03, 0.035, 0.04, 0.045, 0.05, 0.08, 0.09, 0.11)


def core_variants(cfg: StudyConfig) -> StudyConfig:
    """The study without the switch variants the fit superseded: the default dynamic-phase row (its
    Gumbel-trained switch is the paper's) and the fit ``dynamask train`` ends with on its model (the default
    switch), at :data:`CORE_FIT_BUDGETS`; beside it the same fits blind to the detections' confidence."""
    default = cfg.coupled[0]
    train_fit = replace(cfg.train_fit or FitPlan(on=default.name), budgets=CORE_FIT_BUDGETS, on=default.name)
    return replace(cfg, switches=(), fit=None, coupled=(default,), train_fit=train_fit,
                   train_fit_unweighted=replace(train_fit, confidence_weighted=False))


def equal_mask_supervision(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` with Mask R-CNN's head trained on as many positive RoIs per image as DynaMask's
    (``mask_rois_per_image``; the command line applies it to every study, after ``--mask-rois``)."""
    return replace(cfg, maskrcnn={**cfg.maskrcnn, "mask_rois_per_image": cfg.arch["mask_rois_per_image"]})


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
                                         on=coupled[0].name),
                       train_fit_unweighted=FitPlan(batches=2, epochs=2, inits=(0,), budgets=(0.006,),
                                                    calibration_images=2, on=coupled[0].name,
                                                    confidence_weighted=False))
