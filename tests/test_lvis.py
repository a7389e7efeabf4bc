"""LVIS: a tiny LVIS v1-style file (1,203 categories with r/c/f frequencies, images named by coco_url,
negative and not-exhaustive category lists) written here; loading, repeat factors and their sampler,
LVISEval's federated rules, and one training step and one evaluation through the command line."""

import json
import math
import os
import sys
from collections import Counter

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from dynamask.data import CocoDetection
from dynamask.data.lvis import LvisDetection, RepeatFactorSampler, lvis_image_path, open_dataset, repeat_factors

H, W = 48, 64
NUM_CATS = 1203
# category 1 is frequent, 2 common, 3 rare; the rest cycle through f, c, r
FREQ = {c: "fcr"[(c - 1) % 3] for c in range(1, NUM_CATS + 1)}


def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


# image id -> (split folder, annotations as (category, x0, y0, x1, y1)), neg_category_ids, not_exhaustive
IMAGES = {
    1: ("val2017", [(1, 4, 4, 24, 20), (2, 30, 10, 60, 40)], [4], []),
    2: ("train2017", [(1, 10, 10, 40, 40), (3, 42, 4, 62, 24)], [2], [1]),  # LVIS val uses train2017 images too
    3: ("val2017", [(1, 20, 20, 50, 44)], [], []),
}


def _lvis_dict():
    images, anns = [], []
    for image_id, (split, objects, neg, not_exhaustive) in IMAGES.items():
        images.append({"id": image_id, "height": H, "width": W, "neg_category_ids": neg,
                       "not_exhaustive_category_ids": not_exhaustive,
                       "coco_url": f"http://images.cocodataset.org/{split}/{image_id:012d}.jpg"})
        for cat, x0, y0, x1, y1 in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "segmentation": _rect(x0, y0, x1, y1), "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": float((x1 - x0) * (y1 - y0))})
    cats = [{"id": c, "name": f"thing_{c}", "synset": f"thing_{c}.n.01", "frequency": FREQ[c],
             "image_count": 1, "instance_count": 1} for c in range(1, NUM_CATS + 1)]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def _write(root, data):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(1)
    for image_id, (split, *_rest) in IMAGES.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            os.path.join(root, split, f"{image_id:012d}.jpg"))
    ann = os.path.join(root, "lvis_v1_tiny.json")
    with open(ann, "w") as f:
        json.dump(data, f)
    return str(root), ann


@pytest.fixture(scope="module")
def lvis_files(tmp_path_factory):
    return _write(str(tmp_path_factory.mktemp("lvis")), _lvis_dict())


def test_loads_lvis_files(lvis_files):
    root, ann = lvis_files
    ds = open_dataset(root, ann)
    assert isinstance(ds, LvisDetection) and len(ds) == 3
    assert ds.num_classes == NUM_CATS + 1 and ds.label_map[1203] == (1203, "thing_1203")
    assert [ds.image_path(i) for i in range(3)] == [
        os.path.join(root, "val2017", "000000000001.jpg"),
        os.path.join(root, "train2017", "000000000002.jpg"),
        os.path.join(root, "val2017", "000000000003.jpg"),
    ]
    assert ds.frequencies[1] == "f" and ds.frequencies[2] == "c" and ds.frequencies[3] == "r"
    assert Counter(ds.frequencies.values()) == {"f": 401, "c": 401, "r": 401}
    assert ds.neg_category_ids == {1: {4}, 2: {2}, 3: set()}
    assert ds.not_exhaustive_category_ids == {1: set(), 2: {1}, 3: set()}
    image, target = ds[1]
    assert image.shape == (3, H, W)
    assert target["labels"].tolist() == [1, 3] and target["iscrowd"].tolist() == [0, 0]
    assert target["boxes"].tolist() == [[10, 10, 40, 40], [42, 4, 62, 24]]
    assert target["masks"].sum(dim=(1, 2)).tolist() == [30 * 30, 20 * 20]
    # a COCO file stays a CocoDetection
    coco = _lvis_dict()
    for i in coco["images"]:  # the same image files, named relative to the root as COCO names them
        i["file_name"] = os.path.relpath(lvis_image_path(root, i["coco_url"]), root)
        del i["neg_category_ids"], i["not_exhaustive_category_ids"]
    for c in coco["categories"]:
        del c["frequency"]
    with open(os.path.join(root, "coco.json"), "w") as f:
        json.dump(coco, f)
    assert type(open_dataset(root, os.path.join(root, "coco.json"))) is CocoDetection


