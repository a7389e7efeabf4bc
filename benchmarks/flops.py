"""Per-RoI mask-head cost of DynaMask (analytic, dynamask.models.flops) beside the paper and torchvision.

    python benchmarks/flops.py

Prints a markdown table: our cumulative GMAC per RoI at 14/28/56/112, the paper's numbers and the +2%
bound, the MSM, the per-image projections (800×1216 input) and torchvision's 28×28 Mask R-CNN head
(counted with forward hooks on the real modules).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from dynamask.models import DynaMaskHead, MaskSwitchModule, flops

PAPER = {14: 0.23, 28: 0.62, 56: 1.01, 112: 1.40}


def torchvision_mask_head_gmacs(num_classes: int = 91) -> float:
    """torchvision's Mask R-CNN head (4× 3×3 conv 256, deconv ×2, 1×1 → classes) per RoI, by hooks."""
    head = nn.Sequential(MaskRCNNHeads(256, (256, 256, 256, 256), 1), MaskRCNNPredictor(256, 256, num_classes))
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.ConvTranspose2d):
            total += inputs[0].numel() * m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
        else:
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in head.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        head(torch.zeros(1, 256, 14, 14))
    for h in handles:
        h.remove()
    return total / 1e9


def main() -> None:
    head = DynaMaskHead()
    ours = flops.mask_head_gmacs(head)
    print("| resolution | DynaMask (ours), GMAC/RoI | paper | bound (+2%) | within |")
    print("|---|---|---|---|---|")
    for s, g in ours.items():
        bound = PAPER[s] * 1.02
        print(f"| {s}×{s} | {g:.3f} | {PAPER[s]:.2f} | {bound:.3f} | {'yes' if g <= bound else 'NO'} |")
    print(f"| MSM | {flops.msm_gmacs(MaskSwitchModule()):.4f} | \"negligible\" | 0.020 | "
          f"{'yes' if flops.msm_gmacs(MaskSwitchModule()) <= 0.02 else 'NO'} |")
    print()
    print(f"Per-image work (1×1 projections of P4/P3/P2 to 128/64/32 ch, 800×1216 input): "
          f"{flops.per_image_gmacs(head, (800, 1216)):.3f} GMAC per image.")
    tv = torchvision_mask_head_gmacs()
    print(f"torchvision Mask R-CNN mask head (28×28, 91 classes): {tv:.3f} GMAC/RoI "
          f"(DynaMask at 28: {ours[28] / tv:.2f}×, at 112: {ours[112] / tv:.2f}×).")


if __name__ == "__main__":
    main()
