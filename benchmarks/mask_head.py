"""Inference time of the mask head for 100 RoIs: forced routing mixes vs all-112 vs torchvision.

    python benchmarks/mask_head.py [--repeats 5] [--device cpu|cuda]

Cases (fractions of RoIs routed to 14/28/56/112): all-112; the paper's Table 9 mixes
0.35/0.34/0.21/0.10 and 0.05/0.13/0.25/0.56; and torchvision's Mask R-CNN head (4 convs, deconv,
91-class predictor, 28×28) on the same RoIs. Each timed call covers what the mask branch does per batch
at inference: 14×14 multi-level RoIAlign, routing (``group_by_resolution``), the stages each RoI needs
(including the per-image projections and the one ``roi_align_stages`` call) and the sigmoid; pasting is
excluded (the same for both). Features are random P2–P5 of one 800×1216 image, RoIs random boxes with
FPN-typical sizes. Medians of interleaved runs; ``torch.set_num_threads(2)`` on CPU. CPU bar: the
0.35/0.34/0.21/0.10 mix ≤ 0.6× the all-112 time.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_medians  # noqa: E402

from dynamask import ops  # noqa: E402
from dynamask.models import DynaMaskHead  # noqa: E402

MIXES = {
    "all-112": (0.0, 0.0, 0.0, 1.0),
    "Table 9 mix 0.35/0.34/0.21/0.10": (0.35, 0.34, 0.21, 0.10),
    "Table 9 mix 0.05/0.13/0.25/0.56": (0.05, 0.13, 0.25, 0.56),
}
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def make_inputs(num_rois: int, device: torch.device, image=(800, 1216)):
    g = torch.Generator().manual_seed(0)
    h, w = image
    feats = [torch.randn(1, 256, h // s, w // s, generator=g).to(device) for s in (4, 8, 16, 32)]
    side = torch.exp(torch.empty(num_rois).uniform_(3.0, 6.0, generator=g))  # 20 .. 400 px
    cx = torch.rand(num_rois, generator=g) * w
    cy = torch.rand(num_rois, generator=g) * h
    boxes = torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    rois = torch.cat([torch.zeros(num_rois, 1), boxes], 1).to(device)
    return feats, rois, boxes.to(device), image


def choice_for(mix, n: int, device) -> torch.Tensor:
    counts = [round(f * n) for f in mix]
    counts[-1] = n - sum(counts[:-1])
    choice = torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in enumerate(counts)])
    return choice[torch.randperm(n, generator=torch.Generator().manual_seed(1))].to(device)


def run_ours(head: DynaMaskHead, feats, rois, choice) -> list[torch.Tensor]:
    roi_feats = ops.roi_align_multilevel(feats, rois, 14, SCALES, sampling_ratio=2, aligned=True)
    perm, counts = ops.group_by_resolution(choice, 4)
    logits = head.forward_dispatched(roi_feats[perm], feats, SCALES, rois[perm], counts.tolist())
    return [x.sigmoid() for x in logits]


class TorchvisionMaskBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
        self.head = MaskRCNNHeads(256, (256, 256, 256, 256), 1)
        self.predictor = MaskRCNNPredictor(256, 256, 91)

    def forward(self, feats, boxes, image, labels):
        x = self.pool({str(i): f for i, f in enumerate(feats)}, [boxes], [image])
        x = self.predictor(self.head(x))
        return x[torch.arange(x.shape[0], device=x.device), labels].sigmoid()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rois", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and ops.cuda_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    head = DynaMaskHead().to(device).eval()
    tv = TorchvisionMaskBranch().to(device).eval()
    feats, rois, boxes, image = make_inputs(args.rois, device)
    labels = torch.randint(1, 91, (args.rois,), device=device)
    cases = {name: functools.partial(run_ours, head, feats, rois, choice_for(mix, args.rois, device))
             for name, mix in MIXES.items()}
    cases["torchvision Mask R-CNN head (28×28)"] = lambda: tv(feats, boxes, image, labels)
    with torch.no_grad():
        med = interleaved_medians(cases, device.type, args.repeats)
    base = med["all-112"]
    print(f"Mask head inference, {args.rois} RoIs, one 800×1216 image, device {device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats} interleaved runs.\n")
    print("| case | median ms | × all-112 |")
    print("|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f} |")
    ratio = med["Table 9 mix 0.35/0.34/0.21/0.10"] / base
    print(f"\nBar (CPU): mix 0.35/0.34/0.21/0.10 ≤ 0.6× all-112: {ratio:.2f}× → {'PASS' if ratio <= 0.6 else 'FAIL'}")


if __name__ == "__main__":
    main()
