"""``dynamask strip``, ``dynamask --version`` (one version string), every flag's help with its default, and
the overlays ``dynamask infer`` writes (``dynamask.viz``)."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from model_helpers import TRAIN_TINY, one_thread, shapes_fixture, train_config  # noqa: F401  (fixtures)
from PIL import Image

import dynamask
from dynamask import Predictor
from dynamask.cli import build_parser, main
from dynamask.data.shapes import split_paths
from dynamask.engine import switch_life
from dynamask.engine.checkpoint import load_checkpoint
from dynamask.engine.train import train


# ----------------------------------------------------------------------------- strip
@pytest.fixture(scope="module")
def fitted_ckpt(shapes, tmp_path_factory):
    """A tiny run that ends with the switch fit: its checkpoint keeps the fit's report and the dynamic
    phase's switch, which a stripped copy must keep."""
    out = tmp_path_factory.mktemp("fitted")
    return train(train_config(shapes, out))["checkpoint"]


def test_strip_keeps_what_inference_reads_and_drops_the_training_state(fitted_ckpt, shapes, tmp_path, capsys):
    out = str(tmp_path / "model.pth")
    assert main(["strip", fitted_ckpt, out]) == 0
    line = capsys.readouterr().out.strip()
    before, after = os.path.getsize(fitted_ckpt), os.path.getsize(out)
    assert after < before / 2  # AdamW keeps two moments per weight
    assert line.startswith(f"wrote {out}: ") and "MB (from " in line
    assert "dropped optimizer, scheduler, scaler, rng" in line
    full, stripped = load_checkpoint(fitted_ckpt), load_checkpoint(out)
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(stripped)
    assert stripped["arch"] == full["arch"] and stripped["label_map"] == full["label_map"]
    assert stripped["extra"][switch_life.FIT_KEY] == full["extra"][switch_life.FIT_KEY]
    for k, v in full["states"][switch_life.DYNAMIC_SWITCH_KEY].items():
        assert torch.equal(stripped["states"][switch_life.DYNAMIC_SWITCH_KEY][k], v)
    for k, v in full["model"].items():
        assert torch.equal(stripped["model"][k], v), k
    # Predictor, eval, infer and fit-switch take it; the Predictor's detections are the full checkpoint's
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    a = Predictor(fitted_ckpt, device="cpu", score_thresh=0.0)(image)
    b = Predictor(out, device="cpu", score_thresh=0.0)(image)
    assert len(a) == len(b) > 0 and torch.equal(a.boxes, b.boxes) and torch.equal(a.masks, b.masks)
    assert main(["eval", out, "--data", shapes, "--no-progress", "--switch", "dynamic-phase"]) == 0
    val_images = split_paths(shapes, "val")[0]
    assert main(["infer", out, val_images, "--out", str(tmp_path / "infer"), "--no-progress"]) == 0
    assert main(["fit-switch", out, "--data", shapes, "--out", str(tmp_path / "refit.pth"), "--budget-at", "14",
                 "--batches", "2", "--epochs", "1", "--calibration-images", "2", "--no-progress"]) == 0
    assert stripped["extra"]["stripped_from"] == os.path.abspath(fitted_ckpt)
    with pytest.raises(ValueError, match=r"an inference-only checkpoint \(written by `dynamask strip`\) cannot be "
                                         "resumed"):
        train(train_config(shapes, tmp_path / "again", resume=out))


