"""End-to-end inference speed: DynaMask (ResNet-50-FPN) against torchvision's Mask R-CNN, same images.

    python benchmarks/e2e.py [--images 2] [--reps 3] [--device cpu|cuda] [--before] [--out FILE.md]

Both models are randomly initialised (nothing is downloaded) and set up to return exactly 100
detections per image (box score threshold 0, 100 detections per image), on 800×1216 images, so that
the backbone, RPN and box head do the same work and the difference is the mask branch (RoIAlign, head,
paste into the full image). DynaMask's routing is forced by a policy that assigns the detections to
14/28/56/112 in fixed fractions: all-112 (the most expensive case, 2.6× the mask-head FLOPs of
torchvision's head) and the paper's Table 9 mixes. Time per batch of ``--images`` images, median of
interleaved runs (torchvision, then each DynaMask case, repeated). CPU bars (issue 5): the
0.35/0.34/0.21/0.10 mix no slower than torchvision (ratio ≤ 1.0), all-112 ≤ 1.5×. The paper's own
ratios on a GPU were 1.11 (all-112) and 1.49 — against its baseline.

``--before`` adds each DynaMask case once more through the mask hand-off as it was before issue 19
(``_e2e_before.py``: string-keyed masks, a Python loop rebuilding runs before the paste), interleaved
with the rest, and prints the time ratio current ÷ before per case.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import Tensor
from torchvision.models.detection import maskrcnn_resnet50_fpn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _e2e_before  # noqa: E402
from _timing import device_name, interleaved_medians, markdown_table, ms, publish  # noqa: E402

from dynamask import ops  # noqa: E402
from dynamask.models import dynamask_resnet50_fpn  # noqa: E402

MIXES = {
    "all-112": (0.0, 0.0, 0.0, 1.0),
    "mix 0.35/0.34/0.21/0.10": (0.35, 0.34, 0.21, 0.10),
    "mix 0.05/0.13/0.25/0.56": (0.05, 0.13, 0.25, 0.56),
}
DETECTIONS = 100
COMMON = dict(num_classes=91, box_score_thresh=0.0, box_detections_per_img=DETECTIONS)


class FixedMix:
    """A routing policy that sends fixed fractions of the RoIs to each resolution (shuffled by seed)."""

    def __init__(self, fractions: tuple[float, ...]) -> None:
        self.fractions = fractions

    def __call__(self, roi_features: Tensor, boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        n = roi_features.shape[0]
        counts = [round(f * n) for f in self.fractions]
        counts[-1] = n - sum(counts[:-1])
        choice = torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in enumerate(counts)])
        return choice[torch.randperm(n, generator=torch.Generator().manual_seed(0))].to(roi_features.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2, help="images per batch (default 2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and ops.cuda_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2, as the bars)")
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"),
                    help="image size (default 800 1216, the bars' size; smaller for a smoke run)")
    ap.add_argument("--before", action="store_true", help="also time the pre-issue-19 mask hand-off")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args()
    dev = args.device
    if dev == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w = args.size
    images = [torch.rand(3, h, w, device=dev) for _ in range(args.images)]

    sizes = dict(min_size=min(h, w), max_size=max(h, w))  # no resizing: both models see the images as given
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **COMMON, **sizes).to(dev).eval()
    ours = dynamask_resnet50_fpn(**COMMON, **sizes).to(dev).eval()
    # The same backbone, RPN and box head weights, so both see the same proposals and detections.
    shared = {k: v for k, v in tv.state_dict().items() if k.startswith(("backbone.", "rpn.", "roi_heads.box_"))}
    ours.load_state_dict(shared, strict=False)

    def run_tv() -> list[dict[str, Tensor]]:
        return tv(images)

    def run_ours(mix: tuple[float, ...], before: bool = False):
        policy = FixedMix(mix)

        def fn() -> list[dict[str, Tensor]]:
            ours.roi_heads.mask_policy = policy
            return _e2e_before.forward(ours, images) if before else ours(images)
        return fn

    fns = {"torchvision maskrcnn_resnet50_fpn": run_tv}
    fns.update({f"DynaMask {name}": run_ours(mix) for name, mix in MIXES.items()})
    if args.before:
        fns.update({f"DynaMask {name} (before #19)": run_ours(mix, before=True) for name, mix in MIXES.items()})
    with torch.inference_mode():
        counts, masks = {}, {}
        for name, fn in fns.items():
            out = fn()
            counts[name] = [int(o["boxes"].shape[0]) for o in out]
            masks[name] = [o["masks"] for o in out] if name.startswith("DynaMask") and args.before else None
            if name.endswith(" (before #19)"):  # both hand-offs paste the same canvases
                now = masks.pop(name.removesuffix(" (before #19)"))
                assert all(torch.equal(a, b) for a, b in zip(now, masks.pop(name))), name
        del masks
        med = interleaved_medians(fns, dev, args.reps, warmup=0)
    base = med["torchvision maskrcnn_resnet50_fpn"]
    rows = []
    for name, t in med.items():
        rows.append([name, ms(t), f"{args.images / t:.3f}", f"{t / base:.2f}", "/".join(map(str, counts[name]))])
    title = (f"End-to-end inference, {args.images} images of {h}×{w} per batch, ResNet-50-FPN, random weights, "
             f"{DETECTIONS} detections per image; {device_name(dev)}; torch {torch.__version__}; "
             f"median of {args.reps} interleaved runs.")
    table = markdown_table(["model / routing", "median per batch", "images/s", "time ÷ torchvision", "detections"],
                           rows)
    mix = med["DynaMask mix 0.35/0.34/0.21/0.10"] / base
    all112 = med["DynaMask all-112"] / base
    bars = (f"Bars (CPU): mix 0.35/0.34/0.21/0.10 ≤ 1.0× torchvision: {mix:.2f}× → {'PASS' if mix <= 1.0 else 'FAIL'}; "
            f"all-112 ≤ 1.5×: {all112:.2f}× → {'PASS' if all112 <= 1.5 else 'FAIL'}")
    text = f"{title}\n\n{table}\n\n{bars}\n"
    if args.before:
        ratios = ", ".join(f"{name} {med[f'DynaMask {name}'] / med[f'DynaMask {name} (before #19)']:.3f}×"
                           for name in MIXES)
        text += f"\nCurrent ÷ before #19 (same process, interleaved): {ratios}\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
