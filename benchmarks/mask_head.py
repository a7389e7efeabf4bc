"""Inference time of the mask head for 100 RoIs: forced routing mixes vs all-112 vs torchvision.

    python benchmarks/mask_head.py [--repeats 5] [--device cpu|cuda]

Cases (fractions of RoIs routed to 14/28/56/112): all-112; the paper's Table 9 mixes
0.35/0.34/0.21/0.10 and 0.05/0.13/0.25/0.56; and torchvision's Mask R-CNN head (4 convs, deconv,
91-class predictor, 28×28) on the same RoIs. Each timed call covers what the mask branch does per batch
at inference: 14×14 multi-level RoIAlign, routing (``group_by_resolution``), the stages each RoI needs
(including the per-image projections and the one ``roi_align_stages`` call) and the sigmoid; pasting is
excluded (the same for both). Features are random P2–P5 of one 800×1216 image, RoIs random boxes with
FPN-typical sizes. Medians of interleaved runs; ``torch.set_num_threads(--threads)`` on CPU. Each case's
GMAC is counted by the library's rule (``dynamask.models.flops``: each RoI's head MACs at its resolution, plus the
per-image projections; torchvision's: its convs, deconv and 91-class predictor), and its GMAC per second
is given against torchvision's head's. Bars (issues 5 and 20): the 0.35/0.34/0.21/0.10 mix ≤ 0.6× the
all-112 time; all-112 at ≥ 0.9× torchvision's GMAC per second.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from types import SimpleNamespace

import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import device_name, interleaved_medians, markdown_table, publish  # noqa: E402

from dynamask import ops  # noqa: E402
from dynamask.models import DynaMaskHead  # noqa: E402
from dynamask.models.flops import conv_macs, mask_head_macs, maskrcnn_mask_head_gmacs  # noqa: E402

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


def mix_counts(mix, n: int) -> list[int]:
    """RoIs routed to each resolution for fractions ``mix`` of ``n`` (the last takes the rounding rest)."""
    counts = [round(f * n) for f in mix]
    counts[-1] = n - sum(counts[:-1])
    return counts


def choice_for(mix, n: int, device) -> torch.Tensor:
    counts = mix_counts(mix, n)
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


def head_gmacs(head: DynaMaskHead, mix, n: int, feats) -> float:
    """GMAC of one call of ``run_ours`` by the library's counting rule: each RoI's cumulative head MACs at
    its resolution (:func:`dynamask.models.flops.mask_head_macs`) plus the per-image 1×1 projections of the levels
    that the reached stages fuse."""
    counts = mix_counts(mix, n)
    per_roi = mask_head_macs(head)
    total = sum(c * m for c, m in zip(counts, per_roi))
    for s in range(1, head.num_resolutions):
        if sum(counts[s:]) > 0:
            level = feats[head.stage_levels[s - 1]]
            total += conv_macs(head.project[s - 1], (level.shape[-2], level.shape[-1]))
    return total / 1e9


def torchvision_gmacs(tv: TorchvisionMaskBranch, n: int) -> float:
    return n * maskrcnn_mask_head_gmacs(SimpleNamespace(mask_head=tv.head, mask_predictor=tv.predictor))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rois", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and ops.cuda_available() else "cpu")
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = DynaMaskHead().to(device).eval()
    tv = TorchvisionMaskBranch().to(device).eval()
    feats, rois, boxes, image = make_inputs(args.rois, device)
    labels = torch.randint(1, 91, (args.rois,), device=device)
    cases = {name: functools.partial(run_ours, head, feats, rois, choice_for(mix, args.rois, device))
             for name, mix in MIXES.items()}
    gmacs = {name: head_gmacs(head, mix, args.rois, feats) for name, mix in MIXES.items()}
    tv_name = "torchvision Mask R-CNN head (28×28)"
    cases[tv_name] = lambda: tv(feats, boxes, image, labels)
    gmacs[tv_name] = torchvision_gmacs(tv, args.rois)
    with torch.no_grad():
        med = interleaved_medians(cases, device.type, args.repeats)
    base = med["all-112"]
    tv_rate = gmacs[tv_name] / med[tv_name]
    rows = [[name, f"{t * 1e3:.1f}", f"{t / base:.2f}", f"{gmacs[name]:.1f}", f"{gmacs[name] / t:.1f}",
             f"{gmacs[name] / t / tv_rate:.2f}"] for name, t in med.items()]
    lines = [f"Mask head inference, {args.rois} RoIs, one 800×1216 image; {device_name(device.type)}; torch "
             f"{torch.__version__}; median of {args.repeats} interleaved runs.", "",
             markdown_table(["case", "median ms", "× all-112", "GMAC", "GMAC/s", "GMAC/s ÷ torchvision's"], rows), ""]
    ratio = med["Table 9 mix 0.35/0.34/0.21/0.10"] / base
    rate = gmacs["all-112"] / base / tv_rate
    lines.append(f"Bars ({device.type}): mix 0.35/0.34/0.21/0.10 ≤ 0.6× all-112: {ratio:.2f}× → "
                 f"{'PASS' if ratio <= 0.6 else 'FAIL'}; all-112 GMAC/s ≥ 0.9× torchvision's head's: {rate:.2f}× → "
                 f"{'PASS' if rate >= 0.9 else 'FAIL'}")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