def test_strip_refuses_to_write_over_its_input(fitted_ckpt, tmp_path, capsys):
    link = tmp_path / "link.pth"
    link.symlink_to(fitted_ckpt)
    size = os.path.getsize(fitted_ckpt)
    for target in (fitted_ckpt, str(link)):
        assert main(["strip", fitted_ckpt, target]) == 1
        err = capsys.readouterr().err
        assert "is the input checkpoint" in err and len(err.strip().splitlines()) == 1
    assert os.path.getsize(fitted_ckpt) == size and "optimizer" in load_checkpoint(fitted_ckpt)
    assert main(["strip", str(tmp_path / "none.pth"), str(tmp_path / "o.pth")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err and not (tmp_path / "o.pth").exists()


# ----------------------------------------------------------------------------- version, help
def test_one_version_string(capsys):
    import tomllib

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"dynamask {dynamask.__version__}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    # the metadata reads the version from the package (one place), and declares no second copy
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dynamask._version.__version__"}
    assert "version=" not in open(os.path.join(root, "setup.py")).read()


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_flag_has_help_that_shows_its_default():
    parser = build_parser()
    missing, no_default = [], []
    for name, command in _commands(parser).items():
        formatter = command.formatter_class(prog=command.prog)
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                missing.append(label)
            elif action.option_strings and action.nargs != 0:
                if "default" not in formatter._get_help_string(action).lower():
                    no_default.append(label)
    assert missing == [] and no_default == []
    text = _commands(parser)["train"].format_help()
    assert "--lr LR" in text and "(default: 0.02)" in text and "(default: 8 11)" in text
    assert "(default: dynamask_resnet_fpn)" in text and "--freeze {none,detector}" in text


# ----------------------------------------------------------------------------- overlays
def _output(n_res=(14, 56)):
    masks = torch.zeros(2, 1, 120, 200)
    masks[0, 0, 10:50, 20:80] = 0.9
    masks[1, 0, 60:110, 120:190] = 0.8
    return {"boxes": torch.tensor([[20.0, 10, 80, 50], [120, 60, 190, 110]]), "scores": torch.tensor([0.93, 0.41]),
            "labels": torch.tensor([2, 1]), "masks": masks, "mask_resolution": torch.tensor(n_res)}


def test_overlay_is_at_the_images_own_size_coloured_by_resolution(tmp_path):
    from dynamask import viz

    image = torch.full((3, 120, 200), 0.5)
    path = viz.save_overlay(image, _output(), str(tmp_path / "o.png"), score_thresh=0.3, names=["disc", "square"])
    with Image.open(path) as im:
        assert im.size == (200, 120)
        rgb = im.convert("RGB")
        # inside each mask (away from its box and label), the image blended with its resolution's colour
        for (x, y), res in (((50, 40), 14), ((160, 100), 56)):
            want = [round((1 - viz.MASK_ALPHA) * 128 + viz.MASK_ALPHA * c) for c in viz.colour(res)]
            assert list(rgb.getpixel((x, y))) == pytest.approx(want, abs=2)
        assert rgb.getpixel((100, 115)) == (128, 128, 128)  # outside every mask and box: untouched
        # the legend, top left: a swatch of each resolution shown
        legend = [rgb.getpixel((x, y)) for x in range(0, 40) for y in range(0, 40)]
        assert viz.colour(14) in legend and viz.colour(56) in legend
    assert viz.instance_labels([0.93, 0.41], [2, 1], ["disc", "square"]) == ["square 0.93", "disc 0.41"]
    assert viz.instance_labels([0.5], [7], ["disc"]) == ["class 7 0.50"]


def test_overlay_labels_go_through_draw_bounding_boxes_and_max_side_scales_down(tmp_path, monkeypatch):
    import torchvision.utils

    from dynamask import viz

    seen = {}
    real = torchvision.utils.draw_bounding_boxes

    def spy(image, boxes, **kw):
        seen.update(kw, boxes=boxes.clone())
        return real(image, boxes, **kw)

    monkeypatch.setattr(torchvision.utils, "draw_bounding_boxes", spy)
    image = torch.full((3, 120, 200), 0.5)
    overlay = viz.render_overlay(image, _output(), score_thresh=0.5, names=["disc", "square"], max_side=100)
    assert tuple(overlay.shape) == (3, 60, 100)  # the longer side at 100, the aspect kept
    assert seen["labels"] == ["square 0.93"]  # the 0.41 instance is below the threshold
    assert seen["colors"] == [viz.colour(14)] and torch.allclose(seen["boxes"], torch.tensor([[10.0, 5, 40, 25]]))
    # never scaled up; an image with nothing detected is the image itself
    empty = {k: v[:0] for k, v in _output().items()}
    plain = viz.render_overlay(image, empty, max_side=1000)
    assert tuple(plain.shape) == (3, 120, 200) and int(plain.float().sub(128).abs().max()) == 0


def test_infer_overlays_name_the_classes_of_the_checkpoint(fitted_ckpt, shapes, tmp_path, monkeypatch):
    import dynamask.viz

    names = []
    real = dynamask.viz.save_overlay
    monkeypatch.setattr(dynamask.viz, "save_overlay", lambda *a, **kw: names.append(kw["names"]) or real(*a, **kw))
    image = os.path.join(split_paths(shapes, "val")[0], sorted(os.listdir(split_paths(shapes, "val")[0]))[0])
    assert main(["infer", fitted_ckpt, image, "--out", str(tmp_path / "o"), "--no-progress", "--max-side", "32",
                 "--score-thresh", "0"]) == 0
    label_map = load_checkpoint(fitted_ckpt)["label_map"]
    assert names == [[label_map[k][1] for k in sorted(label_map)]]
    stem = os.path.splitext(os.path.basename(image))[0]
    with Image.open(tmp_path / "o" / f"{stem}.png") as im:
        assert max(im.size) == 32
    assert json.load(open(tmp_path / "o" / "images.json")) == {"1": image}
