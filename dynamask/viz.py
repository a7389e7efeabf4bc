"""Overlays of predicted instances, each coloured by the resolution it was segmented at (paper Fig. 7)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# One colour per mask resolution, as in the paper's Fig. 7 legend (RGB in [0, 1]).
RESOLUTION_COLOURS: dict[int, tuple[float, float, float]] = {
    7: (0.55, 0.55, 0.55),
    14: (0.12, 0.47, 0.71),
    28: (0.17, 0.63, 0.17),
    56: (1.00, 0.50, 0.05),
    112: (0.84, 0.15, 0.16),
}


def save_overlay(image: torch.Tensor, output: dict[str, Any], path: str, *, score_thresh: float = 0.5,
                 mask_thresh: float = 0.5, title: str | None = None) -> str:
    """Writes ``image [3, H, W]`` (float in [0, 1]) with the instances of ``output`` (the model's eval
    dict: boxes, scores, masks [N, 1, H, W], optional mask_resolution [N]) to ``path`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    img = image.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy().copy()
    keep = output["scores"].detach().cpu() >= score_thresh
    masks = output["masks"].detach().cpu()[keep, 0].numpy() >= mask_thresh
    boxes = output["boxes"].detach().cpu()[keep].numpy()
    res = output.get("mask_resolution")
    res = res.detach().cpu()[keep].tolist() if res is not None else [28] * len(boxes)
    for m, r in zip(masks, res):
        colour = np.array(RESOLUTION_COLOURS.get(int(r), (1.0, 1.0, 1.0)))
        img[m] = 0.45 * img[m] + 0.55 * colour
    # the figure's height follows the image's shape within 1-20 inches: a 2x3840 or 3840x1 image would
    # otherwise ask for a figure of no height or one over matplotlib's 2^16-pixel limit
    height = min(max(5 * img.shape[0] / img.shape[1], 1.0), 20.0)
    fig, ax = plt.subplots(figsize=(5, height), dpi=100)
    ax.imshow(img)
    for b, r in zip(boxes, res):
        ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, lw=1,
                               color=RESOLUTION_COLOURS.get(int(r), (1.0, 1.0, 1.0))))
    used = sorted(set(int(r) for r in res))
    if used:
        ax.legend(handles=[Patch(color=RESOLUTION_COLOURS.get(r, (1, 1, 1)), label=f"{r}×{r}") for r in used],
                  loc="lower right", fontsize=7, framealpha=0.7)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
