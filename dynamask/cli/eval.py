"""``dynamask eval``: COCO bbox/segm/Boundary AP and the mask-resolution report of a checkpoint (LVIS and
the official Cityscapes evaluation too, on request).

    dynamask eval runs/x/last.pth --data data/shapes --out runs/x/eval
"""

from __future__ import annotations

import argparse
from typing import Any

from dynamask.cli.common import CliError, check_eval_out, check_label_map, default_device, positive_int
from dynamask.data.shapes import split_paths
from dynamask.engine.train_flags import mask_costs


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="COCO bbox/segm/Boundary AP and the mask-resolution report of a checkpoint")
    p.add_argument("checkpoint", help="a dynamask checkpoint, e.g. runs/x/last.pth")
    p.add_argument("--data", help="dataset root with train/ and val/ splits, as `dynamask shapes` writes (its --split "
                                  "is used; default: none, give --images and --ann)")
    p.add_argument("--split", default="val", help="split of --data")
    p.add_argument("--images", help="folder of the images (default: --data's split)")
    p.add_argument("--ann", help="COCO (or LVIS) annotation file of --images (default: --data's split)")
    p.add_argument("--out", default=None, help="folder for results.json, metrics.json, summary.txt, resolution.png "
                                               "(default: none, the metrics are printed only)")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: a GPU when present, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--mask-costs", type=mask_costs, default=None, help="e.g. 14=0.23,28=0.52,56=0.85,112=1.29")
    p.add_argument("--no-boundary", action="store_true", help="skip Boundary AP")
    p.add_argument("--lvis", action="store_true",
                   help="an LVIS file, scored by LVIS's rules (AP, APr/APc/APf; needs `pip install lvis`)")
    p.add_argument("--max-dets", type=int, default=None, help="with --lvis: detections per image (default 300)")
    p.add_argument("--cityscapes-gt", metavar="DIR", default=None,
                   help="also the official Cityscapes instance evaluation against DIR/<city>/*_gtFine_instanceIds.png "
                        "(ROOT/gtFine/val; needs `pip install cityscapesscripts`)")
    p.add_argument("--switch", choices=("fitted", "dynamic-phase"), default=None,
                   help="which mask switch of a DynaMask checkpoint to evaluate: the fitted one, or the one the "
                        "dynamic phase trained (the paper's; kept in a fitted checkpoint). Default: the one the "
                        "checkpoint ends with")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dynamask.checks import check_device, check_mask_costs, check_output_dir
    from dynamask.data.lvis import LvisDetection, open_dataset
    from dynamask.engine.checkpoint import model_from_checkpoint
    from dynamask.engine.evaluate import evaluate, format_metrics

    if args.images and args.ann:
        images, ann = args.images, args.ann
    elif args.data:
        images, ann = split_paths(args.data, args.split)
    else:
        raise CliError("give --data DIR or both --images and --ann")
    # everything is checked before the dataset is run: a failure after it would lose the whole run
    check_device(args.device)
    if args.workers < 0:
        raise CliError(f"--workers must be >= 0, got {args.workers}")
    if args.max_dets is not None and (not args.lvis or args.max_dets < 1):
        raise CliError("--max-dets needs --lvis and a positive number")
    if args.out:
        check_output_dir(args.out)
        check_eval_out(args.out)
    dataset = open_dataset(images, ann)
    if len(dataset) == 0:
        raise ValueError(f"{ann}: no images to evaluate")
    if isinstance(dataset, LvisDetection) != args.lvis:
        raise CliError(f"{ann} is an LVIS file: evaluate it with --lvis" if not args.lvis else
                       f"--lvis: {ann} is not an LVIS file (its categories have no frequency)")
    model, ckpt = model_from_checkpoint(args.checkpoint)
    check_label_map(ckpt, args.checkpoint, dataset.label_map, ann)
    if args.switch is not None:
        print(_choose_switch(model, ckpt, args.switch, args.checkpoint))
    check_mask_costs(args.mask_costs, model)
    device = default_device(args.device)
    costs = args.mask_costs  # None: a DynaMask model's own (dynamask.models.flops.HeadCosts), the MSM included
    try:
        metrics = evaluate(
            model, dataset, device=device, costs=costs, out_dir=args.out, boundary=not args.no_boundary,
            batch_size=args.batch_size, num_workers=args.workers, progress=not args.no_progress,
            lvis=args.lvis, max_dets=args.max_dets, cityscapes_gt_dir=args.cityscapes_gt,
        )
    except ImportError as exc:  # an optional extra (lvis, cityscapesscripts) is missing
        raise CliError(str(exc)) from exc
    if metrics is None:  # a process other than rank 0 under DDP: rank 0 gathers and reports
        return 0
    print(format_metrics(metrics))
    if args.out:
        print(f"files in {args.out}")
    return 0


def _choose_switch(model, ckpt: dict[str, Any], which: str, path: str) -> str:
    """Puts the asked switch into ``model`` (built from ``ckpt``); returns the line that says which it is."""
    from dynamask.engine import switch_life

    if not switch_life.can_fit(model):
        raise CliError(f"--switch: {path} has no mask switch (a {ckpt['arch']['name']} checkpoint)")
    fitted = switch_life.is_fitted(ckpt)
    if which == "fitted":
        if not fitted:
            raise CliError(f"--switch fitted: {path} holds no fitted switch (trained with --switch paper); "
                           "fit one with `dynamask fit-switch`")
        return "switch: the fitted one"
    if not fitted:
        return "switch: the dynamic phase's (the only one this checkpoint has)"
    if not switch_life.use_dynamic_phase_switch(model, ckpt):
        raise CliError(f"--switch dynamic-phase: {path} was fitted but does not keep the dynamic phase's switch")
    return "switch: the dynamic phase's (the paper's), in place of the fitted one"
