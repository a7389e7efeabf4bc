"""``dynamask convert``: convert a dataset's annotations to a COCO instances file.

    dynamask convert cityscapes data/cityscapes --split val --out data/cityscapes/instances_val.json
"""

from __future__ import annotations

import argparse

from dynamask.cli.common import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a dataset's annotations to a COCO instances file")
    p.add_argument("format", choices=("cityscapes",), help="the dataset's format")
    p.add_argument("root", help="cityscapes: the folder holding gtFine/ and leftImg8bit/")
    p.add_argument("--split", choices=("train", "val"), required=True, help="the split to convert (required)")
    p.add_argument("--out", required=True, help="the COCO JSON file to write (required)")
    p.add_argument("--visible", action="store_true",
                   help="write each instance's visible pixels (later polygons cover earlier ones, as in "
                        "Cityscapes' instanceIds images) as RLE instead of its polygon")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
