"""CocoDetection on a hand-written COCO file with the odd cases annotation tools produce; transforms."""

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from dynamask.data import CocoDetection, Compose, RandomHorizontalFlip, Resize, collate_fn
from dynamask.data.masks import encode_mask, encode_masks, polygons_to_mask

H, W = 40, 60


def _rle_uncompressed(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": [int(c) for c in counts], "size": [H, W]}


def _write(tmp_path, data, images):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for name, img in images.items():
        img.save(img_dir / name)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return str(img_dir), str(ann)


@pytest.fixture
def odd_coco(tmp_path):
    rgb = Image.fromarray(np.full((H, W, 3), 200, np.uint8))
    gray = Image.fromarray(np.full((H, W), 100, np.uint8), mode="L")
    rgba_arr = np.zeros((H, W, 4), np.uint8)
    rgba_arr[..., 0] = 255
    rgba_arr[..., 3] = 128
    rgba = Image.fromarray(rgba_arr, mode="RGBA")
    blob = np.zeros((H, W), np.uint8)
    blob[5:15, 20:35] = 1
    compressed = mask_utils.encode(np.asfortranarray(blob))
    crowd = np.zeros((H, W), np.uint8)
    crowd[20:30, 0:10] = 1
    data = {
        "images": [  # image ids start at 0
            {"id": 0, "file_name": "rgb.png", "height": H, "width": W},
            {"id": 1, "file_name": "gray.png", "height": H, "width": W},
            {"id": 2, "file_name": "rgba.png", "height": H, "width": W},
            {"id": 3, "file_name": "empty.png", "height": H, "width": W},
        ],
        "categories": [  # a background category at id 0, then non-contiguous ids
            {"id": 0, "name": "background"},
            {"id": 1, "name": "cat"},
            {"id": 5, "name": "dog"},
        ],
        "annotations": [
            # polygon, with area and iscrowd missing (annotation id 0)
            {"id": 0, "image_id": 0, "category_id": 5, "bbox": [10, 10, 10, 5],
             "segmentation": [[10, 10, 20, 10, 20, 15, 10, 15]]},
            # uncompressed RLE, crowd
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [0, 20, 10, 10], "iscrowd": 1, "area": 100,
             "segmentation": _rle_uncompressed(crowd)},
            # compressed RLE as a string
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 5, 15, 10], "iscrowd": 0, "area": 150,
             "segmentation": {"counts": compressed["counts"].decode(), "size": [H, W]}},
            # degenerate box: dropped
            {"id": 3, "image_id": 1, "category_id": 5, "bbox": [3, 3, 0, 4], "iscrowd": 0,
             "segmentation": [[3, 3, 3, 3, 3, 7]]},
            # an annotation of the background category: ignored
            {"id": 4, "image_id": 2, "category_id": 0, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5]]},
            # uncompressed RLE, not crowd
            {"id": 5, "image_id": 2, "category_id": 5, "bbox": [20, 5, 15, 10], "iscrowd": 0,
             "segmentation": _rle_uncompressed(blob)},
        ],
    }
    images = {"rgb.png": rgb, "gray.png": gray, "rgba.png": rgba, "empty.png": rgb}
    return _write(tmp_path, data, images) + (data, images, blob, crowd)


def test_labels_and_categories(odd_coco):
    img_dir, ann, *_ = odd_coco
    ds = CocoDetection(img_dir, ann)
    assert ds.cat_ids == [1, 5]
    assert ds.label_map == {1: (1, "cat"), 2: (5, "dog")}
    assert ds.num_classes == 3
    assert len(ds) == 4


def test_items(odd_coco):
    img_dir, ann, _, _, blob, crowd = odd_coco
    ds = CocoDetection(img_dir, ann)
    img, t = ds[0]
    assert img.shape == (3, H, W) and img.dtype == torch.float32
    assert torch.allclose(img, torch.full_like(img, 200 / 255))
    assert t["image_id"].item() == 0
    # the crowd region is excluded by default: only the polygon
    assert t["labels"].tolist() == [2] and t["iscrowd"].tolist() == [0]
    assert t["boxes"].tolist() == [[10.0, 10.0, 20.0, 15.0]] and t["boxes"].dtype == torch.float32
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (1, H, W)
    assert t["area"].item() == t["masks"][0].sum().item() > 0  # area filled in from the mask

    img, t = ds[1]  # grayscale -> 3 equal channels; the degenerate box is gone
    assert img.shape == (3, H, W) and torch.allclose(img, torch.full_like(img, 100 / 255))
    assert t["labels"].tolist() == [1]
    assert torch.equal(t["masks"][0], torch.from_numpy(blob))

    img, t = ds[2]  # RGBA composited over black; the background annotation ignored
    assert img.shape == (3, H, W)
    assert abs(img[0, 0, 0].item() - 128 / 255) < 1 / 255 and img[1].abs().max() == 0
    assert t["labels"].tolist() == [2]
    assert torch.equal(t["masks"][0], torch.from_numpy(blob))  # uncompressed RLE

    img, t = ds[3]  # empty image
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, H, W)


