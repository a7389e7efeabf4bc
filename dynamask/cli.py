"""The ``dynamask`` command: ``shapes``, ``convert``, ``train``, ``eval``, ``infer``.

    dynamask shapes --out data/shapes --train 2000 --val 200 --size 192 --seed 0
    dynamask convert cityscapes data/cityscapes --split val --out data/cityscapes/instances_val.json
    dynamask train --data data/shapes --out runs/x --arch dynamask_resnet_fpn --arch-kwargs '{"depth": 18}'
    torchrun --nproc-per-node 2 -m dynamask train ...        (DDP: one process per GPU, or gloo on CPU)
    dynamask eval runs/x/last.pth --data data/shapes --out runs/x/eval
    dynamask infer photos/ extra.jpg --weights runs/x/last.pth --out runs/x/infer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dynamask import cli_checks
from dynamask.data.shapes import split_paths
from dynamask.models.mask_losses import ROUTING_SIGNALS
from dynamask.models.switch_input import SWITCH_INPUTS


class CliError(Exception):
    """A usage problem reported as ``dynamask: error: ...`` with exit status 2."""


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"depth\": 18}'")
    return value


def _costs(text: str) -> dict[int, float]:
    """``14=0.23,28=0.52,56=0.85,112=1.29`` -> {14: 0.23, ...}"""
    try:
        costs = {int(k): float(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected RES=GMAC pairs like 14=0.23,28=0.52, got {text!r}") from exc
    bad = [f"{k}={v}" for k, v in costs.items() if k < 1 or not (v >= 0 and v != float("inf"))]
    if bad or not costs:
        raise argparse.ArgumentTypeError(f"resolutions must be >= 1 and costs finite and >= 0, got {text!r}")
    return costs


def _split_files(args: argparse.Namespace, split: str, images: str | None, ann: str | None) -> tuple[str, str]:
    if images and ann:
        return images, ann
    if args.data:
        return split_paths(args.data, split)
    raise CliError(f"give --data DIR (a dataset made by `dynamask shapes`) or both --{split}-images and --{split}-ann")


# --------------------------------------------------------------------------------------------- shapes
def _shapes_parser(sub) -> None:
    p = sub.add_parser("shapes", help="write the synthetic shapes dataset (COCO format)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=192, help="image side in pixels (default 192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-objects", type=int, default=6, help="objects per image at most (default 6)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.set_defaults(func=_cmd_shapes)


def _cmd_shapes(args: argparse.Namespace) -> int:
    from dynamask.data.shapes import generate

    if args.train < 0 or args.val < 0 or args.size < 32:
        raise CliError("need --train >= 0, --val >= 0 and --size >= 32")
    files = generate(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                     max_objects=args.max_objects, workers=args.workers)
    for split, ann in files.items():
        print(f"{split}: {split_paths(args.out, split)[0]}  {ann}")
    return 0


# --------------------------------------------------------------------------------------------- convert
def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a dataset's annotations to a COCO instances file")
    p.add_argument("format", choices=("cityscapes",), help="the dataset's format")
    p.add_argument("root", help="cityscapes: the folder holding gtFine/ and leftImg8bit/")
    p.add_argument("--split", choices=("train", "val"), required=True)
    p.add_argument("--out", required=True, help="the COCO JSON file to write")
    p.add_argument("--visible", action="store_true",
                   help="write each instance's visible pixels (later polygons cover earlier ones, as in "
                        "Cityscapes' instanceIds images) as RLE instead of its polygon")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from dynamask.data.cityscapes import convert_cityscapes, image_root

    try:
        coco = convert_cityscapes(args.root, args.split, args.out, visible=args.visible)
    except ImportError as exc:
        raise CliError(str(exc)) from exc
    anns = coco["annotations"]
    crowd = sum(a["iscrowd"] for a in anns)
    print(f"{len(coco['images'])} images, {len(anns) - crowd} instances and {crowd} crowd regions "
          f"of {len(coco['categories'])} classes: {args.out}")
    print(f"image root (--images / --train-images): {image_root(args.root, args.split)}")
    return 0


# --------------------------------------------------------------------------------------------- train
def _train_parser(sub) -> None:
    from dynamask.engine.train import TrainConfig

    d = TrainConfig("", "", "")
    p = sub.add_parser("train", help="train a model (DDP under torchrun)")
    p.add_argument("--data", help="dataset root made by `dynamask shapes` (train/ and val/ splits)")
    p.add_argument("--train-images")
    p.add_argument("--train-ann")
    p.add_argument("--val-images", help="evaluate on this split when training ends")
    p.add_argument("--val-ann")
    p.add_argument("--out", required=True, help="run folder: checkpoints (last.pth), metrics.csv, eval/")
    p.add_argument("--arch", default=d.arch, help=f"builder name (default {d.arch}); maskrcnn_resnet_fpn is the peer")
    p.add_argument("--arch-kwargs", type=_json_dict, default={}, help="builder keyword arguments as JSON")
    p.add_argument("--recipe", choices=("paper",), default=None,
                   help="paper: the paper's ResNet-50-FPN COCO recipe (sizes 640-800/800, max 1333, ImageNet "
                        "backbone from --backbone-weights); flags given explicitly override it")
    p.add_argument("--backbone-weights", default=None, metavar="PATH",
                   help="ImageNet ResNet weights (a local torchvision state dict; nothing is downloaded). "
                        "--recipe paper default: $TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"dynamic epochs (mask switch trained), counted after --pretrain-epochs (default {d.epochs}); "
                        "a model without the two phases trains this many epochs")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs,
                   help="epochs before the dynamic ones, every resolution supervised and no mask switch "
                        f"(default {d.pretrain_epochs}): a run is pretrain + dynamic epochs, as the paper's 1 + 12")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per process")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer,
                   help="sgd (default, with --momentum) or adamw (faster from random initialisation)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-iters", type=int, default=d.warmup_iters)
    p.add_argument("--warmup-factor", type=float, default=d.warmup_factor)
    p.add_argument("--lr-steps", type=int, nargs="*", default=list(d.lr_steps),
                   help="lr x gamma after these dynamic epochs (default 8 11: after the pretrain epochs and 8 "
                        "and 11 dynamic ones); the warm-up starts the run")
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--clip-grad-norm", type=float, default=None)
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading processes per training process")
    p.add_argument("--flip-prob", type=float, default=d.flip_prob)
    p.add_argument("--resize", type=int, nargs=2, metavar=("LOW", "HIGH"),
                   help="multi-scale training: the model draws the shorter side from LOW..HIGH per batch, and "
                        "uses HIGH at test (paper: 640 800)")
    p.add_argument("--max-size", type=int, default=None, help="cap of the longer side (the model's max_size)")
    g = p.add_argument_group("DynaMask's method (the model's defaults, which are the paper's, unless given)")
    g.add_argument("--target-gmacs", type=float, default=None,
                   help="C_t, mask-head GMAC per RoI. Default: 0.4/1.40 of the head's top-resolution cost, the "
                        "paper's 54%%-fewer-FLOPs setting (C_t 0.4 of its 1.40-GMAC head) rescaled to this head")
    g.add_argument("--no-budget", action="store_true", help="no FLOPs budget term in the dynamic phase")
    g.add_argument("--budget-weight", type=float, default=None, help="lambda2, weights budget and entropy (0.4)")
    g.add_argument("--edge-weight", type=float, default=None, help="lambda1, weights the edge loss (0.1)")
    g.add_argument("--gumbel-tau", type=float, default=None, help="Gumbel-softmax temperature (0.5)")
    g.add_argument("--routing-signal", choices=ROUTING_SIGNALS, default=None,
                   help="what the switch learns from: each resolution's loss against its own target (paper, the "
                        "default), all scored by BCE on the finest grid (grid) or in a band around the outline "
                        "(boundary), or by 1 - soft IoU on the finest grid (iou)")
    g.add_argument("--decoupled", dest="coupled", action="store_const", const=False, default=None,
                   help="the stages keep their own supervision in the dynamic phase and the switch learns from "
                        "detached losses (default: coupled, the paper's Eq. 3)")
    g.add_argument("--switch-input", choices=SWITCH_INPUTS, default=None,
                   help="what the switch reads: the RoI feature (roi, the default), the trunk's output (trunk), or "
                        "the trunk's output with its 14x14 mask and edge logits (mask)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--time-limit", type=float, default=None, help="minutes; then checkpoint and stop")
    p.add_argument("--max-iters", type=int, default=None, help="stop (with a checkpoint) after this many iterations")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default OUT/last.pth)")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: this process's GPU, else cpu)")
    p.add_argument("--mask-costs", type=_costs, default=None,
                   help="per-resolution mask-head GMAC for the final evaluation, e.g. 14=0.23,28=0.52")
    p.add_argument("--repeat-factor-sampling", type=float, nargs="?", const=0.001, default=None, metavar="THRESH",
                   help="LVIS's repeat-factor sampling of images with rare categories (threshold default 0.001)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from dynamask.engine.train import TrainConfig, train

    _apply_recipe(args)
    train_images, train_ann = _split_files(args, "train", args.train_images, args.train_ann)
    val_images, val_ann = args.val_images, args.val_ann
    if args.data and not (val_images and val_ann) and os.path.isfile(split_paths(args.data, "val")[1]):
        val_images, val_ann = split_paths(args.data, "val")
    cfg = TrainConfig(
        train_images=train_images, train_ann=train_ann, out_dir=args.out, arch=args.arch,
        arch_kwargs=args.arch_kwargs, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters, warmup_factor=args.warmup_factor, lr_steps=tuple(args.lr_steps),
        gamma=args.gamma, clip_grad_norm=args.clip_grad_norm, amp=not args.no_amp, workers=args.workers,
        flip_prob=args.flip_prob, resize=tuple(args.resize) if args.resize else None, max_size=args.max_size,
        seed=args.seed, time_limit=None if args.time_limit is None else 60.0 * args.time_limit,
        max_iters=args.max_iters, log_every=args.log_every, resume=args.resume, device=args.device,
        progress=not args.no_progress, val_images=val_images, val_ann=val_ann, budget=not args.no_budget,
        target_gmacs=args.target_gmacs, budget_weight=args.budget_weight, edge_weight=args.edge_weight,
        gumbel_tau=args.gumbel_tau, routing_signal=args.routing_signal, coupled=args.coupled,
        switch_input=args.switch_input,
        mask_costs=args.mask_costs,  # None: a DynaMask model's own (dynamask.flops.HeadCosts)
        repeat_factor_threshold=args.repeat_factor_sampling,
    )
    result = train(cfg)
    if _launch_rank() == 0:  # train() has closed the process group by now: torchrun's RANK says who speaks
        print(
            f"{result['status']}: epoch {result['epoch']}, iteration {result['iteration']}, "
            f"checkpoint {result['checkpoint']}"
        )
        if "metrics" in result:
            from dynamask.engine.evaluate import format_metrics

            print(format_metrics(result["metrics"]))
    return cli_checks.train_exit_status(result)


def _launch_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _apply_recipe(args: argparse.Namespace) -> None:
    """``--recipe paper``: the recipe's values for the flags left at their defaults, its ``--arch-kwargs``
    under the user's, and the ImageNet backbone file (checked before any work); ``--backbone-weights``."""
    from dynamask.engine import recipe

    if args.recipe == "paper":
        sub = argparse.ArgumentParser().add_subparsers()
        _train_parser(sub)
        defaults = sub.choices["train"]  # a fresh train parser: which flags were left at their defaults
        if args.arch not in recipe.DYNAMASK_ARCHS:
            raise CliError(f"--recipe paper trains DynaMask ({', '.join(recipe.DYNAMASK_ARCHS)}), not {args.arch}")
        in_kwargs = {"resize": "min_size"}  # a recipe flag left out when --arch-kwargs sets the same thing
        for key, value in recipe.PAPER_RECIPE.items():
            if key == "arch_kwargs":
                args.arch_kwargs = {**value, **args.arch_kwargs}
            elif getattr(args, key) == defaults.get_default(key) and in_kwargs.get(key, key) not in args.arch_kwargs:
                setattr(args, key, value)
        if args.backbone_weights is None:
            args.backbone_weights = recipe.default_backbone_weights()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        warning = recipe.check_paper_batch(args.batch_size, world)
        if warning and _launch_rank() == 0:
            print(warning, file=sys.stderr)
    if args.backbone_weights is not None:
        if args.arch not in recipe.DYNAMASK_ARCHS:
            raise CliError(f"--backbone-weights is an argument of DynaMask's builders, not of {args.arch}")
        if "weights_backbone" in args.arch_kwargs:
            raise CliError("give the backbone weights once: --backbone-weights or weights_backbone in --arch-kwargs")
        if not os.path.isfile(args.backbone_weights):
            raise CliError(f"ImageNet backbone weights not found: {args.backbone_weights}. Nothing is downloaded at "
                           f"run time: put torchvision's {recipe.RESNET50_IMAGENET_FILE} (from "
                           f"{recipe.RESNET50_IMAGENET_URL}) there, or pass --backbone-weights PATH")
        args.arch_kwargs = {**args.arch_kwargs, "weights_backbone": args.backbone_weights}


