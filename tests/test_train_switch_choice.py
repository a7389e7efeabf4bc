"""Which mask switch a run ends with (``--switch paper|fit``), the plan's ``switch:`` line, ``--dry-run``,
``dynamask eval --switch``, both switches in a fitted run's final evaluation, and the checks made before any
work (a budget no resolution meets, num_classes against the data, the repeat-factor threshold)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from model_helpers import TRAIN_TINY, one_thread, shapes_fixture, train_config  # noqa: F401  (fixtures)

from dynamask.cli import main
from dynamask.data import CocoDetection
from dynamask.data.shapes import split_paths
from dynamask.engine import switch_life
from dynamask.engine.checkpoint import load_checkpoint, model_from_checkpoint
from dynamask.engine.evaluate import evaluate
from dynamask.engine.train import train

TINY = TRAIN_TINY
FIT_FLAGS = ["--switch-fit-batches", "3", "--switch-fit-epochs", "2", "--switch-fit-calibration-images", "3"]


_cfg = train_config


@pytest.fixture(scope="module")
def fitted_run(shapes, tmp_path_factory):
    """A finished run that ends with the fit, evaluated on the val split at the end."""
    out = tmp_path_factory.mktemp("fitted")
    val_img, val_ann = split_paths(shapes, "val")
    return out, train(_cfg(shapes, out, val_images=val_img, val_ann=val_ann))


def _switch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("switch:")]


def _train_cli(shapes, out, *flags):
    return main(["train", "--data", shapes, "--out", str(out), "--arch-kwargs", json.dumps(TINY), "--workers", "0",
                 "--no-progress", "--pretrain-epochs", "1", "--epochs", "1", *FIT_FLAGS, *flags])


def test_recipe_paper_dry_run_names_the_papers_switch_and_writes_no_checkpoint(shapes, tmp_path, capsys):
    from torchvision.models import resnet18

    weights = str(tmp_path / "resnet18.pth")
    torch.save(resnet18().state_dict(), weights)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "paper", "--data", shapes, "--out", str(run), "--backbone-weights", weights,
                 "--arch-kwargs", json.dumps(TINY), "--workers", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    (line,) = _switch_lines(out)
    assert line.startswith("switch: the paper's, trained through Gumbel-softmax in the dynamic phase (Eq. 3); "
                           "soft budget C_t ")
    assert "dry run: nothing trained, fitted or written" in out
    assert "(drawn per image)" in out
    assert not (run / "last.pth").exists() and not (run / "metrics.csv").exists()
    # the fitted variant of the recipe, asked for explicitly, and the cost that lands on the paper's operating point
    assert main(["train", "--recipe", "paper", "--switch", "fit", "--data", shapes, "--out", str(run),
                 "--backbone-weights", weights, "--arch-kwargs", json.dumps(TINY), "--workers", "0",
                 "--dry-run"]) == 0
    (line,) = _switch_lines(capsys.readouterr().out)
    assert line.startswith("switch: fitted when training ends") and "of the top resolution's" in line
    assert "the paper's C_t 0.4 model ran at 0.457 of its top cost" in line
    assert not (run / "last.pth").exists()


def test_every_plan_has_one_switch_line(shapes, tmp_path, capsys):
    assert _train_cli(shapes, tmp_path / "a", "--dry-run") == 0
    (line,) = _switch_lines(capsys.readouterr().out)
    assert line.startswith("switch: fitted when training ends (regression of each RoI's mask IoU, 3 batches, 2 "
                           "epochs); each detection's predicted gain weighed by its score and priced so that the mean "
                           "head cost over detections is C_t = ")
    for flags in (["--no-switch-fit"], ["--switch", "paper"]):  # the old flag is an alias
        assert _train_cli(shapes, tmp_path / "b", "--dry-run", *flags) == 0
        (line,) = _switch_lines(capsys.readouterr().out)
        assert line.startswith("switch: the paper's")
    assert _train_cli(shapes, tmp_path / "c", "--dry-run", "--no-budget") == 0
    (line,) = _switch_lines(capsys.readouterr().out)
    assert "no budget: unpriced (mu = 0)" in line
    mrcnn = dict(depth=18, min_size=64, max_size=64, fpn_channels=32, box_representation_size=64,
                 mask_head_layers=[8, 8])
    assert main(["train", "--data", shapes, "--out", str(tmp_path / "d"), "--arch", "maskrcnn_resnet_fpn",
                 "--arch-kwargs", json.dumps(mrcnn), "--workers", "0", "--dry-run"]) == 0
    (line,) = _switch_lines(capsys.readouterr().out)
    assert line.startswith("switch: none (")
    assert not any((tmp_path / d / "last.pth").exists() for d in "abcd")


def test_a_budget_below_the_cheapest_resolution_is_refused_before_training(shapes, tmp_path):
    with pytest.raises(ValueError, match=r"--target-gmacs 1e-06 is below the head's cheapest resolution \(7²"):
        train(_cfg(shapes, tmp_path, target_gmacs=1e-6))
    assert not (tmp_path / "last.pth").exists()


def test_num_classes_that_does_not_count_the_background_is_refused(shapes, tmp_path):
    n = CocoDetection(*split_paths(shapes, "train")).num_classes  # categories + 1
    with pytest.raises(ValueError, match=rf"num_classes {n - 1}: .* has {n - 1} categories, so the model needs "
                                         rf"num_classes >= {n} \(num_classes counts the background"):
        train(_cfg(shapes, tmp_path, arch_kwargs=dict(TINY, num_classes=n - 1)))
    assert not (tmp_path / "last.pth").exists()


@pytest.mark.parametrize("value", [1e9, 0.0, -0.5, float("nan")])
def test_repeat_factor_threshold_must_be_a_fraction(shapes, tmp_path, value):
    with pytest.raises(ValueError, match=r"repeat_factor_sampling must be a finite number in \(0, 1\]"):
        train(_cfg(shapes, tmp_path, repeat_factor_threshold=value))


def test_a_fitted_runs_evaluation_reports_both_switches(shapes, fitted_run):
    out, result = fitted_run
    rows = result["metrics"]["switches"]
    assert set(rows) == {"fitted", "dynamic_phase"}
    assert rows["fitted"]["segm_AP"] == result["metrics"]["segm"]["AP"]
    dyn = json.loads((out / "eval" / "dynamic_phase_switch" / "metrics.json").read_text())
    assert rows["dynamic_phase"]["segm_AP"] == dyn["segm"]["AP"]
    assert rows["dynamic_phase"]["mask_gmac_per_instance"] == dyn["mask_gmac_per_instance"]
    # the routing values: recomputed here from the checkpoint's two switches on the validation boxes
    import copy

    from dynamask.engine.routing_probe import gt_box_routing
    from dynamask.engine.routing_value import routing_value

    model, ckpt = model_from_checkpoint(result["checkpoint"])
    dynamic = copy.deepcopy(model.roi_heads.msm)
    dynamic.load_state_dict(switch_life.dynamic_phase_switch(ckpt))
    reads = model.roi_heads.switch_input
    probe = gt_box_routing(model, CocoDetection(*split_paths(shapes, "val")), progress=False,
                           switches={"fitted": (model.roi_heads.msm, reads), "dynamic_phase": (dynamic, reads)})
    for name, row in rows.items():
        want = routing_value(probe["iou"], probe["choices"][name]).captured
        assert row["routing_captured"] == want or (row["routing_captured"] is None and want is None), name


def test_eval_switch_dynamic_phase_gives_the_dynamic_phases_figures(shapes, fitted_run, tmp_path, capsys):
    out, result = fitted_run
    ckpt_path = result["checkpoint"]
    assert main(["eval", ckpt_path, "--data", shapes, "--out", str(tmp_path / "e"), "--switch", "dynamic-phase",
                 "--no-progress", "--no-boundary"]) == 0
    assert "switch: the dynamic phase's (the paper's), in place of the fitted one" in capsys.readouterr().out
    got = json.loads((tmp_path / "e" / "metrics.json").read_text())
    model, ckpt = model_from_checkpoint(ckpt_path)
    assert switch_life.use_dynamic_phase_switch(model, ckpt)
    want = evaluate(model, CocoDetection(*split_paths(shapes, "val")), boundary=False, progress=False)
    assert got["segm"] == want["segm"] and got["mask_gmac_per_instance"] == want["mask_gmac_per_instance"]
    # the final evaluation's dynamic-phase row is the same figure
    assert got["segm"]["AP"] == result["metrics"]["switches"]["dynamic_phase"]["segm_AP"]
    assert main(["eval", ckpt_path, "--data", shapes, "--switch", "fitted", "--no-progress", "--no-boundary"]) == 0
    assert "switch: the fitted one" in capsys.readouterr().out


def test_eval_switch_fitted_on_a_paper_run_is_refused(shapes, tmp_path, capsys):
    result = train(_cfg(shapes, tmp_path / "p", switch="paper", max_iters=1))
    with pytest.raises(SystemExit):
        main(["eval", result["checkpoint"], "--data", shapes, "--switch", "fitted"])
    assert "holds no fitted switch" in capsys.readouterr().err


def test_resuming_a_fitted_run_with_the_papers_switch_puts_it_back(shapes, fitted_run, tmp_path):
    out, result = fitted_run
    ckpt = load_checkpoint(result["checkpoint"])
    run = tmp_path / "copy"
    run.mkdir()
    torch.save(ckpt, run / "last.pth")
    again = train(_cfg(shapes, run, resume="auto", switch="paper"))
    assert again["status"] == "done" and "switch_fit" not in again
    back = load_checkpoint(str(run / "last.pth"))
    assert switch_life.FIT_KEY not in back["extra"] and switch_life.dynamic_phase_switch(back) is None
    for k, v in switch_life.dynamic_phase_switch(ckpt).items():
        assert torch.equal(back["model"]["roi_heads.msm." + k], v), k


def test_training_on_from_fitted_weights_resets_the_price(shapes, fitted_run, tmp_path, capsys):
    _, result = fitted_run
    ckpt = load_checkpoint(result["checkpoint"])
    assert float(ckpt["model"]["roi_heads.msm.confidence_weighted"]) == 1.0  # the fit set its confidence rule
    # and a price: whether this tiny run's budget needs one (μ > 0) depends on its fitted outputs, so the weights
    # carry one here whatever the fit found
    penalty = ckpt["model"]["roi_heads.msm.cost_penalty"]
    ckpt["model"]["roi_heads.msm.cost_penalty"] = torch.arange(penalty.numel(), dtype=penalty.dtype) * 0.1
    weights = str(tmp_path / "fitted_weights.pth")
    torch.save(ckpt["model"], weights)
    further = train(_cfg(shapes, tmp_path / "further", arch_kwargs=dict(TINY, weights=weights), switch="paper",
                         max_iters=1))
    assert "cost_penalty) is reset to zero" in capsys.readouterr().out
    saved = load_checkpoint(further["checkpoint"])
    assert not saved["model"]["roi_heads.msm.cost_penalty"].any()
    assert float(saved["model"]["roi_heads.msm.confidence_weighted"]) == 0.0  # the fit's rule goes with its price
    assert os.path.isfile(further["checkpoint"])


def test_fit_switch_on_a_checkpoint_without_a_switch_is_refused_before_collecting(shapes, tmp_path, capsys):
    mrcnn = dict(depth=18, min_size=64, max_size=64, fpn_channels=32, box_representation_size=64,
                 mask_head_layers=[8, 8])
    result = train(_cfg(shapes, tmp_path / "m", arch="maskrcnn_resnet_fpn", arch_kwargs=mrcnn, max_iters=1))
    out = tmp_path / "fitted.pth"
    assert main(["fit-switch", result["checkpoint"], "--data", shapes, "--out", str(out), "--no-budget"]) == 1
    assert "'maskrcnn_resnet_fpn' has no mask switch to fit" in capsys.readouterr().err
    assert not out.exists()
