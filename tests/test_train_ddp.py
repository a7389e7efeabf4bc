"""DDP with 2 gloo processes on the CPU, training a tiny DynaMask: every collective lines up when one
process has no positive RoI in the dynamic phase, when one process's loss is non-finite, and in the
evaluation gather over uneven shards; and the entropy term's all-reduce against the single-process
value and gradient. Each run has a deadline, so a hang fails the test instead of hanging CI."""

import json
import os
import socket
import sys
import time
import warnings

import pytest
import torch

from dynamask.data.shapes import generate, split_paths
from dynamask.engine.checkpoint import BUILDERS, builders, load_checkpoint
from dynamask.engine.train import NonFiniteLossError, TrainConfig, train
from dynamask.models import dynamask_resnet_fpn

TINY = dict(depth=18, min_size=64, max_size=64, trunk_channels=16, stage_channels=[8, 8, 8], mask_roi_size=7,
            fpn_channels=32, box_representation_size=64, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
            rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=16, box_batch_size_per_image=32,
            box_detections_per_img=10)
DEADLINE_S = 90  # a hang is a failure; each run takes a few seconds


def _data(root, *, train, val, empty=()):
    """Shapes images; the training images numbered in ``empty`` (1-based ids) lose their objects."""
    generate(str(root), train=train, val=val, size=64, seed=1)
    img, ann = split_paths(str(root), "train")
    if empty:
        with open(ann) as f:
            data = json.load(f)
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in empty]
        with open(ann, "w") as f:
            json.dump(data, f)
    return img, ann


