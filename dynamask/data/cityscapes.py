"""Cityscapes' fine polygon annotations to a COCO instances file of its 8 thing classes.

    convert_cityscapes("cityscapes", "val", "cityscapes_val.json")
    # images: cityscapes/leftImg8bit/val/<city>/<name>_leftImg8bit.png, file_name "<city>/<name>_leftImg8bit.png"

Reads ``ROOT/gtFine/<split>/<city>/*_gtFine_polygons.json`` and the matching ``leftImg8bit`` images. The
classes, their ids and names come from ``cityscapesscripts``' label table (an optional extra:
``pip install cityscapesscripts``): the labels that have instances and count in evaluation (person, rider,
car, truck, bus, train, motorcycle, bicycle), with the table's label ids as COCO category ids.

- ``<label>group`` polygons (e.g. ``cargroup``) become crowd regions (``iscrowd=1``) of ``<label>``.
- Other labels (road, sky, caravan, trailer, license plate ...) are dropped; objects marked ``deleted`` too.
- Polygons stay polygons. Cityscapes' vertices are integer pixel indices (``cityscapesscripts`` fills the
  pixels whose centres they enclose), so 0.5 is added to turn them into COCO's continuous coordinates,
  where pixel ``i`` spans ``[i, i + 1]``; then each polygon is clipped to the image ``[0, W] x [0, H]``.
  ``area`` is the pixel count of the clipped polygon as pycocotools rasterises it (what evaluation
  compares against: a self-intersecting "bow-tie" polygon, whose shoelace area is 0, keeps its pixels),
  ``bbox`` its extent.
- Thing instances with no pixel in the image (outside it, or, with ``visible=True``, hidden by the
  objects drawn over them) are dropped; ``info["dropped_instances"]`` lists each (file, object, label,
  reason).
- Polygons overlap where one object hides another: Cityscapes draws them in file order, later over earlier.
  With ``visible=True`` each instance is instead written as the run-length-encoded pixels that stay
  visible when all polygons are drawn that way, which is the region of ``*_gtFine_instanceIds.png`` and so
  what the official evaluation compares against.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynamask.atomic import write_text_atomic
from dynamask.checks import check_output_file

SPLITS = ("train", "val", "test")
_GT_SUFFIX = "_gtFine_polygons.json"
_IMAGE_SUFFIX = "_leftImg8bit.png"


def labels_table():
    """``cityscapesscripts.helpers.labels``, or an ImportError that says how to install it."""
    try:
        from cityscapesscripts.helpers import labels
    except ImportError as exc:
        raise ImportError(
            "Cityscapes needs the optional package cityscapesscripts: pip install cityscapesscripts "
            f"(or pip install 'dynamask[cityscapes]'); {exc}"
        ) from exc
    return labels


def thing_categories() -> list[dict[str, Any]]:
    """COCO categories of the 8 thing classes, from the label table: ``{"id", "name", "supercategory"}``."""
    table = labels_table()
    return [
        {"id": int(lab.id), "name": lab.name, "supercategory": lab.category}
        for lab in table.labels
        if lab.hasInstances and not lab.ignoreInEval
    ]


def image_root(root: str, split: str) -> str:
    """The folder that the converted file's ``file_name`` entries are relative to."""
    return os.path.join(root, "leftImg8bit", split)


