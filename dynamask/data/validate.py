"""Checks of a whole COCO annotation file when a dataset opens, so that bad input fails before any work.

:func:`check_coco` looks at every image, category and annotation once (structure only: masks are decoded
when an item is read) and returns every problem found; :func:`raise_problems` turns them into one error
naming the file. Refused: duplicate image, category or annotation ids (pycocotools keeps the last of each,
silently pairing one image's annotations with another's file), annotations of an unknown image or
category, malformed boxes and segmentations, RLE counts that are negative or of the wrong total, a
segmentation size other than its image's, image files that do not exist.

Degenerate polygons (fewer than 3 points, e.g. ``[[]]``) are dropped, not refused, as detectron2 does:
annotation tools write them for clicks that enclose nothing. An annotation left with no polygon is removed
from the dataset, and with it from the ground truth that evaluation reads (pycocotools cannot evaluate it);
the caller reports how many were dropped. A missing ``iscrowd`` is filled in as 0 and a missing ``area``
as the segmentation's pixel count, since pycocotools' evaluation needs both.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Problems listed by name in the error; the rest are counted.
MAX_LISTED = 12


@dataclass
class CocoCheck:
    """What :func:`check_coco` found: ``problems`` (refused), ``dropped`` (ids of annotations removed for
    having only degenerate polygons) and ``trimmed`` (ids of annotations that lost some polygons)."""

    problems: list[str] = field(default_factory=list)
    dropped: list[Any] = field(default_factory=list)
    trimmed: list[Any] = field(default_factory=list)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _duplicates(ids: list[Any], what: str) -> list[str]:
    return [f"duplicate {what} id {i!r} ({n} entries)" for i, n in Counter(ids).items() if n > 1]


def check_coco(data: Any, image_dir: str | None = None) -> CocoCheck:
    """Check a parsed COCO dict in place; degenerate polygons are removed from ``data``. With ``image_dir``,
    every image's ``file_name`` must exist there (found now, not when a run draws it).

    Returns the problems (each naming the image, category or annotation) and the ids of what was dropped.
    """
    check = CocoCheck()
    problems = check.problems
    if not isinstance(data, dict):
        problems.append(f"the file holds a {type(data).__name__}, not a COCO object with 'images' and 'categories'")
        return check
    for key in ("images", "categories"):
        if key not in data:
            problems.append(f"no {key!r} list")
        elif not isinstance(data[key], list):
            problems.append(f"{key!r} must be a list, got {type(data[key]).__name__}")
    if not isinstance(data.get("annotations", []), list):
        problems.append(f"'annotations' must be a list, got {type(data['annotations']).__name__}")
    if problems:
        return check

    sizes: dict[Any, tuple[Any, Any]] = {}
    image_ids = []
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            problems.append(f"image entry {k} has no integer 'id'")
            continue
        image_ids.append(img["id"])
        where = f"image {img['id']}"
        if not isinstance(img.get("file_name"), str) and "coco_url" not in img:
            problems.append(f"{where} has no 'file_name' (nor a 'coco_url', which names LVIS images)")
        for dim in ("height", "width"):
            if dim in img and not (_is_int(img[dim]) and img[dim] > 0):
                problems.append(f"{where}: {dim} must be a positive integer, got {img[dim]!r}")
        sizes[img["id"]] = (img.get("height"), img.get("width"))
    problems += _duplicates(image_ids, "image")
    if image_dir is not None:
        problems += _missing_files(data["images"], image_dir)

    cat_ids = []
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            problems.append(f"category entry {k} has no integer 'id'")
            continue
        cat_ids.append(cat["id"])
    problems += _duplicates(cat_ids, "category")
    known_cats = set(cat_ids)

    kept, ann_ids = [], []
    for k, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            problems.append(f"annotation entry {k} has no integer 'id'")
            continue
        ann_ids.append(ann["id"])
        where = f"annotation {ann['id']}"
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in sizes:
            problems.append(f"{where}: unknown image_id {ann.get('image_id')!r}")
        else:
            where += f" of image {ann['image_id']}"
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in known_cats:
            problems.append(f"{where}: unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            problems.append(f"{where}: bbox must be [x, y, width, height] of finite numbers, got {bbox!r}")
        if ann.get("iscrowd", 0) not in (0, 1, None):
            problems.append(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        seg = ann.get("segmentation")
        if isinstance(seg, list) and seg:
            kept_polygons = _check_polygons(seg, where, problems)
            if kept_polygons is not None and len(kept_polygons) < len(seg):
                if not kept_polygons:
                    check.dropped.append(ann["id"])
                    continue
                ann["segmentation"] = kept_polygons
                check.trimmed.append(ann["id"])
        elif isinstance(seg, dict):
            image_size = sizes.get(ann["image_id"], (None, None)) if _is_int(ann.get("image_id")) else (None, None)
            _check_rle(seg, image_size, where, problems)
        elif seg is not None and seg != []:
            problems.append(f"{where}: segmentation must be a list of polygons or an RLE dict, "
                            f"got {type(seg).__name__}")
        if not problems:  # pycocotools' evaluation reads both; annotation tools often leave them out
            ann.setdefault("iscrowd", 0)
            if ann.get("area") is None:
                ann["area"] = _area(ann, sizes.get(ann["image_id"], (None, None)))
        kept.append(ann)
    problems += _duplicates(ann_ids, "annotation")
    if check.dropped:
        data["annotations"] = kept
    return check


def _missing_files(images: list, image_dir: str) -> list[str]:
    named = [(img["id"], os.path.join(image_dir, img["file_name"])) for img in images
             if isinstance(img, dict) and isinstance(img.get("file_name"), str)]
    missing = [(i, path) for i, path in named if not os.path.isfile(path)]
    if len(missing) > 1 and len(missing) == len(named):  # the wrong folder, most likely
        return [f"none of the {len(named)} image files is in {image_dir} (e.g. image {missing[0][0]}: "
                f"{missing[0][1]})"]
    return [f"image {i} refers to a missing file {path}" for i, path in missing]


def _area(ann: dict, image_size: tuple[Any, Any]) -> float:
    """The segmentation's pixel count, as COCO's ``area`` is (the box's area without a segmentation)."""
    import pycocotools.mask as mask_utils

    seg, (h, w) = ann.get("segmentation"), image_size
    if isinstance(seg, dict):
        h, w = seg["size"]
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else {
            "counts": seg["counts"].encode("ascii"), "size": [h, w]}
        return float(mask_utils.area(rle))
    if isinstance(seg, list) and seg and h is not None and w is not None:
        return float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))))
    bbox = ann.get("bbox") or [0, 0, 0, 0]
    return float(bbox[2] * bbox[3])


