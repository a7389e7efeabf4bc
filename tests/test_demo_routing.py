"""The demo's routing.json and its report table, on a tiny untrained model (the demo itself is too long)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import torch
from model_helpers import one_thread, tiny_model  # noqa: F401

from dynamask.data import CocoDetection
from dynamask.data.shapes import CATEGORIES, generate, split_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    return demo


def _val(tmp_path, n: int) -> CocoDetection:
    generate(str(tmp_path / "data"), train=0, val=n, size=64, seed=0, max_objects=3)
    return CocoDetection(*split_paths(str(tmp_path / "data"), "val"))


def test_routing_json_and_report_table(tmp_path):
    demo = _demo()
    val = _val(tmp_path, 3)
    torch.manual_seed(0)
    model = tiny_model(num_classes=8, min_size=64, max_size=64).eval()
    path = tmp_path / "routing.json"
    summary = demo.write_routing(model, val, str(path))
    with open(path) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    v = summary["routing_value"]
    assert set(v) == {"switch", "shuffled", "best_same_counts", "captured"}
    y = summary["category_yardstick"]
    assert y is None or y <= 1.0 + 1e-9  # no routing with these counts beats the best one
    assert v["shuffled"] <= v["best_same_counts"] + 1e-12 and v["switch"] <= v["best_same_counts"] + 1e-12
    # one entry per category of the data set, counted from the annotations themselves
    counts = Counter(a["category_id"] for a in val.coco.dataset["annotations"])
    assert list(summary["categories"]) == [name for _, name, _ in CATEGORIES]
    for cid, name, kind in CATEGORIES:
        c = summary["categories"][name]
        assert c["kind"] == kind and c["n"] == counts.get(cid, 0)
        if c["n"]:
            assert -1.0 <= c["iou_gain"] <= 1.0 and 0.0 <= c["mean_index"] <= 3.0
        else:
            assert c["iou_gain"] is None and c["mean_index"] is None
    lines = demo.routing_lines(summary, [7, 14, 28, 56])
    text = "\n".join(lines)
    assert "IoU gain 7²→56²" in text
    for _, name, _ in CATEGORIES:
        assert f"| {name} |" in text


def test_routing_json_reports_the_dynamic_phase_switch_beside_the_fitted_one(tmp_path):
    from dynamask.engine.routing_probe import gt_box_routing, routing_summary

    demo = _demo()
    val = _val(tmp_path, 2)
    torch.manual_seed(0)
    before = tiny_model(num_classes=8, min_size=64, max_size=64).eval()
    after = tiny_model(num_classes=8, min_size=64, max_size=64).eval()
    after.load_state_dict(before.state_dict())
    costs = torch.tensor([1.0, 2.0, 3.0, 4.0])
    after.roi_heads.msm.set_cost_penalty(costs)  # another choice: the fitted model's
    summary = demo.write_routing(after, val, str(tmp_path / "routing.json"), dynamic_phase_model=before)
    want = routing_summary(gt_box_routing(before, val, progress=False))["routing_value"]
    assert summary["dynamic_phase_switch"] == want
    assert summary["routing_value"] == routing_summary(gt_box_routing(after, val, progress=False))["routing_value"]
    text = "\n".join(demo.routing_lines(summary, [7, 14, 28, 56]))
    assert "before the refit" in text
