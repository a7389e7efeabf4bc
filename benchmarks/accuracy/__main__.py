"""Accuracy per FLOP on shapes whose objects are large enough for mask resolution to matter (issue 16).

The study's command line, ``python -m benchmarks.accuracy`` from the repository root (what it trains and
writes: the package's docstring, :mod:`benchmarks.accuracy`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch

from .config import ROOT, core_variants, equal_mask_supervision, full_config, quick_config
from .phases import log
from .study import Study


def _levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(t) for t in text.split(","))
    if len(levels) != 3 or any(v not in range(4) for v in levels):
        raise argparse.ArgumentTypeError(f"three levels in 0-3 (P2-P5), e.g. 0,0,0; got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
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
                   help="the FPN level each r-FPN stage fuses, comma-separated indices into P2,P3,P4,P5 (default: "
                        "the builders' for the image size, 0,0,0 at 192 px; 2,1,0 is the paper's P4, P3, P2 for "
                        "800-px images; docs/method.md §3)")
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
    cfg = equal_mask_supervision(cfg)
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
