"""benchmarks/switch_predictability.py's measures, on hand-made predictors."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.switch_predictability import judge, step_r2  # noqa: E402


def test_step_r2_reads_only_the_gains_between_resolutions():
    iou = torch.tensor([[0.5, 0.6, 0.9], [0.7, 0.7, 0.8], [0.2, 0.6, 0.6], [0.4, 0.5, 0.5]])
    # the truth, and the truth shifted per RoI (only the differences between columns count): R² 1 at each step
    assert step_r2(iou, iou) == pytest.approx([1.0, 1.0])
    assert step_r2(iou + torch.tensor([[1.0], [-2.0], [0.5], [3.0]]), iou) == pytest.approx([1.0, 1.0])
    # the mean gain for every RoI: R² 0; gains of 0.1 at step 1 (true 0.1, 0, 0.4, 0.1: mean 0.15, SS 0.09):
    # residual SS 0 + 0.01 + 0.09 + 0 = 0.10 -> 1 - 0.10 / 0.09
    mean_gain = iou[:, 1:] - iou[:, :-1]
    flat = torch.cat([torch.zeros(4, 1), mean_gain.mean(0).expand(4, 2)], 1).cumsum(1)
    assert step_r2(flat, iou) == pytest.approx([0.0, 0.0], abs=1e-6)
    tenth = torch.tensor([0.0, 0.1, 0.1]).expand(4, 3)
    assert step_r2(tenth, iou)[0] == pytest.approx(1 - 0.10 / 0.09, abs=1e-5)


def test_judge_gives_the_truth_all_of_the_routing_gain():
    iou = torch.tensor([[0.5, 0.6, 0.9], [0.7, 0.7, 0.8], [0.2, 0.6, 0.6], [0.4, 0.5, 0.5]])
    costs = torch.tensor([1.0, 2.0, 4.0])
    got = judge(iou, iou, costs, [2.0])
    assert got["step_r2"] == pytest.approx([1.0, 1.0]) and got["captured"]["2"] == pytest.approx(1.0)
    # each object given another's gains (rows rolled by one) routes worse than the truth
    rolled = judge(iou.roll(1, dims=0), iou, costs, [2.0])
    assert rolled["captured"]["2"] is not None and rolled["captured"]["2"] < 0.99
    assert all(r < 1.0 for r in rolled["step_r2"])
