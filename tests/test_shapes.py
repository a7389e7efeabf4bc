"""The synthetic shapes generator: deterministic, valid COCO, masks that match the drawn pixels."""

import filecmp
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from dynamask.data import CocoDetection
from dynamask.data.coco import _quiet_coco
from dynamask.data.shapes import CATEGORIES, generate, render_image, split_paths


def test_deterministic_by_seed(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate(a, train=4, val=2, size=64, seed=3)
    generate(b, train=4, val=2, size=64, seed=3, workers=2)
    generate(c, train=4, val=2, size=64, seed=4, workers=2)  # (a worker pool writes the same as one process)
    for split in ("train", "val"):
        (da, ja), (db, jb), (dc, jc) = (split_paths(r, split) for r in (a, b, c))
        assert filecmp.cmp(ja, jb, shallow=False)
        names = sorted(os.listdir(da))
        assert names == sorted(os.listdir(db))
        match, mismatch, errors = filecmp.cmpfiles(da, db, names, shallow=False)
        assert not mismatch and not errors
        assert not filecmp.cmp(ja, jc, shallow=False)
    # a split's images do not depend on how many the other split holds
    generate(c, train=2, val=1, size=64, seed=3)
    assert filecmp.cmp(os.path.join(a, "train", "000002.png"), os.path.join(c, "train", "000002.png"), shallow=False)


def test_valid_coco_with_all_categories(tmp_path):
    root = str(tmp_path)
    generate(root, train=40, val=0, size=96, seed=0)
    img_dir, ann = split_paths(root, "train")
    coco = _quiet_coco(ann)
    assert len(coco.imgs) == 40 and len(coco.anns) > 60
    used = {a["category_id"] for a in coco.anns.values()}
    assert used == {c[0] for c in CATEGORIES}
    assert {c["supercategory"] for c in coco.cats.values()} == {"easy", "hard"}
    areas = np.array([a["area"] for a in coco.anns.values()])
    assert areas.min() < 32**2 / 4 and areas.max() > 30**2  # small to large (relative to a 96 px image)
    ds = CocoDetection(img_dir, ann)
    assert ds.num_classes == len(CATEGORIES) + 1
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 96, 96)
        for box, mask, area in zip(t["boxes"], t["masks"], t["area"]):
            ys, xs = np.nonzero(mask.numpy())
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert area.item() == mask.sum().item()
        # visible masks of one image do not overlap (occlusion is subtracted)
        assert t["masks"].sum(0).max().item() <= 1


def test_masks_match_drawn_pixels():
    rng = np.random.default_rng(5)
    for _ in range(10):
        pixels, instances = render_image(rng, 128, noise_std=0.0)
        for inst in instances:
            assert (pixels[inst.mask] == np.array(inst.color, np.uint8)).all()
            assert not (inst.mask & ~inst.full_mask).any()


def test_files_match_drawn_pixels(tmp_path):
    root = str(tmp_path)
    generate(root, train=6, val=0, size=128, seed=1)
    img_dir, ann = split_paths(root, "train")
    coco = _quiet_coco(ann)
    n = 0
    for a in coco.anns.values():
        info = coco.imgs[a["image_id"]]
        pixels = np.asarray(Image.open(os.path.join(img_dir, info["file_name"]))).astype(np.float32)
        mask = mask_utils.decode({"counts": a["segmentation"]["counts"].encode(), "size": a["segmentation"]["size"]})
        inside = pixels[mask.astype(bool)]
        # one flat colour plus the colour noise (std 6) inside every mask
        assert inside.std(0).max() < 10
        # and a visibly different colour along the outside of the mask
        ring = _dilate(mask) & ~mask.astype(bool)
        outside = pixels[ring].mean(0)
        assert np.abs(outside - inside.mean(0)).max() > 15
        n += 1
    assert n > 5


def _dilate(mask: np.ndarray, r: int = 2) -> np.ndarray:
    out = mask.astype(bool).copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask.astype(bool), dy, 0), dx, 1)
    return out


def test_cli_shapes(tmp_path, capsys):
    from dynamask.cli import main

    assert main(["shapes", "--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "64", "--seed", "1"]) == 0
    assert len(_quiet_coco(split_paths(str(tmp_path), "val")[1]).imgs) == 1
    assert sorted(os.listdir(tmp_path / "train")) == ["000001.png", "000002.png"]
    with pytest.raises(SystemExit):
        main(["shapes", "--out", str(tmp_path), "--size", "8"])
    assert "--size >= 32" in capsys.readouterr().err


def test_rings_stay_wide_enough_on_small_images():
    # a ring of the smallest radius a 128-px image draws (0.08 * 128) keeps a band of MIN_RING_WIDTH px:
    # its area is that of the annulus, not of the one-pixel outline that r * 0.1 alone would give
    from dynamask.data.shapes import MIN_RING_WIDTH, _draw_mask, _shape_polygons

    r = 0.08 * 128
    annulus = np.pi * (r ** 2 - (r - MIN_RING_WIDTH) ** 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        outers, holes = _shape_polygons(rng, "ring", 32.0, 32.0, r)
        area = _draw_mask((64, 64), outers, holes).sum()
        assert 0.8 * annulus <= area <= 1.5 * annulus, area  # a band, with its hole open


def test_radius_range_sets_object_size():
    # one object per image, so nothing is occluded: with radii of 0.4–0.45 of a 128-px side every shape's
    # box spans at least half its radius (a ring or gear at least r, an ellipse at least its minor axis r,
    # clipped by at most 0.4 r at the image border); the default range draws many smaller ones
    lo = 0.4 * 128
    for seed in range(12):
        _, inst = render_image(np.random.default_rng(seed), 128, max_objects=1, radius_range=(0.4, 0.45))
        for i in inst:
            ys, xs = np.nonzero(i.mask)
            assert max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 >= 0.5 * lo
    small = [max(np.ptp(np.nonzero(i.mask)[0]), np.ptp(np.nonzero(i.mask)[1])) + 1
             for seed in range(12) for i in render_image(np.random.default_rng(seed), 128, max_objects=1)[1]]
    assert min(small) < 0.5 * lo
    with pytest.raises(ValueError, match="radius_range"):
        render_image(np.random.default_rng(0), 128, radius_range=(0.3, 0.6))
