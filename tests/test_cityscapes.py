"""Cityscapes: a tiny gtFine/leftImg8bit tree written here, converted to COCO and checked against
hand-computed classes, crowd flags, clipped polygons, counts and areas; the official evaluation; one
training step and one evaluation through the command line."""

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

pytest.importorskip("cityscapesscripts", reason="Cityscapes needs the optional package cityscapesscripts")

from dynamask.data import CocoDetection  # noqa: E402
from dynamask.data.cityscapes import clip_polygon, convert_cityscapes, polygon_area  # noqa: E402
from dynamask.engine.evaluate import evaluate_results  # noqa: E402

H, W = 48, 64
THING_IDS = {"person": 24, "rider": 25, "car": 26, "truck": 27, "bus": 28, "train": 31, "motorcycle": 32,
             "bicycle": 33}


def _rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


# frame -> objects, in drawing order (later ones cover earlier ones)
FRAMES = {
    "aachen/aachen_000000_000019": [
        {"label": "road", "polygon": _rect(0, 30, 63, 47)},                  # stuff: dropped
        {"label": "car", "polygon": _rect(4, 4, 23, 13)},                    # inside
        {"label": "person", "polygon": _rect(50, 10, 70, 30)},               # crosses the right border
        {"label": "cargroup", "polygon": [[0, 20], [20, 20], [0, 40]]},       # crowd
        {"label": "caravan", "polygon": _rect(30, 30, 40, 40)},              # has instances, not evaluated: dropped
        {"label": "license plate", "polygon": [[10, 10], [12, 10], [12, 11]]},  # id -1: dropped
        {"label": "car", "polygon": _rect(40, 0, 45, 5), "deleted": 1},      # deleted
        {"label": "bicycle", "polygon": _rect(-5, -5, 10, 3)},               # crosses the top-left corner
        {"label": "car", "polygon": [[70, 70], [80, 70], [80, 80]]},         # outside the image: dropped
        {"label": "rider", "polygon": _rect(15, 8, 30, 20)},                 # covers part of the first car
    ],
    "bochum/bochum_000000_000313": [
        {"label": "truck", "polygon": _rect(2, 2, 31, 21)},
        {"label": "bus", "polygon": _rect(33, 2, 62, 21)},
        {"label": "train", "polygon": _rect(2, 25, 31, 45)},
        {"label": "motorcycle", "polygon": _rect(40, 25, 60, 45)},
        {"label": "sky", "polygon": _rect(0, 0, 63, 3)},                     # stuff over the truck and bus
    ],
    "bochum/bochum_000000_000600": [],                                         # no objects
}

# Polygon mode: vertices + 0.5, clipped to [0, 64] x [0, 48]; areas are pixel counts of the polygons as
# pycocotools rasterises them (what evaluation compares against): a rectangle's whole pixels, the pixels whose
# centres a triangle covers, the border column and row pycocotools rounds in for the person and the bicycle.
EXPECTED = [  # (image, label, iscrowd, bbox, area)
    (1, "car", 0, [4.5, 4.5, 19, 9], 19 * 9),
    (1, "person", 0, [50.5, 10.5, 13.5, 20], 13 * 20),
    (1, "car", 1, [0.5, 20.5, 20, 20], 190),
    (1, "bicycle", 0, [0, 0, 10.5, 3.5], 11 * 4),
    (1, "rider", 0, [15.5, 8.5, 15, 12], 15 * 12),
    (2, "truck", 0, [2.5, 2.5, 29, 19], 29 * 19),
    (2, "bus", 0, [33.5, 2.5, 29, 19], 29 * 19),
    (2, "train", 0, [2.5, 25.5, 29, 20], 29 * 20),
    (2, "motorcycle", 0, [40.5, 25.5, 20, 20], 20 * 20),
]


