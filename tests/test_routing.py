"""Routing value, optimal same-count assignment, oracle routing and per-category summaries (numpy only)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dynamask.engine.routing_value import best_assignment, oracle_choice, per_category, routing_value, shares


def brute_force_best(score: np.ndarray, counts: list[int]) -> float:
    """Max total score over every assignment with these counts (enumerates the distinct permutations)."""
    labels = [k for k, c in enumerate(counts) for _ in range(c)]
    best = -np.inf
    for perm in set(itertools.permutations(labels)):
        best = max(best, float(score[np.arange(len(perm)), list(perm)].sum()))
    return best


def test_hand_made_two_instances():
    # instance 0 gains from the large mask (0.5 → 0.9), instance 1 does not (0.8 at both)
    iou = np.array([[0.5, 0.9], [0.8, 0.8]])
    perfect = routing_value(iou, np.array([1, 0]))
    assert perfect.switch == pytest.approx(0.85)
    assert perfect.shuffled == pytest.approx(0.75)  # each instance gets each resolution with p = 1/2
    assert perfect.best_same_counts == pytest.approx(0.85)
    assert perfect.captured == pytest.approx(1.0)
    inverted = routing_value(iou, np.array([0, 1]))
    assert inverted.switch == pytest.approx(0.65)
    assert inverted.best_same_counts == pytest.approx(0.85)
    assert inverted.captured == pytest.approx(-1.0)


def test_hand_made_four_instances_three_resolutions():
    # rows: a ring that needs 112 (idx 2), a blob that is fine at 56 (idx 1), two ellipses fine at 14
    iou = np.array([[0.2, 0.5, 0.8],
                    [0.6, 0.8, 0.8],
                    [0.9, 0.9, 0.9],
                    [0.7, 0.7, 0.7]])
    # counts (2, 1, 1): best sends the ring to 2, the blob to 1, the ellipses to 0: (0.8+0.8+0.9+0.7)/4
    best = best_assignment(iou, [2, 1, 1])
    assert best.tolist() == [2, 1, 0, 0]
    half = routing_value(iou, np.array([1, 2, 0, 0]))  # ring and blob swapped
    assert half.switch == pytest.approx((0.5 + 0.8 + 0.9 + 0.7) / 4)
    # shuffled: mean over instances of (1/2 iou_0 + 1/4 iou_1 + 1/4 iou_2)
    shuffled = np.mean(0.5 * iou[:, 0] + 0.25 * iou[:, 1] + 0.25 * iou[:, 2])
    assert half.shuffled == pytest.approx(shuffled)
    assert half.best_same_counts == pytest.approx(0.8)
    assert half.captured == pytest.approx((0.725 - shuffled) / (0.8 - shuffled))


def test_captured_undefined_when_all_routings_are_equal():
    iou = np.array([[0.5, 0.9], [0.8, 0.8], [0.1, 0.3]])
    v = routing_value(iou, np.array([1, 1, 1]))  # one resolution for all: every deal is the same
    assert v.switch == v.shuffled == v.best_same_counts
    assert v.captured is None


@pytest.mark.parametrize("seed", range(12))
def test_best_assignment_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(2, 8)), int(rng.integers(2, 5))
    score = rng.random((n, k))
    if seed % 3 == 0:  # repeated values and ties, as IoUs at saturated resolutions have
        score = np.round(score * 4) / 4
    counts = np.bincount(rng.integers(0, k, n), minlength=k).tolist()
    assign = best_assignment(score, counts)
    assert np.bincount(assign, minlength=k).tolist() == counts
    assert score[np.arange(n), assign].sum() == pytest.approx(brute_force_best(score, counts), abs=1e-12)


def test_best_assignment_large_is_no_worse_than_greedy_swaps():
    # no pairwise exchange between two bins can improve an optimal assignment
    rng = np.random.default_rng(7)
    score = rng.random((200, 4))
    counts = [80, 20, 40, 60]
    a = best_assignment(score, counts)
    own = score[np.arange(200), a]
    for i in range(200):
        for j in range(200):
            if a[i] != a[j]:
                assert score[i, a[j]] + score[j, a[i]] <= own[i] + own[j] + 1e-12


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="counts"):
        best_assignment(np.zeros((3, 2)), [1, 1])
    with pytest.raises(ValueError, match="choice"):
        routing_value(np.zeros((3, 2)), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="iou"):
        routing_value(np.zeros(3), np.array([0, 0, 0]))


def test_oracle_takes_the_cheapest_within_tolerance():
    iou = np.array([[0.50, 0.70, 0.705, 0.71],  # 0.70 is within 0.01 of 0.71 → index 1
                    [0.80, 0.80, 0.80, 0.80],  # all equal → the cheapest
                    [0.10, 0.20, 0.30, 0.60],  # only the top
                    [0.90, 0.50, 0.40, 0.30]])  # the lowest is best
    assert oracle_choice(iou, tol=0.01).tolist() == [1, 0, 3, 0]
    assert oracle_choice(iou, tol=0.0).tolist() == [3, 0, 3, 0]


def test_per_category_gain_and_mean_index():
    iou = np.array([[0.2, 0.4, 0.6], [0.4, 0.4, 0.8], [0.9, 0.9, 0.9]])
    cats = ["ring", "ring", "ellipse"]
    out = per_category(iou, cats, np.array([2, 1, 0]), kinds={"ellipse": "easy", "ring": "hard", "star": "hard"})
    assert list(out) == ["ellipse", "ring", "star"]
    assert out["ring"]["iou_gain"] == pytest.approx(0.7 - 0.3)
    assert out["ring"]["mean_index"] == pytest.approx(1.5)
    assert out["ring"]["n"] == 2 and out["ring"]["kind"] == "hard"
    assert out["ellipse"]["iou_gain"] == pytest.approx(0.0)
    assert out["star"]["n"] == 0 and out["star"]["iou_gain"] is None
    s = shares(np.array([2, 1, 0]), cats, 3, ["ellipse", "ring", "star"])
    assert s == {"ellipse": [1.0, 0.0, 0.0], "ring": [0.0, 0.5, 0.5], "star": [0.0, 0.0, 0.0]}


def test_category_routing_by_hand():
    from dynamask.engine.routing_value import category_routing

    # two categories of two instances; "fine" gains from resolution 1, "smooth" does not.
    iou = np.array([[0.5, 0.9],   # fine
                    [0.4, 0.7],   # fine
                    [0.8, 0.8],   # smooth
                    [0.9, 0.6]])  # smooth
    cats = ["fine", "fine", "smooth", "smooth"]
    # leave-one-out scores: row 0 sees row 1 (0.4, 0.7), row 1 sees row 0, row 2 sees row 3, row 3 sees row 2
    # with two slots at resolution 1 the fine instances (gain +0.3 / +0.4 seen) take them
    assert category_routing(iou, cats, [2, 2]).tolist() == [1, 1, 0, 0]
    # one slot at resolution 1: the biggest leave-one-out gain is row 1's (it sees row 0's +0.4)
    assert category_routing(iou, cats, [3, 1]).tolist() == [0, 1, 0, 0]
    # a category's only instance gets score 0 everywhere: it takes what is left
    lone = np.array([[0.1, 0.9], [0.2, 0.3], [0.4, 0.2]])
    assert category_routing(lone, ["a", "b", "b"], [2, 1]).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="categories"):
        category_routing(iou, cats[:3], [2, 2])