def convert_cityscapes(root: str, split: str, out_file: str | None = None, *, visible: bool = False) -> dict[str, Any]:
    """Convert one split of Cityscapes to a COCO instances dict; write it to ``out_file`` if given.

    Images are numbered 1..N in the sorted order of their annotation files, annotations 1..M in image order
    and then file order. Returns the COCO dict. Malformed files raise ``ValueError`` naming the file and the
    object (its index in ``objects``); a missing image raises ``FileNotFoundError``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    table = labels_table()
    gt_dir = os.path.join(root, "gtFine", split)
    if not os.path.isdir(gt_dir):
        raise FileNotFoundError(f"Cityscapes annotations not found: {gt_dir} (expected ROOT/gtFine/{split}/<city>/)")
    files = sorted(glob.glob(os.path.join(gt_dir, "*", "*" + _GT_SUFFIX)))
    if not files:
        raise FileNotFoundError(f"{gt_dir}: no <city>/*{_GT_SUFFIX} files")
    categories = thing_categories()
    things = {c["id"] for c in categories}
    img_root = image_root(root, split)
    if out_file is not None:  # before the conversion, which reads every file of the split
        check_output_file(out_file, name="out_file")
    images: list[dict] = []
    annotations: list[dict] = []
    dropped: list[dict[str, Any]] = []
    for image_id, gt_file in enumerate(files, start=1):
        city = os.path.basename(os.path.dirname(gt_file))
        stem = os.path.basename(gt_file)[: -len(_GT_SUFFIX)]
        file_name = f"{city}/{stem}{_IMAGE_SUFFIX}"
        height, width, objects = _read_polygon_file(gt_file)
        _check_image(os.path.join(img_root, file_name), gt_file, height, width)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        make = _visible_annotations if visible else _polygon_annotations
        anns = make(objects, table, things, height, width, gt_file, dropped)
        for ann in anns:
            ann.update(id=len(annotations) + 1, image_id=image_id)
            annotations.append(ann)
    coco = {
        "info": {"description": f"Cityscapes {split} (gtFine), thing classes, converted by dynamask"
                                + (", visible regions" if visible else ""),
                 "dropped_instances": dropped},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    if out_file is not None:
        _write_json(coco, out_file)
    return coco


def _write_json(value: Any, path: str) -> None:
    """Atomically, with the umask's permissions (:func:`dynamask.atomic.write_text_atomic`)."""
    write_text_atomic(path, json.dumps(value))


