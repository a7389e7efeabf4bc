"""Mask paste speed: dynamask.ops.paste_masks (one kernel call, mixed resolutions) against torchvision.

100 masks into an 800x1216 image, boxes of 16-300 px (fixed seed), our masks at 28x28 and at the
paper's Table 9 mix (35/34/21/10% at 14/28/56/112), against torchvision's ``paste_masks_in_image``
on the same boxes with 28x28 masks (speed only: the sampling conventions differ). Outputs: the dense
thresholded canvas (bool), the dense float canvas, and COCO RLE (ours straight from the masks;
torchvision's canvases then ``pycocotools.mask.encode``). Medians of interleaved runs.

    python benchmarks/paste.py [--device cuda] [--reps 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np
import torch
from pycocotools import mask as mask_util
from torchvision.models.detection.roi_heads import paste_masks_in_image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_medians, markdown_table  # noqa: E402

from dynamask.ops import cuda_available, paste_masks, paste_masks_rle  # noqa: E402

IMAGE = (800, 1216)
NUM_MASKS = 100
TABLE9_MIX = {14: 0.35, 28: 0.34, 56: 0.21, 112: 0.10}


def make_boxes(n: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    H, W = IMAGE
    wh = 16 + torch.rand(n, 2, generator=g) * (300 - 16)
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([W, H]) - wh)
    return torch.cat([xy, xy + wh], 1).to(device)


def make_masks(counts: dict[int, int], device: str, seed: int = 1) -> list[torch.Tensor]:
    """Smooth probability maps (a blob per mask), so thresholds cut real shapes."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for size, n in counts.items():
        coarse = torch.randn(n, 1, 4, 4, generator=g) * 3
        m = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        groups.append(torch.sigmoid(m[:, 0] + 2).to(device))
    return groups


def mix_counts(n: int) -> dict[int, int]:
    counts = {s: int(round(f * n)) for s, f in TABLE9_MIX.items()}
    counts[28] += n - sum(counts.values())
    return counts


def coco_encode(canvases: torch.Tensor) -> list[dict]:
    """pycocotools' encode of [N, H, W] binary canvases (the usual evaluation path)."""
    arr = canvases.to("cpu", torch.uint8).numpy()
    return mask_util.encode(np.asfortranarray(arr.transpose(1, 2, 0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cuda" and not (torch.cuda.is_available() and cuda_available()):
        raise SystemExit("--device cuda needs a GPU and dynamask built with its CUDA kernels")
    torch.set_num_threads(args.threads)
    dev = args.device

    boxes = make_boxes(NUM_MASKS, dev)
    ours = {"28": make_masks({28: NUM_MASKS}, dev), "Table 9 mix": make_masks(mix_counts(NUM_MASKS), dev)}
    tv_masks = make_masks({28: NUM_MASKS}, dev)[0][:, None]  # [N, 1, 28, 28]

    def tv_float():
        return paste_masks_in_image(tv_masks, boxes, IMAGE, padding=1)

    def tv_bool():
        return tv_float()[:, 0] >= 0.5

    def tv_rle():
        return coco_encode(tv_bool())

    rows = []
    cases = [
        ("dense bool (>= 0.5)", lambda m: (lambda: paste_masks(m, boxes, IMAGE, threshold=0.5)), tv_bool),
        ("dense float32", lambda m: (lambda: paste_masks(m, boxes, IMAGE, threshold=None)), tv_float),
        ("COCO RLE", lambda m: (lambda: paste_masks_rle(m, boxes, IMAGE, threshold=0.5)), tv_rle),
    ]
    for output, make_ours, peer in cases:
        fns = {f"dynamask {name}": make_ours(m) for name, m in ours.items()}
        fns["torchvision"] = peer
        t = interleaved_medians(fns, dev, args.reps)
        for name in ours:
            mine = t[f"dynamask {name}"]
            rows.append(
                [output, name, f"{mine * 1e3:.1f}", f"{t['torchvision'] * 1e3:.1f}", f"{t['torchvision'] / mine:.1f}x"]
            )
        print(f"done: {output}", flush=True)

    if dev == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    print(f"\n{NUM_MASKS} masks into {IMAGE[0]}x{IMAGE[1]}, boxes 16-300 px; {where}; "
          f"torch {torch.__version__}; medians of {args.reps} interleaved runs.")
    print("torchvision: paste_masks_in_image with 28x28 masks (+ `>= 0.5`; + pycocotools.mask.encode for RLE).\n")
    print(markdown_table(["output", "our masks", "dynamask (ms)", "torchvision (ms)", "speed-up"], rows))


if __name__ == "__main__":
    main()
