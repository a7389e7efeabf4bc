"""Evaluation: run a model over a COCO-format dataset, then COCO AP, Boundary AP and the resolution report.

``evaluate_results`` works on COCO result dicts alone (testable without a model); ``run_model`` produces
them from a model with torchvision's detection contract; ``evaluate`` does both and writes the files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import Tensor

from dynamask.checks import fixed_mask_resolution
from dynamask.engine.coco_eval import coco_metrics, output_to_results
from dynamask.engine.resolution_report import (
    cost_report,
    plot_resolution_distribution,
    resolution_distribution,
    shown_categories,
)
from dynamask.models import mask_handoff
from dynamask.models.detector import DynaMaskRCNN
from dynamask.models.flops import HeadCosts

Costs = HeadCosts | Mapping[int, float] | Callable[[int], float]


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
    ``default_resolution`` (e.g. :func:`~dynamask.models.maskrcnn.fixed_mask_resolution` of the model). Each result
    also holds ``input_size``, the padded network input (H, W) its image was run at (for the cost report).
    """
    from tqdm import tqdm

    from dynamask.data import collate_fn

    device = torch.device(device)
    model.eval().to(device)
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn
    )
    results: list[dict[str, Any]] = []
    seen: list[list[int]] = []  # the backbone's input [B, 3, H, W]: the padded size, whatever the transform
    backbone = getattr(model, "backbone", None)
    hook = None if backbone is None else backbone.register_forward_pre_hook(
        lambda m, args: seen.append([int(v) for v in args[0].shape[-2:]]))
    try:
        for images, targets in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
            seen.clear()
            # a DynaMask model hands its masks over unpasted, for _batch_results to paste straight to RLE
            unpasted = {"paste_masks": False} if isinstance(model, DynaMaskRCNN) else {}
            outputs = model([im.to(device) for im in images], **unpasted)
            results += _batch_results(dataset, targets, outputs, images, seen[-1] if seen else None, mask_threshold,
                                      default_resolution)
    finally:
        if hook is not None:
            hook.remove()
    return results


