"""Bad input, third round: the commands added since the last round (``fit-switch``, ``convert cityscapes``,
LVIS files, ``infer``, the Python API, checkpoints) lose nothing and refuse nonsense up front. One small
test per numbered item of the issue (``test_<n>_...``) and per confusing case; each fails on the code from
before the fix.

Fit-switch runs use the smallest settings (one batch of one image, one epoch, the price set on the training
RoIs), or stop before the fit."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from model_helpers import TINY, one_thread, synthetic_batch, tiny_model  # noqa: F401
from PIL import Image

from dynamask.data import CocoDetection
from dynamask.data.shapes import generate, split_paths
from dynamask.engine.checkpoint import build_model, load_checkpoint, make_arch, save_checkpoint

FIT = ["--batches", "1", "--batch-size", "1", "--epochs", "1", "--calibration-images", "0", "--flip-prob", "0",
       "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate(root, train=2, val=1, size=64, seed=0, workers=1)
    return root


@pytest.fixture(scope="module")
def label_map(shapes):
    return CocoDetection(*split_paths(shapes, "train")).label_map


def _ckpt(path, label_map, *, num_classes=None, model=None, **kw):
    """A tiny random-weights DynaMask checkpoint for the shapes dataset's classes."""
    arch = make_arch("dynamask_resnet_fpn", **dict(TINY, num_classes=num_classes or len(label_map) + 1))
    torch.manual_seed(0)
    return save_checkpoint(str(path), arch=arch, label_map=label_map, model=model or build_model(arch), **kw)


@pytest.fixture(scope="module")
def tiny_ckpt(label_map, tmp_path_factory):
    return _ckpt(tmp_path_factory.mktemp("ckpt") / "tiny.pth", label_map)


def _no_fit(monkeypatch):
    """Make the switch fit fail loudly: a test that reaches it has checked its input too late."""
    from dynamask.engine import switch_fit

    def never(*args, **kwargs):
        raise AssertionError("the fit ran before the input was checked")

    monkeypatch.setattr(switch_fit, "fit_model_switch", never)


def _one_line_error(capsys, command, *parts):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dynamask {command}: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)
    return err


