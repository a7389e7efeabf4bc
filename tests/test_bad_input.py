"""Issue 21: bad input gets a clear error before any work, and nothing is silently wrong. One small test per
case of the issue, on inputs built here; each checks the error message or the corrected behaviour.

Modules that the fix added are imported inside the tests, so that on the old code each test fails on its
own rather than the whole file failing to import."""

import json
import os
import signal
import tempfile

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from model_helpers import TINY, one_thread, synthetic_batch, tiny_model  # noqa: F401
from PIL import Image

from dynamask.data import CocoDetection
from dynamask.data.shapes import generate, split_paths
from dynamask.engine.checkpoint import BUILDERS, make_arch, save_checkpoint

H, W = 32, 48
# a small torchvision Mask R-CNN, as tests/test_train.py trains (a few CPU iterations)
MRCNN = dict(depth=18, min_size=64, max_size=64, rpn_batch_size_per_image=32, rpn_pre_nms_top_n_train=64,
             rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32,
             box_batch_size_per_image=32, box_detections_per_img=20, fpn_channels=32,
             box_representation_size=64, mask_head_layers=(32, 32))


def _coco_files(tmp_path, *, images=None, annotations=None, categories=None, write_images=True):
    """A COCO file (and its image files) with two 32x48 images and one square each, unless replaced."""
    square = [[4, 4, 20, 4, 20, 20, 4, 20]]
    data = {
        "images": images if images is not None else [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W}],
        "categories": categories if categories is not None else [{"id": 1, "name": "square"}],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16], "area": 256, "segmentation": square},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [4, 4, 16, 16], "area": 256, "segmentation": square}],
    }
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if write_images:
        for k, img in enumerate(data["images"]):
            if isinstance(img, dict) and "file_name" in img:
                Image.fromarray(np.full((H, W, 3), 40 * k, np.uint8)).save(img_dir / img["file_name"])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return str(img_dir), str(ann)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate(root, train=4, val=2, size=64, seed=0, workers=1)
    return root


def _train_cfg(shapes, out, **kw):
    from dynamask.engine.train import TrainConfig

    img, ann = split_paths(shapes, "train")
    base = dict(train_images=img, train_ann=ann, out_dir=str(out), arch="maskrcnn_resnet_fpn", arch_kwargs=MRCNN,
                epochs=1, batch_size=2, lr=0.01, warmup_iters=1, lr_steps=(), workers=0, log_every=1,
                progress=False, seed=3,
                switch_fit_batches=2, switch_fit_epochs=2, switch_fit_calibration_images=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_ckpt(shapes, tmp_path_factory):
    """A random-weights tiny DynaMask with the shapes dataset's label map (evaluation, inference)."""
    ds = CocoDetection(*split_paths(shapes, "val"))
    arch = make_arch("dynamask_resnet_fpn", **dict(TINY, num_classes=ds.num_classes))
    from dynamask.engine.checkpoint import build_model

    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    save_checkpoint(path, arch=arch, label_map=ds.label_map, model=build_model(arch))
    return path


def _unwritable_dir(tmp_path):
    """A folder this process cannot write in: a read-only one, or (as root) a kernel folder."""
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    for candidate in (str(d), "/sys/kernel", "/proc/1"):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            if os.path.isdir(candidate):
                return candidate
            continue
        os.close(fd)
        os.remove(probe)
    pytest.skip("no unwritable folder here")


# ------------------------------------------------------------------ 1. duplicate ids
def test_1_duplicate_ids_are_refused_all_named(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W},
              {"id": 1, "file_name": "b.png", "height": H, "width": W}]
    cats = [{"id": 1, "name": "square"}, {"id": 1, "name": "square again"}]
    anns = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16]},
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16]}]
    img_dir, ann = _coco_files(tmp_path, images=images, categories=cats, annotations=anns)
    with pytest.raises(ValueError) as info:
        CocoDetection(img_dir, ann)
    msg = str(info.value)
    assert "ann.json: 3 problems" in msg
    assert "duplicate image id 1" in msg and "duplicate category id 1" in msg and "duplicate annotation id 7" in msg


