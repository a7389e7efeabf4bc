"""COCO segmentations (polygons, compressed and uncompressed RLE) to binary masks, with clear errors, and
binary masks to compressed RLE: the one encoder that annotations, data sets and results use."""

from __future__ import annotations

from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch


def annotation_to_mask(ann: dict[str, Any], height: int, width: int, *, where: str = "annotation") -> np.ndarray:
    """``[height, width]`` uint8 mask of one COCO annotation.

    ``segmentation`` may be a list of polygons ``[[x0, y0, x1, y1, ...], ...]``, an uncompressed RLE
    ``{"counts": [int, ...], "size": [h, w]}`` or a compressed one (``counts`` a string). An annotation with
    no segmentation (a detection-only file) is filled as its box. ``where`` names the annotation in errors.
    """
    seg = ann.get("segmentation")
    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        return _box_mask(ann.get("bbox"), height, width, where)
    if isinstance(seg, list):
        return polygons_to_mask(seg, height, width, where=where)
    if isinstance(seg, dict):
        return rle_to_mask(seg, height, width, where=where)
    raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict, got {type(seg).__name__}")


def polygons_to_mask(polygons: list, height: int, width: int, *, where: str = "annotation") -> np.ndarray:
    if not all(isinstance(p, (list, tuple)) for p in polygons):
        raise ValueError(f"{where}: polygon segmentation must be a list of lists of coordinates")
    kept = []
    for i, poly in enumerate(polygons):
        if len(poly) % 2 != 0:
            raise ValueError(f"{where}: polygon {i} has an odd number of coordinates ({len(poly)})")
        try:
            coords = [float(v) for v in poly]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: polygon {i} holds a value that is not a number") from exc
        if not np.all(np.isfinite(coords)):
            raise ValueError(f"{where}: polygon {i} has a non-finite coordinate")
        if len(coords) >= 6:  # fewer than 3 points enclose nothing (and pycocotools would read 4 as a box)
            kept.append(coords)
    if not kept:
        return np.zeros((height, width), dtype=np.uint8)
    rles = mask_utils.frPyObjects(kept, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)


def rle_to_mask(rle: dict, height: int, width: int, *, where: str = "annotation") -> np.ndarray:
    counts, size = rle.get("counts"), rle.get("size")
    if counts is None or size is None or len(size) != 2:
        raise ValueError(f"{where}: RLE segmentation needs 'counts' and 'size' [h, w]")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise ValueError(f"{where}: RLE size {list(size)} differs from the image's [height, width] = {[height, width]}")
    if isinstance(counts, list):  # uncompressed
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"{where}: uncompressed RLE counts must be non-negative integers")
        if sum(int(c) for c in counts) != height * width:
            raise ValueError(f"{where}: uncompressed RLE counts sum to {sum(counts)}, expected {height * width}")
        rle = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    elif isinstance(counts, (str, bytes)):
        rle = {"counts": counts.encode("ascii") if isinstance(counts, str) else counts, "size": [height, width]}
    else:
        raise ValueError(f"{where}: RLE counts must be a list of ints or a string, got {type(counts).__name__}")
    try:
        mask = mask_utils.decode(rle)
    except Exception as exc:
        raise ValueError(f"{where}: cannot decode RLE ({exc})") from exc
    return mask.astype(np.uint8)


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """Compressed COCO RLE of each of ``[N, H, W]`` binary masks (any dtype; non-zero is inside), as
    JSON-ready ``{"counts": str, "size": [H, W]}``; pycocotools encodes the whole stack in one call."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    # pycocotools wants [H, W, N] uint8 in column-major order
    rles = mask_utils.encode(np.asfortranarray((masks != 0).astype(np.uint8).transpose(1, 2, 0)))
    return [{"counts": r["counts"].decode("ascii"), "size": [int(v) for v in r["size"]]} for r in rles]


def encode_mask(mask: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """:func:`encode_masks` of one ``[H, W]`` mask."""
    return encode_masks(mask[None])[0]


def _box_mask(bbox: Any, height: int, width: int, where: str) -> np.ndarray:
    if bbox is None:
        raise ValueError(f"{where}: has neither a segmentation nor a bbox")
    x, y, w, h = (float(v) for v in bbox)
    mask = np.zeros((height, width), dtype=np.uint8)
    x1, y1 = int(np.floor(max(x, 0))), int(np.floor(max(y, 0)))
    x2, y2 = int(np.ceil(min(x + w, width))), int(np.ceil(min(y + h, height)))
    mask[y1:y2, x1:x2] = 1
    return mask