def test_crowd_kept_when_asked(odd_coco):
    img_dir, ann, _, _, _, crowd = odd_coco
    ds = CocoDetection(img_dir, ann, include_crowd=True)
    _, t = ds[0]
    assert sorted(t["iscrowd"].tolist()) == [0, 1]
    i = t["iscrowd"].tolist().index(1)
    assert torch.equal(t["masks"][i], torch.from_numpy(crowd))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"segmentation": [[1, 2, 3, 4, 5]]}, "odd number"),
        ({"category_id": 99}, "unknown category_id"),
        ({"bbox": [1, 2, 3]}, "bbox"),
        ({"segmentation": {"counts": [5, 5], "size": [H, W]}}, "counts sum"),
        ({"segmentation": {"counts": "abc", "size": [H + 1, W]}}, "RLE size"),
    ],
)
def test_broken_annotation_names_file_and_annotation(odd_coco, bad, message):
    img_dir, ann, data, *_ = odd_coco
    data = json.loads(json.dumps(data))
    data["annotations"][0].update(bad)
    data["annotations"][0]["id"] = 1234
    with open(ann, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=message) as info:  # found when the file opens, before any work
        CocoDetection(img_dir, ann)
    assert "annotation 1234" in str(info.value) and "ann.json" in str(info.value)


def test_missing_image_and_size_mismatch(odd_coco):
    img_dir, ann, data, *_ = odd_coco
    os.rename(os.path.join(img_dir, "gray.png"), os.path.join(img_dir, "gray.keep"))
    with pytest.raises(ValueError, match="image 1 refers to a missing file .*gray.png"):  # when it opens
        CocoDetection(img_dir, ann)
    os.rename(os.path.join(img_dir, "gray.keep"), os.path.join(img_dir, "gray.png"))
    data["images"][3]["height"] = H + 3  # the image without annotations: its RLE sizes would differ too
    with open(ann, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match="empty.png"):
        CocoDetection(img_dir, ann)[3]


def test_unreadable_annotation_file(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="a.json"):
        CocoDetection(str(tmp_path), str(tmp_path / "a.json"))


def test_polygon_mask_rle_round_trip():
    # a 10x5 rectangle: COCO polygons are on pixel corners, so it covers exactly 50 pixels
    poly = [[10, 10, 20, 10, 20, 15, 10, 15]]
    mask = polygons_to_mask(poly, H, W)
    expected = np.zeros((H, W), np.uint8)
    expected[10:15, 10:20] = 1
    assert np.array_equal(mask, expected)
    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str)
    back = mask_utils.decode({"counts": rle["counts"].encode(), "size": rle["size"]})
    assert np.array_equal(back, mask)
    assert mask_utils.area({"counts": rle["counts"].encode(), "size": rle["size"]}) == 50
    # a triangle: the mask's area is close to the polygon's
    tri = polygons_to_mask([[0, 0, 30, 0, 0, 30]], H, W)
    assert abs(int(tri.sum()) - 450) < 40


def test_encode_masks_is_encode_mask_of_each():
    rng = np.random.default_rng(0)
    stack = rng.random((3, H, W)) < 0.3
    stack[1] = False  # an empty mask
    rles = encode_masks(torch.from_numpy(stack))
    assert rles == [encode_mask(m) for m in stack] == encode_masks(stack.astype(np.uint8))
    for rle, m in zip(rles, stack):
        assert rle["size"] == [H, W] and isinstance(rle["counts"], str)
        assert np.array_equal(mask_utils.decode({"counts": rle["counts"].encode(), "size": rle["size"]}), m)
    assert encode_masks(np.zeros((0, H, W), bool)) == []
    with pytest.raises(ValueError, match=r"masks must be \[N, H, W\], got shape \(40, 60\)"):
        encode_masks(stack[0])


def _target():
    masks = torch.zeros((1, 20, 40), dtype=torch.uint8)
    masks[0, 2:6, 4:10] = 1
    return {
        "boxes": torch.tensor([[4.0, 2.0, 10.0, 6.0]]),
        "labels": torch.tensor([1]),
        "masks": masks,
        "area": torch.tensor([24.0]),
        "iscrowd": torch.tensor([0]),
        "image_id": torch.tensor(7),
    }


def test_flip():
    img = torch.rand(3, 20, 40)
    out, t = RandomHorizontalFlip(1.0)(img, _target())
    assert torch.equal(out, img.flip(-1))
    assert t["boxes"].tolist() == [[30.0, 2.0, 36.0, 6.0]]
    ys, xs = torch.nonzero(t["masks"][0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1) == (30, 36)
    back, t2 = RandomHorizontalFlip(1.0)(out, t)
    assert torch.equal(back, img) and torch.equal(t2["masks"], _target()["masks"])
    same, t3 = RandomHorizontalFlip(0.0)(img, _target())
    assert same is img


def test_resize():
    img = torch.rand(3, 20, 40)
    out, t = Resize(40, max_size=1000)(img, _target())
    assert out.shape == (3, 40, 80)
    assert t["boxes"].tolist() == [[8.0, 4.0, 20.0, 12.0]]
    assert t["masks"].shape == (1, 40, 80) and t["masks"].dtype == torch.uint8
    assert t["masks"][0].sum().item() == 96 and t["area"].item() == 96
    out, _ = Resize(40, max_size=60)(img, _target())  # the longer side is capped
    assert out.shape == (3, 30, 60)
    torch.manual_seed(1)
    sizes = {Compose([Resize((10, 30))])(img, _target())[0].shape[1] for _ in range(30)}
    assert len(sizes) > 3 and min(sizes) >= 10 and max(sizes) <= 30
    with pytest.raises(ValueError):
        Resize((30, 10))


def test_collate(odd_coco):
    img_dir, ann, *_ = odd_coco
    ds = CocoDetection(img_dir, ann, transforms=Compose([Resize(20), RandomHorizontalFlip(0.5)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert len(images) == 3 and len(targets) == 3
    assert images[0].shape == (3, 20, 30) and targets[1]["masks"].shape[1:] == (20, 30)
