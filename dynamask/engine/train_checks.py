"""Checks of a :class:`~dynamask.engine.train.TrainConfig` before any work: every number finite and in
range (``--lr nan`` would train an all-NaN model), the device present, the run folder writable (or the
run would fail at its first save, after the training before it), ``--eval-every`` with a validation split
and ``--freeze detector`` with the detector's weights (either would otherwise fail or mean nothing only
after the training before it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamask.checks import check_device, check_number, check_output_dir
from dynamask.engine.freeze import check_freeze

if TYPE_CHECKING:
    from dynamask.engine.train import TrainConfig


def check_config(cfg: TrainConfig) -> None:
    """Raise a ValueError naming the first setting out of range; create and probe ``cfg.out_dir``."""
    # epochs count the dynamic phase after the pretrain epochs: either may be 0, not both
    check_number(cfg.epochs, "epochs", low=0, integer=True)
    check_number(cfg.pretrain_epochs, "pretrain_epochs", low=0, integer=True)
    if cfg.epochs + cfg.pretrain_epochs < 1:
        raise ValueError("epochs and pretrain_epochs are both 0: nothing to train")
    if cfg.target_gmacs is not None:
        check_number(cfg.target_gmacs, "target_gmacs", low=0, low_open=True)
    if cfg.budget_weight is not None:
        check_number(cfg.budget_weight, "budget_weight", low=0)
    if cfg.edge_weight is not None:
        check_number(cfg.edge_weight, "edge_weight", low=0)
    if cfg.gumbel_tau is not None:
        check_number(cfg.gumbel_tau, "gumbel_tau", low=0, low_open=True)
    check_number(cfg.batch_size, "batch_size", low=1, integer=True)
    check_number(cfg.lr, "lr", low=0, low_open=True)
    check_number(cfg.momentum, "momentum", low=0, high=1, high_open=True)
    check_number(cfg.weight_decay, "weight_decay", low=0)
    check_number(cfg.warmup_iters, "warmup_iters", low=0, integer=True)
    check_number(cfg.warmup_factor, "warmup_factor", low=0, high=1, low_open=True)
    for e in cfg.lr_steps:
        check_number(e, "lr_steps", low=0, integer=True)
    check_number(cfg.gamma, "gamma", low=0, low_open=True)
    if cfg.clip_grad_norm is not None:
        check_number(cfg.clip_grad_norm, "clip_grad_norm", low=0, low_open=True)
    check_number(cfg.workers, "workers", low=0, integer=True)
    check_number(cfg.flip_prob, "flip_prob", low=0, high=1)
    if cfg.resize is not None:
        if len(cfg.resize) != 2 or cfg.resize[0] > cfg.resize[1]:
            raise ValueError(f"resize must be (low, high) with low <= high, got {cfg.resize!r}")
        for v in cfg.resize:
            check_number(v, "resize", low=1, integer=True)
    if cfg.max_size is not None:
        check_number(cfg.max_size, "max_size", low=1, integer=True)
    if cfg.time_limit is not None:
        check_number(cfg.time_limit, "time_limit", low=0)
    if cfg.max_iters is not None:  # iterations in total, resume included
        check_number(cfg.max_iters, "max_iters", low=1, integer=True)
    check_number(cfg.log_every, "log_every", low=1, integer=True)
    if cfg.eval_every is not None:
        check_number(cfg.eval_every, "eval_every", low=1, integer=True)
        if not (cfg.val_images and cfg.val_ann):
            raise ValueError(f"--eval-every {cfg.eval_every} needs a validation split: --val-images and --val-ann, or "
                             "--data with a val split")
    check_freeze(cfg)
    check_number(cfg.switch_fit_batches, "switch_fit_batches", low=1, integer=True)
    check_number(cfg.switch_fit_epochs, "switch_fit_epochs", low=1, integer=True)
    check_number(cfg.switch_fit_calibration_images, "switch_fit_calibration_images", low=0, integer=True)
    if cfg.mask_costs is not None:
        for res, cost in cfg.mask_costs.items():
            check_number(cost, f"mask_costs[{res}]", low=0)
    if cfg.repeat_factor_threshold is not None:  # the share of images a category must reach: a fraction
        check_number(cfg.repeat_factor_threshold, "repeat_factor_sampling", low=0, high=1, low_open=True)
    check_device(cfg.device, name="device")
    check_output_dir(cfg.out_dir, name="out_dir")


def check_val_data(cfg: TrainConfig) -> None:
    """Open the validation split (which checks the whole annotation file and its images) and refuse one
    with no images, whose AP would read 0; evaluation opens it again when training ends."""
    if not cfg.val_ann:
        return
    if not cfg.val_images:
        raise ValueError(f"val_ann ({cfg.val_ann}) needs val_images, the folder of its images")
    from dynamask.data import CocoDetection

    if len(CocoDetection(cfg.val_images, cfg.val_ann)) == 0:
        raise ValueError(f"{cfg.val_ann}: no images to evaluate")