# --------------------------------------------------------------------------------------------- eval
def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="COCO bbox/segm/Boundary AP and the mask-resolution report of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="dataset root made by `dynamask shapes` (its val split is used)")
    p.add_argument("--split", default="val", help="split of --data (default val)")
    p.add_argument("--images")
    p.add_argument("--ann")
    p.add_argument("--out", default=None, help="folder for results.json, metrics.json, summary.txt, resolution.png")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=cli_checks.positive_int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--mask-costs", type=_costs, default=None, help="e.g. 14=0.23,28=0.52,56=0.85,112=1.29")
    p.add_argument("--no-boundary", action="store_true", help="skip Boundary AP")
    p.add_argument("--lvis", action="store_true",
                   help="an LVIS file, scored by LVIS's rules (AP, APr/APc/APf; needs `pip install lvis`)")
    p.add_argument("--max-dets", type=int, default=None, help="with --lvis: detections per image (default 300)")
    p.add_argument("--cityscapes-gt", metavar="DIR", default=None,
                   help="also the official Cityscapes instance evaluation against DIR/<city>/*_gtFine_instanceIds.png "
                        "(ROOT/gtFine/val; needs `pip install cityscapesscripts`)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

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
    dataset = open_dataset(images, ann)
    if len(dataset) == 0:
        raise ValueError(f"{ann}: no images to evaluate")
    if isinstance(dataset, LvisDetection) != args.lvis:
        raise CliError(f"{ann} is an LVIS file: evaluate it with --lvis" if not args.lvis else
                       f"--lvis: {ann} is not an LVIS file (its categories have no frequency)")
    model, ckpt = model_from_checkpoint(args.checkpoint)
    saved = {int(k): tuple(v) for k, v in ckpt["label_map"].items()}
    if saved != dataset.label_map:
        raise CliError(f"{args.checkpoint} was trained on categories {saved}, but {ann} has {dataset.label_map}")
    check_mask_costs(args.mask_costs, model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    costs = args.mask_costs  # None: a DynaMask model's own (dynamask.flops.HeadCosts), the MSM included
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


# --------------------------------------------------------------------------------------------- infer
def _infer_parser(sub) -> None:
    p = sub.add_parser("infer", help="run a checkpoint on images: overlays coloured by mask resolution, results.json")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, or folders (their image files, sorted)")
    p.add_argument("--weights", required=True, help="a dynamask checkpoint, e.g. runs/x/last.pth")
    p.add_argument("--out", required=True, help="folder for one overlay PNG per image, results.json, images.json")
    p.add_argument("--score-thresh", type=cli_checks.unit_interval, default=0.5,
                   help="drop detections scoring below, in [0, 1] (default 0.5)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass (default 2)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: report it, skip it, exit status 1)")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: a GPU when present, else cpu)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dynamask.checks import check_device, check_output_dir
    from dynamask.data.images import to_image_tensor
    from dynamask.predictor import Predictor
    from dynamask.viz import save_overlay

    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    check_device(args.device)
    files = _image_files(args.images)
    check_output_dir(args.out)
    overlays = _overlay_paths(files, args.out)
    predictor = Predictor(args.weights, device=args.device, batch_size=args.batch_size, amp=args.amp,
                          score_thresh=args.score_thresh)
    cli_checks.remove_old_results(args.out)
    # The inputs come from no COCO file: image i of the list (from 1) has id i, whether or not one before it
    # was skipped, so ids and overlay names stay those of the list given.
    results: list[dict[str, Any]] = []
    done: list[int] = []  # indices into files of the images read, in order
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(files), desc="infer", disable=args.no_progress, dynamic_ncols=True) as bar:

        def readable():
            for index, path in enumerate(files):
                try:
                    image = to_image_tensor(path)
                except (ValueError, OSError) as exc:
                    if args.strict:
                        raise
                    skipped.append({"file": path, "error": cli_checks.one_line(exc)})
                    print(f"dynamask infer: skipped {cli_checks.one_line(exc)}", file=sys.stderr)
                    bar.update(1)
                    continue
                done.append(index)
                yield image

        for k, (image, inst) in enumerate(predictor.stream(readable())):
            index = done[k]
            results += inst.to_coco(index + 1)
            output = {"boxes": inst.boxes, "scores": inst.scores, "masks": inst.masks[:, None].float(),
                      "mask_resolution": inst.mask_resolution}
            save_overlay(image, output, overlays[index], score_thresh=0.0,  # already thresholded
                         title=os.path.basename(files[index]))
            bar.update(1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(args.out, "images.json"), "w") as f:
        json.dump({str(i + 1): files[i] for i in done}, f, indent=1)
    print(f"{len(done)} images, {len(results)} instances: overlays, results.json and images.json in {args.out}")
    if skipped:
        with open(os.path.join(args.out, "skipped.json"), "w") as f:
            json.dump(skipped, f, indent=1)
        names = ", ".join(os.path.basename(s["file"]) for s in skipped)
        print(f"dynamask infer: skipped {len(skipped)} of {len(files)} images ({names}); listed in "
              f"{os.path.join(args.out, 'skipped.json')}", file=sys.stderr)
        return 1
    return 0


