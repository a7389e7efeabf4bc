"""Batched RoIAlign against torchvision on a ResNet-50-FPN pyramid of an 800x1216 image.

(a) 512 RoIs at 14x14: `roi_align_multilevel` vs `MultiScaleRoIAlign` (aligned=False, as torchvision).
(b) 100 RoIs cropped at P4@28, P3@56, P2@112: one `roi_align_stages` call vs three
    `torchvision.ops.roi_align` calls, on 256-channel levels and on levels narrowed to 128/64/32.
Medians of interleaved runs in one process. Usage: python benchmarks/roi_align.py [--device cuda] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import device_name, interleaved_medians, markdown_table, ms, publish  # noqa: E402

import dynamask.ops as ops  # noqa: E402

IMAGE = (800, 1216)
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
NAMES = ["p2", "p3", "p4", "p5"]


def make_rois(n: int, device: str, seed: int = 0) -> torch.Tensor:
    """RPN-like boxes: log-uniform sizes 16..800 px, aspect 0.5..2, inside the image."""
    g = torch.Generator().manual_seed(seed)
    H, W = IMAGE
    size = torch.exp(
        torch.empty(n).uniform_(torch.log(torch.tensor(16.0)), torch.log(torch.tensor(800.0)), generator=g)
    )
    aspect = torch.exp(torch.empty(n).uniform_(-0.69, 0.69, generator=g))
    w = (size * aspect.sqrt()).clamp(max=W - 1)
    h = (size / aspect.sqrt()).clamp(max=H - 1)
    x1 = torch.rand(n, generator=g) * (W - w)
    y1 = torch.rand(n, generator=g) * (H - h)
    return torch.stack([torch.zeros(n), x1, y1, x1 + w, y1 + h], 1).to(device)


def pyramid(channels: list[int], device: str) -> list[torch.Tensor]:
    H, W = IMAGE
    return [torch.randn(1, c, H // 2 ** (k + 2), W // 2 ** (k + 2), device=device) for k, c in enumerate(channels)]


def fwd_bwd(fn, feats):
    def run():
        for f in feats:
            f.grad = None
        out = fn()
        outs = out if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dev = args.device
    rows = []

    # (a) multilevel 14x14, 512 RoIs
    feats = pyramid([256] * 4, dev)
    rois = make_rois(512, dev)
    pooler = MultiScaleRoIAlign(NAMES, 14, 2)
    fdict = OrderedDict(zip(NAMES, feats))
    boxes = [rois[:, 1:]]
    ours = lambda: ops.roi_align_multilevel(feats, rois, 14, SCALES, 2, aligned=False)  # noqa: E731
    theirs = lambda: pooler(fdict, boxes, [IMAGE])  # noqa: E731
    torch.testing.assert_close(ours(), theirs(), rtol=1e-4, atol=1e-4)
    t = interleaved_medians({"ours": ours, "tv": theirs}, dev, args.reps)
    rows.append(["(a) 512 RoIs 14x14, P2-P5 256ch, forward", ms(t["tv"]), ms(t["ours"]), f"{t['tv'] / t['ours']:.1f}x"])
    for f in feats:
        f.requires_grad_(True)
    t = interleaved_medians({"ours": fwd_bwd(ours, feats), "tv": fwd_bwd(theirs, feats)}, dev, args.reps)
    rows.append(["(a) 512 RoIs 14x14, P2-P5 256ch, fwd+bwd", ms(t["tv"]), ms(t["ours"]), f"{t['tv'] / t['ours']:.1f}x"])

    # (b) stages: P4@28, P3@56, P2@112 for 100 RoIs
    rois = make_rois(100, dev, seed=1)
    stages = [(2, 28, 100), (1, 56, 100), (0, 112, 100)]
    for label, chans in (("256ch", [256, 256, 256, 256]), ("128/64/32ch", [32, 64, 128, 256])):
        feats = pyramid(chans, dev)
        ours = lambda feats=feats: ops.roi_align_stages(feats, rois, stages, SCALES, 2, True)  # noqa: E731
        theirs = lambda feats=feats: [roi_align(feats[l], rois, s, SCALES[l], 2, True) for l, s, _ in stages]  # noqa: E731
        for a, b in zip(ours(), theirs()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        t = interleaved_medians({"ours": ours, "tv": theirs}, dev, args.reps)
        rows.append([f"(b) 100 RoIs P4@28+P3@56+P2@112, {label}, forward", ms(t["tv"]), ms(t["ours"]),
                     f"{t['tv'] / t['ours']:.1f}x"])
        for f in feats[:3]:
            f.requires_grad_(True)
        t = interleaved_medians({"ours": fwd_bwd(ours, feats[:3]), "tv": fwd_bwd(theirs, feats[:3])}, dev, args.reps)
        rows.append([f"(b) 100 RoIs P4@28+P3@56+P2@112, {label}, fwd+bwd", ms(t["tv"]), ms(t["ours"]),
                     f"{t['tv'] / t['ours']:.1f}x"])

    table = markdown_table(["case", "torchvision (median)", "dynamask (median)", "speed-up"], rows)
    text = f"RoIAlign on {device_name(dev)}, torch {torch.__version__}, {args.reps} interleaved reps\n\n{table}\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
