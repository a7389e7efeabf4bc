"""The main job: generate the shapes data set, train a small DynaMask on it under a time cap (the run
ends by fitting its mask switch to the budget, as every `dynamask train` of DynaMask does), evaluate it,
and write runs/demo/report.md (AP table, per-category resolution plot, FLOPs, overlays) and
runs/demo/routing.json (how well the switch routes on the validation split's ground-truth boxes, beside
each category's gain in mask IoU from resolution; also a table in the report).

Sizes come from the environment so that a quick smoke run is possible:
DEMO_MINUTES (training cap, default 18), DEMO_TRAIN / DEMO_VAL (images, 900 / 100), DEMO_SIZE (px, 128),
DEMO_FIT_BATCHES (training batches the switch fit collects, 300),
DEMO_TOTAL_MINUTES (the whole job, set-up included, default 28.5: a slow set-up shortens training so that the
job still ends in time; the switch fit, evaluation and report take about 5 minutes after training).

The recipe was chosen from measured speed and accuracy on a 2-core CPU (about 1.0 s per iteration of 4
images at 128 px with this model). The model starts from random weights, and in so short a schedule AdamW
learns far faster than SGD: after 450 iterations, bbox AP50 40.6 against 10.2 for SGD with momentum at lr
0.02 (the same run otherwise; SGD's whole 1125-iteration schedule reached 43). 6 epochs of 900 images are
planned and the cap ends training in the 5th or 6th on this machine (4.8-5.8 measured); the first 4 with
every resolution supervised, the rest dynamic (the mask switch trained under a budget equal to the 28²
cost); the learning rate is divided by 10 after epochs 4 and 5. What makes it fast: a ResNet-18 FPN of 128
channels, a narrow mask head whose resolutions are 7/14/28/56 (mask_roi_size 7), anchors scaled to the
small images, and at most 8 RoIs per image training the mask branch.

Training ends with the switch fitted to the budget by regression on 300 training batches
(`dynamask.engine.switch_life`, docs/method.md §3): on the stop-14 demo checkpoint such a fit captured
0.77 / 0.75 of the routing gain (two inits) against 0.52 for the switch the dynamic phase trained. The
report shows both (the checkpoint keeps the dynamic phase's switch).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "demo")
MINUTES = float(os.environ.get("DEMO_MINUTES", "18"))
TOTAL_MINUTES = float(os.environ.get("DEMO_TOTAL_MINUTES", "28.5"))
# checkpoint, evaluation, fixed-resolution runs, overlays (~1 min measured), routing (~15 s est.), the switch fit
# (300 batches collected in 2.3 min and 15 epochs in 1.8-3.1 min on one busy thread; est. 3 min on 2 threads)
# and its evaluation (~0.5 min est.)
# + the training run's own evaluation of the dynamic phase's switch beside the fitted one, and its routing
# probe (100 images of 128 px twice: ~0.75 min est.)
AFTER_TRAINING_MINUTES = 6.0
FIT_BATCHES = int(os.environ.get("DEMO_FIT_BATCHES", "300"))
FIT_EPOCHS = 15
N_TRAIN = int(os.environ.get("DEMO_TRAIN", "900"))
N_VAL = int(os.environ.get("DEMO_VAL", "100"))
SIZE = int(os.environ.get("DEMO_SIZE", "128"))
MAX_OBJECTS = 4
BATCH = 4  # images per iteration
PRETRAIN_EPOCHS, EPOCHS = 4, 2  # 4 epochs with every resolution supervised, then 2 dynamic ones: 6 in all
LR_STEPS = (0, 1)  # dynamic epochs after which the lr is divided by 10 (after epochs 4 and 5 of the 6)
LR = 5e-4  # AdamW
COMPARE_FIXED = (28, 56)  # resolutions the report also evaluates every RoI at (about 20 s each)
ARCH_KWARGS = {
    "depth": 18, "num_classes": 8, "fpn_channels": 128, "box_representation_size": 512,
    "trunk_channels": 64, "stage_channels": [32, 16, 8], "mask_roi_size": 7,
    "anchor_sizes": [s * SIZE // 256 for s in (32, 64, 128, 256, 512)],
    "min_size": SIZE, "max_size": SIZE, "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 128,
    "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 200,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100, "box_detections_per_img": 30,
    "mask_rois_per_image": 8,
}
BUDGET_AT = 28  # C_t: on average as costly as running every RoI at 28² (see demo_budget)


def demo_budget(arch_kwargs: dict) -> float:
    """C_t in GMAC per RoI for the head the demo builds: its cost at ``BUDGET_AT``² from
    :func:`dynamask.models.flops.mask_head_gmacs`, so that the budget follows the head when its widths change."""
    from dynamask.models import dynamask_resnet_fpn, flops

    return flops.mask_head_gmacs(dynamask_resnet_fpn(**arch_kwargs))[BUDGET_AT]


def run(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dynamask", *args], check=True, cwd=ROOT)


def main() -> int:
    t0 = float(os.environ.get("DEMO_T0", time.time()))  # scripts/demo.sh sets it before the set-up
    os.makedirs(OUT, exist_ok=True)
    data = os.path.join(OUT, "data")
    if not os.path.exists(os.path.join(data, "annotations", "val.json")):
        run(["shapes", "--out", data, "--train", str(N_TRAIN), "--val", str(N_VAL), "--size", str(SIZE), "--seed", "0",
             "--max-objects", str(MAX_OBJECTS)])
    train_dir = os.path.join(OUT, "train")
    minutes = training_cap(t0)
    progress = [] if sys.stdout.isatty() else ["--no-progress"]  # bars in a terminal, clean logs otherwise
    run(["train", "--data", data, "--out", train_dir, "--arch", "dynamask_resnet_fpn",
         "--arch-kwargs", json.dumps(ARCH_KWARGS), "--target-gmacs", f"{demo_budget(ARCH_KWARGS):.6g}",
         "--epochs", str(EPOCHS), "--pretrain-epochs", str(PRETRAIN_EPOCHS),
         "--batch-size", str(BATCH), "--optimizer", "adamw", "--lr", str(LR), "--warmup-iters", "100",
         "--lr-steps", *map(str, LR_STEPS),
         "--clip-grad-norm", "10", "--workers", "0", "--time-limit", f"{minutes:.2f}",
         "--switch-fit-batches", str(FIT_BATCHES), "--switch-fit-epochs", str(FIT_EPOCHS), *progress])
    write_report(data, train_dir, t0, minutes)
    print(f"report: {os.path.join(OUT, 'report.md')}")
    return 0


OVERLAY_SCALE = 4  # the demo's 128-px images are drawn at 512 px, where the labels and legend leave room


def upscaled(image, out: dict, k: int):
    """``image`` and one output of the model ``k`` times larger (bilinear), for a readable overlay."""
    import torch.nn.functional as F

    big = F.interpolate(image[None], scale_factor=k, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    masks = F.interpolate(out["masks"].float(), scale_factor=k, mode="bilinear", align_corners=False)
    return big, {**out, "boxes": out["boxes"] * k, "masks": masks}


def training_cap(t0: float) -> float:
    """Minutes of training: DEMO_MINUTES, less whatever the set-up overran, so the whole job fits
    DEMO_TOTAL_MINUTES."""
    spent = (time.time() - t0) / 60
    minutes = min(MINUTES, TOTAL_MINUTES - AFTER_TRAINING_MINUTES - spent)
    if minutes < 1:
        raise SystemExit(f"demo: the set-up took {spent:.1f} of DEMO_TOTAL_MINUTES={TOTAL_MINUTES:g} minutes, "
                         "leaving under a minute to train; raise DEMO_TOTAL_MINUTES")
    print(f"demo: set-up and data took {spent:.1f} min; training for at most {minutes:.1f} min", flush=True)
    return minutes


def interpolated(rows: list[tuple[str, dict, float, float | None]]) -> list[str]:
    """A sentence comparing the switch with a mix of the two fixed resolutions that costs the same: the
    segm AP such a mix (a share of RoIs at each) would get, interpolated linearly between the fixed rows."""
    (_, msm, cost, _), *fixed = rows
    for (name_a, a, cost_a, _), (name_b, b, cost_b, _) in zip(fixed, fixed[1:]):
        if cost_a <= cost <= cost_b and cost_b > cost_a:
            t = (cost - cost_a) / (cost_b - cost_a)
            mix = (1 - t) * a["AP"] + t * b["AP"]
            return ["", f"A mix of {name_a.removeprefix('every RoI at ')} and {name_b.removeprefix('every RoI at ')} "
                    f"that costs what the switch costs ({100 * (1 - t):.0f}% / {100 * t:.0f}% of RoIs) "
                    "would score about "
                    f"segm AP {100 * mix:.1f} (linear interpolation); the switch scores {100 * msm['AP']:.1f}."]
    return []


def write_routing(model, val, path: str, dynamic_phase_model=None) -> dict:
    """How well the switch routes, on the ground-truth boxes of ``val``: ``routing.json`` (issue 16)::

        {"routing_value": {"switch", "shuffled", "best_same_counts", "captured"},
         "categories": {name: {"kind", "n", "iou_gain", "mean_index"}}, "category_yardstick": float | None}

    ``iou_gain``: mean mask IoU at the finest resolution minus at the coarsest (each mask upsampled to the
    finest grid); ``mean_index``: the switch's mean resolution index (0 = coarsest). With
    ``dynamic_phase_model`` (the same model before its switch was refitted), also
    ``"dynamic_phase_switch": {"switch", "shuffled", "best_same_counts", "captured"}`` for that one.
    """
    from dynamask.engine.routing_probe import gt_box_routing, routing_summary

    summary = routing_summary(gt_box_routing(model, val, progress=False))
    if dynamic_phase_model is not None:
        before = routing_summary(gt_box_routing(dynamic_phase_model, val, progress=False))
        summary["dynamic_phase_switch"] = before["routing_value"]
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def before_lines(v: dict | None) -> list[str]:
    """A sentence on the dynamic phase's switch (before the refit), when ``routing.json`` has it."""
    if v is None:
        return []
    captured = "undefined" if v["captured"] is None else f"{v['captured']:.2f}"
    return ["", f"The switch the dynamic phase trained (before the refit): mean IoU {v['switch']:.3f} against "
            f"{v['shuffled']:.3f} shuffled and {v['best_same_counts']:.3f} best with its counts: captured {captured}."]


