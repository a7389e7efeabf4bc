"""Training with a tiny torchvision Mask R-CNN stand-in: a few CPU iterations, exact resume, non-finite
loss, a 2-process gloo DDP run, and checkpoints; with a tiny DynaMask: the two phases, multi-scale inputs,
the method's flags and ``--recipe paper`` (DDP cases of DynaMask: test_train_ddp.py)."""

import json
import os
import signal
import socket

import pytest
import torch

from dynamask.data.shapes import generate, split_paths
from dynamask.engine.checkpoint import (
    BUILDERS,
    build_model,
    builders,
    load_checkpoint,
    make_arch,
    model_from_checkpoint,
    save_checkpoint,
)
from dynamask.engine.recipe import lr_factor
from dynamask.engine.rng import rng_state, set_rng_state
from dynamask.engine.train import NonFiniteLossError, train
from dynamask.engine.train_config import TrainConfig

TINY = dict(depth=18, min_size=64, max_size=64, rpn_batch_size_per_image=32, rpn_pre_nms_top_n_train=64,
            rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32,
            box_batch_size_per_image=32, box_detections_per_img=20, fpn_channels=32,
            box_representation_size=64, mask_head_layers=(32, 32))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # on a small shared machine, one thread per process wastes no time spinning
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate(root, train=6, val=2, size=64, seed=0)
    return root


