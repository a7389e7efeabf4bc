"""`python -m benchmarks.accuracy --quick`: every phase and kind of row runs, and the JSON has the issue's
schema."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the study is the package benchmarks.accuracy, imported from the repository root
    sys.path.insert(0, ROOT)

from benchmarks.accuracy.__main__ import main  # noqa: E402
from benchmarks.accuracy.config import SwitchVariant, equal_mask_supervision, quick_config  # noqa: E402
from benchmarks.accuracy.phases import CostAwareSwitch, calibrate_mu, load_state, save_json  # noqa: E402
from benchmarks.accuracy.study import Study  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--quick", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_quick_study_writes_the_schema(study):
    out = study
    with open(out / "accuracy_cpu.json") as f:
        doc = json.load(f)
    assert doc["resolutions"] == [7, 14, 28, 56]
    assert doc["categories"] == {"ellipse": "easy", "rectangle": "easy", "triangle": "easy", "star": "hard",
                                 "gear": "hard", "ring": "hard", "blob": "hard"}
    assert set(doc["iou_gain"]) == set(doc["categories"])
    assert doc["missing_rows"] == []
    policies = {r["policy"] for r in doc["rows"]}
    assert policies == {"fixed", "size", "msm", "oracle", "maskrcnn", "own-fixed", "own-size", "own-oracle"}
    keys = {"name", "policy", "resolution", "routing_loss", "target_gmacs", "segm_ap", "segm_ap50", "segm_ap75",
            "boundary_ap", "mask_gmacs_per_instance", "resolution_share", "routing_captured"}
    for r in doc["rows"]:
        assert keys <= set(r), r["name"]
        for k in ("segm_ap", "segm_ap50", "segm_ap75", "boundary_ap", "mask_gmacs_per_instance"):
            assert isinstance(r[k], float), (r["name"], k)
        if r["policy"] == "fixed":
            assert r["resolution"] in doc["resolutions"]
            j = doc["resolutions"].index(r["resolution"])
            for share in r["resolution_share"].values():  # every GT instance at that resolution (or none)
                assert share in ([0.0] * 4, [1.0 if i == j else 0.0 for i in range(4)])
        if r["policy"] == "msm":
            assert isinstance(r["routing_loss"], str) and isinstance(r["target_gmacs"], float)
            v = r["routing_value"]
            assert v["shuffled"] <= v["best_same_counts"] + 1e-12
            assert v["switch"] <= v["best_same_counts"] + 1e-12
        else:
            assert r["routing_captured"] is None
    # the fixed rows' costs are the head's own per-RoI costs
    costs = {int(k): v for k, v in doc["head_gmacs_per_roi"].items()}
    for r in doc["rows"]:
        if r["policy"] in ("fixed", "own-fixed"):
            assert r["mask_gmacs_per_instance"] == pytest.approx(costs[r["resolution"]])
    assert (out / "accuracy_cpu.md").read_text().count("| fixed-") == 4
    assert (out / "accuracy_cpu_pareto.png").exists()
    # the fit `dynamask train` ends with: on the default dynamic-phase row's model, judged as the default switch
    by = {r["name"]: r for r in doc["rows"]}
    fit = by["train-fit-ct0.006-init0"]
    assert fit["fit"]["on"] == "coupled-paper-roi-ct0.006" and fit["trained"] == "frozen coupled-paper-roi-ct0.006"
    assert by["fit-iou-roi-ct0.006-init0"]["fit"]["on"] == "base"
    report = (out / "accuracy_cpu.md").read_text()
    assert "(default switch: the fit `dynamask train` ends with, on the dynamic phase's model " \
           "`coupled-paper-roi-ct0.006`, C_t 0.006, every init)" in report and "`train-fit-ct0.006-init0`)" in report
    assert "(the dynamic phase's switch, Gumbel-trained, `coupled-paper-roi-ct0.006`;" in report
    # issue 32's schema: every row its seed and box AP; the default switch's rows marked; Mask R-CNN's masks on
    # the ground-truth boxes, scored as DynaMask's resolutions are
    for r in doc["rows"]:
        assert r["seed"] == 0 and isinstance(r["bbox_ap"], float), r["name"]
    assert by["train-fit-ct0.006-init0"]["default_switch"] is True
    assert by["fit-iou-roi-ct0.006-init0"]["default_switch"] is False
    boxes = {r["bbox_ap"] for r in doc["rows"] if r["trained"] == "base"}
    assert len(boxes) == 1  # the base model's policies share one detector
    # the default switch's own model: its fixed resolutions, size rule and oracle on the same detector as its
    # switch rows; and the same fitted switch blind to the detections' confidence (the ablation)
    own = [by[f"train-fixed-{s}"] for s in doc["resolutions"]] + [by["train-size-rule"], by["train-oracle"]]
    assert {r["bbox_ap"] for r in own} == {fit["bbox_ap"]}
    assert all(r["trained"] == "frozen coupled-paper-roi-ct0.006" for r in own)
    blind = by["train-fit-unweighted-ct0.006-init0"]
    assert blind["default_switch"] is False and blind["fit"]["confidence_weighted"] is False
    assert fit["fit"]["confidence_weighted"] is True
    mr = by["maskrcnn-28"]
    assert 0.0 <= mr["gt_box_iou"] <= 1.0 and set(mr["gt_box_iou_per_category"]) <= set(doc["categories"])


def test_picture_grid_shows_every_resolution_and_maskrcnn(study):
    out = study
    assert main(["--quick", "--out", str(out), "--part", "grid", "--no-progress"]) == 0
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.width > 6 * grid.height / 4  # one column per resolution, the image, the target and Mask R-CNN
    # the IoU in each panel's title: a 2x2 probability map upsampled onto the target's 4x4 grid
    import numpy as np

    from benchmarks.accuracy.grid import _iou

    gt = np.zeros((4, 4))
    gt[:, :2] = 1
    assert _iou(np.array([[1.0, 0.0], [1.0, 0.0]]), gt) == 1.0
    assert _iou(np.ones((2, 2)), gt) == 0.5
    assert _iou(np.zeros((2, 2)), np.zeros((4, 4))) == 1.0  # both empty


def test_rerun_skips_finished_rows_and_refuses_another_config(study):
    out = study
    before = {p: os.path.getmtime(os.path.join(out, "rows", p)) for p in os.listdir(out / "rows")}
    assert main(["--quick", "--out", str(out), "--no-progress"]) == 0
    after = {p: os.path.getmtime(os.path.join(out, "rows", p)) for p in os.listdir(out / "rows")}
    assert before == after
    with pytest.raises(SystemExit, match="another configuration"):
        main(["--quick", "--out", str(out), "--no-progress", "--seed", "1"])


def test_a_variant_added_later_trains_and_evaluates_only_itself(study, tmp_path):
    """The variant lists may grow between runs: the rerun trains only the new switch (on the same frozen
    model) and writes only its row; the finished rows and switches stay as they were."""
    out = study
    import shutil

    work = tmp_path / "grown"
    shutil.copytree(out, work)
    before = {p: os.path.getmtime(os.path.join(work, "rows", p)) for p in os.listdir(work / "rows")}
    old = load_state(os.path.join(work, "ckpt", "switches.pth"))
    cfg = equal_mask_supervision(quick_config(0))  # the configuration main() runs with --quick
    extra = SwitchVariant("frozen-iou-mask-ct0.006", signal="iou", reads="mask", target_gmacs=0.006)
    grown = replace(cfg, switches=(*cfg.switches, extra))
    torch.manual_seed(0)
    Study(grown, str(work), progress=False).run("dynamask")
    after = {p: os.path.getmtime(os.path.join(work, "rows", p)) for p in os.listdir(work / "rows")}
    assert set(after) - set(before) == {"frozen-iou-mask-ct0.006.json"}
    assert all(after[p] == before[p] for p in before)
    new = load_state(os.path.join(work, "ckpt", "switches.pth"))
    assert set(new) == set(old) | {extra.name}
    for name in old:  # the switches trained before are kept bit for bit
        for k, t in old[name].items():
            assert torch.equal(new[name][k], t)
    row = json.load(open(work / "rows" / "frozen-iou-mask-ct0.006.json"))
    assert row["switch_input"] == "mask" and row["routing_loss"] == "iou-frozen"
    # anything but the variant lists changed is still refused
    with pytest.raises(SystemExit, match="another configuration"):
        Study(replace(grown, lr=1e-3), str(work), progress=False)


def test_split_runs_the_maskrcnn_row_in_a_second_process(study, tmp_path):
    """--split: the Mask R-CNN row comes from a second process (its own folder) and is copied in, with
    its timings; the rows are those of the one-process run."""
    out = study
    split = tmp_path / "split"
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--split", "--out", str(split), "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (split / "maskrcnn" / "rows" / "maskrcnn-28.json").exists()
    assert sorted(os.listdir(split / "rows")) == sorted(os.listdir(out / "rows"))
    assert {"maskrcnn-pretrain", "maskrcnn"} <= set(json.load(open(split / "meta.json"))["timings"])
    row = json.load(open(split / "rows" / "maskrcnn-28.json"))
    assert row["policy"] == "maskrcnn" and isinstance(row["segm_ap"], float)


def test_fit_caches_are_named_by_their_batch_count(study):
    """A study folder keeps each fit's collected RoIs and fitted switches under a name with the number of training
    batches: a fit plan of another count (the default changed from 900 to 2700) collects anew instead of pricing
    the cached fit of the old count."""
    plan = equal_mask_supervision(quick_config(0)).train_fit
    cached = set(os.listdir(study / "ckpt"))
    assert {f"{plan.cache('switch_data')}.pth", f"{plan.cache('fit')}.pth"} <= cached
    assert plan.cache("fit").endswith(f"-b{plan.batches}")
    other = replace(plan, batches=plan.batches + 1)
    assert f"{other.cache('switch_data')}.pth" not in cached and f"{other.cache('fit')}.pth" not in cached
    rows = [json.load(open(study / "rows" / f"{n}.json")) for n in plan.names()]
    assert rows and all(r["fit"]["batches"] == plan.batches for r in rows)


def test_cost_aware_switch_is_the_lagrangian_choice_and_mu_meets_the_budget():
    costs = torch.tensor([1.0, 2.0, 4.0])
    # predicted losses: row 0 gains 0.3 from the last resolution, row 1 gains 0.05, row 2 nothing
    pred = torch.tensor([[0.5, 0.4, 0.2], [0.3, 0.28, 0.25], [0.1, 0.1, 0.1]])
    assert calibrate_mu(pred, costs, 4.0) == 0.0  # unconstrained: every row at its best
    # a budget of 2 per row on average: row 0's gain (0.3 for +3 cost) is the one worth buying; μ is row 1's
    # price of its first step (0.02 loss for +1 cost), the smallest at which row 1 stays at resolution 0
    mu = calibrate_mu(pred, costs, 2.0)
    choice = (pred + mu * costs).argmin(dim=1)
    assert choice.tolist() == [2, 0, 0] and float(costs[choice].mean()) <= 2.0
    # just below μ the budget is broken: the smallest such μ
    assert float(costs[(pred + (mu - 1e-4) * costs).argmin(dim=1)].mean()) > 2.0
    msm = torch.nn.Identity()
    sw = CostAwareSwitch(msm, costs.tolist())
    sw.mu.fill_(mu)
    assert sw(pred).argmax(dim=1).tolist() == [2, 0, 0]
    assert calibrate_mu(torch.zeros(0, 3), costs, 1.0) == 0.0


def test_switch_headroom_runs_on_a_finished_study(study, tmp_path):
    """benchmarks/switch_headroom.py: the test-retest ceiling and the longer-trained switches, on the quick study."""
    import shutil

    out = study
    work = tmp_path / "study"
    shutil.copytree(out, work)
    from benchmarks import switch_headroom
    threads = torch.get_num_threads()
    try:
        assert switch_headroom.main(["--study", str(work), "--quick", "--epochs", "5"]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.load(open(work / "switch_headroom.json"))
    retest = doc["retest"]
    n = retest["n"]
    assert n > 0 and sum(retest["quarters"]["counts"]) == n
    assert sorted(doc["epochs"]["runs"]) == ["expected-paper-init0", "expected-paper-init1", "regress-probe-init0",
                                             "regress-probe-init1"]
    for run in doc["epochs"]["runs"].values():
        assert [r["epoch"] for r in run] == [1, 5] and all(sum(r["counts"]) == n for r in run)
    # on the default switch's model, also at the counts of each default-switch row fitted on it
    assert switch_headroom.main(["--study", str(work), "--quick", "--part", "retest", "--on",
                                 "coupled-paper-roi-ct0.006"]) == 0
    own = json.load(open(work / "switch_headroom.json"))["retest_coupled-paper-roi-ct0.006"]
    assert own["n"] == n and "switch:train-fit-ct0.006-init0" in own
    assert sum(own["switch:train-fit-ct0.006-init0"]["counts"]) == n


def test_counts_from_shares_rounds_to_the_instance_count():
    from benchmarks.switch_headroom import counts_from_shares

    cats = np.array(["ring", "ring", "ring", "star"])
    # ring: a third at each of the first three resolutions (1, 1, 1); star: all at the last
    counts = counts_from_shares({"ring": [1 / 3, 1 / 3, 1 / 3, 0.0], "star": [0.0, 0.0, 0.0, 1.0]}, cats, 4, 4)
    assert counts.tolist() == [1, 1, 1, 1]
    # 1.5 and 1.5 rings round to 2 and 2 (half to even): the excess is taken off the last resolution
    counts = counts_from_shares({"ring": [0.5, 0.5, 0.0, 0.0], "star": [0.0, 0.0, 0.0, 1.0]}, cats, 4, 4)
    assert counts.tolist() == [2, 2, 0, 0]


def test_two_processes_on_one_study_keep_each_others_meta(study, tmp_path):
    """Two `Study` objects on one folder (two single-thread processes): neither write loses the other's timings
    or keys."""
    import shutil

    out = study
    work = tmp_path / "study"
    shutil.copytree(out, work)
    meta = json.load(open(work / "meta.json"))
    del meta["iou_gain"]  # as before the base rows: both processes start without it
    save_json(str(work / "meta.json"), meta)
    cfg = equal_mask_supervision(quick_config(0))  # the configuration main() runs with --quick
    a = Study(cfg, str(work), progress=False)
    b = Study(cfg, str(work), progress=False)
    a.meta["iou_gain"] = {"ring": 0.5}  # as base_rows sets it in one process
    a.timing("row-a", {"seconds": 1.0})
    b.timing("row-b", {"seconds": 2.0})  # b read meta.json before a wrote
    meta = json.load(open(work / "meta.json"))
    assert {"row-a", "row-b", "pretrain"} <= set(meta["timings"])
    assert meta["iou_gain"] == {"ring": 0.5}


def test_ladder_of_the_base_checkpoint_is_the_studys_fixed_rows(study):
    """benchmarks.accuracy.ladder on the base model gives the study's own fixed-resolution rows."""
    import json

    from benchmarks.accuracy.ladder import ladder

    out = study
    got = ladder(str(out), "base")
    rows = {r["name"]: r for r in json.load(open(out / "accuracy_cpu.json"))["rows"]}
    assert set(got) == {n for n, r in rows.items() if r["policy"] == "fixed"}
    for name, ap in got.items():
        assert ap == round(100 * rows[name]["segm_ap"], 1), name
