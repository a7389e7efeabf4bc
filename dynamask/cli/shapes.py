"""``dynamask shapes``: write the synthetic shapes dataset (COCO format), with train/ and val/ splits.

    dynamask shapes --out data/shapes --train 2000 --val 200 --size 192 --seed 0
"""

from __future__ import annotations

import argparse
import os

from dynamask.cli.common import CliError
from dynamask.data.shapes import split_paths


def add_parser(sub) -> None:
    p = sub.add_parser("shapes", help="write the synthetic shapes dataset (COCO format)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=192, help="image side in pixels (default 192)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    p.add_argument("--max-objects", type=int, default=6, help="objects per image at most (default 6)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dynamask.data.shapes import generate

    if args.train < 0 or args.val < 0 or args.size < 32:
        raise CliError("need --train >= 0, --val >= 0 and --size >= 32")
    files = generate(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                     max_objects=args.max_objects, workers=args.workers)
    for split, ann in files.items():
        print(f"{split}: {split_paths(args.out, split)[0]}  {ann}")
    return 0
