"""LVIS evaluation by the ``lvis`` package's ``LVISEval`` (an optional extra: ``pip install lvis``).

LVIS is annotated federatedly, and its API applies the rules: a detection of a category that an image
neither contains nor lists in ``neg_category_ids`` is not counted; an unmatched detection of a category in
``not_exhaustive_category_ids`` is not a false positive; AP is also reported per frequency group (APr, APc,
APf); at most 300 detections per image are kept (by score). ``lvis_metrics`` returns the values under the
keys that the API prints (``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``APr``, ``APc``, ``APf``,
``AR@300``, ``ARs@300``, ``ARm@300``, ``ARl@300``), on a 0-1 scale, -1 where there is nothing to score.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from dynamask.engine._numpy_compat import removed_numpy_names

LVIS_MAX_DETS = 300
FREQUENCY_NAMES = ("APr", "APc", "APf")


def _lvis():
    try:
        import lvis
    except ImportError as exc:
        raise ImportError(f"LVIS evaluation needs the optional package lvis: pip install lvis ({exc})") from exc
    return lvis


def lvis_available() -> bool:
    try:
        _lvis()
    except ImportError:
        return False
    return True


def result_keys(max_dets: int = LVIS_MAX_DETS) -> list[str]:
    """The keys of :func:`lvis_metrics`, in the order the API prints them."""
    return ["AP", "AP50", "AP75", "APs", "APm", "APl", *FREQUENCY_NAMES,
            f"AR@{max_dets}", f"ARs@{max_dets}", f"ARm@{max_dets}", f"ARl@{max_dets}"]


def load_lvis_gt(ann_file: str):
    """An ``lvis.LVIS`` of ``ann_file``; every category must have a ``frequency``. Images without
    ``neg_category_ids`` / ``not_exhaustive_category_ids`` get empty lists, annotations without ``area`` the
    area of their mask."""
    lvis = _lvis()
    with _quiet():
        gt = lvis.LVIS(ann_file)
    for cat in gt.dataset["categories"]:
        if cat.get("frequency") not in ("r", "c", "f"):
            raise ValueError(f"{ann_file}: category {cat['id']} ({cat.get('name')!r}) has no frequency r/c/f, "
                             "which LVIS evaluation groups categories by")
    for img in gt.dataset["images"]:
        img.setdefault("neg_category_ids", [])
        img.setdefault("not_exhaustive_category_ids", [])
    import pycocotools.mask as mask_utils

    for ann in gt.dataset["annotations"]:
        if "area" not in ann:
            ann["area"] = float(mask_utils.area(gt.ann_to_rle(ann)))
    return gt


def lvis_metrics(lvis_gt, results: list[dict[str, Any]], iou_type: str, *,
                 max_dets: int = LVIS_MAX_DETS) -> tuple[dict[str, float], str]:
    """``(metrics, printed summary)`` of COCO result dicts by ``LVISEval``.

    Args:
        lvis_gt: an ``lvis.LVIS`` (see :func:`load_lvis_gt`) or the path of an LVIS file.
        iou_type: ``"bbox"`` or ``"segm"`` (segm areas, hence s/m/l, are the masks', not the boxes').
        max_dets: detections kept per image, the highest scoring (LVIS: 300).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    lvis = _lvis()
    if isinstance(lvis_gt, str):
        lvis_gt = load_lvis_gt(lvis_gt)
    dets = []
    for r in results:
        d = {k: v for k, v in r.items() if k != "mask_resolution"}
        if iou_type == "segm":
            if "segmentation" not in d:
                raise ValueError("segm evaluation needs results with a 'segmentation'")
            d.pop("bbox", None)  # else the API takes the box's area as the instance's
        else:
            d.pop("segmentation", None)
        dets.append(d)
    if not dets:
        return {k: 0.0 for k in result_keys(max_dets)}, "no detections"
    with _quiet(), removed_numpy_names("float"):
        lvis_dt = lvis.LVISResults(lvis_gt, dets, max_dets=max_dets)
        ev = lvis.LVISEval(lvis_gt, lvis_dt, iou_type)
        ev.params.max_dets = max_dets
        ev.run()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ev.print_results()
    return {k: float(v) for k, v in ev.get_results().items()}, text.getvalue()


@contextlib.contextmanager
def detections_per_image(model: torch.nn.Module, n: int | None) -> Iterator[None]:
    """Let a torchvision-style detector keep ``n`` detections per image (``roi_heads.detections_per_img``)
    while in the block."""
    heads = getattr(model, "roi_heads", None)
    if n is None or heads is None or not hasattr(heads, "detections_per_img"):
        yield
        return
    before = heads.detections_per_img
    heads.detections_per_img = int(n)
    try:
        yield
    finally:
        heads.detections_per_img = before


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The API logs a warning for every list of results (through the deprecated ``Logger.warn``) and prints
    progress; none of it helps here."""
    logger = logging.getLogger("lvis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The 'warn' method is deprecated", category=DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)