def _write_tree(root, frames=FRAMES, split="val"):
    rng = np.random.default_rng(0)
    for frame, objects in frames.items():
        city, stem = frame.split("/")
        gt_dir = os.path.join(root, "gtFine", split, city)
        img_dir = os.path.join(root, "leftImg8bit", split, city)
        os.makedirs(gt_dir, exist_ok=True)
        os.makedirs(img_dir, exist_ok=True)
        with open(os.path.join(gt_dir, f"{stem}_gtFine_polygons.json"), "w") as f:
            json.dump({"imgHeight": H, "imgWidth": W, "objects": objects}, f)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            os.path.join(img_dir, f"{stem}_leftImg8bit.png"))
    return str(root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = _write_tree(tmp_path_factory.mktemp("cityscapes"))
    # the official evaluation's ground truth, drawn by cityscapesscripts itself from the same polygons and
    # saved as Cityscapes ships it, a 16-bit PNG (its json2instanceImg's own 32-bit save fails on Pillow >= 12)
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage

    for frame in FRAMES:
        base = os.path.join(root, "gtFine", "val", frame)
        annotation = Annotation()
        annotation.fromJsonFile(base + "_gtFine_polygons.json")
        ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.uint16)
        Image.fromarray(ids).save(base + "_gtFine_instanceIds.png")
    return root


@pytest.fixture(scope="module")
def converted(tree):
    out = os.path.join(tree, "instances_val.json")
    convert_cityscapes(tree, "val", out)
    return out


def test_classes_crowd_clipping_counts_and_areas(converted):
    coco = COCO(converted)  # pycocotools loads it
    assert {c["name"]: c["id"] for c in coco.dataset["categories"]} == THING_IDS
    assert [(i["id"], i["file_name"], i["height"], i["width"]) for i in coco.dataset["images"]] == [
        (1, "aachen/aachen_000000_000019_leftImg8bit.png", H, W),
        (2, "bochum/bochum_000000_000313_leftImg8bit.png", H, W),
        (3, "bochum/bochum_000000_000600_leftImg8bit.png", H, W),
    ]
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    anns = coco.dataset["annotations"]
    got = [(a["image_id"], names[a["category_id"]], a["iscrowd"], a["bbox"], a["area"]) for a in anns]
    assert len(got) == len(EXPECTED)
    for g, e in zip(got, EXPECTED):
        assert g[:3] == e[:3]
        assert g[3] == pytest.approx(e[3]) and g[4] == pytest.approx(e[4]), (g, e)
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    # polygons stay polygons, every vertex inside the image
    for a in anns:
        assert isinstance(a["segmentation"], list) and len(a["segmentation"]) == 1
        xs, ys = a["segmentation"][0][0::2], a["segmentation"][0][1::2]
        assert min(xs) >= 0 and max(xs) <= W and min(ys) >= 0 and max(ys) <= H
        assert coco.annToMask(a).sum() == a["area"] > 0
    # the person is cut at x = 64
    person = anns[1]["segmentation"][0]
    assert sorted(set(person[0::2])) == [50.5, 64.0]


def test_loads_as_a_dataset(tree, converted):
    ds = CocoDetection(os.path.join(tree, "leftImg8bit", "val"), converted, include_crowd=True)
    assert ds.num_classes == 9 and len(ds) == 3
    image, target = ds[0]
    assert image.shape == (3, H, W)
    assert target["iscrowd"].tolist() == [0, 0, 1, 0, 0]
    assert [ds.cat_ids[label - 1] for label in target["labels"].tolist()] == [26, 24, 26, 33, 25]
    labels = CocoDetection(os.path.join(tree, "leftImg8bit", "val"), converted)[0][1]["labels"]
    assert len(labels) == 4  # crowd left out
    assert ds[2][1]["boxes"].shape == (0, 4)