def _image(path, h=40, w=56, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


# ------------------------------------------------------------------ 1. --out through a link to the input
def test_1_fit_switch_refuses_an_out_that_is_the_input_through_a_link(shapes, label_map, tmp_path, capsys,
                                                                     monkeypatch):
    from dynamask.cli import main

    run = tmp_path / "run"
    run.mkdir()
    last = _ckpt(run / "last.pth", label_map, iteration=3, extra={"note": "a training run"})
    before = open(last, "rb").read()
    link = tmp_path / "link.pth"
    link.symlink_to(last)
    _no_fit(monkeypatch)
    assert main(["fit-switch", str(link), "--data", shapes, "--out", last, "--budget-at", "14"] + FIT) == 1
    _one_line_error(capsys, "fit-switch", "is the input checkpoint")
    os.link(last, tmp_path / "hard.pth")  # a hard link is the same file too
    assert main(["fit-switch", str(tmp_path / "hard.pth"), "--data", shapes, "--out", last, "--budget-at", "14"]
                + FIT) == 1
    _one_line_error(capsys, "fit-switch", "is the input checkpoint")
    assert open(last, "rb").read() == before


# ------------------------------------------------------------------ 2. the dynamic phase's switch is kept
def test_2_fit_switch_keeps_the_dynamic_phase_switch(shapes, label_map, tmp_path, capsys):
    from dynamask.cli import main
    from dynamask.engine import switch_life
    from dynamask.engine.checkpoint import model_from_checkpoint

    # a checkpoint `dynamask train` fitted: its model's switch is a fit, the dynamic phase's is kept beside
    dynamic = {k: torch.randn_like(v) if v.is_floating_point() else v
               for k, v in tiny_model(num_classes=len(label_map) + 1).roi_heads.msm.state_dict().items()}
    fitted = _ckpt(tmp_path / "fitted.pth", label_map, extra={"switch_fit": {"mu": 0.5}},
                   states={switch_life.DYNAMIC_SWITCH_KEY: dynamic})
    out = str(tmp_path / "refit.pth")
    assert main(["fit-switch", fitted, "--data", shapes, "--out", out, "--budget-at", "14"] + FIT) == 0
    ckpt = load_checkpoint(out)
    kept = switch_life.dynamic_phase_switch(ckpt)
    assert kept is not None and kept.keys() == dynamic.keys()
    assert all(torch.equal(kept[k], dynamic[k]) for k in dynamic)
    model, ckpt = model_from_checkpoint(out)
    assert switch_life.use_dynamic_phase_switch(model, ckpt)  # was False: "not fitted"
    assert all(torch.equal(v, dynamic[k]) for k, v in model.roi_heads.msm.state_dict().items())
    # a checkpoint nobody fitted: its own switch is the dynamic phase's, and is kept as that
    plain = _ckpt(tmp_path / "plain.pth", label_map)
    own = {k.removeprefix("roi_heads.msm."): v for k, v in load_checkpoint(plain)["model"].items()
           if k.startswith("roi_heads.msm.")}
    out2 = str(tmp_path / "fit2.pth")
    assert main(["fit-switch", plain, "--data", shapes, "--out", out2, "--budget-at", "14"] + FIT) == 0
    kept = switch_life.dynamic_phase_switch(load_checkpoint(out2))
    assert kept is not None and all(torch.equal(kept[k], v) for k, v in own.items())
    capsys.readouterr()


# ------------------------------------------------------------------ 3. infer loses no earlier outputs
def test_3_infer_leaves_eval_outputs_and_earlier_results_whole(tiny_ckpt, tmp_path, capsys):
    from dynamask.cli import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = _image(tmp_path / "good.png")
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.json").write_text('[{"image_id": 1, "from": "eval"}]')
    (ev / "metrics.json").write_text('{"segm": {"AP": 0.5}}')
    assert main(["infer", str(bad), "--strict", "--weights", tiny_ckpt, "--out", str(ev), "--device", "cpu",
                 "--no-progress"]) == 1
    _one_line_error(capsys, "infer", f"--out {ev} holds the outputs of `dynamask eval` (metrics.json)")
    assert json.loads((ev / "results.json").read_text()) == [{"image_id": 1, "from": "eval"}]
    # an earlier infer run's files stay whole when a new run fails
    out = tmp_path / "infer"
    argv = ["--weights", tiny_ckpt, "--out", str(out), "--score-thresh", "0", "--device", "cpu", "--no-progress"]
    assert main(["infer", good] + argv) == 0
    capsys.readouterr()
    earlier = {name: (out / name).read_bytes() for name in ("results.json", "images.json", "good.png")}
    assert main(["infer", good, str(bad), "--strict"] + argv) == 1
    assert "bad.png: cannot read image" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in earlier} == earlier
    assert sorted(os.listdir(out)) == ["good.png", "images.json", "results.json"]  # no staging folder left
    # and the other way round: eval refuses infer's folder before reading anything
    assert main(["eval", tiny_ckpt, "--images", str(tmp_path), "--ann", str(tmp_path / "missing.json"),
                 "--out", str(out)]) == 1
    _one_line_error(capsys, "eval", f"--out {out} holds the outputs of `dynamask infer` (images.json)")
    assert {name: (out / name).read_bytes() for name in earlier} == earlier


