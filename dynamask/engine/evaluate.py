"""Evaluation: run a model over a COCO-format dataset, then COCO AP, Boundary AP and the resolution report.

``evaluate_results`` works on COCO result dicts alone (testable without a model); ``run_model`` produces
them from a model with torchvision's detection contract; ``evaluate`` does both and writes the files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import torch
from pycocotools.coco import COCO

from dynamask.engine.coco_eval import coco_metrics, output_to_results
from dynamask.engine.resolution import mean_mask_gmac, plot_resolution_distribution, resolution_distribution

Costs = Mapping[int, float] | Callable[[int], float]


@torch.no_grad()
def run_model(
    model: torch.nn.Module,
    dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    num_workers: int = 0,
    progress: bool = True,
    mask_threshold: float = 0.5,
    default_resolution: int | None = None,
    indices: list[int] | None = None,
) -> list[dict[str, Any]]:
    """COCO result dicts for every image of ``dataset`` (a :class:`dynamask.data.CocoDetection`).

    The model is put in eval mode; its outputs are mapped back to each image's size in the annotation file
    and its labels to COCO category ids (``dataset.cat_ids``). Outputs without ``mask_resolution`` count as
    ``default_resolution`` (default: the model's ``fixed_mask_resolution`` attribute, if any).
    """
    from tqdm import tqdm

    from dynamask.data import collate_fn

    device = torch.device(device)
    if default_resolution is None:  # a fixed-resolution model (e.g. Mask R-CNN) may say which it uses
        default_resolution = getattr(model, "fixed_mask_resolution", None)
    model.eval().to(device)
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn
    )
    results: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
        outputs = model([im.to(device) for im in images])
        for target, out in zip(targets, outputs):
            image_id = int(target["image_id"])
            info = dataset.coco.imgs[image_id]
            size = (int(info["height"]), int(info["width"])) if "height" in info else None
            results += output_to_results(
                image_id, out, dataset.cat_ids, image_size=size, mask_threshold=mask_threshold,
                default_resolution=default_resolution,
            )
    return results


def evaluate_results(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    *,
    costs: Costs | None = None,
    boundary: bool = True,
    score_threshold: float = 0.5,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Metrics of COCO result dicts against ``coco_gt``.

    Returns ``{"bbox": {AP...}, "segm": {AP...}, "boundary": {AP...} (if asked), "resolution": distribution,
    "mask_gmac_per_instance": float | None}``. With ``out_dir``, also writes ``results.json``,
    ``metrics.json``, ``summary.txt`` and ``resolution.png`` there.
    """
    metrics: dict[str, Any] = {}
    texts = []
    kinds = ["bbox", "segm"] + (["boundary"] if boundary else [])
    has_masks = all("segmentation" in r for r in results)
    for kind in kinds:
        if kind != "bbox" and not has_masks:
            continue
        metrics[kind], text = coco_metrics(coco_gt, results, kind)
        texts.append(f"== {kind} ==\n{text}")
    cat_names = {int(c["id"]): str(c["name"]) for c in coco_gt.loadCats(coco_gt.getCatIds())}
    # A mapping of costs names the model's resolutions (e.g. 7/14/28/56 for a demo model).
    known = sorted(int(r) for r in costs) if isinstance(costs, Mapping) else None
    dist = resolution_distribution(results, cat_names, score_threshold=score_threshold, resolutions=known)
    metrics["resolution"] = dist
    metrics["mask_gmac_per_instance"] = mean_mask_gmac(dist, costs) if costs is not None else None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        with open(os.path.join(out_dir, "summary.txt"), "w") as f:
            f.write("\n".join(texts) + "\n" + format_metrics(metrics))
        if dist["instances"]:
            plot_resolution_distribution(dist, os.path.join(out_dir, "resolution.png"))
    return metrics


def evaluate(
    model: torch.nn.Module,
    dataset,
    *,
    device: torch.device | str = "cpu",
    costs: Costs | None = None,
    out_dir: str | None = None,
    boundary: bool = True,
    batch_size: int = 1,
    num_workers: int = 0,
    progress: bool = True,
    default_resolution: int | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` and evaluate (see :func:`run_model` and :func:`evaluate_results`)."""
    results = run_model(
        model, dataset, device=device, batch_size=batch_size, num_workers=num_workers, progress=progress,
        default_resolution=default_resolution,
    )
    return evaluate_results(dataset.coco, results, costs=costs, boundary=boundary, out_dir=out_dir)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A markdown table of the AP metrics (in %) plus the resolution distribution and mask-head cost."""
    from dynamask.engine.coco_eval import STAT_NAMES

    lines = ["| metric | " + " | ".join(STAT_NAMES) + " |", "|---|" + "---|" * len(STAT_NAMES)]
    for kind in ("bbox", "segm", "boundary"):
        if kind in metrics:
            vals = [metrics[kind][k] for k in STAT_NAMES]
            lines.append(f"| {kind} | " + " | ".join("–" if v < 0 else f"{100 * v:.1f}" for v in vals) + " |")
    dist = metrics.get("resolution")
    if dist and dist["instances"]:
        res = [int(r) for r in dist["resolutions"]]
        lines += ["", "| category | " + " | ".join(f"{r}²" for r in res) + " |", "|---|" + "---|" * len(res)]
        for name, counts in list(dist["per_category"].items()) + [("all", dist["overall"])]:
            counts = {int(r): n for r, n in counts.items()}  # metrics.json read back has str keys
            total = sum(counts.values())
            cells = [f"{100 * counts[r] / total:.0f}%" if total else "–" for r in res]
            lines.append(f"| {name} (n={total}) | " + " | ".join(cells) + " |")
    if metrics.get("mask_gmac_per_instance") is not None:
        lines += ["", f"Mean mask-head cost: {metrics['mask_gmac_per_instance']:.3f} GMAC per instance"]
    return "\n".join(lines) + "\n"
