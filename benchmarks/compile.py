"""Compiled against eager inference on the CPU: torch.compile(model) on a DynaMask, same images.

    python benchmarks/compile.py [--model tiny|r50] [--size H W] [--images 1] [--reps 5] [--out FILE.md]
    python benchmarks/compile.py --export     # try torch.export on the same model and print where it stops

Randomly initialised models (nothing is downloaded), box score threshold 0 so every image keeps its
detections; "tiny" is the test suite's ResNet-18 DynaMask (tests/model_helpers.py), "r50" the
ResNet-50-FPN one. Times the first compiled call (tracing and compiling), then the median of
interleaved eager and compiled runs after one warm-up each, under the "msm" policy and a fixed 28.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _timing import cpu_name, interleaved_medians, markdown_table, ms, publish  # noqa: E402

from dynamask.models import dynamask_resnet50_fpn  # noqa: E402


def build(name: str, size: tuple[int, int]) -> torch.nn.Module:
    h, w = size
    if name == "tiny":
        from model_helpers import tiny_model

        return tiny_model(box_score_thresh=0.0, min_size=min(h, w), max_size=max(h, w)).eval()
    return dynamask_resnet50_fpn(num_classes=91, box_score_thresh=0.0, box_detections_per_img=100,
                                 min_size=min(h, w), max_size=max(h, w)).eval()


def try_export(model: torch.nn.Module, images: list[torch.Tensor]) -> None:
    """torch.export needs one graph for the whole forward; print the first place it stops."""
    try:
        torch.export.export(model, (images,), strict=False)
        print("torch.export: exported")
    except Exception as e:  # noqa: BLE001  (report whatever stops it)
        tb = traceback.extract_tb(e.__traceback__)
        user = [f for f in tb if "torch/" not in f.filename.split("site-packages/")[-1][:6]]
        where = user[-1] if user else tb[-1]
        print(f"torch.export stops: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
        print(f"  last frame outside torch: {where.filename}:{where.lineno} ({where.name}): {where.line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "r50"], default="tiny")
    ap.add_argument("--size", type=int, nargs=2, default=(64, 80), metavar=("H", "W"))
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--export", action="store_true", help="only try torch.export and report where it stops")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.model, tuple(args.size))
    images = [torch.rand(3, *args.size) for _ in range(args.images)]
    if args.export:
        try_export(model, images)
        return

    compiled = torch.compile(model)
    rows = []
    for policy in ("msm", 28):
        model.mask_policy = policy
        with torch.inference_mode():
            t0 = time.perf_counter()
            compiled(images)
            first = time.perf_counter() - t0
            med = interleaved_medians({"eager": lambda: model(images), "compiled": lambda: compiled(images)},
                                      "cpu", args.reps, warmup=1)
        rows.append([str(policy), ms(med["eager"]), ms(med["compiled"]), f"{med['eager'] / med['compiled']:.2f}",
                     ms(first)])
    title = (f"torch.compile(model) inference, {args.model} DynaMask, {args.images} image(s) of "
             f"{args.size[0]}×{args.size[1]}; {cpu_name()}, {args.threads} thread(s); torch {torch.__version__}; "
             f"median of {args.reps} interleaved runs after a warm-up. First compiled call = tracing + "
             f"compiling (the second policy recompiles the mask branch only).")
    table = markdown_table(["policy", "eager", "compiled", "speed-up (eager ÷ compiled)", "first compiled call"],
                           rows)
    text = f"{title}\n\n{table}\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