# ------------------------------------------------------------------ 2. misspelt architecture settings
def test_2_builders_refuse_unknown_arguments_naming_the_closest():
    from dynamask.engine.checkpoint import build_model
    from dynamask.models import dynamask_resnet_fpn

    with pytest.raises(TypeError, match=r"'min_szie' \(did you mean 'min_size'\?\)"):
        dynamask_resnet_fpn(min_szie=64)
    with pytest.raises(TypeError, match=r"'box_score_tresh' \(did you mean 'box_score_thresh'\?\)"):
        dynamask_resnet_fpn(box_score_tresh=0.9)
    with pytest.raises(TypeError, match=r"'mask_head_layer' \(did you mean 'mask_head_layers'\?\)"):
        build_model(make_arch("maskrcnn_resnet_fpn", num_classes=3, mask_head_layer=[8]))
    # what is valid still builds: the transform's own arguments go through
    model = dynamask_resnet_fpn(**dict(TINY, size_divisible=16))
    assert model.transform.size_divisible == 16 and model.transform.min_size == (64,)


def test_2_cli_train_names_the_misspelt_argument(shapes, tmp_path, capsys):
    from dynamask.cli import main

    kwargs = json.dumps(dict(MRCNN, min_szie=64))
    assert main(["train", "--data", shapes, "--out", str(tmp_path / "r"), "--arch", "maskrcnn_resnet_fpn",
                 "--arch-kwargs", kwargs, "--workers", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "'min_szie' (did you mean 'min_size'?)" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "r" / "last.pth")


# ------------------------------------------------------------------ 3. NaN pixels
def test_3_nan_pixels_are_refused():
    from dynamask.data.images import to_image_tensor

    model = tiny_model().eval()
    image = torch.rand(3, 64, 80)
    image[:, 10:20, 10:20] = float("nan")  # a 10x10 NaN patch
    with pytest.raises(ValueError, match=r"images \[0\] hold NaN or infinite values"):
        model([image])
    with pytest.raises(ValueError, match="must be finite, got 300 NaN"):
        to_image_tensor(image)
    array = np.full((8, 8, 3), np.nan, np.float32)
    with pytest.raises(ValueError, match="must be finite"):
        to_image_tensor(array)


# ------------------------------------------------------------------ 4. degenerate polygons
def test_4_degenerate_polygons_are_dropped_reported_and_eval_runs(tmp_path):
    from dynamask.engine.evaluate import evaluate_results

    square = [[4, 4, 20, 4, 20, 20, 4, 20]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16], "area": 256, "segmentation": square},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [4, 4, 16, 16], "area": 256, "segmentation": square},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 4, 4, 4], "area": 0, "segmentation": [[]]},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [30, 4, 4, 4], "area": 0,
         "segmentation": [[30, 4, 34, 8]]},  # 2 points (and pycocotools would read 4 numbers as a box)
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [24, 20, 8, 8], "area": 64,  # keeps its good polygon
         "segmentation": [[24, 20, 32, 20, 32, 28, 24, 28], [1, 1]]},
    ]
    img_dir, ann = _coco_files(tmp_path, annotations=anns)
    with pytest.warns(UserWarning, match=r"dropped 2 annotations .* \(ids \[3, 4\]\) .* degenerate polygons of 1 more"):
        ds = CocoDetection(img_dir, ann)
    assert ds.dropped_annotations == [3, 4]
    assert sorted(ds.coco.anns) == [1, 2, 5]  # gone from the ground truth that evaluation reads, too
    assert ds[0][1]["boxes"].shape == (2, 4) and ds[1][1]["boxes"].shape == (1, 4)
    # evaluation of the ground truth itself now runs (it died inside pycocotools) and scores 1
    results = []
    for a in ds.coco.anns.values():
        m = ds.coco.annToMask(a)
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        results.append({"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0,
                        "segmentation": rle})
    metrics = evaluate_results(ds.coco, results, boundary=False)
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)


# ------------------------------------------------------------------ 5. --max-iters is a total
def test_5_max_iters_counts_resumed_iterations_and_refuses_0(shapes, tmp_path):
    from dynamask.engine.train import train

    r = train(_train_cfg(shapes, tmp_path, epochs=3, max_iters=2))
    assert r["iteration"] == 2
    steps = []
    r = train(_train_cfg(shapes, tmp_path, epochs=3, max_iters=2, resume="auto"),
              on_iteration=lambda it, losses: steps.append(it))
    assert r["iteration"] == 2 and r["status"] == "stopped" and steps == []  # was 3: one step too many
    with pytest.raises(ValueError, match="max_iters must be an integer >= 1, got 0"):
        train(_train_cfg(shapes, tmp_path / "zero", max_iters=0))


