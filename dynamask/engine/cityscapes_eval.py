"""The official Cityscapes instance-level evaluation (``cityscapesscripts``, an optional extra) of COCO results.

The results are those of :func:`dynamask.engine.evaluate.run_model` on a file made by
``dynamask convert cityscapes``; the ground truth is Cityscapes' own ``*_gtFine_instanceIds.png``. The
predictions are written the way the evaluation script reads them (one text file per image naming one PNG
mask per instance, its label id and its score) into a scratch folder, then scored by
``evalInstanceLevelSemanticLabeling.evaluateImgLists``: AP over IoU 0.5:0.95 and AP at 0.5, per class and
averaged over the 8 classes, regions under 100 pixels ignored.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from dynamask.engine._numpy_compat import removed_numpy_names

_IMAGE_SUFFIX = "_leftImg8bit"
_GT_SUFFIX = "_gtFine_instanceIds.png"


def _eval_module():
    try:
        from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as cs_eval
        from cityscapesscripts.helpers.labels import name2label
    except ImportError as exc:
        raise ImportError(
            "the official Cityscapes evaluation needs the optional package cityscapesscripts: "
            f"pip install cityscapesscripts ({exc})"
        ) from exc
    return cs_eval, name2label


def cityscapes_instance_metrics(
    coco_gt: COCO, results: list[dict[str, Any]], gt_dir: str, *, work_dir: str | None = None
) -> dict[str, Any]:
    """``{"AP", "AP50", "classes": {name: {"AP", "AP50"}}}`` on a 0-1 scale (-1: a class with no instance).

    Args:
        coco_gt: the converted file (its images' ``file_name`` are ``<city>/<city>_<seq>_<frame>_leftImg8bit.png``,
            its categories named as in Cityscapes' label table).
        results: COCO result dicts with RLE ``segmentation`` at each image's size.
        gt_dir: ``ROOT/gtFine/<split>``, holding ``<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png``.
        work_dir: where to write the prediction files (default: a temporary folder, removed afterwards).
    Every image of ``coco_gt`` is evaluated, so each needs its ``instanceIds`` file.
    """
    cs_eval, name2label = _eval_module()
    label_ids = {}
    for cat in coco_gt.loadCats(coco_gt.getCatIds()):
        if cat["name"] not in name2label:
            raise ValueError(f"category {cat['name']!r} is not a Cityscapes label; the official evaluation needs "
                             "a file made by `dynamask convert cityscapes`")
        label_ids[int(cat["id"])] = name2label[cat["name"]].id
    gt_files, stems = {}, {}
    for image_id, info in coco_gt.imgs.items():
        stem = os.path.splitext(os.path.basename(info["file_name"]))[0]
        if not stem.endswith(_IMAGE_SUFFIX) or stem.count("_") < 3:
            raise ValueError(f"image {image_id}: {info['file_name']} is not named like Cityscapes' "
                             "<city>_<seq>_<frame>_leftImg8bit.png")
        stem = stem[: -len(_IMAGE_SUFFIX)]
        gt = os.path.join(gt_dir, stem.split("_")[0], stem + _GT_SUFFIX)
        if not os.path.isfile(gt):
            raise FileNotFoundError(f"image {image_id} ({info['file_name']}): ground truth {gt} is missing")
        gt_files[image_id], stems[image_id] = os.path.abspath(gt), stem
    if not gt_files:
        raise ValueError("the annotation file has no images to evaluate")
    by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in gt_files}
    for r in results:
        if r["image_id"] not in by_image:
            raise ValueError(f"a result refers to image {r['image_id']}, which the annotation file lacks")
        by_image[r["image_id"]].append(r)

    with tempfile.TemporaryDirectory(prefix="dynamask_cityscapes_") as tmp:
        work = os.path.abspath(work_dir or tmp)
        os.makedirs(work, exist_ok=True)
        for image_id, dets in by_image.items():
            _write_predictions(work, stems[image_id], dets, label_ids)
        args = copy.copy(cs_eval.args)  # the module's settings object, without changing the module's own
        args.predictionPath, args.predictionWalk = work, None
        args.gtInstancesFile = os.path.join(work, "gtInstances.json")
        args.exportFile = os.path.join(work, "resultInstanceLevelSemanticLabeling.json")
        args.JSONOutput, args.quiet, args.colorized, args.csv = False, True, False, False
        gts = [gt_files[i] for i in sorted(gt_files)]
        cwd = os.getcwd()
        os.chdir(work)  # the script writes matches.json into the working folder
        try:
            preds = [cs_eval.getPrediction(gt, args) for gt in gts]
            with removed_numpy_names("in1d"), _json_writer_for_numpy(cs_eval):
                averages = cs_eval.evaluateImgLists(preds, gts, args)["averages"]
        except SystemExit as exc:  # the script reports its errors by printing and exiting
            raise ValueError(
                f"the Cityscapes evaluation failed (exit status {exc.code}); see its message above"
            ) from exc
        finally:
            os.chdir(cwd)

    def value(v) -> float:
        v = float(v)
        return -1.0 if math.isnan(v) else v

    return {
        "AP": value(averages["allAp"]),
        "AP50": value(averages["allAp50%"]),
        "classes": {name: {"AP": value(c["ap"]), "AP50": value(c["ap50%"])} for name, c in averages["classes"].items()},
    }


@contextlib.contextmanager
def _json_writer_for_numpy(module) -> Iterator[None]:
    """The script dumps its intermediate dicts to JSON with ``default=o.__dict__``, which fails on the NumPy
    scalars that NumPy 2 returns from its pixel counts: write those as Python numbers while in the block."""
    import json

    def write(data, file_name):
        with open(file_name, "w") as f:
            json.dump(data, f, default=lambda o: o.item() if isinstance(o, np.generic) else o.__dict__,
                      sort_keys=True, indent=4)

    original = module.writeDict2JSON
    module.writeDict2JSON = write
    try:
        yield
    finally:
        module.writeDict2JSON = original


def _write_predictions(folder: str, stem: str, dets: list[dict[str, Any]], label_ids: dict[int, int]) -> None:
    """``<stem>_pred.txt`` listing ``<stem>_<k>.png <label id> <score>``, one binary PNG per detection."""
    import pycocotools.mask as mask_utils
    from PIL import Image

    lines = []
    for k, d in enumerate(dets):
        if "segmentation" not in d:
            raise ValueError("the Cityscapes evaluation needs results with a 'segmentation'")
        mask = mask_utils.decode(d["segmentation"])
        png = f"{stem}_{k}.png"
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(os.path.join(folder, png))
        lines.append(f"{png} {label_ids[int(d['category_id'])]} {float(d['score']):.6g}\n")
    with open(os.path.join(folder, f"{stem}_pred.txt"), "w") as f:
        f.writelines(lines)
