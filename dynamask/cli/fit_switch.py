"""``dynamask fit-switch``: fit a trained DynaMask checkpoint's Mask Switch by regression and price its
resolutions for a budget (:mod:`dynamask.engine.switch_fit`); writes a new checkpoint.

    dynamask fit-switch runs/x/last.pth --data data/shapes --out runs/x/fitted.pth --budget-at 28
"""

from __future__ import annotations

import argparse
import os

from dynamask.cli.common import (
    check_label_map,
    checkpoint_label_map,
    default_device,
    non_negative_int,
    positive_float,
    positive_int,
    same_file,
    split_files,
    unit_interval,
)
from dynamask.engine import switch_fit_defaults as defaults


def add_parser(sub) -> None:
    p = sub.add_parser("fit-switch", help="fit a trained checkpoint's mask switch to a budget (regression, "
                                          "the stages untouched); writes a new checkpoint")
    p.add_argument("checkpoint", help="a trained DynaMask checkpoint")
    p.add_argument("--out", required=True, help="the new checkpoint (not the input's path; required)")
    p.add_argument("--data", help="dataset root with train/ and val/ splits, as `dynamask shapes` writes (its train "
                                  "split is used; default: none, give --train-images and --train-ann)")
    p.add_argument("--train-images", help="folder of the training images (default: --data's train split)")
    p.add_argument("--train-ann", help="annotation file of --train-images (default: --data's train split)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-gmacs", type=positive_float,
                        help="C_t: mean mask-head GMAC per RoI (one of the three budget flags is required)")
    budget.add_argument("--budget-at", type=int, metavar="S",
                        help="C_t = the head's cost at resolution S (e.g. 28: on average as costly as 28² for all)")
    budget.add_argument("--no-budget", action="store_true", help="no price: each RoI gets its predicted best")
    p.add_argument("--batches", type=positive_int, default=defaults.BATCHES,
                   help=f"training batches run through the frozen model (default {defaults.BATCHES})")
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per batch (default 2)")
    p.add_argument("--epochs", type=positive_int, default=defaults.EPOCHS,
                   help=f"epochs of the switch over the collected RoIs (default {defaults.EPOCHS})")
    p.add_argument("--average-epochs", type=positive_int, default=None,
                   help="keep the mean of the switch's weights after each of the last N epochs (default: the last "
                        "half; 1 keeps the last epoch's)")
    p.add_argument("--calibration-images", type=non_negative_int, default=defaults.CALIBRATION_IMAGES,
                   help=f"training images whose detections the price is set on (default {defaults.CALIBRATION_IMAGES}"
                        "; 0: set it on the training positives)")
    p.add_argument("--no-confidence-weighting", action="store_true",
                   help="choose for every detection as for a sure one (by default the switch weighs each "
                        "detection's predicted mask gain by its score, so the budget goes to likely objects)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the batches drawn and of the switch's initialisation")
    p.add_argument("--flip-prob", type=unit_interval, default=0.5,
                   help="horizontal flips of the training images (default 0.5, as training)")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: a GPU when present, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from dynamask.checks import check_device, check_output_file

    images, ann = split_files(args, "train", args.train_images, args.train_ann)
    if same_file(args.out, args.checkpoint):  # through links too: it holds a run's resumable state
        raise ValueError(f"--out {args.out} is the input checkpoint {args.checkpoint}: write the fitted one "
                         "beside it")
    check_device(args.device)
    if args.average_epochs is not None and args.average_epochs > args.epochs:
        raise ValueError(f"--average-epochs {args.average_epochs} exceeds --epochs {args.epochs}")
    check_output_file(args.out)  # everything is checked before the model runs on the data: that takes minutes
    try:
        model, ckpt, costs, report, before = _fit(args, images, ann)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"dynamask fit-switch: interrupted: the switch was not fitted; {args.checkpoint} is unchanged and "
              f"{args.out} was not written", file=sys.stderr)
        return 130
    _save(args, model, ckpt, report, before)
    print(report.summary(list(costs)))
    print(f"wrote {args.out}")
    return 0


def _fit(args: argparse.Namespace, images: str, ann: str):
    """Load the checkpoint and the data, check them against each other, fit the switch (in place).
    Returns ``(model, checkpoint, costs, report, the switch's state dict from before the fit)``."""
    import torch

    from dynamask.data import Compose, RandomHorizontalFlip
    from dynamask.data.lvis import open_dataset
    from dynamask.engine import switch_fit
    from dynamask.engine.checkpoint import model_from_checkpoint
    from dynamask.models.detector import DynaMaskRCNN
    from dynamask.models.flops import mask_head_gmacs
    from dynamask.models.roi_heads import DynaMaskRoIHeads

    model, ckpt = model_from_checkpoint(args.checkpoint)
    heads = getattr(model, "roi_heads", None)
    if not isinstance(model, DynaMaskRCNN) or not isinstance(heads, DynaMaskRoIHeads):
        raise ValueError(f"{args.checkpoint}: architecture {ckpt['arch'].get('name')!r} has no mask switch to fit")
    costs = mask_head_gmacs(heads.mask_head)
    if args.budget_at is not None:
        if args.budget_at not in costs:
            raise ValueError(f"--budget-at {args.budget_at}: the head's resolutions are {sorted(costs)}")
        target: float | None = costs[args.budget_at]
    else:
        target = None if args.no_budget else args.target_gmacs
    if target is not None and target < min(costs.values()):
        raise ValueError(f"--target-gmacs {target:g} is below the cheapest resolution's cost "
                         f"{min(costs.values()):g} GMAC per RoI (costs: {costs})")
    dataset = open_dataset(images, ann, Compose([RandomHorizontalFlip(args.flip_prob)] if args.flip_prob else []))
    if len(dataset) == 0:
        raise ValueError(f"{ann}: no training images")
    check_label_map(ckpt, args.checkpoint, dataset.label_map, ann, error=ValueError)
    before = {k: v.detach().cpu().clone() for k, v in heads.msm.state_dict().items()}
    device = torch.device(default_device(args.device))
    model.to(device)
    report = switch_fit.fit_model_switch(model, dataset, target_gmacs=target, num_batches=args.batches,
                                         batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                                         calibration_images=args.calibration_images,
                                         average_epochs=args.average_epochs,
                                         confidence_weighted=not args.no_confidence_weighting,
                                         progress=not args.no_progress)
    return model, ckpt, costs, report, before


def _save(args: argparse.Namespace, model, ckpt: dict, report, before: dict) -> None:
    """The fitted checkpoint: the input's weights with the fitted switch, its epoch and iteration, the fit's
    report, and the dynamic phase's switch (``dynamask.engine.switch_life``): the one the input kept beside
    a fit of `dynamask train`, or else the input's own switch, which this fit replaced."""
    from dynamask.engine import switch_life
    from dynamask.engine.checkpoint import save_checkpoint

    record = {**report.as_dict(), "from": os.path.abspath(args.checkpoint), "batches": args.batches,
              "batch_size": args.batch_size, "seed": args.seed}
    extra, states = switch_life.refitted(ckpt, record=record, before=before)
    save_checkpoint(args.out, arch=ckpt["arch"], label_map=checkpoint_label_map(ckpt), model=model.cpu(),
                    epoch=ckpt.get("epoch"), iteration=ckpt.get("iteration"), extra=extra, states=states or None)