def test_visible_regions_match_the_official_instance_images(tree):
    coco = convert_cityscapes(tree, "val", None, visible=True)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns = coco["annotations"]
    assert [(a["image_id"], names[a["category_id"]], a["iscrowd"]) for a in anns] == [e[:3] for e in EXPECTED]
    # PIL fills the pixels a polygon's vertices enclose, borders included: the car's 20 x 10 pixels less the
    # 9 x 6 under the rider drawn after it; the rider's 16 x 13; the bicycle's 11 x 4 inside the image
    areas = {(a["image_id"], names[a["category_id"]], a["iscrowd"]): a["area"] for a in anns}
    assert areas[1, "car", 0] == 20 * 10 - 9 * 6
    assert areas[1, "rider", 0] == 16 * 13
    assert areas[1, "bicycle", 0] == 11 * 4
    assert areas[2, "truck", 0] == 30 * 20 - 30 * 2  # the sky (rows 0 to 3) is drawn over its rows 2 and 3
    # every region equals its pixels in cityscapesscripts' instanceIds image
    files = {i["id"]: i["file_name"] for i in coco["images"]}
    seen = {}
    for a in anns:
        stem = os.path.basename(files[a["image_id"]])[: -len("_leftImg8bit.png")]
        ids = np.asarray(Image.open(os.path.join(tree, "gtFine", "val", stem.split("_")[0],
                                                 stem + "_gtFine_instanceIds.png")))
        key = (a["image_id"], a["category_id"])
        value = a["category_id"] if a["iscrowd"] else a["category_id"] * 1000 + seen.get(key, 0)
        if not a["iscrowd"]:
            seen[key] = seen.get(key, 0) + 1
        np.testing.assert_array_equal(mask_utils.decode(a["segmentation"]), (ids == value).astype(np.uint8))


def test_ground_truth_fed_back_scores_one(tree, converted):
    coco = COCO(converted)
    results = []
    for a in coco.dataset["annotations"]:
        if a["iscrowd"]:
            continue
        rle = mask_utils.encode(np.asfortranarray(coco.annToMask(a)))
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                        "score": 1.0, "segmentation": {"counts": rle["counts"].decode(), "size": [H, W]}})
    m = evaluate_results(coco, results, boundary=False)
    assert m["segm"]["AP"] == pytest.approx(1.0) and m["bbox"]["AP"] == pytest.approx(1.0)
    assert evaluate_results(coco, results[::2], boundary=False)["segm"]["AP"] < 0.9


def test_official_evaluation(tree, converted):
    from dynamask.engine.cityscapes_eval import cityscapes_instance_metrics

    coco = COCO(converted)
    visible = convert_cityscapes(tree, "val", None, visible=True)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in visible["annotations"] if not a["iscrowd"]]
    cwd = os.getcwd()
    m = cityscapes_instance_metrics(coco, results, os.path.join(tree, "gtFine", "val"))
    assert os.getcwd() == cwd and not os.path.exists(os.path.join(cwd, "matches.json"))
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert set(m["classes"]) == set(THING_IDS)
    assert m["classes"]["bicycle"]["AP"] == -1.0  # its 44 pixels are under the 100-pixel minimum: no instance
    # a missed car and a shifted truck lower it
    worse = [r for r in results if r["category_id"] != 26]
    truck = next(r for r in worse if r["category_id"] == 27)
    shifted = np.roll(mask_utils.decode(truck["segmentation"]), 12, axis=1)
    enc = mask_utils.encode(np.asfortranarray(shifted))
    truck["segmentation"] = {"counts": enc["counts"].decode(), "size": [H, W]}
    m2 = cityscapes_instance_metrics(coco, worse, os.path.join(tree, "gtFine", "val"))
    assert m2["classes"]["car"]["AP"] == 0.0 and m2["classes"]["truck"]["AP"] < 0.5 and m2["AP"] < 0.8