# ------------------------------------------------------------------ 6. unwritable --out
def test_6_training_checks_it_can_save_before_training(shapes, tmp_path):
    from dynamask.engine.train import train

    out = _unwritable_dir(tmp_path)
    steps = []
    with pytest.raises(ValueError, match="out_dir .*: cannot write there"):
        train(_train_cfg(shapes, out), on_iteration=lambda it, losses: steps.append(it))
    assert steps == []


# ------------------------------------------------------------------ 7. missing image files
def test_7_missing_image_files_are_found_when_the_data_opens(tmp_path):
    from dynamask.engine.train import TrainConfig, train

    img_dir, ann = _coco_files(tmp_path)
    os.remove(os.path.join(img_dir, "b.png"))
    with pytest.raises(ValueError, match=r"ann.json: 1 problem: image 2 refers to a missing file .*b\.png"):
        CocoDetection(img_dir, ann)
    # one summary names every problem, the missing file with the others
    data = json.load(open(ann))
    data["annotations"][1]["category_id"] = 9
    json.dump(data, open(ann, "w"))
    with pytest.raises(
        ValueError, match=r"ann.json: 2 problems: image 2 refers to a missing file .*b\.png; .*unknown category_id 9"
    ):
        CocoDetection(img_dir, ann)
    data["annotations"][1]["category_id"] = 1
    json.dump(data, open(ann, "w"))
    (tmp_path / "nowhere").mkdir()  # the wrong folder: one problem, not one per image
    with pytest.raises(ValueError, match=r"1 problem: none of the 2 image files is in .*nowhere \(e.g. image 1: "):
        CocoDetection(str(tmp_path / "nowhere"), ann)
    steps = []
    cfg = TrainConfig(img_dir, ann, str(tmp_path / "run"), arch="maskrcnn_resnet_fpn", arch_kwargs=MRCNN,
                      workers=0, progress=False, batch_size=1)
    with pytest.raises(ValueError, match="missing file"):
        train(cfg, on_iteration=lambda it, losses: steps.append(it))
    assert steps == [] and not os.path.exists(tmp_path / "run" / "last.pth")