def test_image_folder_without_split_and_errors(lvis_files, tmp_path):
    root, _ = lvis_files
    url = "http://images.cocodataset.org/val2017/000000000001.jpg"
    assert lvis_image_path(root, url) == os.path.join(root, "val2017", "000000000001.jpg")
    flat = os.path.join(root, "val2017")  # IMAGES pointing at the split folder itself
    assert lvis_image_path(flat, url) == os.path.join(flat, "000000000001.jpg")
    missing = "http://images.cocodataset.org/val2017/000000000009.jpg"  # named where the layout says
    assert lvis_image_path(root, missing) == os.path.join(root, "val2017", "000000000009.jpg")
    bad = _lvis_dict()
    bad["images"][1]["neg_category_ids"] = [2, 5000]
    _, ann = _write(str(tmp_path / "a"), bad)
    with pytest.raises(ValueError, match=r"image 2: neg_category_ids must list category ids of the file, got \[5000\]"):
        open_dataset(root, ann)
    bad = _lvis_dict()
    del bad["images"][0]["coco_url"]
    _, ann = _write(str(tmp_path / "b"), bad)
    with pytest.raises(ValueError, match=r"image 1 has no 'file_name' \(nor a 'coco_url'"):
        open_dataset(root, ann)
    bad = _lvis_dict()
    bad["categories"][0]["frequency"] = "x"
    _, ann = _write(str(tmp_path / "c"), bad)
    with pytest.raises(ValueError, match="category 1 has frequency 'x'"):
        open_dataset(root, ann)


def test_repeat_factors(lvis_files):
    ds = open_dataset(*lvis_files)
    # category 1 is in 3 of 3 images (f = 1), categories 2 and 3 in 1 of 3 (f = 1/3)
    assert repeat_factors(ds) == [1.0, 1.0, 1.0]  # threshold 0.001: nothing is rare enough here
    t = 3.0
    r1, r23 = math.sqrt(t / 1), math.sqrt(t / (1 / 3))  # 1.73, 3
    assert repeat_factors(ds, t) == pytest.approx([max(r1, r23), max(r1, r23), r1])
    assert repeat_factors(ds, 0.5) == pytest.approx([math.sqrt(1.5), math.sqrt(1.5), 1.0])


