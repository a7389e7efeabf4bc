"""How well a mask switch routes (docs/method.md §3, "How the switch is judged"), as pure numpy functions.

Inputs are a per-instance quality matrix ``iou [N, K]`` (mask IoU with the ground truth of each
instance's mask at each of the K resolutions, measured on the same boxes) and the switch's choices
``choice [N]`` (resolution indices, ascending cost). Three mean IoUs over the N instances:

- **switch**: ``mean_i iou[i, choice_i]``;
- **shuffled**: the same choices dealt to the instances at random (same counts, same cost), in
  expectation: instance i gets resolution k with probability ``n_k / N``, so
  ``shuffled = (1/N) Σ_i Σ_k (n_k/N) iou[i, k]`` (exact, no sampling noise);
- **best_same_counts**: the best assignment with the same counts ``n_k`` (an optimal transportation
  problem, solved exactly by :func:`best_assignment`).

``captured = (switch − shuffled) / (best − shuffled)``: 1 when the switch routes as well as any routing of
the same cost can, 0 when it is no better than chance, negative when it is worse; undefined (None) when
every routing of those counts is equally good (e.g. all instances at one resolution).

Also here: the **oracle** routing (per instance the cheapest resolution whose IoU is within ``tol`` of the
best one) and per-category summaries (gain in mean IoU from the lowest to the highest resolution; the
switch's mean resolution index).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, overload

import numpy as np


@overload
def _check(iou: np.ndarray, choice: None = None) -> tuple[np.ndarray, None]: ...
@overload
def _check(iou: np.ndarray, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
def _check(iou: np.ndarray, choice: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2 or iou.shape[1] < 1:
        raise ValueError(f"iou must be [N, K] with K >= 1, got shape {iou.shape}")
    if not np.isfinite(iou).all():
        raise ValueError("iou holds non-finite values")
    if choice is None:
        return iou, None
    choice = np.asarray(choice)
    if choice.shape != (iou.shape[0],):
        raise ValueError(f"choice must be [N] = [{iou.shape[0]}], got shape {choice.shape}")
    if choice.size and (
        not np.issubdtype(choice.dtype, np.integer) or choice.min() < 0 or choice.max() >= iou.shape[1]
    ):
        raise ValueError(f"choice must hold integer resolution indices in [0, {iou.shape[1]}), got {choice[:8]}...")
    return iou, choice.astype(np.int64)


def best_assignment(score: np.ndarray, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """The assignment of N items to K bins holding exactly ``counts[k]`` items each that maximises the
    total score. ``score [N, K]`` → ``[N]`` int64 bin per item.

    Successive shortest paths on the transportation network source → item (capacity 1) → bin k
    (capacity ``counts[k]``) → sink, with cost ``−score``. Each augmentation adds one item along a
    shortest path: item i enters bin k₀, and a chain of already-placed items moves bin to bin
    (k₀ → k₁ → … → k*) until a bin with room is reached. Between bins, the cheapest move of one placed
    item is ``w[k, k'] = min_{j in k} (cost[j, k'] − cost[j, k])``; Bellman–Ford on the K bins finds the
    path (SSP keeps the partial flow optimal, so the residual graph has no negative cycle). The result
    is optimal: the network is totally unimodular and SSP finds a min-cost flow of value N.
    O(N² K + N K³) time, O(N K) memory.
    """
    score = np.asarray(score, dtype=np.float64)
    n, k = score.shape
    sizes = np.asarray(counts, dtype=np.int64)
    if sizes.shape != (k,) or (sizes < 0).any() or sizes.sum() != n:
        raise ValueError(f"counts must be {k} non-negative ints summing to N = {n}, got {sizes.tolist()}")
    cost = -score
    assign = np.full(n, -1, dtype=np.int64)
    room = sizes.copy()
    for _ in range(n):
        free = np.flatnonzero(assign < 0)
        c_free = cost[free]  # [F, K]
        best_free = c_free.argmin(axis=0)
        dist = c_free[best_free, np.arange(k)].copy()  # S → free item → bin k
        entry = free[best_free]  # the free item that enters bin k on that path
        prev_bin = np.full(k, -1, dtype=np.int64)  # predecessor bin (−1: reached from a free item)
        mover = np.full(k, -1, dtype=np.int64)  # the placed item that moves prev_bin → k
        placed = np.flatnonzero(assign >= 0)
        if placed.size:
            delta = cost[placed] - cost[placed, assign[placed]][:, None]  # [P, K] cost of moving j to k'
            w = np.full((k, k), np.inf)
            wj = np.full((k, k), -1, dtype=np.int64)
            for b in range(k):
                members = assign[placed] == b
                if members.any():
                    d = delta[members]
                    arg = d.argmin(axis=0)
                    w[b] = d[arg, np.arange(k)]
                    wj[b] = placed[members][arg]
            np.fill_diagonal(w, np.inf)
            for _ in range(k - 1):  # Bellman–Ford over the K bins
                cand = dist[:, None] + w  # [from, to]
                frm = cand.argmin(axis=0)
                better = cand[frm, np.arange(k)] < dist - 1e-15
                if not better.any():
                    break
                to = np.flatnonzero(better)
                dist[to] = cand[frm[to], to]
                prev_bin[to] = frm[to]
                mover[to] = wj[frm[to], to]
        open_bins = np.flatnonzero(room > 0)
        target = int(open_bins[dist[open_bins].argmin()])
        # walk back from the bin with room to the bin the free item enters, moving each placed item
        b, seen = target, 0
        while prev_bin[b] >= 0:
            assign[mover[b]] = b
            b = int(prev_bin[b])
            seen += 1
            if seen > k:
                raise RuntimeError("best_assignment: cycle in the shortest-path tree (should not happen)")
        assign[entry[b]] = b
        room[target] -= 1
    return assign


@dataclass(frozen=True)
class RoutingValue:
    """Mean IoUs of a routing and the share of the possible gain it captures (module docstring)."""

    switch: float
    shuffled: float
    best_same_counts: float
    captured: float | None
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def routing_value(iou: np.ndarray, choice: np.ndarray) -> RoutingValue:
    """Switch, shuffled, best-with-the-same-counts mean IoU and the share captured.

    Args:
        iou: ``[N, K]`` mask IoU of each instance at each resolution (same boxes for all K).
        choice: ``[N]`` the switch's resolution index per instance.
    """
    iou, choice = _check(iou, choice)
    n, k = iou.shape
    if n == 0:
        raise ValueError("routing_value needs at least one instance")
    counts = np.bincount(choice, minlength=k)
    switch = float(iou[np.arange(n), choice].mean())
    shuffled = float((iou.mean(axis=0) * counts / n).sum())
    best = best_assignment(iou, counts)
    best_value = float(iou[np.arange(n), best].mean())
    span = best_value - shuffled
    # a span within float rounding of 0 means every routing with these counts is as good as any other
    captured = None if span <= 1e-12 * max(1.0, abs(best_value)) else (switch - shuffled) / span
    return RoutingValue(switch=switch, shuffled=shuffled, best_same_counts=best_value, captured=captured, n=n)


def category_routing(iou: np.ndarray, categories: Sequence[str], counts: Sequence[int]) -> np.ndarray:
    """The best routing with the given counts for a router that knows only each instance's category.

    Instance i is scored at resolution k by the mean IoU of the OTHER instances of its category at k
    (leave-one-out, so that its own IoU does not leak in; a category's only instance scores 0 everywhere),
    and the counts are dealt by :func:`best_assignment` on those scores. Its :func:`routing_value` says how
    much of the possible gain is visible from the category alone: a switch sees more than the category, so
    this is a yardstick, not a ceiling.

    Args:
        iou: ``[N, K]``. categories: N names. counts: K ints summing to N.

    Returns:
        ``[N]`` int64 resolution indices.
    """
    iou, _ = _check(iou)
    if len(categories) != iou.shape[0]:
        raise ValueError(f"categories must have N = {iou.shape[0]} entries, got {len(categories)}")
    names = np.asarray(list(categories), dtype=object)
    score = np.zeros_like(iou)
    for name in set(categories):
        sel = names == name
        n = int(sel.sum())
        if n > 1:
            score[sel] = (iou[sel].sum(axis=0, keepdims=True) - iou[sel]) / (n - 1)
    return best_assignment(score, counts)


def oracle_choice(iou: np.ndarray, tol: float = 0.01) -> np.ndarray:
    """Per instance, the cheapest resolution (lowest index; indices ascend in cost) whose IoU is within
    ``tol`` of that instance's best. ``[N, K]`` → ``[N]`` int64."""
    iou, _ = _check(iou)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    ok = iou >= iou.max(axis=1, keepdims=True) - tol
    return ok.argmax(axis=1).astype(np.int64)  # argmax of a bool row: its first True


def per_category(iou: np.ndarray, categories: Sequence[str], choice: np.ndarray | None = None,
                 kinds: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per category: ``n``, ``iou_gain`` (mean IoU at the highest resolution − at the lowest),
    ``mean_iou`` (per resolution), and, with ``choice``, ``mean_index`` (the mean chosen index).

    Args:
        iou: ``[N, K]``. categories: N names. choice: ``[N]`` or None. kinds: name → "easy"/"hard".
    """
    iou, choice = _check(iou, choice)
    if len(categories) != iou.shape[0]:
        raise ValueError(f"categories must have N = {iou.shape[0]} entries, got {len(categories)}")
    names = np.asarray(list(categories), dtype=object)
    order = list(dict.fromkeys(kinds)) if kinds else sorted(set(categories))
    out: dict[str, dict[str, Any]] = {}
    for name in order:
        sel = names == name
        entry: dict[str, Any] = {"n": int(sel.sum())}
        if kinds is not None:
            entry["kind"] = kinds.get(name)
        if sel.any():
            m = iou[sel].mean(axis=0)
            entry["iou_gain"] = float(m[-1] - m[0])
            entry["mean_iou"] = [float(v) for v in m]
            if choice is not None:
                entry["mean_index"] = float(choice[sel].mean())
        else:
            entry["iou_gain"] = None
            entry["mean_iou"] = None
            if choice is not None:
                entry["mean_index"] = None
        out[name] = entry
    return out


def shares(choice: np.ndarray, categories: Sequence[str], num_resolutions: int,
           names: Sequence[str]) -> dict[str, list[float]]:
    """Per category name, the fraction of its instances at each resolution (zeros when it has none)."""
    choice = np.asarray(choice, dtype=np.int64)
    cats = np.asarray(list(categories), dtype=object)
    out = {}
    for name in names:
        c = choice[cats == name]
        counts = np.bincount(c, minlength=num_resolutions).astype(np.float64)
        out[name] = (counts / max(len(c), 1)).tolist()
    return out
