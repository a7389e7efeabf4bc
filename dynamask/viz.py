"""Overlays of predicted instances, each coloured by the resolution it was segmented at (paper Fig. 7).

The overlay is the image at its own size (or scaled down to ``max_side``), with torchvision's
``draw_segmentation_masks`` filling each mask and ``draw_bounding_boxes`` drawing each box and its label
(class name and score), both in the colour of the instance's mask resolution; a legend in the top-left
corner says which colour is which resolution. Text is drawn with matplotlib's DejaVu Sans (a dependency
already) at a size that follows the image, so labels stay readable on a 4K photo and fit on a small image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# One colour per mask resolution, as in the paper's Fig. 7 legend (RGB in [0, 1]).
RESOLUTION_COLOURS: dict[int, tuple[float, float, float]] = {
    7: (0.55, 0.55, 0.55),
    14: (0.12, 0.47, 0.71),
    28: (0.17, 0.63, 0.17),
    56: (1.00, 0.50, 0.05),
    112: (0.84, 0.15, 0.16),
}
UNKNOWN_COLOUR = (1.0, 1.0, 1.0)  # a resolution outside the legend
MASK_ALPHA = 0.55  # the mask colour's share of each masked pixel


def colour(resolution: int) -> tuple[int, int, int]:
    """The 8-bit RGB colour of a mask resolution."""
    rgb = RESOLUTION_COLOURS.get(int(resolution), UNKNOWN_COLOUR)
    return (round(255 * rgb[0]), round(255 * rgb[1]), round(255 * rgb[2]))


def instance_labels(scores: Sequence[float], labels: Sequence[int], names: Sequence[str] | None) -> list[str]:
    """``"person 0.93"`` per instance: ``names[label - 1]`` (or ``class <label>``) and the score."""
    out = []
    for score, label in zip(scores, labels):
        label = int(label)
        name = names[label - 1] if names is not None and 1 <= label <= len(names) else f"class {label}"
        out.append(f"{name} {float(score):.2f}")
    return out


def _font_path() -> str | None:
    try:
        import matplotlib

        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    except ImportError:
        return None
    return path if os.path.isfile(path) else None


def font_size(height: int, width: int) -> int:
    """Label text height in pixels: about 1/40 of the shorter side, within 8..48."""
    return int(min(max(round(min(height, width) / 40), 8), 48))


def render_overlay(image: Tensor, output: dict[str, Any], *, score_thresh: float = 0.5, mask_thresh: float = 0.5,
                   names: Sequence[str] | None = None, max_side: int | None = None,
                   title: str | None = None) -> Tensor:
    """The overlay of ``output``'s instances on ``image`` as a ``[3, H', W']`` uint8 tensor.

    Args:
        image: ``[3, H, W]`` float in [0, 1] (or uint8).
        output: the model's eval dict of one image: ``boxes [N, 4]``, ``scores [N]``, ``masks [N, 1, H, W]``
            (probabilities) or ``[N, H, W]``, optional ``labels [N]`` and ``mask_resolution [N]``.
        score_thresh: instances scoring below are not drawn; mask_thresh: a mask's pixel threshold.
        names: class names of labels 1, 2, ... (the checkpoint's label map); else ``class <label>``.
        max_side: scale the overlay down (never up) so that its longer side is at most this.
        title: drawn above the legend (e.g. the image's file name).
    """
    import torch.nn.functional as F
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    img = image.detach().cpu()
    img = img if img.dtype == torch.uint8 else (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
    keep = output["scores"].detach().cpu() >= score_thresh
    scores = output["scores"].detach().cpu()[keep]
    boxes = output["boxes"].detach().cpu().float()[keep]
    masks = output["masks"].detach().cpu()[keep]
    masks = masks[:, 0] if masks.dim() == 4 else masks
    res_t = output.get("mask_resolution")
    res = res_t.detach().cpu()[keep].tolist() if res_t is not None else [28] * len(boxes)
    lab_t = output.get("labels")
    labels = lab_t.detach().cpu()[keep].tolist() if lab_t is not None else [0] * len(boxes)
    h, w = img.shape[-2:]
    scale = 1.0
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(round(h * scale), 1), max(round(w * scale), 1))
        img = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True,
                            align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        if len(masks):
            masks = F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        boxes = boxes * scale
        h, w = size
    colours = [colour(r) for r in res]
    if len(masks):
        img = draw_segmentation_masks(img, masks >= mask_thresh, alpha=MASK_ALPHA, colors=colours)
    font, size_px = _font_path(), font_size(h, w)
    if len(boxes):
        img = draw_bounding_boxes(img, boxes, labels=instance_labels(scores.tolist(), labels, names), colors=colours,
                                  width=max(1, size_px // 8), font=font, font_size=size_px if font else None,
                                  label_colors=(255, 255, 255), fill_labels=True)
    return _legend(img, sorted({int(r) for r in res}), size_px, font, title)


def _legend(img: Tensor, resolutions: list[int], size_px: int, font: str | None, title: str | None) -> Tensor:
    """The colour legend (one swatch per resolution shown, ``56×56``) and the title, top left."""
    if not resolutions and not title:
        return img
    from PIL import ImageDraw, ImageFont
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image

    pil = to_pil_image(img)
    draw = ImageDraw.Draw(pil, "RGBA")
    face = ImageFont.truetype(font, size_px) if font else ImageFont.load_default()
    lines = ([title] if title else []) + [f"mask {r}×{r}" for r in resolutions]
    pad, swatch = max(2, size_px // 4), size_px
    width = max(draw.textlength(line, font=face) for line in lines) + swatch + 3 * pad
    draw.rectangle((0, 0, width, len(lines) * (size_px + pad) + pad), fill=(0, 0, 0, 150))
    y = pad
    for i, line in enumerate(lines):
        x = pad
        if not (title and i == 0):
            draw.rectangle((x, y, x + swatch, y + swatch), fill=colour(resolutions[i - (1 if title else 0)]))
            x += swatch + pad
        draw.text((x, y), line, fill=(255, 255, 255), font=face)
        y += size_px + pad
    return pil_to_tensor(pil)


def save_overlay(image: Tensor, output: dict[str, Any], path: str, *, score_thresh: float = 0.5,
                 mask_thresh: float = 0.5, title: str | None = None, names: Sequence[str] | None = None,
                 max_side: int | None = None) -> str:
    """Writes :func:`render_overlay`'s picture to ``path`` as a PNG; returns ``path``."""
    from torchvision.transforms.functional import to_pil_image

    overlay = render_overlay(image, output, score_thresh=score_thresh, mask_thresh=mask_thresh, names=names,
                             max_side=max_side, title=title)
    to_pil_image(overlay).save(path, format="PNG")
    return path