def _image_files(items: Sequence[str]) -> list[str]:
    """The files named, and the image files inside the folders named (sorted), in the order given."""
    from dynamask.data.images import IMAGE_EXTENSIONS, is_image_file

    files: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item)
                           if is_image_file(n) and os.path.isfile(os.path.join(item, n)))
            if not found:
                raise CliError(f"{item}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder")
            files += found
        elif os.path.isfile(item):
            files.append(item)  # named explicitly: taken whatever its ending, and refused if unreadable
        else:
            raise FileNotFoundError(f"image not found: {item}")
    return files


def _overlay_paths(files: Sequence[str], out: str) -> list[str]:
    """``OUT/<stem>.png`` per image; ``<stem>_<image id>.png`` where stems repeat. Never an input file."""
    inputs = {os.path.realpath(f) for f in files}
    used: set[str] = set()
    paths = []
    for image_id, f in enumerate(files, start=1):
        stem = os.path.splitext(os.path.basename(f))[0]
        name, k = f"{stem}.png", image_id
        while name in used:
            name, k = f"{stem}_{k}.png", k + len(files)
        used.add(name)
        path = os.path.join(out, name)
        if os.path.realpath(path) in inputs:
            raise CliError(f"the overlay of {f} would overwrite the input {path}; choose another --out")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamask", description="DynaMask instance segmentation")
    parser.add_argument("--debug", action="store_true", help="show the traceback of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _shapes_parser(sub)
    _convert_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _infer_parser(sub)
    for command in sub.choices.values():  # also accepted after the command; SUPPRESS keeps the top-level one
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of internal errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        parser.error(str(exc))  # exits with status 2
    except (OSError, ValueError, KeyError, FloatingPointError) as exc:  # bad input: its message names it
        if args.debug:
            raise
        print(f"dynamask {args.command}: error: {cli_checks.one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not bad input: one line, the traceback under --debug
        if args.debug:
            raise
        print(f"dynamask {args.command}: internal error: {type(exc).__name__}: {cli_checks.one_line(exc)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