def test_repeat_factor_sampler():
    factors = [3.0, 1.0, 2.5, 1.2]  # sum 7.7: 8 samples an epoch, each factor scaled by 8 / 7.7
    scaled = [f * 8 / 7.7 for f in factors]
    s = RepeatFactorSampler(factors, seed=5)
    assert s.epoch_size == 8 and len(s) == 8
    totals = Counter()
    epochs = 400
    for epoch in range(epochs):
        s.set_epoch(epoch)
        ids = list(s)
        assert len(ids) == 8 and len(set(ids)) == 8  # each copy its own sample id
        counts = Counter(i % 4 for i in ids)
        for i, f in enumerate(scaled):
            assert counts[i] in (math.floor(f), math.ceil(f)), (epoch, counts)
        assert all(i // 4 < counts[i % 4] for i in ids)  # copy k of image i is i + 4k
        totals.update(counts)
    for i, f in enumerate(scaled):
        assert totals[i] / epochs == pytest.approx(f, rel=0.05)
    # a function of (seed, epoch)
    s.set_epoch(3)
    again = RepeatFactorSampler(factors, seed=5)
    again.set_epoch(3)
    assert list(s) == list(again)
    s.set_epoch(4)
    assert list(s) != list(again)
    # two processes share the epoch out (padded to 8), and `start` resumes part-way
    parts = [RepeatFactorSampler(factors, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for p in parts:
        p.set_epoch(3)
    both = [list(p) for p in parts]
    assert len(both[0]) == len(both[1]) == 4
    assert sorted(both[0] + both[1]) == sorted(again)
    parts[0].start = 3
    assert list(parts[0]) == both[0][3:] and len(parts[0]) == 1
    three = [RepeatFactorSampler(factors, num_replicas=3, rank=r, seed=5) for r in range(3)]
    for p in three:
        p.set_epoch(3)
    assert sorted(i for p in three for i in p) == sorted(list(again) + list(again)[:1])  # padded to 9
    with pytest.raises(ValueError):
        RepeatFactorSampler([0.5])


def _gt_results(data, score=1.0):
    out = []
    for a in data["annotations"]:
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], H, W))
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score,
                    "segmentation": {"counts": rle["counts"].decode(), "size": [H, W]}, "mask_resolution": 28})
    return out


def _det(image_id, cat, box, score):
    x0, y0, x1, y1 = box
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"image_id": image_id, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score,
            "segmentation": {"counts": rle["counts"].decode(), "size": [H, W]}}


def test_lvis_eval_federated_rules(lvis_files, tmp_path):
    pytest.importorskip("lvis", reason="LVIS evaluation needs the optional package lvis")
    from pycocotools.coco import COCO

    from dynamask.engine.evaluate import evaluate_results, format_metrics
    from dynamask.engine.lvis_eval import load_lvis_gt, lvis_metrics, result_keys

    _, ann = lvis_files
    gt = load_lvis_gt(ann)
    data = _lvis_dict()
    perfect = _gt_results(data)
    m = evaluate_results(COCO(ann), perfect, lvis_gt=gt, out_dir=str(tmp_path / "ev"))
    assert set(m) >= {"bbox", "segm"} and "boundary" not in m
    for kind in ("bbox", "segm"):
        assert list(m[kind]) == result_keys(300)
        for k in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
            assert m[kind][k] == pytest.approx(1.0), (kind, k)
    saved = json.load(open(tmp_path / "ev" / "metrics.json"))
    assert saved["segm"]["APr"] == pytest.approx(1.0) and "AR@300" in saved["segm"]
    # the resolution table and plot show the categories with instances, not all 1,203
    table = format_metrics(m)
    assert "| APr | APc | APf |" in table and "(3 of 1203 categories" in table
    assert [line.split(" (n=")[0] for line in table.splitlines() if line.startswith("| thing_")] == \
        ["| thing_1", "| thing_2", "| thing_3"]

    def segm(results, **kw):
        return lvis_metrics(gt, results, "segm", **kw)[0]

    # a top-scoring false positive of category 2 on image 2, which lists 2 as verified absent: counted
    assert segm(perfect + [_det(2, 2, (0, 0, 8, 8), 2.0)])["APc"] < 0.6
    # the same for category 3 on image 1, which neither contains 3 nor lists it as absent: not counted
    assert segm(perfect + [_det(1, 3, (0, 0, 8, 8), 2.0)])["APr"] == pytest.approx(1.0)
    # an unmatched category-1 detection on image 2, where category 1 is not exhaustively annotated: ignored
    assert segm(perfect + [_det(2, 1, (44, 30, 60, 46), 2.0)])["APf"] == pytest.approx(1.0)
    # ... but on image 3, annotated exhaustively, it is a false positive
    assert segm(perfect + [_det(3, 1, (0, 0, 10, 10), 2.0)])["APf"] < 0.9
    # at most max_dets detections per image, the highest scoring: one false positive above the truth
    fp = [_det(i, 1, (0, 0, 3, 3), 2.0) for i in (1, 3)]
    assert segm(perfect + fp, max_dets=300)["APf"] > 0.5
    assert segm(perfect + fp, max_dets=1)["APf"] < segm(perfect + fp, max_dets=300)["APf"]
    assert segm([])["AP"] == 0.0


