"""Model outputs to COCO results, and COCO bbox / segm / Boundary AP by pycocotools' COCOeval.

Pure functions over predictions, so they are testable without a model.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dynamask.data.masks import encode_mask, encode_masks

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def output_to_results(
    image_id: int,
    output: dict[str, torch.Tensor],
    cat_ids: Sequence[int],
    *,
    image_size: tuple[int, int] | None = None,
    mask_threshold: float = 0.5,
    default_resolution: int | None = None,
    rles: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """COCO result dicts of one image from a detection model's output.

    Args:
        output: ``boxes [N, 4]`` xyxy, ``labels [N]`` contiguous from 1, ``scores [N]``, ``masks [N, 1, h, w]``
            probabilities (or ``[N, h, w]``), optionally ``mask_resolution [N]``.
        cat_ids: ``cat_ids[label - 1]`` is the COCO category id.
        image_size: ``(H, W)`` of the image in the annotation file; when the model saw the image at another
            size (``masks``' h, w), boxes are scaled and masks resampled to it.
        mask_threshold: probabilities >= this are inside the mask.
        default_resolution: ``mask_resolution`` for models that do not report one (e.g. 28 for Mask R-CNN).
        rles: the detections' masks already encoded (N JSON-ready RLEs at ``image_size``, e.g. by
            :func:`dynamask.models.mask_handoff.paste_rle`), used instead of ``masks``.
    Returns a list of ``{"image_id", "category_id", "bbox" (xywh), "score", "segmentation" (RLE, str counts),
    "mask_resolution"}``.
    """
    boxes = output["boxes"].detach().float().cpu()
    labels = output["labels"].detach().cpu().tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    masks = output.get("masks")
    res = output.get("mask_resolution")
    n = len(labels)
    resolutions = res.detach().cpu().tolist() if res is not None else [default_resolution] * n
    if n == 0:
        return []
    encoded: list[dict[str, Any] | None] = [None] * n
    if rles is not None:
        if len(rles) != n:
            raise ValueError(f"rles has {len(rles)} entries for {n} detections")
        encoded = list(rles)
    elif masks is not None:
        masks = masks.detach()
        if masks.dim() == 4:
            masks = masks[:, 0]
        h, w = masks.shape[-2:]
        if image_size is not None and tuple(image_size) != (h, w):
            sy, sx = image_size[0] / h, image_size[1] / w
            boxes = boxes * torch.tensor([sx, sy, sx, sy])
            masks = F.interpolate(
                masks[:, None].float(), size=tuple(image_size), mode="bilinear", align_corners=False
            )[:, 0]
        encoded = list(encode_masks(masks >= mask_threshold))
    results = []
    for i in range(n):
        label = int(labels[i])
        if not 1 <= label <= len(cat_ids):
            raise ValueError(f"model predicted label {label}, but the dataset has labels 1..{len(cat_ids)}")
        x1, y1, x2, y2 = boxes[i].tolist()
        r = {
            "image_id": int(image_id),
            "category_id": int(cat_ids[label - 1]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores[i]),
            "mask_resolution": None if (res_i := resolutions[i]) is None else int(res_i),
        }
        if encoded[i] is not None:
            r["segmentation"] = encoded[i]
        results.append(r)
    return results


def coco_metrics(
    coco_gt: COCO, results: list[dict[str, Any]], iou_type: str, *, boundary_dilation: float = 0.02
) -> tuple[dict[str, float], str]:
    """``({"AP", "AP50", "AP75", "APs", "APm", "APl"}, summary text)`` on a 0-1 scale (-1: no such GT).

    ``iou_type``: "bbox", "segm", or "boundary" (Boundary AP: segm AP with IoU = min(mask IoU, boundary
    IoU), Cheng et al. 2021, boundary width ``boundary_dilation`` of the image diagonal).
    """
    if iou_type not in ("bbox", "segm", "boundary"):
        raise ValueError(f"iou_type must be 'bbox', 'segm' or 'boundary', got {iou_type!r}")
    dets = []
    for r in results:
        d = {k: v for k, v in r.items() if k != "mask_resolution"}
        if iou_type == "bbox":
            d.pop("segmentation", None)
        else:
            if "segmentation" not in d:
                raise ValueError("segm / boundary evaluation needs results with a 'segmentation'")
            d.pop("bbox", None)  # so that the area (and its small/medium/large range) is the mask's
        dets.append(d)
    if not dets:
        return {k: 0.0 for k in STAT_NAMES}, "no detections"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        if iou_type == "boundary":
            ev: COCOeval = BoundaryCOCOeval(coco_gt, coco_dt, dilation_ratio=boundary_dilation)
        else:
            ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = sorted(coco_gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats[:6])}, summary.getvalue()


def mask_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Pixels of a binary ``[H, W]`` mask within ``dilation`` pixels (chessboard distance) of its outside.

    The image border counts as outside, as in the Boundary IoU reference code.
    """
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    outside = F.pad(1.0 - m, (dilation,) * 4, value=1.0)
    near_outside = F.max_pool2d(outside, kernel_size=2 * dilation + 1, stride=1)
    return ((m > 0) & (near_outside > 0))[0, 0].numpy()


class BoundaryCOCOeval(COCOeval):
    """COCOeval whose IoU is min(mask IoU, boundary IoU): Boundary AP (Cheng et al., CVPR 2021)."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, *, dilation_ratio: float = 0.02) -> None:
        super().__init__(coco_gt, coco_dt, "segm")
        self.dilation_ratio = dilation_ratio
        self._boundary_cache: dict[tuple[str, int], dict] = {}

    def _boundary_rle(self, kind: str, ann: dict) -> dict:
        key = (kind, ann["id"])
        if key not in self._boundary_cache:
            rle = ann["segmentation"]
            mask = mask_utils.decode(rle)
            h, w = mask.shape
            d = max(1, int(round(self.dilation_ratio * np.sqrt(h * h + w * w))))
            b = mask_boundary(mask, d)
            self._boundary_cache[key] = encode_mask(b)
        return self._boundary_cache[key]

    def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools' name)
        p = self.params
        if p.useCats:
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gt = [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = [d for c in p.catIds for d in self._dts[imgId, c]]
        if len(gt) == 0 and len(dt) == 0:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][: p.maxDets[-1]]
        crowd = [int(g["iscrowd"]) for g in gt]
        mask_iou = mask_utils.iou([d["segmentation"] for d in dt], [g["segmentation"] for g in gt], crowd)
        b_iou = mask_utils.iou(
            [self._boundary_rle("dt", d) for d in dt], [self._boundary_rle("gt", g) for g in gt], crowd
        )
        return np.minimum(mask_iou, b_iou)
