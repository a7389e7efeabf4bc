"""How much of the routing gain a switch could capture, on a finished accuracy study (issue 16).

    python benchmarks/switch_headroom.py --study /work/acc-cls            # both parts, ~15 min on 1 core
    python benchmarks/switch_headroom.py --study runs/accuracy --part retest
    python benchmarks/switch_headroom.py --study runs/accuracy --part retest --on coupled-paper-roi-ct0.08

Two measurements on one of the study's frozen models (``--on``: ``base``, ``OUT/ckpt/base.pth``, by default; the
default switch's model is the dynamic-phase row's, ``coupled-paper-roi-ct0.08``), written to
``OUT/switch_headroom.json`` (the retest of another model than the base under ``retest_NAME``):

- ``retest``: a test-retest ceiling. Every validation ground-truth box is probed twice, on the image and on
  its mirror image; the best assignment computed from the mirror's IoUs is scored on the original's
  (:func:`dynamask.engine.routing_value.routing_value`). A router that sees the object cannot be expected to
  predict its per-instance gains much better than a second measurement of the same object does. Scored at the
  oracle's counts, at quarters, and at the counts of every default-switch row fitted on that model
  (``switch:NAME``, from the row's shares per category): the ceiling for that switch's own choice.
- ``epochs``: switches trained longer. The switch inputs (detached 14² RoI features) and signals of the
  positives of ``--iters`` training batches (the study's switch phase: same seed, same batches) are cached,
  then fresh switches train for ``--epochs`` passes over the cache, two inits each; the routing value on the
  validation boxes is reported after epochs 1, 5, 10, ... For a regression switch the choice is the best
  assignment of its predicted losses with the counts split in quarters (ranking quality alone); for the
  expected-loss switch its own argmax under the study's budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the accuracy study is imported as the package benchmarks.accuracy
    sys.path.insert(0, ROOT)

from benchmarks.accuracy.config import full_config, quick_config  # noqa: E402
from benchmarks.accuracy.phases import (  # noqa: E402
    batches,
    build_dynamask,
    datasets,
    load_state,
    log,
    new_switch,
    save_json,
)
from dynamask.engine.routing_probe import mask_iou_top_grid  # noqa: E402
from dynamask.engine.routing_value import best_assignment, oracle_choice, routing_value  # noqa: E402
from dynamask.engine.switch_fit import frozen_head_outputs  # noqa: E402
from dynamask.models import mask_losses  # noqa: E402
from dynamask.models.flops import mask_head_gmacs  # noqa: E402
from dynamask.models.switch_input import switch_view  # noqa: E402


def probe_gt_boxes(model, image, target, reads: str = "roi"):
    """``([R, C, S, S] switch input, [R, K] IoU)`` of the ground-truth boxes of one image; the input is the view
    ``reads`` (:func:`dynamask.models.switch_input.switch_view`; the RoI feature by default)."""
    heads = model.roi_heads
    head = heads.mask_head
    il, tg = model.transform([image], [target])
    feats = model.backbone(il.tensors)
    boxes = [tg[0]["boxes"]]
    out = heads.masks_every_resolution(feats, boxes, il.image_sizes, tg[0]["labels"])
    n = boxes[0].shape[0]
    top = mask_losses.mask_targets([tg[0]["masks"]], boxes, [torch.arange(n)], [head.resolutions[-1]])[0]
    view = switch_view(reads, head, out.roi_features, out.trunk)
    return view, mask_iou_top_grid([x.sigmoid() for x in out.mask_logits], top)


def _mirror(image, target):
    w = image.shape[-1]
    b = target["boxes"]
    flipped = dict(target, boxes=torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1),
                   masks=target["masks"].flip(-1))
    return image.flip(-1), flipped


def counts_from_shares(shares: dict[str, list[float]], categories: np.ndarray, n: int, k: int) -> np.ndarray:
    """A row's instance counts per resolution ``[k]`` from its ``resolution_share`` (category → k fractions of
    that category's ground-truth instances) and the instances' ``categories`` ``[n]``; rounding goes to the
    last resolution, so the counts sum to ``n``."""
    counts = np.zeros(k)
    for cat, share in shares.items():
        counts += np.asarray(share, dtype=float) * int((categories == cat).sum())
    out = np.round(counts).astype(int)
    out[-1] += n - int(out.sum())
    return out


@torch.no_grad()
def retest(model, val, rows: list[dict] | None = None) -> dict:
    """The test-retest ceiling on ``val``'s ground-truth boxes; ``rows``: switch rows (``name``,
    ``resolution_share``) whose counts it is also scored at."""
    names = {int(c["id"]): str(c["name"]) for c in val.coco.loadCats(val.coco.getCatIds())}
    a, b, cats = [], [], []
    for i in range(len(val)):
        image, target = val[i]
        if target["boxes"].shape[0] == 0:
            continue
        a.append(probe_gt_boxes(model, image, dict(target))[1].numpy())
        b.append(probe_gt_boxes(model, *_mirror(image, target))[1].numpy())
        cats += [names[val.cat_ids[int(lab) - 1]] for lab in target["labels"].tolist()]
    iou, mirror = np.concatenate(a), np.concatenate(b)
    n, k = iou.shape
    gains = np.corrcoef(iou[:, -1] - iou[:, 0], mirror[:, -1] - mirror[:, 0])[0, 1]
    out = {"n": int(n), "gain_correlation": float(gains)}
    plans = {"oracle_counts": np.bincount(oracle_choice(iou), minlength=k),
             "quarters": np.diff(np.round(np.linspace(0, n, k + 1)).astype(int)),
             "half_lowest_half_highest": np.array([n // 2] + [0] * (k - 2) + [n - n // 2])}
    for r in rows or []:
        if r.get("resolution_share"):
            plans[f"switch:{r['name']}"] = counts_from_shares(r["resolution_share"], np.asarray(cats), n, k)
    for name, counts in plans.items():
        choice = best_assignment(mirror, counts)
        out[name] = {"counts": counts.tolist(), "captured": routing_value(iou, choice).captured}
    return out


@torch.no_grad()
def cache(model, train, val, cfg, iters: int) -> dict:
    heads = model.roi_heads
    xs, sig = [], {"probe": [], "paper": []}
    for images, targets in batches(train, cfg.batch, iters, cfg.seed + 2):
        frozen = frozen_head_outputs(model, images, targets)
        if frozen is None:
            continue
        rf, _, ml, el, mt, et = frozen
        xs.append(rf.half())  # 14² × C half floats per RoI: ~50 kB at 128 channels
        sig["probe"].append(1 - mask_iou_top_grid([x.sigmoid() for x in ml], mt[-1]).float())
        sig["paper"].append(mask_losses.routing_signal_losses(ml, el, mt, et, signal="paper",
                                                              edge_weight=heads.edge_weight))
    vx, vi = [], []
    for i in range(len(val)):
        image, target = val[i]
        if target["boxes"].shape[0] > 0:
            rf, iou = probe_gt_boxes(model, image, target)
            vx.append(rf.half())
            vi.append(iou)
    return {"x": torch.cat(xs), "signal": {k: torch.cat(v) for k, v in sig.items()}, "val_x": torch.cat(vx),
            "val_iou": torch.cat(vi)}


def train_longer(model, data: dict, *, kind: str, signal: str, seed: int, epochs: int, target: float,
                 lr: float) -> list[dict]:
    costs = torch.tensor(list(mask_head_gmacs(model.roi_heads.mask_head).values()))
    x, vx, viou = data["x"].float(), data["val_x"].float(), data["val_iou"].numpy()
    n_val, k = viou.shape
    quarters = np.diff(np.round(np.linspace(0, n_val, k + 1)).astype(int))
    torch.manual_seed(seed)
    net = new_switch(model, "roi")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    s_all = data["signal"][signal]
    out = []
    for ep in range(1, epochs + 1):
        net.train()
        perm = torch.randperm(x.shape[0])
        for j in range(0, x.shape[0], 16):
            idx = perm[j:j + 16]
            pred, s = net(x[idx]), s_all[idx]
            if kind == "regress":
                loss = F.mse_loss(pred - pred.mean(1, keepdim=True), s - s.mean(1, keepdim=True))
            else:  # "expected": Σ_k p_k ℓ_k with the study's budget and entropy terms (λ2 0.4)
                p = pred.softmax(1)
                loss = (p * s).sum(1).mean() + 0.4 * (mask_losses.entropy_loss(p)
                                                      + mask_losses.budget_loss(p, costs, target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if ep == 1 or ep % 5 == 0:
            net.eval()
            with torch.no_grad():
                pv = net(vx)
            choice = best_assignment(-pv.numpy(), quarters) if kind == "regress" else pv.argmax(1).numpy()
            out.append({"epoch": ep, "captured": routing_value(viou, choice).captured,
                        "counts": np.bincount(choice, minlength=k).tolist()})
            cap = out[-1]["captured"]  # None when the boxes leave no gain to capture (tiny test sets)
            log(f"{kind}/{signal} init {seed} epoch {ep}: captured {'undefined' if cap is None else f'{cap:.3f}'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="a finished accuracy study's --out folder")
    p.add_argument("--part", choices=("all", "retest", "epochs"), default="all")
    p.add_argument("--quick", action="store_true", help="the study is a --quick one")
    p.add_argument("--iters", type=int, default=None,
                   help="training batches to cache (default: the study's switch_iters)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--on", default="base",
                   help="the study's checkpoint (ckpt/ON.pth) to measure: base (default) or a dynamic-phase row's, "
                        "e.g. coupled-paper-roi-ct0.08, the model of the default switch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = quick_config() if args.quick else full_config()
    with open(os.path.join(args.study, "meta.json")) as f:
        saved = json.load(f)["config"]
    cfg = replace(cfg, arch=saved["arch"])  # the head the study trained (class-specific or not)
    train, val = datasets(cfg, args.study)
    model = build_dynamask(cfg)
    ckpt = os.path.join(args.study, "ckpt", f"{args.on}.pth")
    if not os.path.isfile(ckpt):
        p.error(f"--on {args.on}: no {ckpt} in the study")
    model.load_state_dict(load_state(ckpt)["model"])
    model.eval()
    path = os.path.join(args.study, "switch_headroom.json")
    result = json.load(open(path)) if os.path.exists(path) else {}
    t0 = time.time()
    if args.part in ("all", "retest"):
        rows = []
        rows_dir = os.path.join(args.study, "rows")
        for name in sorted(os.listdir(rows_dir)) if os.path.isdir(rows_dir) else []:
            with open(os.path.join(rows_dir, name)) as f:
                row = json.load(f)
            if row.get("default_switch") and (row.get("fit") or {}).get("on", "base") == args.on:
                rows.append(row)
        key = "retest" if args.on == "base" else f"retest_{args.on}"
        result[key] = retest(model, val, rows)
        log(f"{key}: {json.dumps(result[key])}")
        save_json(path, result)
    if args.part in ("all", "epochs"):
        data = cache(model, train, val, cfg, args.iters or saved["switch_iters"])
        log(f"cached {data['x'].shape[0]} training RoIs, {data['val_x'].shape[0]} validation boxes")
        mid = sorted(v["target_gmacs"] for v in saved["switches"])[len(saved["switches"]) // 2]
        runs = {}
        for kind, signal in (("regress", "probe"), ("expected", "paper")):
            for seed in (0, 1):
                runs[f"{kind}-{signal}-init{seed}"] = train_longer(model, data, kind=kind, signal=signal, seed=seed,
                                                                   epochs=args.epochs, target=mid, lr=cfg.lr)
        result["epochs"] = {"training_rois": int(data["x"].shape[0]), "epochs": args.epochs, "runs": runs}
        save_json(path, result)
    result["minutes"] = (time.time() - t0) / 60
    save_json(path, result)
    log(f"done: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