# ------------------------------------------------------------------ 8. infer degrades gracefully
def _infer_inputs(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    data = (folder / "c.png").read_bytes()
    (folder / "c.png").write_bytes(data[: len(data) // 2])  # truncated
    return folder


def test_8_infer_skips_a_bad_file_and_never_mixes_runs(tiny_ckpt, tmp_path, capsys):
    from dynamask.cli import main

    folder = _infer_inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('[{"image_id": 99, "from": "an earlier run"}]')
    code = main(["infer", str(folder), "--weights", tiny_ckpt, "--out", str(out), "--score-thresh", "0",
                 "--device", "cpu", "--no-progress"])
    assert code == 1  # not all images were read
    err = capsys.readouterr().err
    assert "c.png: cannot read image" in err and "skipped 1 of 4 images (c.png)" in err
    results = json.load(open(out / "results.json"))
    assert {r["image_id"] for r in results} <= {1, 2, 4} and all("from" not in r for r in results)
    assert json.load(open(out / "images.json")) == {"1": str(folder / "a.png"), "2": str(folder / "b.png"),
                                                    "4": str(folder / "d.png")}
    assert [s["file"] for s in json.load(open(out / "skipped.json"))] == [str(folder / "c.png")]
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "d.png"]
    # --strict stops at the bad file and changes nothing: the earlier run's files stay whole (issue: bad input,
    # third round; they were removed before the run)
    earlier = {name: (out / name).read_bytes() for name in ("results.json", "images.json", "skipped.json")}
    code = main(["infer", str(folder), "--weights", tiny_ckpt, "--out", str(out), "--strict", "--device", "cpu",
                 "--no-progress"])
    assert code == 1 and "c.png: cannot read image" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in earlier} == earlier


# ------------------------------------------------------------------ 9. --lr nan
def test_9_non_finite_settings_are_refused_and_nan_weights_never_saved(shapes, tmp_path):
    from dynamask.engine.train import NonFiniteLossError, train
    from dynamask.models.maskrcnn import maskrcnn_resnet_fpn

    for name, value, message in [("lr", float("nan"), "lr must be a finite number > 0, got nan"),
                                 ("momentum", 1.5, r"momentum must be a finite number in \[0, 1\)"),
                                 ("gamma", float("inf"), "gamma must be"),
                                 ("clip_grad_norm", -1.0, "clip_grad_norm must be"),
                                 ("target_gmacs", 0.0, "target_gmacs must be a finite number > 0"),
                                 ("budget_weight", float("nan"), "budget_weight must be"),
                                 ("edge_weight", -0.1, "edge_weight must be"),
                                 ("gumbel_tau", float("inf"), "gumbel_tau must be"),
                                 ("epochs", 0, "both 0: nothing to train")]:
        settings = {"epochs": 0, "pretrain_epochs": 0} if name == "epochs" else {name: value}
        with pytest.raises(ValueError, match=message):
            train(_train_cfg(shapes, tmp_path / name, **settings))
        assert not os.path.exists(tmp_path / name / "last.pth")
    # weights that turned NaN behind a finite loss are not saved as if all were well
    held = {}
    BUILDERS["holdable"] = lambda **kw: held.setdefault("model", maskrcnn_resnet_fpn(**kw))
    try:
        def poison(it, losses):
            with torch.no_grad():
                next(held["model"].parameters()).fill_(float("nan"))

        with pytest.raises(NonFiniteLossError, match="non-finite weights at iteration 1; not saved"):
            train(_train_cfg(shapes, tmp_path / "poison", arch="holdable", max_iters=1), on_iteration=poison)
        assert not os.path.exists(tmp_path / "poison" / "last.pth")
    finally:
        BUILDERS.pop("holdable", None)


# ------------------------------------------------------------------ 10. eval of an empty file
def test_10_eval_refuses_a_file_with_no_images(tmp_path, capsys):
    from dynamask.cli import main

    img_dir, ann = _coco_files(tmp_path, images=[], annotations=[])
    code = main(["eval", str(tmp_path / "any.pth"), "--images", img_dir, "--ann", ann, "--device", "cpu",
                 "--no-progress"])
    assert code == 1 and "ann.json: no images to evaluate" in capsys.readouterr().err
    # and evaluate() called from Python, before the model runs
    from dynamask.data import CocoDetection
    from dynamask.engine.evaluate import evaluate

    with pytest.raises(ValueError, match="ann.json: no images to evaluate"):
        evaluate(tiny_model().eval(), CocoDetection(img_dir, ann), device="cpu", progress=False)


def test_10_val_annotations_without_their_images_are_named(tmp_path):
    # before, the missing folder reached os.path.isdir(None) and failed with a TypeError naming no flag
    from dynamask.engine.train_config import TrainConfig

    img_dir, ann = _coco_files(tmp_path, images=[], annotations=[])
    cfg = TrainConfig(train_images=img_dir, train_ann=ann, out_dir=str(tmp_path / "out"), val_ann=ann)
    with pytest.raises(ValueError, match=r"val_ann \(.*ann\.json\) needs val_images"):
        cfg.validate_val_data()


# ------------------------------------------------------------------ 11. targets that disagree with the image
def test_11_targets_must_agree_with_their_image():
    model = tiny_model().train()
    images, targets = synthetic_batch()  # 64x80 images
    small = [dict(t, masks=t["masks"][:, :32, :32]) for t in targets]
    with pytest.raises(ValueError, match=r"target 0: masks must be \[N, H, W\] = \[2, 64, 80\].*got \(2, 32, 32\)"):
        model(images, small)
    extra = [dict(t, masks=torch.cat([t["masks"], t["masks"]])) for t in targets]
    with pytest.raises(ValueError, match=r"target 0: masks must be \[N, H, W\] = \[2, 64, 80\].*got \(4, 64, 80\)"):
        model(images, extra)
    with pytest.raises(ValueError, match="2 boxes but labels of shape \\(1,\\)"):
        model(images, [dict(targets[0], labels=targets[0]["labels"][:1]), targets[1]])


# ------------------------------------------------------------------ errors a user can act on
@pytest.mark.parametrize("flag, value, message", [
    ("--device", "tpu", "device 'tpu' is not a device; use cpu, cuda or cuda:N"),
    ("--device", "cuda", "device 'cuda': no CUDA GPU is available here"),
    ("--out", "note.txt", "note.txt: exists and is not a folder"),
])
def test_devices_and_out_file_are_named_before_any_work(shapes, tiny_ckpt, tmp_path, capsys, flag, value, message):
    from dynamask.cli import main

    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    (tmp_path / "note.txt").write_text("x")
    if flag == "--out":
        value = str(tmp_path / value)
    val_img, val_ann = split_paths(shapes, "val")
    commands = {
        "eval": ["eval", tiny_ckpt, "--images", val_img, "--ann", val_ann],
        "infer": ["infer", val_img, "--weights", tiny_ckpt],
        "train": ["train", "--data", shapes, "--arch", "maskrcnn_resnet_fpn", "--arch-kwargs", json.dumps(MRCNN),
                  "--workers", "0"],
    }
    for name, argv in commands.items():
        out = [] if flag == "--out" else ["--out", str(tmp_path / name)]
        assert main(argv + out + [flag, value, "--no-progress"]) == 1, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"dynamask {name}: error: ") and message in err and "\n" not in err, (name, err)