def _batch_results(dataset: Any, targets: Sequence[dict[str, Tensor]], outputs: Sequence[dict[str, Any]],
                   images: Sequence[Tensor], input_size: list[int] | None, mask_threshold: float,
                   default_resolution: int | None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for target, out, image in zip(targets, outputs, images):
        image_id = int(target["image_id"])
        info = dataset.coco.imgs[image_id]
        size = (int(info["height"]), int(info["width"])) if "height" in info else None
        rles = _unpasted_rles(out, (int(image.shape[-2]), int(image.shape[-1])), size, mask_threshold)
        found = output_to_results(image_id, out, dataset.cat_ids, image_size=size, mask_threshold=mask_threshold,
                                  default_resolution=default_resolution, rles=rles)
        if input_size is not None:
            for r in found:
                r["input_size"] = input_size
        results += found
    return results


def _unpasted_rles(out: dict[str, Any], shape: tuple[int, int], size: tuple[int, int] | None,
                   mask_threshold: float) -> list[dict[str, Any]] | None:
    """The RLEs of an output whose masks came unpasted (``mask_handoff``; image ``shape`` (H, W), annotated
    ``size``), pasted straight to RLE: the same RLEs as pasting float canvases, thresholding and encoding them,
    without the canvases. Where that would not give the same results (an annotated size other than the
    image's, to which the dense masks are resampled; a threshold of 0, which the RLE op refuses), the masks
    are pasted into ``out["masks"]`` for the dense path instead, and None is returned (so is it for an output
    that has pasted masks already)."""
    if mask_handoff.HANDOFF_KEY not in out:
        return None
    if mask_threshold > 0 and (size is None or tuple(size) == shape):
        return mask_handoff.paste_rle(out.pop(mask_handoff.HANDOFF_KEY), out["boxes"], shape, mask_threshold)
    mask_handoff.paste_instance_masks(out, shape)
    return None


def evaluate_results(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    *,
    costs: Costs | None = None,
    boundary: bool = True,
    score_threshold: float = 0.5,
    out_dir: str | None = None,
    lvis_gt: Any = None,
    max_dets: int | None = None,
    cityscapes_gt_dir: str | None = None,
) -> dict[str, Any]:
    """Metrics of COCO result dicts against ``coco_gt``.

    Returns ``{"bbox": {AP...}, "segm": {AP...}, "boundary": {AP...} (if asked), "resolution": distribution
    (detections scoring >= ``score_threshold``), "mask_gmac_per_instance": float | None, "mask_cost": the
    :func:`~dynamask.engine.resolution_report.cost_report` over every detection}``. With ``out_dir``, also writes
    ``results.json``, ``metrics.json``, ``summary.txt`` and ``resolution.png`` there.

    With ``lvis_gt`` (an LVIS file's path, or its ``lvis.LVIS``), bbox and segm are scored by LVIS's rules
    instead (:mod:`dynamask.engine.lvis_eval`: ``max_dets`` per image, default 300, and APr/APc/APf), and
    there is no Boundary AP. With ``cityscapes_gt_dir`` (``ROOT/gtFine/<split>``), ``"cityscapes"`` holds the
    official Cityscapes instance evaluation as well (:mod:`dynamask.engine.cityscapes_eval`).
    """
    metrics: dict[str, Any] = {}
    texts = []
    kinds = ["bbox", "segm"] + (["boundary"] if boundary and lvis_gt is None else [])
    has_masks = all("segmentation" in r for r in results)
    for kind in kinds:
        if kind != "bbox" and not has_masks:
            continue
        if lvis_gt is not None:
            from dynamask.engine.lvis_eval import LVIS_MAX_DETS, lvis_metrics

            metrics[kind], text = lvis_metrics(lvis_gt, results, kind, max_dets=max_dets or LVIS_MAX_DETS)
        else:
            metrics[kind], text = coco_metrics(coco_gt, results, kind)
        texts.append(f"== {kind} ==\n{text}")
    if cityscapes_gt_dir is not None:
        from dynamask.engine.cityscapes_eval import cityscapes_instance_metrics

        metrics["cityscapes"] = cityscapes_instance_metrics(coco_gt, results, cityscapes_gt_dir)
    cat_names = {int(c["id"]): str(c["name"]) for c in coco_gt.loadCats(coco_gt.getCatIds())}
    # A mapping of costs names the model's resolutions (e.g. 7/14/28/56 for a demo model).
    per_roi = costs.per_roi if isinstance(costs, HeadCosts) else costs
    known = sorted(int(r) for r in per_roi) if isinstance(per_roi, Mapping) else None
    dist = resolution_distribution(results, cat_names, score_threshold=score_threshold, resolutions=known)
    metrics["resolution"] = dist
    # the cost below counts every detection the head segmented: the same detections' distribution beside it
    metrics["resolution_all"] = resolution_distribution(results, cat_names, score_threshold=0.0,
                                                        resolutions=known)
    # the head segments every kept detection, whatever its score: its cost is averaged over all of them
    report = cost_report(results, costs, num_images=len(coco_gt.imgs)) if costs is not None else None
    metrics["mask_gmac_per_instance"] = report["mask_gmac_per_instance"] if report else None
    metrics["mask_cost"] = report
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
    lvis: bool | None = None,
    max_dets: int | None = None,
    cityscapes_gt_dir: str | None = None,
) -> dict[str, Any] | None:
    """Run ``model`` over ``dataset`` and evaluate (see :func:`run_model` and :func:`evaluate_results`).
    ``costs`` default: a DynaMask model's own (:class:`~dynamask.models.flops.HeadCosts`, with the MSM when it routes).
    ``default_resolution`` (the resolution its masks are reported at when the model reports none) default:
    :func:`~dynamask.models.maskrcnn.fixed_mask_resolution` of the model (28 for Mask R-CNN).

    ``lvis``: score by LVIS's rules (default: when ``dataset`` is a :class:`dynamask.data.lvis.LvisDetection`);
    the model then keeps ``max_dets`` detections per image (default 300) while it runs.

    Under DDP every process must call this: each runs the model on its share of the images (every
    world-th, so shares differ by one at most), rank 0 gathers the results and returns the metrics; the
    other processes return None.
    """
    from dynamask.data.lvis import LvisDetection
    from dynamask.engine import distributed as dist_utils

    if len(dataset) == 0:  # its AP would read 0.0, as if the model had failed on every image
        raise ValueError(f"{getattr(dataset, 'ann_file', 'the dataset')}: no images to evaluate")
    heads = getattr(model, "roi_heads", None)
    if costs is None and heads is not None and hasattr(heads, "mask_head") and hasattr(heads, "msm"):
        costs = HeadCosts.of(model, msm=heads.mask_policy == "msm")
    if lvis is None:
        lvis = isinstance(dataset, LvisDetection)
    lvis_gt = None
    limit: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if lvis:
        from dynamask.engine.lvis_eval import LVIS_MAX_DETS, detections_per_image, load_lvis_gt

        lvis_gt = load_lvis_gt(dataset.ann_file)  # before inference, so that a bad file fails early
        max_dets = max_dets or LVIS_MAX_DETS
        limit = detections_per_image(model, max_dets)
    world, rank = dist_utils.world_size(), dist_utils.rank()
    indices = list(range(rank, len(dataset), world)) if world > 1 else None
    with limit:
        results = run_model(
            model, dataset, device=device, batch_size=batch_size, num_workers=num_workers, progress=progress,
            default_resolution=fixed_mask_resolution(model) if default_resolution is None else default_resolution,
            indices=indices,
        )
    gathered = dist_utils.gather_lists(results)
    if gathered is None:
        return None
    return evaluate_results(dataset.coco, gathered, costs=costs, boundary=boundary, out_dir=out_dir,
                            lvis_gt=lvis_gt, max_dets=max_dets, cityscapes_gt_dir=cityscapes_gt_dir)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A markdown table of the AP metrics (in %) plus the resolution distribution and mask-head cost."""
    from dynamask.engine.coco_eval import STAT_NAMES

    kinds = [k for k in ("bbox", "segm", "boundary") if k in metrics]
    # LVIS's metrics add the frequency groups (rare, common, frequent)
    names = list(STAT_NAMES) + [n for n in ("APr", "APc", "APf") if any(n in metrics[k] for k in kinds)]

    def pct(v: float) -> str:
        return "–" if v < 0 else f"{100 * v:.1f}"

    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(pct(metrics[kind].get(k, -1.0)) for k in names) + " |")
    cs = metrics.get("cityscapes")
    if cs:
        lines += ["", f"Cityscapes official instance evaluation: AP {pct(cs['AP'])}, AP50 {pct(cs['AP50'])}"]
    dist = metrics.get("resolution")
    if dist and dist["instances"]:
        res = [int(r) for r in dist["resolutions"]]
        lines += ["", "| category | " + " | ".join(f"{r}²" for r in res) + " |", "|---|" + "---|" * len(res)]
        shown = shown_categories(dist)
        rows = [(n, dist["per_category"][n]) for n in shown] + [("all", dist["overall"])]
        every = metrics.get("resolution_all")
        if every and every["instances"]:
            rows.append(("all detections, any score", every["overall"]))
        for name, counts in rows:
            counts = {int(r): n for r, n in counts.items()}  # metrics.json read back has str keys
            total = sum(counts.values())
            cells = [f"{100 * counts.get(r, 0) / total:.0f}%" if total else "–" for r in res]
            note = "; what the cost below counts" if name.startswith("all detections") else ""
            lines.append(f"| {name} (n={total}{note}) | " + " | ".join(cells) + " |")
        if len(shown) < len(dist["per_category"]):
            lines.append(f"({len(shown)} of {len(dist['per_category'])} categories, those with the most instances; "
                         "all in metrics.json)")
        lines.append(f"(rows: detections scoring >= {dist.get('score_threshold', 0.5):g}, but the last)")
    cost = metrics.get("mask_cost") or {}
    if metrics.get("mask_gmac_per_instance") is not None:
        msm = " (MSM included)" if cost.get("msm_gmac_per_roi") else ""
        lines += ["", f"Mask head: {metrics['mask_gmac_per_instance']:.4f} GMAC per instance{msm}, the mean over "
                      f"all {cost.get('instances', '')} detections it segmented (any score)"]
    if cost.get("head_gmac_per_image") is not None:
        lines.append(f"Per image: {cost['per_image_gmac']:.4f} GMAC of projections and MSM; whole mask head "
                     f"{cost['head_gmac_per_image']:.4f} GMAC")
    switches = metrics.get("switches")
    if switches:
        labels = {"fitted": "fitted (the run's)", "dynamic_phase": "dynamic phase's (the paper's)"}

        def num(v: float | None, fmt: str) -> str:
            return "–" if v is None else format(v, fmt)

        lines += ["", "| switch | segm AP | GMAC / instance | routing value captured |", "|---|---|---|---|"]
        for key, row in switches.items():
            ap = None if row.get("segm_AP") is None else 100 * row["segm_AP"]
            gmac, captured = num(row.get("mask_gmac_per_instance"), ".4f"), num(row.get("routing_captured"), ".3f")
            lines.append(f"| {labels.get(key, key)} | {num(ap, '.1f')} | {gmac} | {captured} |")
    return "\n".join(lines) + "\n"