def _check_polygons(seg: list, where: str, problems: list[str]) -> list | None:
    """The polygons with at least 3 points; None (and a problem) when the structure is wrong."""
    kept = []
    for i, poly in enumerate(seg):
        if not isinstance(poly, list):
            problems.append(f"{where}: polygon {i} must be a list of coordinates, got {type(poly).__name__}")
            return None
        if len(poly) % 2:
            problems.append(f"{where}: polygon {i} has an odd number of coordinates ({len(poly)})")
            return None
        if len(poly) >= 6:
            kept.append(poly)
    return kept


def _check_rle(seg: dict, image_size: tuple[Any, Any], where: str, problems: list[str]) -> None:
    counts, size = seg.get("counts"), seg.get("size")
    if counts is None or not (isinstance(size, list) and len(size) == 2 and all(map(_is_int, size))):
        problems.append(f"{where}: RLE segmentation needs 'counts' and 'size' [h, w], got keys {sorted(seg)}")
        return
    h, w = image_size
    if h is not None and w is not None and list(size) != [h, w]:
        problems.append(f"{where}: RLE size {size} differs from the image's [height, width] = {[h, w]}")
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            bad = next(c for c in counts if not (_is_int(c) and c >= 0))
            problems.append(f"{where}: uncompressed RLE counts must be non-negative integers, got {bad!r}")
        elif sum(counts) != size[0] * size[1]:
            problems.append(f"{where}: uncompressed RLE counts sum to {sum(counts)}, expected {size[0] * size[1]}")
    elif not isinstance(counts, str):
        problems.append(f"{where}: RLE counts must be a list of ints or a string, got {type(counts).__name__}")


def raise_problems(source: str, problems: list[str]) -> None:
    """One ``ValueError`` naming ``source`` and every problem (the first :data:`MAX_LISTED`, then a count)."""
    if not problems:
        return
    listed = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    noun = "problem" if len(problems) == 1 else "problems"
    raise ValueError(f"{source}: {len(problems)} {noun}: {listed}{more}")