def test_decompression_bomb_and_negative_rle_counts_are_named(tmp_path, monkeypatch):
    from dynamask.data.images import read_image

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 900 pixels > twice the limit: PIL refuses
    with pytest.raises(ValueError, match=r"big\.png: image refused as too large"):
        read_image(path)
    monkeypatch.undo()
    counts = [10, -5, H * W - 5]  # sums to H*W, but a run cannot be negative
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": {"counts": counts, "size": [H, W]}}]
    img_dir, ann = _coco_files(tmp_path, annotations=anns)
    with pytest.raises(ValueError, match="annotation 1 of image 1: uncompressed RLE counts must be non-negative"):
        CocoDetection(img_dir, ann)


def test_missing_keys_are_named_not_bare(tmp_path, capsys):
    from dynamask.cli import main

    img_dir, ann = _coco_files(tmp_path)
    data = json.load(open(ann))
    del data["categories"]
    del data["images"][1]["file_name"]
    json.dump(data, open(ann, "w"))
    assert main(["eval", "x.pth", "--images", img_dir, "--ann", ann, "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "ann.json: 1 problem: no 'categories' list" in err
    data["categories"] = [{"id": 1, "name": "square"}]
    json.dump(data, open(ann, "w"))
    assert main(["eval", "x.pth", "--images", img_dir, "--ann", ann, "--device", "cpu", "--no-progress"]) == 1
    assert "image 2 has no 'file_name'" in capsys.readouterr().err
    from dynamask.cli.common import one_line

    assert one_line(KeyError("file_name")) == "missing key 'file_name'"


def test_eval_checks_out_segmentations_and_costs_before_running(shapes, tiny_ckpt, tmp_path, capsys, monkeypatch):
    import dynamask.engine.evaluate as evaluate_module
    from dynamask.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the model ran before the inputs were checked")

    monkeypatch.setattr(evaluate_module, "run_model", never)
    val_img, val_ann = split_paths(shapes, "val")
    base = ["eval", tiny_ckpt, "--images", val_img, "--device", "cpu", "--no-progress"]
    # a --mask-costs without the model's resolutions (7/14/28/56 for this tiny model)
    assert main(base + ["--ann", val_ann, "--mask-costs", "14=0.2,28=0.5"]) == 1
    assert "--mask-costs: no cost for resolution(s) [7, 56]" in capsys.readouterr().err
    assert main(base + ["--ann", val_ann, "--out", _unwritable_dir(tmp_path)]) == 1
    assert "cannot write there" in capsys.readouterr().err
    data = json.load(open(val_ann))
    data["annotations"][0]["segmentation"] = "a string"
    bad_ann = tmp_path / "bad.json"
    bad_ann.write_text(json.dumps(data))
    assert main(base + ["--ann", str(bad_ann)]) == 1
    assert f"annotation {data['annotations'][0]['id']}" in (err := capsys.readouterr().err)
    assert "segmentation must be a list of polygons or an RLE dict, got str" in err
    with pytest.raises(SystemExit):
        main(base + ["--ann", val_ann, "--mask-costs", "14=nan"])


def test_interrupted_training_exits_non_zero(shapes, tmp_path, monkeypatch):
    import dynamask.engine.train as train_module
    from dynamask.cli import main

    real_train = train_module.train

    def signalled(sig):
        def run(cfg, **kw):
            return real_train(cfg, on_iteration=lambda it, losses: os.kill(os.getpid(), sig) if it == 1 else None,
                              **kw)
        return run

    argv = ["train", "--data", shapes, "--arch", "maskrcnn_resnet_fpn", "--arch-kwargs", json.dumps(MRCNN),
            "--workers", "0", "--no-progress", "--batch-size", "1", "--epochs", "2"]
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = tmp_path / sig.name
        monkeypatch.setattr(train_module, "train", signalled(sig))
        assert main(argv + ["--out", str(out)]) == status
        ckpt = torch.load(out / "last.pth", weights_only=True)
        assert ckpt["iteration"] == 1  # saved before exiting


def test_exif_orientation_is_applied_everywhere(tmp_path, tiny_ckpt):
    from dynamask import Predictor
    from dynamask.data.images import read_image, to_image_tensor

    stored = np.zeros((H, W, 3), np.uint8)
    stored[:4, :, 0] = 255  # a red band along the stored top edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored top edge is the viewed right edge
    path = tmp_path / "phone.png"
    Image.fromarray(stored).save(path, exif=exif)
    upright = np.rot90(stored, k=-1)  # [W, H, 3]
    expected = torch.from_numpy(upright.copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(read_image(path), expected)
    with Image.open(path) as pil:
        assert torch.equal(to_image_tensor(pil), expected)
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [W - 8, 0, 8, 8]}]
    data = {"images": [{"id": 1, "file_name": "phone.png", "height": W, "width": H}],  # the upright size
            "categories": [{"id": 1, "name": "x"}], "annotations": anns}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    image, _ = CocoDetection(str(tmp_path), str(tmp_path / "ann.json"))[0]
    assert torch.equal(image, expected)
    result = Predictor(tiny_ckpt, device="cpu", score_thresh=0.0)(str(path))
    assert result.image_size == (W, H) and result.masks.shape[1:] == (W, H)


def test_score_thresholds_must_be_in_unit_interval(tiny_ckpt, tmp_path, capsys):
    from dynamask import Predictor
    from dynamask.cli import main

    for bad in ("-1", "2", "nan"):
        with pytest.raises(SystemExit) as exc:
            main(["infer", "x.png", "--weights", tiny_ckpt, "--out", str(tmp_path), "--score-thresh", bad])
        assert exc.value.code == 2
        assert f"argument --score-thresh: must be a number in [0, 1], got {bad}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"score_thresh must be a finite number in \[0, 1\], got 2"):
        Predictor(tiny_ckpt, device="cpu", score_thresh=2)
    with pytest.raises(ValueError, match=r"mask_thresh must be a finite number in \[0, 1\], got nan"):
        Predictor(tiny_ckpt, device="cpu", mask_thresh=float("nan"))


def test_empty_list_and_half_precision_images():
    model = tiny_model().eval()
    assert model([]) == []
    image = synthetic_batch()[0][0]
    with torch.no_grad():
        full = model([image])[0]
        half = model([image.half()])[0]
        reference = model([image.half().float()])[0]  # the same pixels, rounded to float16, in float32
    assert full["boxes"].dtype == torch.float32
    for key in ("boxes", "scores", "labels", "masks", "mask_resolution"):
        assert torch.equal(half[key], reference[key]), key
    with pytest.raises(ValueError, match="training needs at least one image"):
        model.train()([], [])


def test_a_policy_returning_the_wrong_type_is_named():
    model = tiny_model(box_score_thresh=0.0).eval()
    model.mask_policy = lambda feats, boxes, sizes: "28"
    with pytest.raises(ValueError, match=r"a policy callable must return an int64 tensor of shape \[\d+\].*got a str"):
        with torch.no_grad():
            model(synthetic_batch()[0][:1])
    model.mask_policy = lambda feats, boxes, sizes: torch.full((feats.shape[0],), 9, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"resolution indices in \[0, 4\), got values from 9 to 9"):
        with torch.no_grad():
            model(synthetic_batch()[0][:1])


def test_checkpoint_errors_name_the_field_and_give_no_unsafe_advice(tmp_path):
    from dynamask.engine.checkpoint import load_checkpoint

    path = str(tmp_path / "v.pth")
    torch.save({"format_version": "1", "arch": {"name": "x"}, "label_map": {}, "model": {}}, path)
    with pytest.raises(ValueError, match=r"v\.pth: format_version must be an integer, got '1'"):
        load_checkpoint(path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError) as info:
        load_checkpoint(str(junk))
    msg = str(info.value)
    assert "junk.pth: not a readable dynamask checkpoint" in msg
    assert "weights_only" not in msg and "will likely succeed" not in msg and "\n" not in msg


def test_internal_errors_are_one_line_unless_debug(monkeypatch, tmp_path, capsys):
    import dynamask.cli as cli

    def broken(args):
        raise RuntimeError("something inside broke")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), broken))
    assert cli.main(["shapes", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("dynamask shapes: internal error: RuntimeError: something inside broke "
                   "(run with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="something inside broke"):
        cli.main(["shapes", "--out", str(tmp_path), "--debug"])
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "shapes", "--out", str(tmp_path)])


def _with_func(parser, func):
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser
