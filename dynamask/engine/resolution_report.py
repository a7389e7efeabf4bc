"""What the mask switch chose: the distribution of mask resolutions per category, its mask-head cost, a plot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from dynamask.models.mask_head import RESOLUTIONS


def resolution_distribution(
    results: list[dict[str, Any]],
    cat_names: Mapping[int, str],
    *,
    score_threshold: float = 0.5,
    resolutions: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Counts of chosen mask resolutions per category, over detections scoring at least ``score_threshold``.

    Args:
        results: COCO result dicts with ``category_id``, ``score`` and ``mask_resolution`` (see
            :func:`dynamask.engine.coco_eval.output_to_results`); ``None`` resolutions are skipped.
        cat_names: COCO category id -> name.
        resolutions: the model's resolutions (every one gets a column, chosen or not); DynaMask's
            14/28/56/112 when None.
    Returns ``{"resolutions": [...], "per_category": {name: {res: count}}, "overall": {res: count},
    "instances": n}``; every category of ``cat_names`` appears, resolutions in ascending order.
    """
    seen = sorted({int(r["mask_resolution"]) for r in results if r.get("mask_resolution") is not None})
    resolutions = sorted(set(RESOLUTIONS if resolutions is None else resolutions) | set(seen))
    per_cat: dict[str, Counter] = {name: Counter() for name in cat_names.values()}
    overall: Counter = Counter()
    for r in results:
        if r.get("mask_resolution") is None or r["score"] < score_threshold:
            continue
        name = cat_names.get(r["category_id"], str(r["category_id"]))
        per_cat.setdefault(name, Counter())[int(r["mask_resolution"])] += 1
        overall[int(r["mask_resolution"])] += 1
    return {
        "resolutions": resolutions,
        "per_category": {name: {res: c[res] for res in resolutions} for name, c in per_cat.items()},
        "overall": {res: overall[res] for res in resolutions},
        "instances": sum(overall.values()),
        "score_threshold": score_threshold,
    }


def cost_report(results: list[dict[str, Any]], costs: Any, *, num_images: int) -> dict[str, Any]:
    """Mask-head cost over every detection the head ran on (no score threshold: it segments them all).

    Args:
        results: COCO result dicts with ``mask_resolution`` (``None``: not costed) and, for the per-image
            figures, ``input_size`` (the padded network input, H, W; see :func:`dynamask.engine.evaluate.run_model`).
        costs: a :class:`dynamask.models.flops.HeadCosts` (all figures, MSM included), or resolution → per-RoI
            GMAC as a mapping or callable (the per-instance figure only).
        num_images: images evaluated (those without detections cost nothing and count in the means).
    Returns ``{"instances", "mask_gmac_per_instance", "msm_gmac_per_roi", "per_image_gmac",
    "head_gmac_per_image"}``; a figure that cannot be computed is None.
    """
    from dynamask.models.flops import HeadCosts

    costed = [r for r in results if r.get("mask_resolution") is not None]
    head = costs if isinstance(costs, HeadCosts) else None
    per_roi = head.per_roi if head is not None else costs
    cost = per_roi if callable(per_roi) else (lambda r: per_roi[r])
    msm = head.msm if head is not None else 0.0
    total = 0.0
    for r in costed:
        try:
            total += float(cost(int(r["mask_resolution"]))) + msm
        except KeyError as exc:
            raise KeyError(f"no mask-head cost given for resolution {r['mask_resolution']}") from exc
    out: dict[str, Any] = {"instances": len(costed), "mask_gmac_per_instance": total / len(costed) if costed else None,
                           "msm_gmac_per_roi": msm if head is not None else None, "per_image_gmac": None,
                           "head_gmac_per_image": None}
    if head is not None and num_images > 0 and all("input_size" in r for r in costed):
        by_image: dict[Any, list[dict[str, Any]]] = {}
        for r in costed:
            by_image.setdefault(r["image_id"], []).append(r)
        part = whole = 0.0
        for rs in by_image.values():
            p, w = head.image(rs[0]["input_size"], [int(r["mask_resolution"]) for r in rs])
            part, whole = part + p, whole + w
        out["per_image_gmac"], out["head_gmac_per_image"] = part / num_images, whole / num_images
    return out


MAX_SHOWN_CATEGORIES = 40


def shown_categories(distribution: dict[str, Any], limit: int = MAX_SHOWN_CATEGORIES) -> list[str]:
    """The categories a plot or table shows: all of them, or, past ``limit`` (LVIS has 1,203), the ``limit``
    with the most instances (none without), in the distribution's order."""
    names = list(distribution["per_category"])
    if len(names) <= limit:
        return names
    count = {n: sum(distribution["per_category"][n].values()) for n in names}
    keep = set(sorted((n for n in names if count[n]), key=lambda n: -count[n])[:limit])
    return [n for n in names if n in keep]


def plot_resolution_distribution(distribution: dict[str, Any], path: str, *, title: str | None = None) -> str:
    """A PNG of stacked horizontal bars: per category, the share of each chosen resolution (at most
    ``MAX_SHOWN_CATEGORIES`` categories: those with the most instances)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = shown_categories(distribution)
    if title is None and len(names) < len(distribution["per_category"]):
        title = (
            f"Mask resolution chosen per category ({len(names)} of {len(distribution['per_category'])}, most instances)"
        )
    resolutions = distribution["resolutions"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.6))
    left = [0.0] * len(names)
    colors = plt.cm.viridis([i / max(1, len(resolutions) - 1) for i in range(len(resolutions))])
    for res, color in zip(resolutions, colors):
        shares = []
        for name in names:
            counts = distribution["per_category"][name]
            total = sum(counts.values())
            shares.append(counts[res] / total if total else 0.0)
        ax.barh(names, shares, left=left, color=color, label=f"{res}x{res}")
        left = [a + b for a, b in zip(left, shares)]
    for i, name in enumerate(names):
        ax.text(1.01, i, f"n={sum(distribution['per_category'][name].values())}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel(f"share of instances (score >= {distribution.get('score_threshold', 0):g})")
    ax.set_title(title or "Mask resolution chosen per category")
    ax.legend(ncol=len(resolutions), loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(names) < 4 else -0.12),
              fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
