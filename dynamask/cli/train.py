"""``dynamask train``: train a model (DDP under torchrun); ``--config`` replays an earlier run's settings
(:mod:`dynamask.cli.replay`), ``--recipe paper`` fills in the paper's.

    dynamask train --data data/shapes --out runs/x --arch dynamask_resnet_fpn --arch-kwargs '{"depth": 18}'
    dynamask train --config runs/x/config.yaml --out runs/y      (replays run x's settings into runs/y)
    torchrun --nproc-per-node 2 -m dynamask train ...        (DDP: one process per GPU, or gloo on CPU)
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Mapping
from typing import Any

from dynamask.cli.common import CliError, split_files
from dynamask.cli.replay import replay
from dynamask.data.shapes import split_paths


def add_parser(sub) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dynamask.engine import recipe
    from dynamask.engine.train import TrainConfig, train
    from dynamask.engine.train_flags import config_kwargs

    replayed: dict[str, Any] = {}
    if args.config:  # the file's settings, under the flags given on this command line
        # a fresh `dynamask` parser (dynamask.cli.main passes its builder: this module cannot import it)
        args, replayed = replay(args, args.build_parser())
    if args.out_dir is None:
        raise CliError("the following arguments are required: --out (or --config FILE, which names the run's folder)")
    _apply_recipe(args)
    kwargs = config_kwargs(args, TrainConfig)
    kwargs.update(replayed)  # the file's exact values for the settings not given on the command line
    if "train_images" not in replayed:
        kwargs["train_images"], kwargs["train_ann"] = split_files(args, "train", args.train_images, args.train_ann)
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
    return exit_status(result)


def exit_status(result: Mapping[str, Any]) -> int:
    """0 for a finished run or one stopped by its own limits; 128 + the signal's number (130 for SIGINT,
    143 for SIGTERM) for one stopped by a signal, so ``dynamask train ... && dynamask eval ...`` stops too."""
    reason = result.get("stop_reason")
    if reason in ("SIGINT", "SIGTERM"):
        return 128 + int(signal.Signals[reason])
    if reason == "signal in another process":
        return 128 + int(signal.SIGTERM)
    return 0


def _launch_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _apply_recipe(args: argparse.Namespace) -> None:
    """``--recipe paper``: the recipe's values for the flags left at their defaults, its ``--arch-kwargs``
    under the user's, and the ImageNet backbone file (checked before any work); ``--backbone-weights``."""
    from dynamask.engine import recipe

    if args.recipe == "paper":
        sub = argparse.ArgumentParser().add_subparsers()
        add_parser(sub)
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