def routing_lines(summary: dict, resolutions) -> list[str]:
    """The report's table of the switch's routing beside each category's gain from resolution."""
    v = summary["routing_value"]
    lo, hi = resolutions[0], resolutions[-1]
    captured = "undefined (one resolution for all)" if v["captured"] is None else f"{v['captured']:.2f}"
    y = summary.get("category_yardstick")
    yard = ("" if y is None else f" A router that knows only each instance's category would capture {y:.2f} with "
            "the same counts (leave-one-out category means).")
    lines = [
        "## How well the switch routes (ground-truth boxes of the validation split, `routing.json`)",
        "",
        f"Mean mask IoU of the switch's choices {v['switch']:.3f}; the same choices shuffled among the instances "
        f"{v['shuffled']:.3f}; the best assignment of the same counts {v['best_same_counts']:.3f}: the switch "
        f"captures **{captured}** of the possible routing gain.{yard}",
        *before_lines(summary.get("dynamic_phase_switch")),
        "",
        f"| category | kind | n | IoU gain {lo}²→{hi}² "
        f"| switch's mean index (0 = {lo}², {len(resolutions) - 1} = {hi}²) |",
        "|---|---|---|---|---|",
    ]
    for name, c in summary["categories"].items():
        gain = "–" if c["iou_gain"] is None else f"{c['iou_gain']:+.3f}"
        index = "–" if c["mean_index"] is None else f"{c['mean_index']:.2f}"
        lines.append(f"| {name} | {c['kind']} | {c['n']} | {gain} | {index} |")
    lines += ["", "A category whose masks gain little from resolution is rightly sent to small masks, whatever "
              "its generator label says.", ""]
    return lines