def test_missing_extras_say_how_to_install(lvis_files, monkeypatch, tmp_path, capsys):
    from dynamask.cli import main
    from dynamask.engine import lvis_eval

    monkeypatch.setitem(sys.modules, "lvis", None)  # import lvis now raises ImportError
    monkeypatch.setitem(sys.modules, "cityscapesscripts", None)
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers", None)
    assert not lvis_eval.lvis_available()
    with pytest.raises(ImportError, match="pip install lvis"):
        lvis_eval.load_lvis_gt(lvis_files[1])
    with pytest.raises(SystemExit):
        main(["convert", "cityscapes", str(tmp_path), "--split", "val", "--out", str(tmp_path / "x.json")])
    assert "pip install cityscapesscripts" in capsys.readouterr().err


def test_cli_train_and_eval(lvis_files, tmp_path, capsys):
    from dynamask.cli import main

    root, ann = lvis_files
    kwargs = json.dumps(dict(depth=18, min_size=48, max_size=64, fpn_channels=32, box_representation_size=64,
                             mask_head_layers=[32, 32]))
    run = str(tmp_path / "run")
    assert main(["train", "--train-images", root, "--train-ann", ann, "--val-images", root, "--val-ann", ann,
                 "--out", run, "--arch", "maskrcnn_resnet_fpn", "--arch-kwargs", kwargs, "--epochs", "1",
                 "--max-iters", "1", "--batch-size", "1", "--workers", "0", "--no-progress", "--lr", "0.001",
                 "--repeat-factor-sampling", "1"]) == 0
    out = capsys.readouterr().out
    assert "iteration 1" in out
    try:  # the final evaluation of an LVIS validation file is LVIS's, when the package is there
        import lvis  # noqa: F401

        assert "| APr | APc | APf |" in out and os.path.exists(os.path.join(run, "eval", "metrics.json"))
    except ImportError:
        assert "is an LVIS file, which is scored by the lvis package" in out
    ckpt = torch.load(os.path.join(run, "last.pth"), weights_only=True)
    assert ckpt["extra"]["config"]["repeat_factor_threshold"] == 1.0  # the largest threshold: a share of images
    assert ckpt["extra"]["iters_per_epoch"] == 5  # ceil(1.73 + 1.73 + 1) samples at batch 1
    assert len(ckpt["label_map"]) == NUM_CATS
    last = os.path.join(run, "last.pth")
    with pytest.raises(SystemExit):  # an LVIS file is scored by LVIS's rules only
        main(["eval", last, "--images", root, "--ann", ann, "--no-progress"])
    assert "is an LVIS file: evaluate it with --lvis" in capsys.readouterr().err
    pytest.importorskip("lvis", reason="LVIS evaluation needs the optional package lvis")
    ev = tmp_path / "ev"
    assert main(["eval", last, "--images", root, "--ann", ann, "--lvis", "--out", str(ev), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| APr | APc | APf |" in out
    metrics = json.load(open(ev / "metrics.json"))
    for kind in ("bbox", "segm"):
        assert {"AP", "APr", "APc", "APf", "AR@300"} <= set(metrics[kind])


def test_detections_per_image_is_set_and_restored():
    from types import SimpleNamespace

    from dynamask.engine.lvis_eval import detections_per_image

    model = SimpleNamespace(roi_heads=SimpleNamespace(detections_per_img=100))
    with detections_per_image(model, 300):
        assert model.roi_heads.detections_per_img == 300
    assert model.roi_heads.detections_per_img == 100
    with pytest.raises(RuntimeError), detections_per_image(model, 5):
        raise RuntimeError
    assert model.roi_heads.detections_per_img == 100
    with detections_per_image(SimpleNamespace(), 300):  # a model without the attribute is left alone
        pass
