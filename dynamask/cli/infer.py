"""``dynamask infer``: run a checkpoint on images: one overlay per image coloured by mask resolution,
results.json (COCO results) and images.json (which image each id is).

    dynamask infer runs/x/last.pth photos/ extra.jpg --out runs/x/infer     (or: infer IMAGES --weights CKPT)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dynamask.cli.common import INFER_RESULT_FILES, CliError, check_infer_out, one_line, positive_int, unit_interval


def add_parser(sub) -> None:
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
    p.add_argument("--max-side", type=positive_int, default=None, metavar="N",
                   help="overlays scaled down to at most N pixels on their longer side (default: the image's own "
                        "size)")
    p.add_argument("--score-thresh", type=unit_interval, default=0.5,
                   help="drop detections scoring below, in [0, 1] (default 0.5)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass (default 2)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: report it, skip it, exit status 1)")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: a GPU when present, else cpu)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from dynamask.checks import check_device, check_output_dir

    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    _infer_inputs(args)
    check_device(args.device)
    files = _image_files(args.images)
    check_output_dir(args.out)
    check_infer_out(args.out)
    overlays = _overlay_paths(files, args.out)
    # everything is written in a folder of its own inside --out and moved in once the run has succeeded, so
    # a run that fails (--strict, Ctrl-C, a full disk) leaves the earlier run's files as they were
    stage = tempfile.mkdtemp(prefix=".infer-", dir=args.out)
    try:
        status, written = _infer_into(args, files, overlays, stage)
        publish(stage, args.out, written, stale=INFER_RESULT_FILES)
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
                    skipped.append({"file": path, "error": one_line(exc)})
                    print(f"dynamask infer: skipped {one_line(exc)}", file=sys.stderr)
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


def publish(stage: str, out: str, written: list[str], *, stale: tuple[str, ...] = ()) -> None:
    """Move the files a run wrote in ``stage`` (names relative to it) into ``out``, then remove the files
    named in ``stale`` that this run did not write (an earlier run's, which would be mixed with it). The
    results files go last, so that until then the earlier run's are whole."""
    last = [n for n in written if n in INFER_RESULT_FILES]
    for name in [n for n in written if n not in last] + last:
        os.replace(os.path.join(stage, name), os.path.join(out, name))
    for name in stale:
        if name not in written and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


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
