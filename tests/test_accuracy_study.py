"""`benchmarks/accuracy.py --quick`: every phase and kind of row runs, and the JSON has the issue's schema."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("accuracy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert accuracy.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return accuracy, out


def test_quick_study_writes_the_schema(study):
    _, out = study
    with open(out / "accuracy_cpu.json") as f:
        doc = json.load(f)
    assert doc["resolutions"] == [7, 14, 28, 56]
    assert doc["categories"] == {"ellipse": "easy", "rectangle": "easy", "triangle": "easy", "star": "hard",
                                 "gear": "hard", "ring": "hard", "blob": "hard"}
    assert set(doc["iou_gain"]) == set(doc["categories"])
    assert doc["missing_rows"] == []
    policies = {r["policy"] for r in doc["rows"]}
    assert policies == {"fixed", "size", "msm", "oracle", "maskrcnn"}
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
        if r["policy"] == "fixed":
            assert r["mask_gmacs_per_instance"] == pytest.approx(costs[r["resolution"]])
    assert (out / "accuracy_cpu.md").read_text().count("| fixed-") == 4
    assert (out / "accuracy_cpu_pareto.png").exists()


def test_rerun_skips_finished_rows_and_refuses_another_config(study):
    accuracy, out = study
    before = {p: os.path.getmtime(os.path.join(out, "rows", p)) for p in os.listdir(out / "rows")}
    assert accuracy.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    after = {p: os.path.getmtime(os.path.join(out, "rows", p)) for p in os.listdir(out / "rows")}
    assert before == after
    with pytest.raises(SystemExit, match="another configuration"):
        accuracy.main(["--quick", "--out", str(out), "--no-progress", "--seed", "1"])