def test_errors_name_the_file_and_the_polygon(tmp_path):
    bad = {"x/x_000000_000001": [{"label": "car", "polygon": _rect(1, 1, 9, 9)},
                                 {"label": "person", "polygon": [[1, 2], [3, "a"], [5, 6]]}]}
    root = _write_tree(tmp_path / "a", bad)
    with pytest.raises(
        ValueError, match=r"x_000000_000001_gtFine_polygons\.json: object 1 \('person'\): polygon point 1"
    ):
        convert_cityscapes(root, "val")
    root = _write_tree(tmp_path / "b", {"x/x_000000_000001": [{"label": "spaceship", "polygon": _rect(1, 1, 9, 9)}]})
    with pytest.raises(ValueError, match=r"object 0 \('spaceship'\): label 'spaceship' is not in"):
        convert_cityscapes(root, "val")
    root = _write_tree(tmp_path / "c", {"x/x_000000_000001": [{"label": "car", "polygon": [[1, 1], [5, 5]]}]})
    with pytest.raises(ValueError, match=r"object 0 \('car'\): polygon has 2 points"):
        convert_cityscapes(root, "val")
    root = _write_tree(tmp_path / "d", {"x/x_000000_000001": []})
    os.remove(os.path.join(root, "leftImg8bit", "val", "x", "x_000000_000001_leftImg8bit.png"))
    with pytest.raises(FileNotFoundError, match="x_000000_000001_leftImg8bit.png is missing"):
        convert_cityscapes(root, "val")
    with pytest.raises(FileNotFoundError, match="gtFine"):
        convert_cityscapes(str(tmp_path / "nowhere"), "val")


def test_clip_polygon():
    # a concave "U" crossing the right border stays one polygon with the clipped area
    u = [(0, 0), (12, 0), (12, 10), (8, 10), (8, 4), (4, 4), (4, 10), (0, 10)]
    assert polygon_area(clip_polygon(u, 10, 10)) == pytest.approx(10 * 4 + 4 * 6 + 2 * 6)
    assert polygon_area(clip_polygon(u, 100, 100)) == pytest.approx(12 * 10 - 4 * 6)
    assert clip_polygon([(20, 20), (30, 20), (30, 30)], 10, 10) == []
    assert polygon_area(clip_polygon([(-10, 5), (5, -10), (20, 5), (5, 20)], 10, 10)) == pytest.approx(100)


def test_cli_convert_train_and_eval(tree, tmp_path, capsys):
    from dynamask.cli import main

    ann = str(tmp_path / "cs_val.json")
    assert main(["convert", "cityscapes", tree, "--split", "val", "--out", ann]) == 0
    out = capsys.readouterr().out
    images = os.path.join(tree, "leftImg8bit", "val")
    assert (
        "3 images, 8 instances and 1 crowd regions of 8 classes" in out
        and f"image root (--images / --train-images): {images}" in out
    )
    kwargs = json.dumps(dict(depth=18, min_size=48, max_size=64, fpn_channels=32, box_representation_size=64,
                             mask_head_layers=[32, 32]))
    run = str(tmp_path / "run")
    assert main(["train", "--train-images", images, "--train-ann", ann, "--out", run, "--arch", "maskrcnn_resnet_fpn",
                 "--arch-kwargs", kwargs, "--epochs", "1", "--max-iters", "1", "--batch-size", "1", "--workers", "0",
                 "--no-progress", "--lr", "0.001"]) == 0
    assert "iteration 1" in capsys.readouterr().out
    ev = tmp_path / "ev"
    assert main(["eval", os.path.join(run, "last.pth"), "--images", images, "--ann", ann, "--out", str(ev),
                 "--no-progress", "--no-boundary", "--cityscapes-gt", os.path.join(tree, "gtFine", "val")]) == 0
    metrics = json.load(open(ev / "metrics.json"))
    assert {"bbox", "segm", "cityscapes"} <= set(metrics) and set(metrics["cityscapes"]["classes"]) == set(THING_IDS)
    assert "Cityscapes official instance evaluation: AP" in capsys.readouterr().out
