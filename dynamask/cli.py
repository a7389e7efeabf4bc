"""The ``dynamask`` command: ``shapes``, ``convert``, ``train``, ``eval``, ``infer``, ``fit-switch``, ``strip``.

    dynamask shapes --out data/shapes --train 2000 --val 200 --size 192 --seed 0
    dynamask convert cityscapes data/cityscapes --split val --out data/cityscapes/instances_val.json
    dynamask train --data data/shapes --out runs/x --arch dynamask_resnet_fpn --arch-kwargs '{"depth": 18}'
    dynamask train --config runs/x/config.yaml --out runs/y      (replays run x's settings into runs/y)
    torchrun --nproc-per-node 2 -m dynamask train ...        (DDP: one process per GPU, or gloo on CPU)
    dynamask eval runs/x/last.pth --data data/shapes --out runs/x/eval
    dynamask infer runs/x/last.pth photos/ extra.jpg --out runs/x/infer     (or: infer IMAGES --weights CKPT)
    dynamask fit-switch runs/x/last.pth --data data/shapes --out runs/x/fitted.pth --budget-at 28
    dynamask strip runs/x/last.pth runs/x/model.pth                  (weights only, for inference)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from dynamask import cli_checks, cli_fit_switch, cli_replay, cli_strip
from dynamask._version import __version__
from dynamask.cli_help import HelpFormatter
from dynamask.data.shapes import split_paths
from dynamask.engine.train_flags import mask_costs


class CliError(Exception):
    """A usage problem reported as ``dynamask: error: ...`` with exit status 2."""


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
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
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
    p.add_argument("--split", choices=("train", "val"), required=True, help="the split to convert (required)")
    p.add_argument("--out", required=True, help="the COCO JSON file to write (required)")
    p.add_argument("--visible", action="store_true",
                   help="write each instance's visible pixels (later polygons cover earlier ones, as in "
                        "Cityscapes' instanceIds images) as RLE instead of its polygon")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from dynamask.checks import check_output_file
    from dynamask.data.cityscapes import convert_cityscapes, image_root

    check_output_file(args.out)
    try:
        coco = convert_cityscapes(args.root, args.split, args.out, visible=args.visible)
    except ImportError as exc:
        raise CliError(str(exc)) from exc
    anns = coco["annotations"]
    crowd = sum(a["iscrowd"] for a in anns)
    print(f"{len(coco['images'])} images, {len(anns) - crowd} instances and {crowd} crowd regions "
          f"of {len(coco['categories'])} classes: {args.out}")
    dropped = coco["info"].get("dropped_instances", [])
    if dropped:
        first = dropped[0]
        print(f"dropped {len(dropped)} instance{'s' if len(dropped) > 1 else ''} with no pixel in the image "
              f"(listed in the file's info.dropped_instances; e.g. {first['file']} object {first['object']} "
              f"({first['label']!r}): {first['reason']})")
    print(f"image root (--images / --train-images): {image_root(args.root, args.split)}")
    return 0


# --------------------------------------------------------------------------------------------- train
def _train_parser(sub) -> None:
    from dynamask.engine.train import TrainConfig
    from dynamask.engine.train_flags import add_train_flags

    p = sub.add_parser("train", help="train a model (DDP under torchrun)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="replay the settings of an earlier run: its OUT/config.yaml (flags given here override the "
                        "file's; --out replays into another folder)")
    p.add_argument("--data", help="dataset root with train/ and val/ splits, as `dynamask shapes` writes (default: "
                                  "none; give --train-images and --train-ann instead)")
    p.add_argument("--recipe", choices=("paper",), default=None,
                   help="paper: the paper's ResNet-50-FPN COCO recipe (sizes 640-800/800, max 1333, ImageNet "
                        "backbone from --backbone-weights); flags given explicitly override it")
    p.add_argument("--backbone-weights", default=None, metavar="PATH",
                   help="ImageNet ResNet weights (a local torchvision state dict; nothing is downloaded). "
                        "--recipe paper default: $TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth")
    add_train_flags(p, TrainConfig)  # every setting of a run, from TrainConfig's fields
    p.add_argument("--no-switch-fit", dest="switch", action="store_const", const="paper",
                   help="the same as --switch paper")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the plan (every line train prints before its first step), "
                        "then exit: nothing is trained, fitted or written")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from dynamask.engine import recipe
    from dynamask.engine.train import TrainConfig, train
    from dynamask.engine.train_flags import config_kwargs

    replayed: dict[str, Any] = {}
    if args.config:  # the file's settings, under the flags given on this command line
        args, replayed = cli_replay.replay(args, build_parser())
    if args.out_dir is None:
        raise CliError("the following arguments are required: --out (or --config FILE, which names the run's folder)")
    _apply_recipe(args)
    kwargs = config_kwargs(args, TrainConfig)
    kwargs.update(replayed)  # the file's exact values for the settings not given on the command line
    if "train_images" not in replayed:
        kwargs["train_images"], kwargs["train_ann"] = _split_files(args, "train", args.train_images, args.train_ann)
        val_images, val_ann = args.val_images, args.val_ann
        if args.data and not (val_images and val_ann) and os.path.isfile(split_paths(args.data, "val")[1]):
            kwargs["val_images"], kwargs["val_ann"] = split_paths(args.data, "val")
    recipe_record = None if args.recipe is None else {"name": args.recipe, "values": recipe.PAPER_RECIPE}
    provenance = {"command": shlex.join(["dynamask", *getattr(args, "argv", ["train"])]), "config": args.config,
                  "data": args.data, "recipe": recipe_record, "backbone_weights": args.backbone_weights}
    result = train(TrainConfig(**kwargs), dry_run=args.dry_run, provenance=provenance)
    if result["status"] == "dry run":
        if _launch_rank() == 0:
            print("dry run: nothing trained, fitted or written")
        return 0
    # train() has logged the end of the run (its status line and metrics) to the console and log.txt
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
    p.add_argument("checkpoint", help="a dynamask checkpoint, e.g. runs/x/last.pth")
    p.add_argument("--data", help="dataset root with train/ and val/ splits, as `dynamask shapes` writes (its --split "
                                  "is used; default: none, give --images and --ann)")
    p.add_argument("--split", default="val", help="split of --data")
    p.add_argument("--images", help="folder of the images (default: --data's split)")
    p.add_argument("--ann", help="COCO (or LVIS) annotation file of --images (default: --data's split)")
    p.add_argument("--out", default=None, help="folder for results.json, metrics.json, summary.txt, resolution.png "
                                               "(default: none, the metrics are printed only)")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: a GPU when present, else cpu)")
    p.add_argument("--batch-size", type=cli_checks.positive_int, default=1, help="images per forward pass")
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
        cli_checks.check_eval_out(args.out)
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
    if args.switch is not None:
        print(_choose_switch(model, ckpt, args.switch, args.checkpoint))
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


def _choose_switch(model, ckpt: dict[str, Any], which: str, path: str) -> str:
    """Puts the asked switch into ``model`` (built from ``ckpt``); returns the line that says which it is."""
    from dynamask.engine import train_switch

    if not train_switch.can_fit(model):
        raise CliError(f"--switch: {path} has no mask switch (a {ckpt['arch']['name']} checkpoint)")
    fitted = train_switch.FIT_KEY in ckpt.get("extra", {})
    if which == "fitted":
        if not fitted:
            raise CliError(f"--switch fitted: {path} holds no fitted switch (trained with --switch paper); "
                           "fit one with `dynamask fit-switch`")
        return "switch: the fitted one"
    if not fitted:
        return "switch: the dynamic phase's (the only one this checkpoint has)"
    if not train_switch.use_dynamic_phase_switch(model, ckpt):
        raise CliError(f"--switch dynamic-phase: {path} was fitted but does not keep the dynamic phase's switch")
    return "switch: the dynamic phase's (the paper's), in place of the fitted one"


# --------------------------------------------------------------------------------------------- infer
def _infer_parser(sub) -> None:
    p = sub.add_parser("infer", help="run a checkpoint on images: overlays coloured by mask resolution, results.json",
                       usage="dynamask infer CKPT IMAGES [IMAGES ...] --out OUT [options]\n"
                             "       dynamask infer IMAGES [IMAGES ...] --weights CKPT --out OUT [options]")
    p.add_argument("inputs", nargs="+", metavar="CKPT IMAGES",
                   help="the checkpoint (as eval and fit-switch take it), then image files or folders (their image "
                        "files, sorted); with --weights, all of them are images")
    p.add_argument("--weights", default=None, metavar="CKPT",
                   help="the checkpoint, e.g. runs/x/last.pth, in place of the first argument (default: the first "
                        "argument)")
    p.add_argument("--out", required=True, help="folder for one overlay PNG per image, results.json, images.json "
                                                "(required)")
    p.add_argument("--max-side", type=cli_checks.positive_int, default=None, metavar="N",
                   help="overlays scaled down to at most N pixels on their longer side (default: the image's own "
                        "size)")
    p.add_argument("--score-thresh", type=cli_checks.unit_interval, default=0.5,
                   help="drop detections scoring below, in [0, 1] (default 0.5)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass (default 2)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: report it, skip it, exit status 1)")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: a GPU when present, else cpu)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_infer)


def _infer_inputs(args: argparse.Namespace) -> None:
    """``args.weights`` and ``args.images`` from ``infer CKPT IMAGES...`` or ``infer IMAGES... --weights CKPT``."""
    from dynamask.data.images import is_image_file

    if args.weights is not None:
        args.images = list(args.inputs)
        return
    first = args.inputs[0]
    if os.path.isdir(first) or is_image_file(first):
        raise CliError(f"{first} is {'a folder' if os.path.isdir(first) else 'an image'}, not a checkpoint: name the "
                       "checkpoint first (dynamask infer CKPT IMAGES...) or give --weights CKPT")
    if len(args.inputs) < 2:
        raise CliError("give the checkpoint, then the images: dynamask infer CKPT IMAGES... (or IMAGES... "
                       "--weights CKPT)")
    args.weights, args.images = first, list(args.inputs[1:])


def _cmd_infer(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from dynamask.checks import check_device, check_output_dir

    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    _infer_inputs(args)
    check_device(args.device)
    files = _image_files(args.images)
    check_output_dir(args.out)
    cli_checks.check_infer_out(args.out)
    overlays = _overlay_paths(files, args.out)
    # everything is written in a folder of its own inside --out and moved in once the run has succeeded, so
    # a run that fails (--strict, Ctrl-C, a full disk) leaves the earlier run's files as they were
    stage = tempfile.mkdtemp(prefix=".infer-", dir=args.out)
    try:
        status, written = _infer_into(args, files, overlays, stage)
        cli_checks.publish(stage, args.out, written, stale=cli_checks.INFER_RESULT_FILES)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return status


def _infer_into(args: argparse.Namespace, files: list[str], overlays: list[str],
                stage: str) -> tuple[int, list[str]]:
    """Run ``infer`` writing every file in ``stage``; returns the exit status and the names written."""
    from tqdm import tqdm

    from dynamask.data.images import to_image_tensor
    from dynamask.predictor import Predictor
    from dynamask.viz import save_overlay

    predictor = Predictor(args.weights, device=args.device, batch_size=args.batch_size, amp=args.amp,
                          score_thresh=args.score_thresh)
    label_map = predictor.label_map or {}
    class_names = [label_map[k][1] for k in sorted(label_map)]  # labels 1..N (checked when the checkpoint loads)
    # The inputs come from no COCO file: image i of the list (from 1) has id i, whether or not one before it
    # was skipped, so ids and overlay names stay those of the list given.
    results: list[dict[str, Any]] = []
    done: list[int] = []  # indices into files of the images read, in order
    skipped: list[dict[str, str]] = []
    written: list[str] = []
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
            output = {"boxes": inst.boxes, "scores": inst.scores, "masks": inst.masks, "labels": inst.labels,
                      "mask_resolution": inst.mask_resolution}
            name = os.path.basename(overlays[index])
            save_overlay(image, output, os.path.join(stage, name), score_thresh=0.0,  # already thresholded
                         title=os.path.basename(files[index]), names=class_names, max_side=args.max_side)
            written.append(name)
            bar.update(1)

    def write_json(name: str, value: Any, **kw: Any) -> None:
        with open(os.path.join(stage, name), "w") as f:
            json.dump(value, f, **kw)
        written.append(name)

    write_json("results.json", results)
    write_json("images.json", {str(i + 1): files[i] for i in done}, indent=1)
    if skipped:
        write_json("skipped.json", skipped, indent=1)
    print(f"{len(done)} images, {len(results)} instances: overlays, results.json and images.json in {args.out}")
    if skipped:
        names = ", ".join(os.path.basename(s["file"]) for s in skipped)
        print(f"dynamask infer: skipped {len(skipped)} of {len(files)} images ({names}); listed in "
              f"{os.path.join(args.out, 'skipped.json')}", file=sys.stderr)
        return 1, written
    return 0, written


def _image_files(items: Sequence[str]) -> list[str]:
    """The files named, and the image files inside the folders named (sorted), in the order given. A link
    named like an image that leads nowhere (a missing target, a loop) is listed too, so that it is reported
    as skipped rather than passed over in silence."""
    from dynamask.data.images import IMAGE_EXTENSIONS, is_image_file

    files: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item)
                           if is_image_file(n) and _file_or_broken_link(os.path.join(item, n)))
            if not found:
                raise CliError(f"{item}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder")
            files += found
        elif os.path.isfile(item):
            files.append(item)  # named explicitly: taken whatever its ending, and refused if unreadable
        else:
            raise FileNotFoundError(f"image not found: {item}")
    return files


def _file_or_broken_link(path: str) -> bool:
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


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
    parser = argparse.ArgumentParser(prog="dynamask", description="DynaMask instance segmentation",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"dynamask {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _shapes_parser(sub)
    _convert_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _infer_parser(sub)
    cli_fit_switch.add_parser(sub)
    cli_strip.add_parser(sub)
    for command in sub.choices.values():  # also accepted after the command; SUPPRESS keeps the top-level one
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of internal errors")
        command.formatter_class = HelpFormatter  # every flag's help shows its default
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given (train's --config tells the flags given from the file's)
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
