"""A COCO-format instance-segmentation dataset whose items are what torchvision's detection models take."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from dynamask.data.masks import annotation_to_mask
from dynamask.data.validate import check_coco, raise_problems

# Category names that annotation tools use for "no object"; such categories get no label.
BACKGROUND_NAMES = frozenset({"background", "__background__", "_background_", "bg"})

Target = dict[str, torch.Tensor]


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection / instance-segmentation dataset (built on pycocotools).

    Each item is ``(image, target)``:

    - ``image``: ``[3, H, W]`` float32 in [0, 1] (grayscale, palette and RGBA images are converted to RGB).
    - ``target["boxes"]``: ``[N, 4]`` float32, xyxy in pixels of this image.
    - ``target["labels"]``: ``[N]`` int64, contiguous from 1 (0 is the background of torchvision's models);
      ``dataset.cat_ids[label - 1]`` is the COCO category id, ``dataset.label_map[label]`` is ``(id, name)``.
    - ``target["masks"]``: ``[N, H, W]`` uint8.
    - ``target["image_id"]``: int64 scalar (the COCO image id), ``target["area"]`` ``[N]`` float32,
      ``target["iscrowd"]`` ``[N]`` int64.

    Args:
        image_dir: folder that the images' ``file_name`` entries are relative to.
        ann_file: the COCO JSON file.
        transforms: optional callable ``(image, target) -> (image, target)``, e.g. :mod:`dynamask.data.transforms`.
        include_crowd: keep crowd regions (``iscrowd=1``) in the targets. Off by default, since training
            must ignore them; evaluation reads crowd regions from ``dataset.coco`` itself.
        drop_background: give no label to categories named like "background" (and drop their annotations).

    Robust to what annotation tools write: ids starting at 0, a background category, missing ``area`` or
    ``iscrowd``, empty images, polygons, compressed and uncompressed RLE. Boxes with no width or height are
    dropped. The whole file is checked when the dataset opens (:mod:`dynamask.data.validate`): duplicate
    ids, unknown images or categories, malformed boxes or segmentations and missing image files raise one
    ``ValueError`` naming the file and every problem found. Annotations whose polygons all have fewer than
    3 points are dropped with a warning (``dataset.dropped_annotations`` lists their ids), from the
    training targets and from ``dataset.coco``, the ground truth evaluation reads. EXIF orientation is
    applied: images, boxes and masks refer to the upright image.
    """

    def __init__(
        self,
        image_dir: str,
        ann_file: str,
        transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None = None,
        *,
        include_crowd: bool = False,
        drop_background: bool = True,
    ) -> None:
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder not found: {image_dir}")
        self.image_dir = image_dir
        self.ann_file = ann_file
        self.transforms = transforms
        self.include_crowd = include_crowd
        self.coco, self.dropped_annotations = _checked_coco(ann_file, image_dir)

        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        if drop_background:
            cats = [c for c in cats if str(c.get("name", "")).strip().lower() not in BACKGROUND_NAMES]
        self.cat_ids: list[int] = [int(c["id"]) for c in cats]
        self.cat_names: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self.cat_id_to_label: dict[int, int] = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        # contiguous label -> (COCO category id, name); what checkpoints store (docs/method.md §2)
        self.label_map: dict[int, tuple[int, str]] = {
            i + 1: (cid, name) for i, (cid, name) in enumerate(zip(self.cat_ids, self.cat_names))
        }
        self._all_cat_ids = set(self.coco.getCatIds())
        self.ids: list[int] = sorted(self.coco.imgs.keys())

    @property
    def num_classes(self) -> int:
        """Number of classes including the background (what torchvision's ``num_classes`` means)."""
        return len(self.cat_ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> str:
        info = self.coco.imgs[self.ids[index]]
        return os.path.join(self.image_dir, info["file_name"])

    def load_image(self, index: int) -> torch.Tensor:
        """``[3, H, W]`` float32 in [0, 1]."""
        path = self.image_path(index)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.ann_file}: image {self.ids[index]} refers to a missing file {path}")
        array = read_rgb_array(path)
        info = self.coco.imgs[self.ids[index]]
        h, w = array.shape[:2]
        if ("height" in info and int(info["height"]) != h) or ("width" in info and int(info["width"]) != w):
            raise ValueError(
                f"{self.ann_file}: image {info['id']} ({path}) is {w}x{h} pixels but the file says "
                f"{info.get('width')}x{info.get('height')}"
            )
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)

    def load_target(self, index: int, height: int, width: int) -> Target:
        image_id = self.ids[index]
        anns = self.coco.imgToAnns.get(image_id, [])
        boxes, labels, masks, areas, crowd = [], [], [], [], []
        for ann in anns:
            where = f"{self.ann_file}: annotation {ann.get('id')} of image {image_id}"
            cat = ann.get("category_id")
            if cat not in self._all_cat_ids:
                raise ValueError(f"{where}: unknown category_id {cat!r}")
            if cat not in self.cat_id_to_label:  # a background category
                continue
            is_crowd = int(ann.get("iscrowd", 0) or 0)
            if is_crowd and not self.include_crowd:
                continue
            box = _xywh_to_xyxy(ann.get("bbox"), where, height, width)
            mask = annotation_to_mask(ann, height, width, where=where)
            if box is None:  # no usable bbox given: take the mask's extent
                box = _mask_box(mask)
            if box is None or box[2] <= box[0] or box[3] <= box[1]:
                continue  # degenerate (zero width or height)
            area = ann.get("area")
            area = float(mask.sum()) if area is None else float(area)
            boxes.append(box)
            labels.append(self.cat_id_to_label[cat])
            masks.append(mask)
            areas.append(area)
            crowd.append(is_crowd)
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image = self.load_image(index)
        target = self.load_target(index, image.shape[1], image.shape[2])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_fn(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Keeps images of different sizes apart: ``([image, ...], [target, ...])`` (the models batch them)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def _quiet_coco(ann_file: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def _checked_coco(ann_file: str, image_dir: str | None = None) -> tuple[COCO, list[Any]]:
    """The file as a pycocotools ``COCO``, checked whole first (``dynamask.data.validate``); returns it and
    the ids of annotations dropped for having only degenerate polygons (reported here as a warning)."""
    import json
    import warnings

    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{ann_file}: not a readable COCO annotation file ({type(exc).__name__}: {exc})") from exc
    check = check_coco(data, image_dir)
    raise_problems(ann_file, check.problems)
    if check.dropped or check.trimmed:
        warnings.warn(
            f"{ann_file}: dropped {len(check.dropped)} annotations whose polygons all have fewer than 3 points "
            f"(ids {check.dropped[:10]}{' ...' if len(check.dropped) > 10 else ''}) and degenerate polygons of "
            f"{len(check.trimmed)} more", UserWarning, stacklevel=3)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, check.dropped


def read_rgb_array(path: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 of an existing image file, turned upright by its EXIF orientation (as phones and
    image viewers show it); a file PIL cannot decode, one over PIL's decompression-bomb limit, or one whose
    pixel values dynamask cannot scale is a ValueError naming it."""
    try:
        with Image.open(path) as img:
            return _to_rgb_array(upright(img))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{path}: image refused as too large ({exc})") from exc
    except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: cannot read image ({exc})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: its EXIF orientation applied (``ImageOps.exif_transpose``). Phone
    photos are stored sideways with an orientation tag; boxes and masks refer to the upright image."""
    if img.getexif().get(0x0112, 1) in (None, 1):  # 0x0112: Orientation; 1 is upright (no copy made)
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8 from any PIL mode (alpha composited over black). Images of more than 8 bits are
    scaled by a fixed range, never by their own maximum (which would make a pixel's brightness depend on
    the others): 16-bit and 32-bit integer ones by 0..65535, 32-bit float ones by [0, 1]; values outside
    that range are refused, since no scale for them is right."""
    if img.mode.startswith("I;16"):
        a = np.floor(np.asarray(img, dtype=np.float64) / 65535.0 * 255.0)
    elif img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"a 32-bit integer image with values from {a.min():.0f} to {a.max():.0f}: only "
                             "0..65535 (16-bit data) is read; convert it to 8 or 16 bits")
        a = np.floor(a / 65535.0 * 255.0)
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.size and not np.isfinite(a).all():
            raise ValueError(f"a 32-bit float image with {int((~np.isfinite(a)).sum())} NaN or infinite values")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"a 32-bit float image with values from {a.min():.4g} to {a.max():.4g}: only [0, 1] "
                             "is read; scale it to [0, 1] or convert it to 8 or 16 bits")
        a = np.round(a * 255.0)
    else:
        a = None
    if a is not None:
        gray = a.astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        rgb = rgba[:, :, :3] * (rgba[:, :, 3:4] / 255.0)
        return np.round(rgb).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _xywh_to_xyxy(bbox: Any, where: str, height: int, width: int) -> list[float] | None:
    if bbox is None:
        return None
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bbox must hold numbers, got {bbox!r}") from exc
    if not all(np.isfinite([x, y, w, h])):
        raise ValueError(f"{where}: bbox has a non-finite value: {bbox!r}")
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return [x1, y1, x2, y2]


def _mask_box(mask: np.ndarray) -> list[float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