def write_report(data: str, train_dir: str, t0: float, minutes: float) -> None:
    sys.path.insert(0, ROOT)
    from dynamask.data import CocoDetection
    from dynamask.engine.checkpoint import model_from_checkpoint
    from dynamask.engine.evaluate import evaluate, format_metrics
    from dynamask.engine.switch_life import fit_record, use_dynamic_phase_switch
    from dynamask.models import flops
    from dynamask.viz import save_overlay

    eval_dir = os.path.join(train_dir, "eval")
    with open(os.path.join(eval_dir, "metrics.json")) as f:  # `train --data` evaluated last.pth, fitted
        metrics = json.load(f)
    model, ckpt = model_from_checkpoint(os.path.join(train_dir, "last.pth"))
    model.eval()
    val = CocoDetection(os.path.join(data, "val"), os.path.join(data, "annotations", "val.json"))
    # the same model with the switch the dynamic phase trained (kept in the checkpoint beside the fitted one)
    before = copy.deepcopy(model)
    if not use_dynamic_phase_switch(before, ckpt):
        raise SystemExit("demo: the training run did not fit its switch (see its log)")
    before.eval()
    dynamic = evaluate(before, val, boundary=False, progress=False)
    gmacs = flops.mask_head_gmacs(model)
    overlays = []
    names = [str(v[1]) for _, v in sorted(((int(k), v) for k, v in ckpt["label_map"].items()))]
    with torch.no_grad():
        for i in range(min(4, len(val))):
            image, _ = val[i]
            out = model([image])[0]
            big, big_out = upscaled(image, out, OVERLAY_SCALE)
            overlays.append(save_overlay(big, big_out, os.path.join(OUT, f"overlay_{i}.png"), names=names))
    # the method's claim, on this model: the switch against every RoI at one resolution
    msm_gmac = flops.msm_gmacs(model)
    cost = metrics.get("mask_cost") or {}
    # costs over every detection the head segmented; the switch's row includes the MSM, which a fixed
    # resolution does not run (evaluate's default costs follow the model's policy)
    rows = [("MSM (fitted switch)", metrics["segm"], metrics["mask_gmac_per_instance"] or 0.0,
             cost.get("head_gmac_per_image"))]
    dyn_cost = dynamic.get("mask_cost") or {}
    dynamic_row = ("MSM (dynamic phase's switch)", dynamic["segm"], dynamic["mask_gmac_per_instance"] or 0.0,
                   dyn_cost.get("head_gmac_per_image"))
    for r in COMPARE_FIXED:
        model.mask_policy = r
        fixed = evaluate(model, val, boundary=False, progress=False)
        rows.append((f"every RoI at {r}²", fixed["segm"], fixed["mask_gmac_per_instance"],
                     fixed["mask_cost"]["head_gmac_per_image"]))
    model.mask_policy = "msm"
    routing = write_routing(model, val, os.path.join(OUT, "routing.json"), dynamic_phase_model=before)
    fit = fit_record(ckpt) or {}
    seconds = time.time() - t0  # the job up to here; only writing the report is left
    iters_per_epoch = -(-N_TRAIN // BATCH)
    lines = [
        "# DynaMask demo report",
        "",
        "What this is: a **small** DynaMask (ResNet-18-FPN, narrow mask head, random initialisation) trained for "
        f"{minutes:.1f} minutes at most on a synthetic shapes data set generated here ({N_TRAIN} training and "
        f"{N_VAL} validation images of {SIZE} px, at most {MAX_OBJECTS} objects each). "
        "It shows the pipeline and the method's routing on data with "
        "smooth and finely detailed objects; its numbers say nothing about COCO.",
        "",
        f"Trained {ckpt['iteration']} iterations ({ckpt['iteration'] / iters_per_epoch:.1f} epochs of "
        f"{iters_per_epoch}, AdamW at lr {LR:g}) on {'a GPU' if torch.cuda.is_available() else 'the CPU'}; "
        f"then, as the run ended, its switch fitted to the budget ({fit.get('rois', '?')} training RoIs, "
        f"{fit.get('epochs', '?')} epochs, {fit.get('seconds', 0) / 60:.1f} min of fitting); "
        f"whole job, set-up included, {seconds / 60:.1f} minutes.",
        "",
        "## Accuracy (validation split, %)",
        "",
        format_metrics(metrics),
        "## Mask-head cost (cumulative GMAC per RoI at each resolution, this model)",
        "",
        "| " + " | ".join(f"{r}²" for r in gmacs) + " |",
        "|" + "---|" * len(gmacs),
        "| " + " | ".join(f"{g:.4f}" for g in gmacs.values()) + " |",
        "",
        f"MSM: {msm_gmac:.4f} GMAC per RoI.",
        "",
        "## Accuracy per FLOP: the mask switch against fixed resolutions (validation split)",
        "",
        "| mask resolution | segm AP | AP50 | AP75 | mask GMAC per instance | whole mask head, GMAC per image |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {100 * m['AP']:.1f} | {100 * m['AP50']:.1f} | {100 * m['AP75']:.1f} | {g:.4f} | "
          f"{'–' if img is None else f'{img:.4f}'} |" for name, m, g, img in [*rows, dynamic_row]),
        "",
        "The fitted switch is the trained model with its switch refitted by regression and priced to the "
        "budget (docs/method.md §3); the dynamic phase's switch is the same model before that.",
        "Costs are averaged over every detection the head segmented (any score), the MSM included in the "
        "switch's row; per image, the whole head adds the 1×1 projections of the levels its RoIs reach "
        "(and the MSM) to the RoIs' own cost.",
        *interpolated(rows),
        "",
        "## Chosen resolutions per category",
        "",
        "Detections scoring at least 0.5 (a category the model is not yet sure of has few or none).",
        "",
        ("![resolutions](train/eval/resolution.png)" if os.path.exists(os.path.join(eval_dir, "resolution.png"))
         else "(no detections)"),
        "",
        *routing_lines(routing, list(gmacs)),
        "## Examples (colour = resolution the instance was segmented at)",
        "",
    ]
    lines += [f"![overlay {i}]({os.path.basename(p)})" for i, p in enumerate(overlays)]
    with open(os.path.join(OUT, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