def _cfg(img, ann, out, **kw):
    base = dict(train_images=img, train_ann=ann, out_dir=str(out), arch="dynamask_resnet_fpn", arch_kwargs=TINY,
                epochs=1, pretrain_epochs=0, batch_size=1, optimizer="adamw", lr=1e-4, warmup_iters=1,
                lr_steps=(), workers=0, log_every=1, progress=False, seed=0,
                switch_fit_batches=2, switch_fit_epochs=2, switch_fit_calibration_images=2)
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank, world, port, cfg, out, on_iteration):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # the C++ side (DDP's reducer) warns on stderr: keep this process's in a file for the test to read
    err = os.open(os.path.join(out, f"rank{rank}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = train(cfg, on_iteration=on_iteration)
            outcome = {"status": result["status"], "iteration": result["iteration"],
                       "metrics": result.get("metrics")}
        except NonFiniteLossError as exc:
            outcome = {"error": str(exc)}
    outcome["warnings"] = [str(w.message) for w in caught]
    sys.stderr.flush()
    with open(os.path.join(out, f"rank{rank}.stderr")) as f:
        outcome["warnings"].append(f.read())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, args: tuple) -> None:
    """``fn(rank, *args)`` in 2 forked processes; fails the test if they do not finish by the deadline."""
    # fork: the children need not import torch again (minutes on a busy 2-core machine)
    ctx = torch.multiprocessing.start_processes(fn, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2 processes did not finish in {DEADLINE_S} s (a collective out of step?)")


def _run_two(cfg, out, on_iteration=None) -> list[dict]:
    """Runs ``train(cfg)`` in 2 gloo processes; returns what each reported."""
    os.makedirs(out, exist_ok=True)
    _spawn(_worker, (2, _free_port(), cfg, str(out), on_iteration))
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]


@pytest.mark.slow
def test_dynamic_phase_with_no_positive_roi_on_one_process(tmp_path):
    """The issue's run: 2 processes, 2 images of which one has no object, dynamic from the first step.
    The process given the empty image has no positive RoI, yet the entropy term's all-reduce lines up."""
    img, ann = _data(tmp_path / "data", train=2, val=0, empty=(2,))
    out = tmp_path / "run"
    ranks = _run_two(_cfg(img, ann, out), out)
    assert [r["status"] for r in ranks] == ["done", "done"] and [r["iteration"] for r in ranks] == [1, 1]
    ckpt = load_checkpoint(str(out / "last.pth"))
    assert ckpt["iteration"] == 1 and ckpt["epoch"] == 1 and ckpt["extra"]["world_size"] == 2
    header, row = open(out / "metrics.csv").read().strip().splitlines()
    values = dict(zip(header.split(","), row.split(",")))
    # the entropy term was all-reduced: the mean over processes of the same global value, non-zero
    assert float(values["loss_entropy"]) < 0 and "loss_budget" in values
    # DDP's reducer copies each gradient whose strides differ from its bucket view, and says so
    assert not [w for r in ranks for w in r["warnings"] if "Grad strides do not match" in w]
    assert any("find_unused_parameters=True" in w for w in ranks[0]["warnings"])  # stderr was read
    assert not [w for r in ranks for w in r["warnings"] if "is deprecated" in w]


@pytest.mark.slow
def test_non_finite_loss_on_one_process_stops_both(tmp_path):
    img, ann = _data(tmp_path / "data", train=4, val=0)
    out = tmp_path / "run"
    holder = {}

    def builder(**kw):
        holder["model"] = dynamask_resnet_fpn(**kw)
        return holder["model"]

    def poison(it, losses):
        if it == 3 and torch.distributed.get_rank() == 1:  # process 1 only, after the 3rd step
            with torch.no_grad():
                next(holder["model"].parameters()).fill_(float("nan"))

    builders()  # the registry fills on first use: fill it before adding to it
    BUILDERS["poisonable_dynamask"] = builder
    try:
        cfg = _cfg(img, ann, out, arch="poisonable_dynamask", epochs=2)  # 2 iterations per epoch
        ranks = _run_two(cfg, out, on_iteration=poison)
    finally:
        BUILDERS.pop("poisonable_dynamask", None)
    for r in ranks:  # both processes stop at the same step with the clear error
        assert "non-finite loss at epoch 2, iteration 4" in r["error"] and "last.pth" in r["error"]
    ckpt = load_checkpoint(str(out / "last.pth"))  # the end of epoch 1 is kept
    assert ckpt["iteration"] == 2 and ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_evaluation_is_sharded_and_gathered(tmp_path):
    """3 validation images over 2 processes (2 + 1: uneven shards, one gather) give the metrics of all 3,
    as one process evaluating alone does; 3 training images are padded to 2 steps of 1 per process."""
    img, ann = _data(tmp_path / "data", train=3, val=3)
    val_img, val_ann = split_paths(str(tmp_path / "data"), "val")
    out = tmp_path / "run"
    cfg = _cfg(img, ann, out, val_images=val_img, val_ann=val_ann)
    ranks = _run_two(cfg, out)
    assert [r["iteration"] for r in ranks] == [2, 2]
    assert ranks[1]["metrics"] is None and ranks[0]["metrics"] is not None
    from dynamask.data import CocoDetection
    from dynamask.engine.checkpoint import model_from_checkpoint
    from dynamask.engine.evaluate import evaluate

    model, _ = model_from_checkpoint(str(out / "last.pth"))
    alone = evaluate(model, CocoDetection(val_img, val_ann), progress=False, out_dir=str(tmp_path / "alone"))
    gathered = ranks[0]["metrics"]
    assert gathered["resolution"]["instances"] == alone["resolution"]["instances"]
    assert gathered["segm"]["AP"] == pytest.approx(alone["segm"]["AP"], abs=1e-6)
    key = lambda r: (r["image_id"], round(r["score"], 4))  # noqa: E731
    with open(out / "eval" / "results.json") as f, open(tmp_path / "alone" / "results.json") as g:
        assert sorted(map(key, json.load(f))) == sorted(map(key, json.load(g)))


def _entropy_worker(rank, world, port, out, probs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from dynamask.models.mask_losses import entropy_loss

        mine = probs[rank].clone().requires_grad_(True)
        loss = entropy_loss(mine)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": mine.grad}, os.path.join(out, f"entropy{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_entropy_term_is_the_global_batch_one_even_with_no_roi_on_a_process(tmp_path):
    """2 processes, 3 RoIs on one and none on the other: both get L_entropy of the 3 RoIs together, and
    each process's gradient is the world size times its share of the global one (DDP then averages)."""
    probs = [torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]), torch.zeros(0, 4)]
    _spawn(_entropy_worker, (2, _free_port(), str(tmp_path), probs))
    ranks = [torch.load(tmp_path / f"entropy{r}.pt", weights_only=True) for r in range(2)]
    everything = probs[0].clone().requires_grad_(True)
    f = everything.mean(dim=0)  # by hand: f_k = mean_i p_ik, L = (1/K) sum_k f_k log f_k
    reference = (f * f.log()).mean()
    reference.backward()
    for r in ranks:
        assert float(r["loss"]) == pytest.approx(reference.item(), abs=1e-6)
    assert torch.allclose(ranks[0]["grad"], 2 * everything.grad, atol=1e-6)
    assert ranks[1]["grad"].shape == (0, 4)


def _fit_worker(rank, world, port, cfg, out, on_iteration):
    """``_worker``, then this process's switch (state dict) saved for the test to compare."""
    _worker(rank, world, port, cfg, out, on_iteration)
    torch.save(_HELD["model"].roi_heads.msm.state_dict(), os.path.join(out, f"msm{rank}.pt"))


_HELD: dict = {}


@pytest.mark.slow
def test_switch_fit_at_the_end_is_sharded_gathered_and_the_same_on_both_processes(tmp_path):
    """The switch fit that ends a run, in 2 processes: 3 batches (2 on one process, 1 on the other) and 3
    calibration images; both processes end with the same switch, fitted on the RoIs of all 3 batches (the
    rows of one process collecting the same 3 batches alone, in another order)."""
    from dynamask.data import CocoDetection
    from dynamask.engine import switch_fit, switch_life

    img, ann = _data(tmp_path / "data", train=4, val=0)
    out = tmp_path / "run"
    os.makedirs(out)

    def builder(**kw):
        _HELD["model"] = dynamask_resnet_fpn(**kw)
        return _HELD["model"]

    builders()
    BUILDERS["held_dynamask"] = builder
    try:
        cfg = _cfg(img, ann, out, arch="held_dynamask", flip_prob=0.0, switch_fit_batches=3,
                   switch_fit_calibration_images=3)
        _spawn(_fit_worker, (2, _free_port(), cfg, str(out), None))
    finally:
        BUILDERS.pop("held_dynamask", None)
    ranks = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    assert [r["status"] for r in ranks] == ["done", "done"]
    states = [torch.load(out / f"msm{r}.pt", weights_only=True) for r in range(2)]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    ckpt = load_checkpoint(str(out / "last.pth"))
    fit = ckpt["extra"]["switch_fit"]
    assert fit["world_size"] == 2 and fit["batches"] == 3
    for k, v in states[0].items():
        assert torch.equal(ckpt["model"][f"roi_heads.msm.{k}"], v), k
    # one process alone, the same 3 batches: the same RoIs (IoU rows), in batch order 0, 1, 2 against 0, 2 | 1
    model = builder(**ckpt["arch"]["kwargs"])
    model.load_state_dict(ckpt["model"])
    assert switch_life.use_dynamic_phase_switch(model, ckpt)
    alone = switch_fit.collect(model, switch_fit.sample_batches(CocoDetection(img, ann), batch_size=1, num_batches=3,
                                                                seed=0), progress=False)
    assert fit["rois"] == alone.iou.shape[0] > 0


def _gather_worker(rank, world, port, out, parts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from dynamask.engine import distributed as dist_utils

        got = [dist_utils.all_gather_rows(p[rank], torch.device("cpu")) for p in parts]
        torch.save(got, os.path.join(out, f"gather{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_all_gather_rows_concatenates_uneven_and_empty_shares_in_rank_order(tmp_path):
    parts = [
        [torch.arange(6, dtype=torch.float16).reshape(3, 2), torch.zeros(0, 2, dtype=torch.float16)],  # 3 + 0
        [torch.ones(1, 2, 2), torch.full((2, 2, 2), 7.0)],  # 1 + 2, trailing dims kept
        [torch.zeros(0, 4), torch.zeros(0, 4)],  # nothing anywhere
    ]
    _spawn(_gather_worker, (2, _free_port(), str(tmp_path), parts))
    for r in range(2):
        got = torch.load(tmp_path / f"gather{r}.pt", weights_only=True)
        for g, p in zip(got, parts):
            expected = torch.cat(p)
            assert g.dtype == expected.dtype and torch.equal(g, expected)