# --------------------------------------------------------------------------------------------- reading
def _read_polygon_file(path: str) -> tuple[int, int, list[tuple[int, str, list[list[float]]]]]:
    """``(height, width, [(object index, label, [[x, y], ...]), ...])`` of the objects not deleted."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable Cityscapes polygon file ({exc})") from exc
    if not isinstance(data, dict) or "objects" not in data:
        raise ValueError(f"{path}: expected a JSON object with imgHeight, imgWidth and objects")
    try:
        height, width = int(data["imgHeight"]), int(data["imgWidth"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: imgHeight and imgWidth must be integers") from exc
    if height <= 0 or width <= 0:
        raise ValueError(f"{path}: image size {width}x{height} is not positive")
    if not isinstance(data["objects"], list):
        raise ValueError(f"{path}: objects must be a list")
    objects = []
    for i, obj in enumerate(data["objects"]):
        where = f"{path}: object {i}"
        if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
            raise ValueError(f"{where}: expected {{'label': str, 'polygon': [[x, y], ...]}}")
        where += f" ({obj['label']!r})"
        if obj.get("deleted"):
            continue
        objects.append((i, obj["label"], _points(obj.get("polygon"), where)))
    return height, width, objects


def _points(polygon: Any, where: str) -> list[list[float]]:
    if not isinstance(polygon, list):
        raise ValueError(f"{where}: polygon must be a list of [x, y] points, got {type(polygon).__name__}")
    points = []
    for k, p in enumerate(polygon):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ValueError(f"{where}: polygon point {k} is not [x, y]: {p!r}")
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: polygon point {k} holds a value that is not a number: {p!r}") from exc
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"{where}: polygon point {k} is not finite: {p!r}")
        points.append([x, y])
    return points


def _label(table, name: str, where: str):
    """``(label, is_group)``: ``cargroup`` is a group of ``car``; unknown names are an error."""
    if name in table.name2label:
        return table.name2label[name], False
    if name.endswith("group") and name[: -len("group")] in table.name2label:
        return table.name2label[name[: -len("group")]], True
    raise ValueError(f"{where}: label {name!r} is not in cityscapesscripts' label table")


def _check_image(path: str, gt_file: str, height: int, width: int) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{gt_file}: its image {path} is missing")
    from PIL import Image

    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
    except OSError as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from exc
    if (w, h) != (width, height):
        raise ValueError(f"{path} is {w}x{h} pixels but {gt_file} says {width}x{height}")


# --------------------------------------------------------------------------------------------- polygons
def _polygon_annotations(objects, table, things: set[int], height: int, width: int, gt_file: str,
                         dropped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import pycocotools.mask as mask_utils

    anns = []
    for i, name, points in objects:
        where = f"{gt_file}: object {i} ({name!r})"
        label, group = _label(table, name, where)
        if label.id not in things:
            continue
        if len(points) < 3:
            raise ValueError(f"{where}: polygon has {len(points)} points, needs at least 3")
        clipped = [(round(x, 3), round(y, 3))
                   for x, y in clip_polygon([(x + 0.5, y + 0.5) for x, y in points], width, height)]
        flat = [v for p in clipped for v in p]
        area = float(mask_utils.area(mask_utils.frPyObjects([flat], height, width))[0]) if len(clipped) >= 3 else 0.0
        if area <= 0:
            dropped.append(_dropped(gt_file, i, name, "no pixel inside the image"))
            continue
        xs, ys = [p[0] for p in clipped], [p[1] for p in clipped]
        x0, y0 = min(xs), min(ys)
        anns.append({
            "category_id": int(label.id),
            "segmentation": [flat],
            "area": area,
            "bbox": [x0, y0, max(xs) - x0, max(ys) - y0],
            "iscrowd": int(group),
        })
    return anns


def clip_polygon(points: Sequence[tuple[float, float]], width: float, height: float) -> list[tuple[float, float]]:
    """The part of a polygon inside ``[0, width] x [0, height]`` (Sutherland-Hodgman against each side).

    A concave polygon that leaves and re-enters the image stays one polygon, joined along the border
    (edges of zero width there), so its area and rasterisation are those of the clipped region.
    Consecutive repeated points are merged.
    """
    def clip(pts, inside, cross):
        out = []
        for k, cur in enumerate(pts):
            prev = pts[k - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
        return out

    def at_x(x):
        return lambda p, q: (x, p[1] + (q[1] - p[1]) * (x - p[0]) / (q[0] - p[0]))

    def at_y(y):
        return lambda p, q: (p[0] + (q[0] - p[0]) * (y - p[1]) / (q[1] - p[1]), y)

    pts = [(float(x), float(y)) for x, y in points]
    for inside, cross in (
        (lambda p: p[0] >= 0.0, at_x(0.0)),
        (lambda p: p[0] <= width, at_x(float(width))),
        (lambda p: p[1] >= 0.0, at_y(0.0)),
        (lambda p: p[1] <= height, at_y(float(height))),
    ):
        if not pts:
            break
        pts = clip(pts, inside, cross)
    merged: list[tuple[float, float]] = []
    for p in pts:
        if not merged or p != merged[-1]:
            merged.append(p)
    while len(merged) > 1 and merged[0] == merged[-1]:
        merged.pop()
    return merged


def polygon_area(points: Sequence[tuple[float, float]]) -> float:
    """Area of a simple polygon (shoelace formula)."""
    if len(points) < 3:
        return 0.0
    s = 0.0
    for k, (x1, y1) in enumerate(points):
        x2, y2 = points[(k + 1) % len(points)]
        s += x1 * y2 - x2 * y1
    return abs(s) / 2.0


# --------------------------------------------------------------------------------------------- visible
def _visible_annotations(objects, table, things: set[int], height: int, width: int, gt_file: str,
                         dropped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each thing instance's pixels left visible when every polygon is drawn in file order, later over
    earlier, with PIL as ``cityscapesscripts``' ``json2instanceImg`` does; as compressed RLE."""
    from PIL import Image, ImageDraw

    from dynamask.data.masks import encode_mask

    canvas = Image.new("I", (width, height), 0)  # 0: nothing, k + 1: object k of `objects`
    draw = ImageDraw.Draw(canvas)
    wanted = []
    for k, (i, name, points) in enumerate(objects):
        where = f"{gt_file}: object {i} ({name!r})"
        label, group = _label(table, name, where)
        if label.id < 0:  # e.g. license plate: never drawn by cityscapesscripts
            continue
        if label.id in things:
            if len(points) < 3:
                raise ValueError(f"{where}: polygon has {len(points)} points, needs at least 3")
            wanted.append((k, i, name, label, group))
        if len(points) >= 3:
            draw.polygon([tuple(p) for p in points], fill=k + 1)
    index = np.asarray(canvas, dtype=np.int32)
    anns = []
    for k, i, name, label, group in wanted:
        mask = index == k + 1
        if not mask.any():
            dropped.append(_dropped(gt_file, i, name, "no pixel visible (outside the image or hidden)"))
            continue
        ys, xs = np.nonzero(mask)
        x0, y0 = float(xs.min()), float(ys.min())
        anns.append({
            "category_id": int(label.id),
            "segmentation": encode_mask(mask),
            "area": float(mask.sum()),
            "bbox": [x0, y0, float(xs.max() + 1) - x0, float(ys.max() + 1) - y0],
            "iscrowd": int(group),
        })
    return anns


def _dropped(gt_file: str, index: int, label: str, reason: str) -> dict[str, Any]:
    return {"file": gt_file, "object": index, "label": label, "reason": reason}
