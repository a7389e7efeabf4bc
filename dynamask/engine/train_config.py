"""The settings of a training run (:class:`TrainConfig`, one field per ``dynamask train`` flag) and their
checks before any work.

:meth:`TrainConfig.validate`: every number finite and in range (``--lr nan`` would train an all-NaN model), the
device present, the run folder writable (or the run would fail at its first save, after the training before
it), ``--eval-every`` with a validation split and ``--freeze detector`` with the detector's weights (either
would otherwise fail or mean nothing only after the training before it). :meth:`TrainConfig.validate_val_data`
opens the validation split evaluated at the end, now rather than after the training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from dynamask.checks import check_device, check_number, check_output_dir
from dynamask.engine import switch_fit_defaults
from dynamask.engine.freeze import FreezeChoice, check_freeze
from dynamask.engine.train_flags import json_dict, option
from dynamask.engine.train_flags import mask_costs as parse_mask_costs
from dynamask.models.mask_losses import ROUTING_SIGNALS
from dynamask.models.switch_input import SWITCH_INPUTS

METHOD = "DynaMask's method (the model's defaults, which are the paper's, unless given)"


@dataclass
class TrainConfig:
    """Everything a training run needs. Iteration counts are per process; ``batch_size`` is per process.

    Each field is declared with its ``dynamask train`` flag (:mod:`dynamask.engine.train_flags`).
    """

    train_images: str = option(help="folder of the training images (default: DATA/train with --data)")
    train_ann: str = option(help="COCO (or LVIS) annotation file of the training images (default: --data's)")
    out_dir: str = option(help="run folder: last.pth, config.yaml, log.txt, metrics.csv, loss.png, eval/ (required, "
                          "unless --config gives it; default: none)", option="--out", metavar="OUT")
    arch: str = option("dynamask_resnet_fpn", "builder name; maskrcnn_resnet_fpn is the peer")
    # num_classes is filled from the data if absent
    arch_kwargs: dict[str, Any] = option(factory=dict, help="builder keyword arguments as JSON, e.g. '{\"depth\": "
                                         "18}' or '{\"weights\": \"runs/x/last.pth\"}'", type=json_dict)
    epochs: int = option(12, "dynamic epochs (mask switch trained), counted after --pretrain-epochs; a model "
                         "without the two phases trains this many epochs")
    pretrain_epochs: int = option(1, "epochs before the dynamic ones, every resolution supervised and no mask "
                                  "switch: a run is pretrain + dynamic epochs, as the paper's 1 + 12")
    batch_size: int = option(2, "images per process")
    optimizer: Literal["sgd", "adamw"] = option("sgd", "sgd (with --momentum) or adamw (faster from random "
                                                "initialisation)")
    lr: float = option(0.02, "base learning rate (the paper's 0.02 is for a total batch of 16)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "weight decay (L2 for sgd, decoupled for adamw)")
    warmup_iters: int = option(500, "iterations of linear lr warm-up at the start of the run")
    warmup_factor: float = option(0.001, "lr multiplier the warm-up starts from")
    lr_steps: tuple[int, ...] = option((8, 11), "lr x gamma after these dynamic epochs (8 11: after the pretrain "
                                       "epochs and 8 and 11 dynamic ones); the warm-up starts the run")
    gamma: float = option(0.1, "lr multiplier at each of --lr-steps")
    clip_grad_norm: float | None = option(None, "clip the gradients' total norm to this (default: no clipping)")
    amp: bool = option(True, "no mixed precision on CUDA")  # mixed precision; only on CUDA
    workers: int = option(2, "data-loading processes per training process")
    flip_prob: float = option(0.5, "probability of a horizontal flip of each training image")
    resize: tuple[int, int] | None = option(None, "multi-scale training: the model draws the shorter side from "
                                            "LOW..HIGH per image, and uses HIGH at test (paper: 640 800; default: "
                                            "the model's min_size)", metavar=("LOW", "HIGH"))
    max_size: int | None = option(None, "cap of the longer side (default: the model's max_size)")
    # DynaMask's method (None: the model's default; see dynamask.engine.recipe). The budget is on unless
    # budget=False; its default C_t is the paper's 54%-fewer-FLOPs setting rescaled to this head.
    target_gmacs: float | None = option(
        None, "C_t, mask-head GMAC per RoI. Default: 0.4/1.40 of the head's top-resolution cost, the paper's "
        "54%%-fewer-FLOPs setting (C_t 0.4 of its 1.40-GMAC head) rescaled to this head", group=METHOD)
    budget: bool = option(True, "no FLOPs budget term in the dynamic phase", group=METHOD)
    budget_weight: float | None = option(None, "lambda2, weights budget and entropy (default: the model's, 0.4)",
                                         group=METHOD)
    edge_weight: float | None = option(None, "lambda1, weights the edge loss (default: the model's, 0.1)",
                                       group=METHOD)
    gumbel_tau: float | None = option(None, "Gumbel-softmax temperature (default: the model's, 0.5)", group=METHOD)
    routing_signal: str | None = option(
        None, "what the switch learns from: each resolution's loss against its own target (paper, the default), "
        "all scored by BCE on the finest grid (grid) or in a band around the outline (boundary), or by 1 - soft "
        "IoU on the finest grid (iou)", group=METHOD, choices=ROUTING_SIGNALS)
    coupled: bool | None = option(
        None, "the stages keep their own supervision in the dynamic phase and the switch learns from detached "
        "losses (default: coupled, the paper's Eq. 3)", group=METHOD, option="--decoupled",
        action="store_const", const=False)
    switch_input: str | None = option(
        None, "what the switch reads: the RoI feature (roi, the default), the trunk's output (trunk), or the "
        "trunk's output with its 14x14 mask and edge logits (mask)", group=METHOD, choices=SWITCH_INPUTS)
    switch: Literal["paper", "fit"] | None = option(
        None, "the mask switch the run ends with: fit (the default) regresses each RoI's mask IoU and prices the "
        "resolutions so that the mean head cost meets C_t exactly, when training ends (dynamask.engine."
        "switch_life); paper keeps the switch the dynamic phase trained through Gumbel-softmax under the soft "
        "budget (Eq. 3), the paper's model and --recipe paper's default. --no-switch-fit: --switch paper",
        group=METHOD)
    switch_fit_batches: int = option(
        switch_fit_defaults.BATCHES, "training batches (of --batch-size images, over all processes) the switch fit "
        "runs the trained model on", group=METHOD)
    switch_fit_epochs: int = option(switch_fit_defaults.EPOCHS, "epochs of the switch fit over those RoIs",
                                    group=METHOD)
    switch_fit_calibration_images: int = option(
        switch_fit_defaults.CALIBRATION_IMAGES,
        "training images on whose detections the fitted switch's price is set (0: on the training RoIs)", group=METHOD)
    freeze: FreezeChoice = option(
        "none", "detector: train only the mask head (r-FPN stages, predictors) and the switch on a frozen detector "
        "(backbone, FPN, RPN, box head keep the weights given in --arch-kwargs: weights or torchvision_weights)")
    seed: int = option(0, "seed of the model's initialisation, the data order and the augmentations")
    # seconds of training in this run; then checkpoint and stop (the flag is in minutes)
    time_limit: float | None = option(None, "minutes; then checkpoint and stop (default: no limit)", scale=60.0,
                                      metavar="MINUTES")
    max_iters: int | None = option(None, "stop (with a checkpoint) after this many iterations in total (default: "
                                   "no limit)")
    log_every: int = option(20, "iterations between the progress lines of log.txt and metrics.csv")
    eval_every: int | None = option(
        None, "evaluate on the validation split after every N epochs (with the model's own switch at that point; "
        "needs --val-images/--val-ann or --data with a val split) and keep best.pth by segm AP (default: only when "
        "training ends)", metavar="N")
    resume: str | None = option(None, "continue from a checkpoint (default with no path: OUT/last.pth)", nargs="?",
                                const="auto")
    device: str | None = option(None, "e.g. cpu or cuda:0 (default: this process's GPU, else cpu)")
    progress: bool = option(True, "no progress bar (log.txt is written either way)")
    val_images: str | None = option(None, "evaluate on this split when training ends (default: DATA/val with "
                                    "--data, if it exists)")
    val_ann: str | None = option(None, "annotation file of --val-images (default: --data's val split)")
    mask_costs: dict[int, float] | None = option(
        None, "per-resolution mask-head GMAC for the final evaluation, e.g. 14=0.23,28=0.52 (default: a DynaMask "
        "model's own)", type=parse_mask_costs)
    repeat_factor_threshold: float | None = option(
        None, "LVIS's repeat-factor sampling of images with rare categories (threshold default 0.001; default: "
        "off)", option="--repeat-factor-sampling", type=float, nargs="?", const=0.001, metavar="THRESH")

    def validate(self) -> None:
        """Raise a ValueError naming the first setting out of range; create and probe ``out_dir``."""
        # epochs count the dynamic phase after the pretrain epochs: either may be 0, not both
        check_number(self.epochs, "epochs", low=0, integer=True)
        check_number(self.pretrain_epochs, "pretrain_epochs", low=0, integer=True)
        if self.epochs + self.pretrain_epochs < 1:
            raise ValueError("epochs and pretrain_epochs are both 0: nothing to train")
        if self.target_gmacs is not None:
            check_number(self.target_gmacs, "target_gmacs", low=0, low_open=True)
        if self.budget_weight is not None:
            check_number(self.budget_weight, "budget_weight", low=0)
        if self.edge_weight is not None:
            check_number(self.edge_weight, "edge_weight", low=0)
        if self.gumbel_tau is not None:
            check_number(self.gumbel_tau, "gumbel_tau", low=0, low_open=True)
        check_number(self.batch_size, "batch_size", low=1, integer=True)
        check_number(self.lr, "lr", low=0, low_open=True)
        check_number(self.momentum, "momentum", low=0, high=1, high_open=True)
        check_number(self.weight_decay, "weight_decay", low=0)
        check_number(self.warmup_iters, "warmup_iters", low=0, integer=True)
        check_number(self.warmup_factor, "warmup_factor", low=0, high=1, low_open=True)
        for e in self.lr_steps:
            check_number(e, "lr_steps", low=0, integer=True)
        check_number(self.gamma, "gamma", low=0, low_open=True)
        if self.clip_grad_norm is not None:
            check_number(self.clip_grad_norm, "clip_grad_norm", low=0, low_open=True)
        check_number(self.workers, "workers", low=0, integer=True)
        check_number(self.flip_prob, "flip_prob", low=0, high=1)
        if self.resize is not None:
            if len(self.resize) != 2 or self.resize[0] > self.resize[1]:
                raise ValueError(f"resize must be (low, high) with low <= high, got {self.resize!r}")
            for v in self.resize:
                check_number(v, "resize", low=1, integer=True)
        if self.max_size is not None:
            check_number(self.max_size, "max_size", low=1, integer=True)
        if self.time_limit is not None:
            check_number(self.time_limit, "time_limit", low=0)
        if self.max_iters is not None:  # iterations in total, resume included
            check_number(self.max_iters, "max_iters", low=1, integer=True)
        check_number(self.log_every, "log_every", low=1, integer=True)
        if self.eval_every is not None:
            check_number(self.eval_every, "eval_every", low=1, integer=True)
            if not (self.val_images and self.val_ann):
                raise ValueError(f"--eval-every {self.eval_every} needs a validation split: --val-images and "
                                 "--val-ann, or --data with a val split")
        check_freeze(self)
        check_number(self.switch_fit_batches, "switch_fit_batches", low=1, integer=True)
        check_number(self.switch_fit_epochs, "switch_fit_epochs", low=1, integer=True)
        check_number(self.switch_fit_calibration_images, "switch_fit_calibration_images", low=0, integer=True)
        if self.mask_costs is not None:
            for res, cost in self.mask_costs.items():
                check_number(cost, f"mask_costs[{res}]", low=0)
        if self.repeat_factor_threshold is not None:  # the share of images a category must reach: a fraction
            check_number(self.repeat_factor_threshold, "repeat_factor_sampling", low=0, high=1, low_open=True)
        check_device(self.device, name="device")
        check_output_dir(self.out_dir, name="out_dir")

    def validate_val_data(self) -> None:
        """Open the validation split (which checks the whole annotation file and its images) and refuse one
        with no images, whose AP would read 0; evaluation opens it again when training ends."""
        if not self.val_ann:
            return
        if not self.val_images:
            raise ValueError(f"val_ann ({self.val_ann}) needs val_images, the folder of its images")
        from dynamask.data import CocoDetection

        if len(CocoDetection(self.val_images, self.val_ann)) == 0:
            raise ValueError(f"{self.val_ann}: no images to evaluate")

    def as_record(self) -> dict[str, Any]:
        """The settings as plain values (tuples as lists), as a checkpoint's ``extra["config"]`` records them."""
        d = asdict(self)
        d["lr_steps"] = list(d["lr_steps"])
        if d["resize"] is not None:
            d["resize"] = list(d["resize"])
        if d["mask_costs"] is not None:
            d["mask_costs"] = {int(k): float(v) for k, v in d["mask_costs"].items()}
        return d


def resolved_switch(cfg: TrainConfig) -> str:
    """The switch a run ends with: ``cfg.switch``, else the fit (``--recipe paper`` sets "paper")."""
    return cfg.switch or "fit"
