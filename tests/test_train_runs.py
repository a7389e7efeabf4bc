"""What a training run leaves in its folder and how it can be replayed: config.yaml and ``train --config``,
log.txt (the plan, progress lines, the end), loss.png, ``--eval-every`` with best.pth, ``--freeze detector``
and the files' permissions under the umask. Tiny DynaMask runs of a few iterations on 64-px shapes."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import pytest
import torch
import yaml
from model_helpers import TRAIN_TINY, one_thread, shapes_fixture, train_config  # noqa: F401  (fixtures)

import dynamask.engine.train as train_mod
from dynamask.cli import main
from dynamask.data.shapes import split_paths
from dynamask.engine import freeze
from dynamask.engine.checkpoint import build_model, load_checkpoint, make_arch, save_checkpoint
from dynamask.engine.loss_plot import write_loss_plot
from dynamask.engine.train import TrainConfig, train
from dynamask.engine.train_eval import BestCheckpoint

FAST = ["--workers", "0", "--switch", "paper", "--optimizer", "adamw", "--warmup-iters", "1"]


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _record_configs(monkeypatch) -> list[TrainConfig]:
    """The TrainConfig each `dynamask train` builds, recorded on its way into the real train()."""
    seen: list[TrainConfig] = []
    real = train_mod.train

    def recording(cfg, **kw):
        seen.append(cfg)
        return real(cfg, **kw)

    monkeypatch.setattr(train_mod, "train", recording)
    return seen


@pytest.fixture(autouse=True)
def _umask_022():
    """Every run here under umask 022, so the permission checks below know what to expect."""
    old = os.umask(0o022)
    yield
    os.umask(old)


# ----------------------------------------------------------------------------- 1. a run they can replay
def test_config_yaml_replays_the_run_exactly(shapes, tmp_path, monkeypatch, capsys):
    seen = _record_configs(monkeypatch)
    x, y = tmp_path / "x", tmp_path / "y"
    tiny = {k: v for k, v in TRAIN_TINY.items() if k != "min_size"}  # --resize gives it
    flags = ["--arch-kwargs", json.dumps(tiny), "--max-iters", "1", "--lr", "3e-4", "--seed", "7",
             "--lr-steps", "1", "--time-limit", "100", "--resize", "56", "64", "--flip-prob", "0.25",
             "--mask-costs", "7=0.1,14=0.2,28=0.3,56=0.4", "--log-every", "1", "--no-progress", *FAST]
    assert main(["train", "--data", shapes, "--out", str(x), *flags]) == 0
    settings = yaml.safe_load(open(x / "config.yaml"))
    assert settings["dynamask_version"] == __import__("dynamask").__version__ and settings["data"] == shapes
    assert settings["train"]["lr"] == 3e-4 and settings["train"]["time_limit"] == 6000.0
    assert settings["command"].startswith("dynamask train --data ")
    # the builder's resolved arguments: the classes from the data, the sizes from --resize, the default C_t
    resolved = settings["resolved"]["arch_kwargs"]
    assert resolved["num_classes"] == 8 and resolved["min_size"] == list(range(56, 65)) and resolved["target_gmacs"] > 0
    assert main(["train", "--config", str(x / "config.yaml"), "--out", str(y)]) == 0
    first, replayed = seen
    assert dataclasses.replace(replayed, out_dir=first.out_dir) == first
    assert replayed.out_dir == str(y) and replayed.time_limit == 6000.0 and replayed.lr_steps == (1,)
    # the same first step: same losses, to the last bit
    a, b = _rows(x / "metrics.csv"), _rows(y / "metrics.csv")
    losses = [k for k in a[0] if k.startswith("loss")]
    assert len(a) == len(b) == 1 and len(losses) >= 5
    assert [a[0][k] for k in losses] == [b[0][k] for k in losses]
    # flags given on the command line override the file's, even when they give a flag's default value
    capsys.readouterr()
    assert main(["train", "--config", str(x / "config.yaml"), "--out", str(tmp_path / "z"), "--lr", "0.02",
                 "--epochs", "3", "--dry-run"]) == 0
    assert dataclasses.replace(seen[-1], out_dir=first.out_dir, lr=first.lr, epochs=first.epochs) == first
    assert (seen[-1].lr, seen[-1].epochs) == (0.02, 3)
    assert not (tmp_path / "z" / "config.yaml").exists()  # a dry run writes nothing


def test_config_errors_are_one_line_before_any_work(shapes, tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 1
    assert "--config " in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n  lerning_rate: 0.2\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "unknown setting(s) under train: lerning_rate" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["train", "--config", str(tmp_path / "list.yaml"), "--out", str(tmp_path / "o")]) == 1
    assert "not a dynamask run config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # neither --out nor a file to take it from
        main(["train", "--data", shapes])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    assert not (tmp_path / "o" / "last.pth").exists()


# ----------------------------------------------------------------------------- 2. logs, progress, loss.png
def test_log_txt_holds_everything_the_run_says(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    r = train(train_config(shapes, out, pretrain_epochs=1, epochs=1, switch="paper", progress=False, log_every=2))
    console = capsys.readouterr().out
    text = open(out / "log.txt").read()
    assert r["status"] == "done" and r["iteration"] == 6
    for needle in ("schedule: 1 pretrain epoch(s)", "switch: the paper's", "config.yaml",
                   "epoch 1/2 iteration 2/6: loss ", "epoch 2/2 iteration 6/6: loss ", "eta 0:",
                   "done: epoch 2, iteration 6, checkpoint"):
        assert needle in text, needle
        assert needle in console, needle  # --no-progress: the progress lines on the console too
    # a line at every log_every and at each epoch's end (iteration 3)
    assert [ln.split("iteration ")[1].split("/")[0] for ln in text.splitlines() if ": loss " in ln] == ["2", "3", "4",
                                                                                                          "6"]
    # the logged loss is the sum of the terms (every one trains without --freeze)
    row = _rows(out / "metrics.csv")[-1]
    terms = sum(float(v) for k, v in row.items() if k.startswith("loss_") and v != "")
    assert float(row["loss"]) == pytest.approx(terms, rel=1e-5)
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # with the bar shown, progress lines go to log.txt only; resuming appends to the same file
    train(train_config(shapes, out, pretrain_epochs=1, epochs=2, switch="paper", progress=True, log_every=2,
                       resume="auto"))
    console = capsys.readouterr().out
    text = open(out / "log.txt").read()
    assert "iteration 8/9: loss" in text and ": loss " not in console and "done: epoch 3, iteration 9" in console
    assert text.count("schedule: ") == 2


def test_loss_plot_needs_a_loss_and_draws_the_validation_ap(tmp_path):
    from PIL import Image

    path = tmp_path / "metrics.csv"
    assert write_loss_plot(str(path), str(tmp_path / "a.png")) is None  # no file yet
    path.write_text("epoch,iteration,val_segm_AP\n1,3,0.2\n")
    assert write_loss_plot(str(path), str(tmp_path / "a.png")) is None and not (tmp_path / "a.png").exists()
    path.write_text("epoch,iteration,loss,loss_mask,val_segm_AP\n1,1,2.0,0.5,\n1,2,1.5,0.4,\n1,2,,,0.25\n")
    assert write_loss_plot(str(path), str(tmp_path / "a.png")) == str(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert oct(os.stat(tmp_path / "a.png").st_mode & 0o777) == oct(0o644)


# ----------------------------------------------------------------------------- 3. validation during training
def test_eval_every_needs_a_validation_split_before_any_work(shapes, tmp_path):
    with pytest.raises(ValueError, match="--eval-every 1 needs a validation split"):
        train(train_config(shapes, tmp_path, eval_every=1))
    with pytest.raises(ValueError, match="eval_every must be"):
        train(train_config(shapes, tmp_path, eval_every=0, val_images="v", val_ann="a"))
    assert sorted(os.listdir(tmp_path)) == []  # nothing written


def test_eval_every_logs_each_evaluation_and_keeps_best(shapes, tmp_path, monkeypatch):
    scalars: list[tuple[str, float, int]] = []

    class Board:  # TensorBoard's SummaryWriter, as far as the trainer uses it
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setattr(train_mod, "tensorboard_writer", lambda folder: Board())
    val_img, val_ann = split_paths(shapes, "val")
    out = tmp_path / "run"
    r = train(train_config(shapes, out, pretrain_epochs=1, epochs=1, switch="paper", eval_every=1,
                           val_images=val_img, val_ann=val_ann))
    assert r["status"] == "done"
    evals = [row for row in _rows(out / "metrics.csv") if row.get("val_segm_AP")]
    assert [(row["epoch"], row["iteration"]) for row in evals] == [("1", "3"), ("2", "6")]
    aps = [float(row["val_segm_AP"]) for row in evals]
    assert [(tag, step) for tag, _, step in scalars if tag == "val/segm_AP"] == [("val/segm_AP", 3), ("val/segm_AP", 6)]
    assert [v for tag, v, _ in scalars if tag == "val/segm_AP"] == pytest.approx(aps)
    best = load_checkpoint(str(out / "best.pth"))
    record = best["extra"]["best"]
    # the first evaluation with the highest AP (a tie keeps the earlier one)
    assert record["segm_AP"] == pytest.approx(max(aps)) and record["epoch"] == 1 + aps.index(max(aps))
    assert "optimizer" not in best and "rng" not in best
    log = open(out / "log.txt").read()
    assert log.count("evaluating after epoch") == 2 and "| segm |" in log
    for name in ("best.pth", "last.pth", "config.yaml", "log.txt", "loss.png"):  # umask 022
        assert oct(os.stat(out / name).st_mode & 0o777) == oct(0o644), name


def test_best_checkpoint_keeps_the_highest_segm_ap(tmp_path):
    written = []
    best = BestCheckpoint(str(tmp_path))
    for epoch, ap in enumerate([0.1, 0.05, 0.2, 0.2], start=1):
        best.offer({"segm": {"AP": ap}}, epoch=epoch, iteration=10 * epoch,
                   write=lambda path, record: written.append(record))
    assert [r["epoch"] for r in written] == [1, 3] and best.ap == 0.2
    assert not best.offer({"bbox": {"AP": 0.9}}, epoch=5, iteration=50, write=lambda p, r: written.append(r))


# ----------------------------------------------------------------------------- 4. --freeze detector
DETECTOR_PREFIXES = ("backbone.", "rpn.", "roi_heads.box_head.", "roi_heads.box_predictor.")
HEAD_PREFIXES = ("roi_heads.mask_head.", "roi_heads.msm.")


def test_freeze_detector_trains_the_mask_head_on_bit_identical_detector_weights(shapes, tmp_path):
    first = train(train_config(shapes, tmp_path / "det", pretrain_epochs=1, epochs=0, switch="paper", lr=1e-3))
    source = load_checkpoint(first["checkpoint"])["model"]
    # frozen_bn False: ordinary BatchNorm in the backbone, so that its running statistics must stay put
    kwargs = dict(TRAIN_TINY, weights=first["checkpoint"], frozen_bn=False)
    r = train(train_config(shapes, tmp_path / "frozen", arch_kwargs=kwargs, freeze="detector", pretrain_epochs=1,
                           epochs=1, switch="paper", lr=1e-3))
    assert r["status"] == "done" and any(line.startswith("freeze: the detector is frozen") for line in r["plan"])
    after = load_checkpoint(r["checkpoint"])
    detector = [k for k in source if k.startswith(DETECTOR_PREFIXES)]
    head = [k for k in source if k.startswith(HEAD_PREFIXES) and source[k].is_floating_point()]
    assert any("running_mean" in k for k in detector) and len(head) > 10
    for k in detector:  # parameters and BatchNorm statistics alike
        assert torch.equal(after["model"][k], source[k]), k
    changed = [k for k in head if not torch.equal(after["model"][k], source[k])]
    assert len(changed) > len(head) // 2
    assert after["extra"]["config"]["freeze"] == "detector" and "weights" not in after["arch"]["kwargs"]
    # the RPN and box losses are logged but not back-propagated: the loss is the mask branch's terms
    for row in _rows(tmp_path / "frozen" / "metrics.csv"):
        mask_terms = sum(float(v) for k, v in row.items()
                         if k.startswith("loss_") and k not in freeze.DETECTOR_LOSSES and v != "")
        assert float(row["loss"]) == pytest.approx(mask_terms, rel=1e-5) and float(row["loss_classifier"]) > 0
    # resuming it without --freeze would train other parameters with this optimiser state: refused
    with pytest.raises(ValueError, match="trained with --freeze detector, not none"):
        train(train_config(shapes, tmp_path / "frozen", epochs=2, switch="paper", resume="auto"))


def test_freeze_detector_puts_only_the_detectors_batchnorm_in_eval_mode():
    model = build_model(make_arch("dynamask_resnet_fpn", **dict(TRAIN_TINY, num_classes=3)))
    trained = freeze.freeze_detector(model)
    assert trained and all(n.startswith(HEAD_PREFIXES) for n in trained)
    model.train()
    freeze.detector_eval_mode(model)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.training and model.rpn.training and model.roi_heads.mask_head.training


def test_freeze_detector_is_refused_without_detector_weights(shapes, tmp_path):
    with pytest.raises(ValueError, match="--freeze detector keeps the detector's weights as they are"):
        train(train_config(shapes, tmp_path, freeze="detector"))
    with pytest.raises(ValueError, match="maskrcnn_resnet_fpn has neither"):
        train(train_config(shapes, tmp_path, arch="maskrcnn_resnet_fpn", arch_kwargs={"weights": "x.pth"},
                           freeze="detector"))
    assert not (tmp_path / "last.pth").exists() and not (tmp_path / "log.txt").exists()


def test_freeze_detector_refuses_torchvision_weights_whose_box_predictor_would_not_load(shapes, tmp_path):
    """torchvision's COCO predictor has 91 classes; the shapes data 8: imported, it would be dropped and the
    frozen box predictor stay random."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    path = str(tmp_path / "tv.pth")
    torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict(), path)
    with pytest.raises(ValueError, match="has 91 classes and this model 8"):
        train(train_config(shapes, tmp_path / "run", arch_kwargs={"depth": 50, "torchvision_weights": path},
                           freeze="detector"))


# ----------------------------------------------------------------------------- 5. permissions
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_checkpoint(str(tmp_path / "c.pth"), arch=make_arch("x"), label_map={1: (1, "a")},
                               model=torch.nn.Linear(2, 2))
    finally:
        os.umask(old)
    assert oct(os.stat(path).st_mode & 0o777) == oct(mode)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []  # no temporary file left behind