# ------------------------------------------------------------------ 4. 32-bit TIFFs
def test_4_float_tiffs_are_scaled_and_int32_by_a_fixed_range(tmp_path):
    from dynamask import Predictor
    from dynamask.data.images import read_image

    grey = np.full((8, 10), 0.5, np.float32)
    grey[0, 0] = 1.0
    Image.fromarray(grey, "F").save(tmp_path / "f.tif")
    image = read_image(tmp_path / "f.tif")
    assert image[0, 1, 1] == pytest.approx(128 / 255) and image[0, 0, 0] == 1.0  # was 0: all black
    # the datasets read it alike
    data = {"images": [{"id": 1, "file_name": "f.tif", "height": 8, "width": 10}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    assert torch.equal(CocoDetection(str(tmp_path), str(tmp_path / "ann.json"))[0][0], image)
    # a pixel's brightness does not depend on the others'
    for name, top in (("dim", 1000), ("bright", 60000)):
        a = np.full((8, 10), 1000, np.int32)
        a[0, 0] = top
        Image.fromarray(a, "I").save(tmp_path / f"{name}.tif")
    assert read_image(tmp_path / "dim.tif")[0, 5, 5] == read_image(tmp_path / "bright.tif")[0, 5, 5]
    # values no fixed scale fits are refused, naming the file
    Image.fromarray(grey * 255, "F").save(tmp_path / "f255.tif")
    with pytest.raises(ValueError, match=r"f255\.tif: a 32-bit float image with values from 127\.5 to 255"):
        read_image(tmp_path / "f255.tif")
    Image.fromarray(np.full((8, 10), -5, np.int32), "I").save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"neg\.tif: a 32-bit integer image with values from -5"):
        Predictor(tiny_model().eval(), device="cpu")(str(tmp_path / "neg.tif"))


# ------------------------------------------------------------------ 5. self-intersecting Cityscapes polygons
def test_5_cityscapes_area_is_the_rasterised_mask_and_drops_are_counted(tmp_path, capsys):
    pytest.importorskip("cityscapesscripts", reason="Cityscapes needs the optional package cityscapesscripts")
    from pycocotools.coco import COCO

    from dynamask.cli import main

    h, w = 48, 64
    objects = [
        {"label": "car", "polygon": [[10, 10], [30, 30], [30, 10], [10, 30]]},  # a bow-tie: shoelace area 0
        {"label": "person", "polygon": [[40, 5], [60, 5], [40, 25], [60, 25], [60, 40], [40, 40]]},  # partly
        {"label": "bus", "polygon": [[70, 70], [80, 70], [80, 80]]},  # outside the image
    ]
    for folder in ("gtFine", "leftImg8bit"):
        os.makedirs(tmp_path / folder / "val" / "c")
    (tmp_path / "gtFine/val/c/c_000000_000001_gtFine_polygons.json").write_text(
        json.dumps({"imgHeight": h, "imgWidth": w, "objects": objects}))
    _image(tmp_path / "leftImg8bit/val/c/c_000000_000001_leftImg8bit.png", h, w)
    out = tmp_path / "cs.json"
    assert main(["convert", "cityscapes", str(tmp_path), "--split", "val", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 images, 2 instances" in printed
    assert "dropped 1 instance with no pixel in the image" in printed and "object 2 ('bus')" in printed
    coco = COCO(str(out))
    anns = coco.dataset["annotations"]
    assert [a["category_id"] for a in anns] == [26, 24]  # the bow-tie car is kept
    for a in anns:
        assert a["area"] == coco.annToMask(a).sum() > 150, a  # the pixels evaluation compares against
    assert [(d["object"], d["label"]) for d in coco.dataset["info"]["dropped_instances"]] == [(2, "bus")]


# ------------------------------------------------------------------ 6. NaN weights
def test_6_a_checkpoint_with_nan_weights_is_refused_naming_file_and_parameter(label_map, tmp_path, capsys):
    from dynamask import Predictor
    from dynamask.cli import main

    model = tiny_model(num_classes=len(label_map) + 1)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight[0, 0] = float("nan")
    path = _ckpt(tmp_path / "nan.pth", label_map, model=model)
    with pytest.raises(ValueError, match=r"nan\.pth: weights hold NaN or infinite values \(parameter "
                                         r"'roi_heads\.box_predictor\.cls_score\.weight'\)"):
        Predictor(path, device="cpu")
    image = _image(tmp_path / "a.png")
    assert main(["infer", image, "--weights", path, "--out", str(tmp_path / "out"), "--score-thresh", "0",
                 "--device", "cpu", "--no-progress"]) == 1
    _one_line_error(capsys, "infer", "nan.pth: weights hold NaN")


# ------------------------------------------------------------------ 7. 0..255 float images
def test_7_the_model_refuses_a_float_image_in_0_255():
    model = tiny_model().eval()
    image = synthetic_batch()[0][0]
    with pytest.raises(ValueError, match=r"images \[1\] hold values outside \[0, 1\] \(from .* to 2\d\d"):
        model([image, image * 255])
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        model.train()([image * 255], synthetic_batch()[1][:1])


# ------------------------------------------------------------------ 8. targets outside the image, bad labels
def test_8_targets_with_a_box_outside_or_labels_out_of_range_are_named():
    model = tiny_model(num_classes=8).train()
    images, targets = synthetic_batch()  # 64x80 images

    def with_(k, **change):
        t = [dict(t) for t in targets]
        t[k].update(change)
        return t

    outside = targets[1]["boxes"].clone()
    outside[0] = torch.tensor([100.0, 70.0, 140.0, 90.0])
    with pytest.raises(ValueError, match=r"target 1: box 0 \[100\.0, 70\.0, 140\.0, 90\.0\] lies wholly outside "
                                         r"its 80x64 image"):
        model(images, with_(1, boxes=outside))
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"target 0: label {bad} < 1 \(labels are 1 \.\. num_classes - 1"):
            model(images, with_(0, labels=torch.tensor([1, bad])))
    with pytest.raises(ValueError, match="target 0: label 99 ≥ num_classes 8"):
        model(images, with_(0, labels=torch.tensor([99, 1])))


# ------------------------------------------------------------------ 9. extreme aspect ratios in infer
def test_9_infer_runs_images_with_a_side_that_would_resize_to_nothing(tiny_ckpt, tmp_path, capsys):
    from dynamask import Predictor
    from dynamask.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    _image(folder / "a_normal.png")
    _image(folder / "b_wide.png", 2, 3840)
    _image(folder / "c_tall.png", 3840, 1)
    out = tmp_path / "out"
    assert main(["infer", str(folder), "--weights", tiny_ckpt, "--out", str(out), "--score-thresh", "0",
                 "--device", "cpu", "--no-progress"]) == 0
    assert "3 images" in capsys.readouterr().out
    assert sorted(json.load(open(out / "images.json"))) == ["1", "2", "3"]
    assert {"a_normal.png", "b_wide.png", "c_tall.png"} <= set(os.listdir(out))
    result = Predictor(tiny_ckpt, device="cpu", score_thresh=0)(torch.rand(3, 2, 3840))
    assert result.masks.shape[1:] == (2, 3840)
    from dynamask.models.maskrcnn import maskrcnn_resnet_fpn

    baseline = maskrcnn_resnet_fpn(num_classes=3, depth=18, min_size=64, max_size=96, fpn_channels=32,
                                   box_representation_size=64, mask_head_layers=(32,))
    assert Predictor(baseline, device="cpu", score_thresh=0)(torch.rand(3, 3840, 1)).masks.shape[1:] == (3840, 1)


# ------------------------------------------------------------------ 11. --out under a file
def test_11_fit_switch_checks_out_before_collecting(shapes, tiny_ckpt, tmp_path, capsys, monkeypatch):
    from dynamask.cli import main

    (tmp_path / "note.txt").write_text("x")
    _no_fit(monkeypatch)
    out = str(tmp_path / "note.txt" / "x.pth")
    assert main(["fit-switch", tiny_ckpt, "--data", shapes, "--out", out, "--budget-at", "14"] + FIT) == 1
    _one_line_error(capsys, "fit-switch", f"--out {out}: {tmp_path / 'note.txt'} is a file, not a folder")
    assert main(["fit-switch", tiny_ckpt, "--data", shapes, "--out", str(tmp_path), "--budget-at", "14"] + FIT) == 1
    _one_line_error(capsys, "fit-switch", "is a folder; give the file to write")


# ------------------------------------------------------------------ 12. a non-finite budget
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_12_fit_switch_refuses_a_non_finite_budget(shapes, tiny_ckpt, tmp_path, capsys, monkeypatch, value):
    from dynamask.cli import main

    _no_fit(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["fit-switch", tiny_ckpt, "--data", shapes, "--out", str(tmp_path / "x.pth"), "--target-gmacs", value]
             + FIT)
    assert exc.value.code == 2
    assert f"argument --target-gmacs: must be a finite number > 0, got {value}" in capsys.readouterr().err


# ------------------------------------------------------------------ confusing cases: one clear line
def test_ctrl_c_during_fit_switch_says_nothing_was_fitted(shapes, tiny_ckpt, tmp_path, capsys, monkeypatch):
    from dynamask.cli import main
    from dynamask.engine import switch_fit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(switch_fit, "fit_model_switch", interrupted)
    before = open(tiny_ckpt, "rb").read()
    out = tmp_path / "fitted.pth"
    try:
        code = main(["fit-switch", tiny_ckpt, "--data", shapes, "--out", str(out), "--budget-at", "14"] + FIT)
    except KeyboardInterrupt:  # (not left to pytest, which would end the whole session)
        pytest.fail("Ctrl-C reached the caller, with its traceback")
    assert code == 130
    err = _one_line_error(capsys, "fit-switch", "interrupted: the switch was not fitted",
                          f"{tiny_ckpt} is unchanged")
    assert len(err.splitlines()) == 1
    assert not out.exists() and open(tiny_ckpt, "rb").read() == before
    with pytest.raises(KeyboardInterrupt):  # --debug: the traceback
        main(["fit-switch", tiny_ckpt, "--data", shapes, "--out", str(out), "--budget-at", "14", "--debug"] + FIT)


def test_a_label_map_shorter_than_the_models_classes_is_refused_at_load(label_map, tmp_path):
    from dynamask import Predictor

    short = {1: label_map[1], 2: label_map[2]}
    path = _ckpt(tmp_path / "short.pth", short, num_classes=8)
    with pytest.raises(ValueError, match=r"short\.pth: the model has num_classes 8 \(labels 1\.\.7\) but its "
                                         r"label_map names only 2 labels"):
        Predictor(path, device="cpu")
    with pytest.raises(ValueError, match=r"cat_ids has 2 entries, but the model predicts labels 1\.\.7"):
        Predictor(tiny_model(num_classes=8), cat_ids=[1, 2])


def test_backbone_weights_that_are_not_a_torch_file_are_named(shapes, tmp_path, capsys):
    from dynamask.cli import main
    from dynamask.models import dynamask_resnet_fpn

    junk = tmp_path / "resnet18.pth"
    junk.write_text("this is not a state dict")
    with pytest.raises(ValueError) as info:
        dynamask_resnet_fpn(depth=18, weights_backbone=str(junk))
    assert f"weights_backbone {junk}: not a readable torch state dict" in str(info.value)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    assert main(["train", "--data", shapes, "--out", str(tmp_path / "run"), "--arch", "dynamask_resnet_fpn",
                 "--arch-kwargs", json.dumps(dict(TINY, num_classes=8)), "--backbone-weights", str(junk),
                 "--workers", "0", "--no-progress"]) == 1
    err = _one_line_error(capsys, "train", f"{junk}: not a readable torch state dict")
    assert "weights_only" not in err and "internal error" not in err


def test_an_inference_only_checkpoint_cannot_be_resumed(tiny_ckpt):
    with pytest.raises(ValueError, match=r"tiny\.pth: an inference-only checkpoint cannot be resumed: it has no "
                                         r"optimizer, scheduler, epoch, iteration, rng"):
        load_checkpoint(tiny_ckpt, resume=True)
    assert "optimizer" not in load_checkpoint(tiny_ckpt)  # loading it for inference still works


@pytest.mark.parametrize("flag, value", [("--seed", "-5"), ("--calibration-images", "-1")])
def test_fit_switch_negative_counts_are_named_when_parsed(shapes, tiny_ckpt, tmp_path, capsys, monkeypatch,
                                                          flag, value):
    from dynamask.cli import main
    from dynamask.engine import checkpoint

    monkeypatch.setattr(checkpoint, "model_from_checkpoint", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exc:
        main(["fit-switch", tiny_ckpt, "--data", shapes, "--out", str(tmp_path / "x.pth"), "--budget-at", "14",
              flag, value])
    assert exc.value.code == 2 and f"argument {flag}: must be >= 0, got {value}" in capsys.readouterr().err


def test_a_huge_num_classes_is_named_before_any_allocation(label_map, tmp_path):
    from dynamask.engine.checkpoint import model_from_checkpoint

    path = str(tmp_path / "huge.pth")
    torch.save({"format_version": 1, "arch": make_arch("dynamask_resnet_fpn", **dict(TINY, num_classes=2**36)),
                "label_map": label_map, "model": {}}, path)
    with pytest.raises(ValueError, match=r"huge\.pth: the model has num_classes 68719476736 .* label_map names "
                                         r"only 7 labels"):
        model_from_checkpoint(path)


def test_empty_four_channel_and_meta_images_and_bad_checkpoint_arguments(tiny_ckpt, tmp_path):
    from dynamask import Predictor

    predictor = Predictor(tiny_ckpt, device="cpu")
    model = tiny_model().eval()
    for image, message in [(torch.rand(3, 0, 40), r"the image is empty \(40x0 pixels\)"),
                           (np.zeros((0, 40, 3), np.uint8), "the image is empty"),
                           (torch.rand(4, 30, 40), r"must be \[3, H, W\], got shape \(4, 30, 40\)"),
                           (torch.empty(3, 30, 40, device="meta"), "on the meta device")]:
        with pytest.raises(ValueError, match=message):
            predictor(image)
    for image, message in [(torch.rand(3, 0, 40), r"image 0 is empty: \(3, 0, 40\)"),
                           (torch.rand(4, 30, 40), r"image 0 must be a \[3, H, W\] tensor \(RGB\), got \(4, 30, 40\)"),
                           (torch.empty(3, 30, 40, device="meta"), "image 0 is on the meta device")]:
        with pytest.raises(ValueError, match=message):
            model([image])
    with pytest.raises(TypeError, match="checkpoint must be a checkpoint file's path or a model .* got NoneType"):
        Predictor(None)
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"run: is a folder, not a checkpoint file$"):
        Predictor(str(folder))
    os.link(tiny_ckpt, folder / "last.pth")
    with pytest.raises(ValueError, match=r"is a folder, not a checkpoint file \(did you mean .*last\.pth\?\)"):
        Predictor(str(folder))


def test_convert_checks_out_before_converting_and_leaves_no_temporary_file(tmp_path, capsys):
    pytest.importorskip("cityscapesscripts", reason="Cityscapes needs the optional package cityscapesscripts")
    from dynamask.cli import main
    from dynamask.data import cityscapes

    os.makedirs(tmp_path / "gtFine" / "val" / "c")
    (tmp_path / "gtFine/val/c/c_000000_000001_gtFine_polygons.json").write_text(
        json.dumps({"imgHeight": 8, "imgWidth": 8, "objects": []}))
    os.makedirs(tmp_path / "leftImg8bit" / "val" / "c")
    _image(tmp_path / "leftImg8bit/val/c/c_000000_000001_leftImg8bit.png", 8, 8)
    out = tmp_path / "out"
    (out / "cs").mkdir(parents=True)
    read = []
    real = cityscapes._read_polygon_file
    cityscapes._read_polygon_file = lambda path: read.append(path) or real(path)
    try:
        assert main(["convert", "cityscapes", str(tmp_path), "--split", "val", "--out", str(out / "cs")]) == 1
        _one_line_error(capsys, "convert", f"--out {out / 'cs'}: is a folder")
        with pytest.raises(ValueError, match="out_file .*: is a folder"):
            cityscapes.convert_cityscapes(str(tmp_path), "val", str(out / "cs"))
    finally:
        cityscapes._read_polygon_file = real
    assert read == [] and os.listdir(out) == ["cs"] and os.listdir(out / "cs") == []
    assert main(["convert", "cityscapes", str(tmp_path), "--split", "val", "--out", str(out / "cs.json")]) == 0
    assert sorted(os.listdir(out)) == ["cs", "cs.json"]


def test_a_broken_image_link_in_an_infer_folder_is_skipped_and_reported(tiny_ckpt, tmp_path, capsys):
    from dynamask.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    _image(folder / "a.png")
    (folder / "b.png").symlink_to(tmp_path / "gone.png")
    (folder / "c.png").symlink_to(folder / "d.png")
    (folder / "d.png").symlink_to(folder / "c.png")  # a loop
    out = tmp_path / "out"
    assert main(["infer", str(folder), "--weights", tiny_ckpt, "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 1
    assert "skipped 3 of 4 images (b.png, c.png, d.png)" in capsys.readouterr().err
    skipped = {os.path.basename(s["file"]): s["error"] for s in json.load(open(out / "skipped.json"))}
    assert "its target" in skipped["b.png"] and "gone.png does not exist" in skipped["b.png"]
    assert "a loop of links" in skipped["c.png"] and "a loop of links" in skipped["d.png"]
    assert json.load(open(out / "images.json")) == {"1": str(folder / "a.png")}


def test_an_lvis_category_both_annotated_and_negative_is_warned(tmp_path):
    from dynamask.data.lvis import LvisDetection, open_dataset

    _image(tmp_path / "a.png", 32, 48)
    _image(tmp_path / "b.png", 32, 48)
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 48, "neg_category_ids": [2]},
                       {"id": 2, "file_name": "b.png", "height": 32, "width": 48, "neg_category_ids": [1, 2]}],
            "categories": [{"id": 1, "name": "cat", "frequency": "f"}, {"id": 2, "name": "dog", "frequency": "r"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10]}]}
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"lvis\.json: 1 categories are both annotated on an image and listed in "
                                         r"its neg_category_ids \(image 2: category 1\)"):
        ds = open_dataset(str(tmp_path), str(tmp_path / "lvis.json"))
    assert isinstance(ds, LvisDetection)
    data["images"][1]["neg_category_ids"] = [2]
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_dataset(str(tmp_path), str(tmp_path / "lvis.json"))
