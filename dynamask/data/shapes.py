"""Synthetic "shapes": a COCO-format instance-segmentation set where some masks need fine resolution.

"Easy" categories have smooth outlines that a 14x14 or 28x28 mask renders well (ellipse, rectangle,
triangle); "hard" ones have detail that only a 56x56 or 112x112 mask resolves (many-spiked star, gear with
a hole, thin ring, wavy blob). Objects range from small to large, over textured backgrounds with colour
noise; later objects occlude earlier ones and each annotation stores the *visible* mask as compressed RLE.

Everything is a function of ``(seed, split, image index)``, so a dataset is reproducible and the images of
one split do not depend on how many the other split holds.

Layout written by :func:`generate`::

    OUT/train/000001.png ...      OUT/annotations/train.json
    OUT/val/000001.png ...        OUT/annotations/val.json
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dynamask.data.masks import encode_mask

# (id, name, supercategory): the supercategory says whether fine mask resolution should matter.
CATEGORIES: list[tuple[int, str, str]] = [
    (1, "ellipse", "easy"),
    (2, "rectangle", "easy"),
    (3, "triangle", "easy"),
    (4, "star", "hard"),
    (5, "gear", "hard"),
    (6, "ring", "hard"),
    (7, "blob", "hard"),
]
SPLITS = {"train": 0, "val": 1}
MIN_RING_WIDTH = 2.5  # pixels


@dataclass
class Instance:
    category_id: int
    color: tuple[int, int, int]
    full_mask: np.ndarray  # [H, W] bool, the whole shape
    mask: np.ndarray  # [H, W] bool, what is visible after occlusion


def split_paths(root: str, split: str) -> tuple[str, str]:
    """``(image_dir, ann_file)`` of one split of a generated dataset."""
    return os.path.join(root, split), os.path.join(root, "annotations", f"{split}.json")


def _shape_polygons(rng: np.random.Generator, name: str, cx: float, cy: float, r: float) -> tuple[list, list]:
    """Outer polygons (filled) and hole polygons (cleared), as lists of (x, y) point lists."""
    theta0 = rng.uniform(0, 2 * np.pi)

    def ring_points(radii: np.ndarray, angles: np.ndarray) -> list[tuple[float, float]]:
        a = angles + theta0
        return list(zip((cx + radii * np.cos(a)).tolist(), (cy + radii * np.sin(a)).tolist()))

    def rotated(points: np.ndarray) -> list[tuple[float, float]]:
        c, s = np.cos(theta0), np.sin(theta0)
        x = points[:, 0] * c - points[:, 1] * s + cx
        y = points[:, 0] * s + points[:, 1] * c + cy
        return list(zip(x.tolist(), y.tolist()))

    if name == "ellipse":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        b = r * rng.uniform(0.5, 1.0)
        return [rotated(np.stack([r * np.cos(t), b * np.sin(t)], 1))], []
    if name == "rectangle":
        hw, hh = r, r * rng.uniform(0.45, 1.0)
        return [rotated(np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]]))], []
    if name == "triangle":
        angles = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        return [ring_points(np.full(3, r), angles)], []
    if name == "star":
        n = int(rng.integers(9, 17))
        angles = np.arange(2 * n) * np.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.35, 0.55))
        return [ring_points(radii, angles)], []
    if name == "gear":
        n = int(rng.integers(10, 19))
        depth = r * rng.uniform(0.15, 0.25)
        step = 2 * np.pi / n
        # per tooth: root, rise to the top, top, fall back to the root
        radii = np.tile(np.array([r - depth, r, r, r - depth]), n)
        angles = (np.arange(n)[:, None] * step + np.array([0.0, 0.1, 0.45, 0.55])[None] * step).reshape(-1)
        hole = r * rng.uniform(0.2, 0.35)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return [ring_points(radii, angles)], [ring_points(np.full_like(t, hole), t)]
    if name == "ring":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        # relative width, but never under 2.5 px: at 128-px images r * 0.1 is one pixel, a band that no
        # mask (and no annotation tool) can outline, which made every ring of a small image unlearnable
        width = max(r * rng.uniform(0.1, 0.2), MIN_RING_WIDTH)
        return [ring_points(np.full_like(t, r), t)], [ring_points(np.full_like(t, r - width), t)]
    if name == "blob":
        t = np.linspace(0, 2 * np.pi, 160, endpoint=False)
        k1, k2 = int(rng.integers(5, 9)), int(rng.integers(9, 15))
        radii = r * (
            0.78
            + rng.uniform(0.1, 0.16) * np.sin(k1 * t + rng.uniform(0, 2 * np.pi))
            + rng.uniform(0.05, 0.08) * np.sin(k2 * t + rng.uniform(0, 2 * np.pi))
        )
        return [ring_points(radii, t)], []
    raise ValueError(f"unknown shape {name!r}")


def _draw_mask(size: tuple[int, int], outers: list, holes: list) -> np.ndarray:
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in outers:
        draw.polygon(poly, fill=1)
    for poly in holes:
        draw.polygon(poly, fill=0)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 255]: a colour gradient plus low-frequency noise and faint stripes."""
    base = rng.uniform(40, 215, 3)
    tilt = rng.uniform(-50, 50, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx / w + np.sin(direction) * yy / h)[:, :, None]
    img = base[None, None] + tilt[None, None] * ramp
    cells = int(rng.integers(3, 9))
    low = rng.normal(0, 18, (cells, cells, 3)).astype(np.float32)
    noise = np.stack(
        [np.asarray(Image.fromarray(low[:, :, c]).resize((w, h), Image.Resampling.BICUBIC)) for c in range(3)], axis=2
    )
    img = img + noise
    if rng.random() < 0.5:  # faint stripes
        period = rng.uniform(6, 24)
        angle = rng.uniform(0, np.pi)
        stripes = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
        img = img + rng.uniform(4, 12) * stripes[:, :, None]
    return img.astype(np.float32)


def render_image(
    rng: np.random.Generator,
    size: int,
    *,
    max_objects: int = 6,
    noise_std: float = 6.0,
    min_visible: float = 0.35,
    radius_range: tuple[float, float] = (0.05, 0.3),
) -> tuple[np.ndarray, list[Instance]]:
    """One image ``[size, size, 3]`` uint8 and its instances, drawn back to front.

    Object radii are log-uniform in ``radius_range`` (fractions of the image side); larger values make
    objects large enough for a fine mask's detail to be visible (the accuracy study uses (0.1, 0.45)).

    An instance whose visible part is less than ``min_visible`` of its whole shape (or under 12 pixels) is
    dropped from the annotations, though its visible pixels stay in the image as clutter.
    """
    lo, hi = radius_range
    if not 0 < lo <= hi <= 0.5:
        raise ValueError(f"radius_range must satisfy 0 < low <= high <= 0.5, got {radius_range}")
    h = w = size
    img = _background(rng, h, w)
    instances: list[Instance] = []
    n = int(rng.integers(1, max_objects + 1))
    for _ in range(n):
        cat_id, name, _ = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        # radius log-uniform from small to large objects
        r = float(np.exp(rng.uniform(np.log(lo * size), np.log(hi * size))))
        if name == "ring":
            r = max(r, 0.08 * size)  # with MIN_RING_WIDTH, keeps the hole clearly open
        cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
        outers, holes = _shape_polygons(rng, name, cx, cy, r)
        full = _draw_mask((h, w), outers, holes)
        if full.sum() < 12:
            continue
        rgb = rng.integers(0, 256, 3)
        # keep the object distinguishable from the local background
        local = img[full].mean(0)
        if np.abs(rgb - local).max() < 60:
            rgb = (rgb + 128) % 256
        color = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
        img[full] = np.array(color, dtype=np.float32)
        for prev in instances:
            prev.mask &= ~full
        instances.append(Instance(cat_id, color, full, full.copy()))
    kept = [i for i in instances if i.mask.sum() >= max(12, min_visible * i.full_mask.sum())]
    if noise_std > 0:
        img = img + rng.normal(0, noise_std, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), kept


def _annotation(inst: Instance, ann_id: int, image_id: int) -> dict:
    ys, xs = np.nonzero(inst.mask)
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": inst.category_id,
        "segmentation": encode_mask(inst.mask),
        "area": int(inst.mask.sum()),
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "iscrowd": 0,
    }


def _write_image(job: tuple) -> list[dict]:
    """Render and save one image; its annotations without ids (one job of a worker pool)."""
    image_dir, split, i, size, seed, render_kwargs = job
    rng = np.random.default_rng([seed, SPLITS[split], i])
    pixels, instances = render_image(rng, size, **render_kwargs)
    Image.fromarray(pixels).save(os.path.join(image_dir, f"{i + 1:06d}.png"), compress_level=1)
    return [_annotation(inst, 0, i + 1) for inst in instances]


def generate_split(
    root: str, split: str, count: int, *, size: int = 256, seed: int = 0, workers: int = 0, **render_kwargs
) -> str:
    """Write ``count`` images of one split and its COCO JSON; returns the JSON's path.

    ``workers`` > 1 renders in that many processes (same output as one process).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if count < 0 or size < 32:
        raise ValueError(f"need count >= 0 and size >= 32, got count={count}, size={size}")
    image_dir, ann_file = split_paths(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    jobs = [(image_dir, split, i, size, seed, render_kwargs) for i in range(count)]
    if workers > 1 and count > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            per_image = pool.map(_write_image, jobs, chunksize=max(1, count // (4 * workers)))
    else:
        per_image = [_write_image(job) for job in jobs]
    images = [{"id": i + 1, "file_name": f"{i + 1:06d}.png", "height": size, "width": size} for i in range(count)]
    annotations: list[dict] = []
    for anns in per_image:
        for a in anns:
            annotations.append(dict(a, id=len(annotations) + 1))
    data = {
        "info": {"description": f"dynamask synthetic shapes, split {split}, seed {seed}", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in CATEGORIES],
    }
    tmp = ann_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, ann_file)
    return ann_file


def generate(
    root: str, *, train: int, val: int, size: int = 256, seed: int = 0, workers: int = 0, **render_kwargs
) -> dict[str, str]:
    """Write the train and val splits under ``root``; returns ``{split: ann_file}``."""
    return {
        split: generate_split(root, split, n, size=size, seed=seed, workers=workers, **render_kwargs)
        for split, n in (("train", train), ("val", val))
    }