def _cfg(shapes, out, **kw):
    img, ann = split_paths(shapes, "train")
    base = dict(train_images=img, train_ann=ann, out_dir=str(out), arch="maskrcnn_resnet_fpn", arch_kwargs=TINY,
                epochs=2, pretrain_epochs=1, batch_size=2, lr=0.01, warmup_iters=2, lr_steps=(1,), workers=0,
                log_every=1, progress=False, seed=3,
                switch_fit_batches=2, switch_fit_epochs=2, switch_fit_calibration_images=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = train(_cfg(shapes, out))
    return out, result


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_trains_a_few_iterations(uninterrupted):
    out, result = uninterrupted
    assert result["status"] == "done" and result["epoch"] == 2 and result["iteration"] == 6
    ckpt = load_checkpoint(result["checkpoint"], arch_name="maskrcnn_resnet_fpn")
    for key in ("format_version", "arch", "label_map", "model", "optimizer", "scheduler", "epoch", "iteration", "rng"):
        assert key in ckpt
    assert ckpt["label_map"][1] == (1, "ellipse") and ckpt["arch"]["kwargs"]["num_classes"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    lines = open(out / "metrics.csv").read().strip().splitlines()
    assert lines[0].startswith("epoch,iteration,lr,") and "loss_mask" in lines[0] and len(lines) == 7
    # warm-up then a step at epoch 1: the lr of the last logged row is 0.1 x base
    assert float(lines[-1].split(",")[2]) == pytest.approx(0.001)
    # the model rebuilds from the file alone
    model, _ = model_from_checkpoint(result["checkpoint"])
    model.eval()
    with torch.no_grad():
        out0 = model([torch.rand(3, 64, 64)])[0]
    assert set(out0) >= {"boxes", "labels", "scores", "masks"}


def test_resume_after_interruption_is_exact(shapes, uninterrupted, tmp_path):
    full_out, full = uninterrupted

    def interrupt(it, losses):
        if it == 4:  # mid-way through the second epoch
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(_cfg(shapes, tmp_path), on_iteration=interrupt)
    assert first["status"] == "stopped" and first["stop_reason"] == "SIGTERM" and first["iteration"] == 4
    ckpt = load_checkpoint(first["checkpoint"])
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 4
    second = train(_cfg(shapes, tmp_path, resume="auto"))
    assert second["status"] == "done" and second["iteration"] == 6
    a = load_checkpoint(full["checkpoint"])
    b = load_checkpoint(second["checkpoint"])
    _same_weights(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # the metric log continues where it stopped, with no duplicated rows
    assert open(full_out / "metrics.csv").read().count("\n") == open(tmp_path / "metrics.csv").read().count("\n")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(shapes, tmp_path):
    holder = {}

    def builder(**kw):
        holder["model"] = build_model(make_arch("maskrcnn_resnet_fpn", **kw))
        return holder["model"]

    BUILDERS["poisonable"] = builder
    try:
        def poison(it, losses):
            if it == 4:
                with torch.no_grad():
                    next(holder["model"].parameters()).fill_(float("nan"))

        with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 2, iteration 5") as info:
            train(_cfg(shapes, tmp_path, arch="poisonable", max_iters=None), on_iteration=poison)
        assert "last.pth" in str(info.value)
        ckpt = load_checkpoint(str(tmp_path / "last.pth"))
        assert ckpt["iteration"] == 3 and ckpt["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    finally:
        BUILDERS.pop("poisonable", None)


def test_time_limit_and_max_iters(shapes, tmp_path):
    r = train(_cfg(shapes, tmp_path, max_iters=2))
    assert r["status"] == "stopped" and r["iteration"] == 2 and r["stop_reason"] == "max_iters"
    r = train(_cfg(shapes, tmp_path, resume="auto", time_limit=0.0))
    assert r["status"] == "stopped" and r["iteration"] == 3 and r["stop_reason"] == "time limit"


def test_resume_refuses_another_architecture(shapes, tmp_path):
    train(_cfg(shapes, tmp_path, max_iters=1))
    BUILDERS["other"] = BUILDERS["maskrcnn_resnet_fpn"]
    try:
        with pytest.raises(ValueError, match="architecture 'maskrcnn_resnet_fpn', not 'other'"):
            train(_cfg(shapes, tmp_path, arch="other", resume="auto"))
    finally:
        BUILDERS.pop("other", None)


def test_adamw_trains_and_resume_refuses_another_optimizer(shapes, tmp_path):
    r = train(_cfg(shapes, tmp_path, optimizer="adamw", lr=1e-3, max_iters=2))
    assert r["iteration"] == 2
    state = load_checkpoint(os.path.join(tmp_path, "last.pth"))["optimizer"]["state"]
    assert all("exp_avg_sq" in s for s in state.values()) and len(state) > 0  # Adam's moments were saved
    with pytest.raises(ValueError, match="--optimizer adamw, not sgd"):
        train(_cfg(shapes, tmp_path, resume="auto"))
    with pytest.raises(ValueError, match="optimizer must be"):
        train(_cfg(shapes, tmp_path / "x", optimizer="adam"))


def test_lr_schedule():
    kw = dict(warmup_iters=10, warmup_factor=0.1, milestones=[20, 30], gamma=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(5, **kw) == pytest.approx(0.55)
    assert lr_factor(10, **kw) == 1.0 and lr_factor(19, **kw) == 1.0
    assert lr_factor(20, **kw) == pytest.approx(0.1) and lr_factor(35, **kw) == pytest.approx(0.01)


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 3)).sum().backward()
    opt.step()
    path = str(tmp_path / "c.pth")
    state = rng_state()
    save_checkpoint(path, arch=make_arch("maskrcnn_resnet_fpn", num_classes=3, min_size=(64, 80)),
                    label_map={1: (7, "a")}, model=model, optimizer=opt, epoch=1, iteration=5, rng=state)
    assert sorted(os.listdir(tmp_path)) == ["c.pth"]  # no temporary file left behind
    ckpt = load_checkpoint(path)
    assert ckpt["label_map"] == {1: (7, "a")} and ckpt["arch"]["kwargs"]["min_size"] == (64, 80)
    torch.rand(5)
    set_rng_state(ckpt["rng"])
    assert torch.equal(torch.get_rng_state(), state["torch"])
    with pytest.raises(ValueError, match="not 'dynamask_resnet_fpn'"):
        load_checkpoint(path, arch_name="dynamask_resnet_fpn")
    with pytest.raises(KeyError, match="unknown architecture 'nope'"):
        build_model({"name": "nope", "kwargs": {}})
    with pytest.raises(TypeError, match="not a plain value"):
        make_arch("x", f=lambda: 0)
    torch.save({"weights": 1}, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="not a dynamask checkpoint"):
        load_checkpoint(str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pth"))


def _ddp_worker(rank, world, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(cfg)


@pytest.mark.slow
def test_ddp_two_processes_gloo(shapes, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(shapes, tmp_path, epochs=1, batch_size=1, log_every=1)
    # fork: the children need not import torch again (minutes on a busy 2-core machine)
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, port, cfg), nprocs=2, join=True, start_method="fork")
    ckpt = load_checkpoint(str(tmp_path / "last.pth"))
    # 6 images over 2 processes at batch 1: 3 iterations per epoch
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 3 and ckpt["extra"]["world_size"] == 2
    assert open(tmp_path / "metrics.csv").read().count("\n") == 4


def test_cli_train_then_eval(shapes, tmp_path, capsys):
    from dynamask.cli import main

    kwargs = json.dumps(dict(depth=18, min_size=64, max_size=64, fpn_channels=32, box_representation_size=64,
                             mask_head_layers=[32, 32]))
    run = str(tmp_path / "run")
    assert main(["train", "--data", shapes, "--out", run, "--arch", "maskrcnn_resnet_fpn", "--arch-kwargs", kwargs,
                 "--epochs", "1", "--batch-size", "3", "--workers", "0", "--no-progress", "--lr", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "done: epoch 1, iteration 2" in out and "| segm |" in out
    assert main(["eval", os.path.join(run, "last.pth"), "--data", shapes, "--out", str(tmp_path / "ev"),
                 "--no-progress", "--mask-costs", "28=0.5"]) == 0
    assert (tmp_path / "ev" / "metrics.json").exists()
    metrics = json.load(open(tmp_path / "ev" / "metrics.json"))
    # the Mask R-CNN stand-in reports every mask at 28x28, costed as given; its only column is 28
    n = metrics["resolution"]["instances"]
    assert metrics["resolution"]["overall"] == {"28": n}
    assert n == 0 or metrics["mask_gmac_per_instance"] == pytest.approx(0.5)
    assert main(["eval", str(tmp_path / "missing.pth"), "--data", shapes]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", run])  # no data given
    with pytest.raises(SystemExit):
        main(["train", "--data", shapes, "--out", run, "--arch-kwargs", "[1]"])


TINY_DYNAMASK = dict(depth=18, trunk_channels=16, stage_channels=[8, 8, 8], mask_roi_size=7, fpn_channels=32,
                     box_representation_size=64, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
                     rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=16, box_batch_size_per_image=32,
                     box_detections_per_img=10)


def test_dynamask_trains_across_the_phase_switch_at_many_scales(shapes, tmp_path):
    """A tiny DynaMask through ``train()``: 1 pretrain epoch, then 2 dynamic ones (2 steps each); the lr
    step after dynamic epoch 1 falls at step 4; the shorter side is drawn from 48..80 in training and is
    80 at test; the budget is on by default at the paper's ratio of this head's top cost."""
    from dynamask.engine.recipe import PAPER_TARGET_RATIO
    from dynamask.models import dynamask_resnet_fpn, flops

    sizes = {"train": [], "eval": []}

    def builder(**kw):
        model = dynamask_resnet_fpn(**kw)
        model.transform.register_forward_hook(
            lambda m, args, out: sizes["train" if m.training else "eval"].extend(out[0].image_sizes))
        return model

    builders()  # the registry fills on first use: fill it before adding to it
    BUILDERS["watched_dynamask"] = builder
    phases = []
    val_img, val_ann = split_paths(shapes, "val")
    try:
        r = train(_cfg(shapes, tmp_path, arch="watched_dynamask", arch_kwargs=TINY_DYNAMASK, pretrain_epochs=1,
                       epochs=2, batch_size=3, lr_steps=(1,), warmup_iters=1, resize=(48, 80), optimizer="adamw",
                       lr=1e-4, val_images=val_img, val_ann=val_ann),
                  on_iteration=lambda it, losses: phases.append("loss_budget" in losses))
    finally:
        BUILDERS.pop("watched_dynamask", None)
    assert r["status"] == "done" and r["epoch"] == 3 and r["iteration"] == 6
    assert phases == [False, False, True, True, True, True]  # budget and entropy from the dynamic phase on
    rows = [line.split(",") for line in open(tmp_path / "metrics.csv").read().strip().splitlines()]
    lr = [float(row[rows[0].index("lr")]) for row in rows[1:]]
    assert lr == pytest.approx([1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5])  # the lr of the step after each row
    train_short = [min(s) for s in sizes["train"]]
    assert all(48 <= s <= 80 for s in train_short) and len(set(train_short)) > 1
    # at test size: the evaluation's 2 images, the switch fit's 2 batches of 3 and 2 calibration images, then
    # the dynamic phase's switch evaluated on the 2 images and both switches probed on their ground-truth boxes
    assert {min(s) for s in sizes["eval"]} == {80} and len(sizes["eval"]) == 2 + 2 * 3 + 2 + 2 + 2
    assert r["plan"][0].startswith("schedule: 1 pretrain epoch(s)") and "= 3 epochs of 2 iterations" in r["plan"][0]
    assert "after dynamic epoch 1 (iteration 4)" in r["plan"][2] and "shorter side 48-80" in r["plan"][3]
    assert any(line.startswith("mask head: 14² fuses P2, 28² fuses P2, 56² fuses P2 (stage_levels [0, 0, 0]")
               for line in r["plan"])  # the tiny 7→56 head on 80-px images
    ckpt = load_checkpoint(r["checkpoint"])
    kwargs = ckpt["arch"]["kwargs"]
    assert kwargs["min_size"] == list(range(48, 81))
    assert kwargs["stage_levels"] == [0, 0, 0]  # resolved from the 80-px images and recorded for the rebuild
    model = dynamask_resnet_fpn(**kwargs)
    model.load_state_dict(ckpt["model"])
    top = max(flops.mask_head_gmacs(model).values())
    assert kwargs["target_gmacs"] == pytest.approx(0.4 / 1.40 * top) and PAPER_TARGET_RATIO == 0.4 / 1.40
    assert model.roi_heads.target_gmacs == pytest.approx(0.4 / 1.40 * top)
    # the evaluation's costs: every detection (any score), MSM included; per image over the 2 val images
    cost = r["metrics"]["mask_cost"]
    n, msm = cost["instances"], flops.msm_gmacs(model)
    assert n > 0 and cost["msm_gmac_per_roi"] == pytest.approx(msm)
    assert min(flops.mask_head_gmacs(model).values()) + msm <= cost["mask_gmac_per_instance"] <= top + msm
    rois = n * (cost["mask_gmac_per_instance"] - msm)  # the RoIs' own head cost, all images
    assert cost["head_gmac_per_image"] == pytest.approx(cost["per_image_gmac"] + rois / 2)
    assert cost["per_image_gmac"] > n * msm / 2  # the projections come on top of the MSM


def test_method_flags_reach_the_model_and_conflicts_are_refused(shapes, tmp_path):
    r = train(_cfg(shapes, tmp_path, arch="dynamask_resnet_fpn", arch_kwargs=TINY_DYNAMASK, pretrain_epochs=0,
                   epochs=1, max_iters=1, target_gmacs=0.005, budget_weight=0.3, edge_weight=0.2, gumbel_tau=0.7,
                   routing_signal="grid", coupled=False, switch_input="mask"))
    kw = load_checkpoint(r["checkpoint"])["arch"]["kwargs"]
    assert (kw["target_gmacs"], kw["budget_weight"], kw["edge_weight"], kw["gumbel_tau"]) == (0.005, 0.3, 0.2, 0.7)
    assert (kw["routing_signal"], kw["coupled"], kw["switch_input"]) == ("grid", False, "mask")
    from dynamask.engine.recipe import METHOD_SETTINGS, model_kwargs

    none = dict.fromkeys(METHOD_SETTINGS)
    off = model_kwargs("dynamask_resnet_fpn", {"depth": 18}, resize=None, max_size=None, budget=False, settings=none)
    assert off == {"depth": 18, "target_gmacs": None}  # the trainer then sets no default C_t
    with pytest.raises(ValueError, match="--no-budget and --target-gmacs contradict"):
        model_kwargs("dynamask_resnet_fpn", {}, resize=None, max_size=None, budget=False,
                     settings=dict(none, target_gmacs=0.3))
    with pytest.raises(
        ValueError, match=r"budget_weight \(--budget-weight\) given both in --arch-kwargs and as a flag"
    ):
        train(_cfg(shapes, tmp_path / "x", arch="dynamask_resnet_fpn",
                   arch_kwargs=dict(TINY_DYNAMASK, budget_weight=0.4), budget_weight=0.5))
    with pytest.raises(ValueError, match="settings of DynaMask, not of architecture 'maskrcnn_resnet_fpn'"):
        train(_cfg(shapes, tmp_path / "x", target_gmacs=0.4))
    with pytest.raises(ValueError, match="a resumed run keeps its settings"):
        train(_cfg(shapes, tmp_path, arch="dynamask_resnet_fpn", arch_kwargs=TINY_DYNAMASK, resume="auto",
                   gumbel_tau=0.5))


def test_cli_paper_recipe_dry_run(shapes, tmp_path, capsys):
    """``--recipe paper`` with a tiny model and 1 step: the plan it prints is the paper's schedule; the
    ImageNet weights come from the file named, and a missing file is refused before any work."""
    from torchvision.models import resnet18

    from dynamask.cli import main

    weights = str(tmp_path / "resnet18.pth")
    torch.save(resnet18().state_dict(), weights)
    tiny = json.dumps(dict(TINY_DYNAMASK, box_detections_per_img=5))
    run = str(tmp_path / "run")
    assert main(["train", "--recipe", "paper", "--data", shapes, "--out", run, "--backbone-weights", weights,
                 "--arch-kwargs", tiny, "--max-iters", "1", "--workers", "0", "--no-progress",
                 "--switch-fit-batches", "1", "--switch-fit-epochs", "1", "--switch-fit-calibration-images", "1"]) == 0
    out, err = capsys.readouterr()
    assert "total batch of 16; this run has 2 x 1 = 2" in err
    assert "1 pretrain epoch(s) (every resolution supervised, no mask switch) + 12 dynamic epoch(s)" in out
    assert "= 13 epochs of 3 iterations" in out
    assert "sgd 0.02, linear warm-up over the first 500 iterations from x0.001; x0.1 after dynamic epoch 8 " \
           "(iteration 27), dynamic epoch 11 (iteration 36)" in out
    assert "shorter side 640-800 in training (drawn per image), 800 at test; longer side at most 1333" in out
    assert "mask head: 14² fuses P4, 28² fuses P3, 56² fuses P2 (stage_levels [2, 1, 0]" in out  # the paper's levels
    ckpt = load_checkpoint(os.path.join(run, "last.pth"))
    kw = ckpt["arch"]["kwargs"]
    assert "weights_backbone" not in kw and kw["frozen_bn"] is True and kw["depth"] == 18  # --arch-kwargs wins
    assert kw["stage_levels"] == [2, 1, 0]  # the paper's recipe (800 px): the paper's P4, P3, P2
    assert kw["msm_heads"] == 1  # the paper's MSM: one head
    model, _ = model_from_checkpoint(os.path.join(run, "last.pth"))  # rebuilds without the weights file
    assert model.roi_heads.msm.num_heads == 1
    from torchvision.ops.misc import FrozenBatchNorm2d

    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # 3 trainable layers: layer2-4
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "paper", "--data", shapes, "--out", run,
              "--backbone-weights", str(tmp_path / "missing.pth")])
    assert "ImageNet backbone weights not found" in capsys.readouterr().err


@pytest.mark.cuda
def test_dynamask_trains_on_cuda_with_amp(shapes, tmp_path):
    """The trainer's CUDA path: float16 autocast and a gradient scaler across the phase switch."""
    r = train(_cfg(shapes, tmp_path, arch="dynamask_resnet_fpn", arch_kwargs=TINY_DYNAMASK, pretrain_epochs=1,
                   epochs=1, batch_size=3, amp=True, device="cuda", optimizer="adamw", lr=1e-4))
    assert r["status"] == "done" and r["iteration"] == 4
    ckpt = load_checkpoint(r["checkpoint"])
    assert "scaler" in ckpt and ckpt["scaler"]  # the scaler was enabled and saved
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_cli_routing_flags_reach_the_train_config(shapes, tmp_path, monkeypatch):
    """``--routing-signal``, ``--decoupled`` and ``--switch-input`` land in TrainConfig (whose settings the
    test above follows into the model); left out, they stay None (the model's defaults)."""
    import dynamask.engine.train as train_mod
    from dynamask.cli import main

    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, **kw: seen.append(cfg) or {"status": "done", "epoch": 0,
                                                                               "iteration": 0, "checkpoint": ""})
    common = ["train", "--data", shapes, "--out", str(tmp_path / "r"), "--arch", "dynamask_resnet_fpn", "--no-progress"]
    main(common + ["--routing-signal", "boundary", "--decoupled", "--switch-input", "trunk"])
    main(common)
    assert [(c.routing_signal, c.coupled, c.switch_input) for c in seen] == [("boundary", False, "trunk"),
                                                                            (None, None, None)]
    with pytest.raises(SystemExit):
        main(common + ["--switch-input", "p2"])


def test_every_train_setting_has_one_flag_and_the_defaults_round_trip(tmp_path):
    """The CLI's flags are generated from TrainConfig: every field has one, the parsed defaults give back
    TrainConfig's defaults, and a flag's value lands in its field (units and types converted)."""
    import dataclasses

    from dynamask.cli import build_parser
    from dynamask.engine.train import TrainConfig
    from dynamask.engine.train_flags import config_kwargs

    parser = build_parser()
    args = parser.parse_args(["train", "--out", str(tmp_path)])
    kw = config_kwargs(args, TrainConfig)
    assert set(kw) == {f.name for f in dataclasses.fields(TrainConfig)}
    kw.update(train_images="i", train_ann="a")
    assert TrainConfig(**kw) == TrainConfig("i", "a", str(tmp_path))
    args = parser.parse_args(["train", "--out", "o", "--time-limit", "1.5", "--lr-steps", "3", "4", "--resize",
                              "600", "800", "--no-amp", "--no-budget", "--decoupled", "--resume",
                              "--repeat-factor-sampling", "--mask-costs", "14=0.2,28=0.5", "--optimizer", "adamw"])
    kw = config_kwargs(args, TrainConfig)
    assert (kw["out_dir"], kw["time_limit"], kw["lr_steps"], kw["resize"]) == ("o", 90.0, (3, 4), (600, 800))
    assert (kw["amp"], kw["budget"], kw["coupled"], kw["resume"]) == (False, False, False, "auto")
    assert (kw["repeat_factor_threshold"], kw["mask_costs"], kw["optimizer"]) == (0.001, {14: 0.2, 28: 0.5}, "adamw")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--out", "o", "--optimizer", "adam"])
