"""The study over seeds: every row's mean and spread, and the issue's claims judged on the default switch.

    python -m benchmarks.accuracy.seeds runs/accuracy-s0 runs/accuracy-s1 --out benchmarks/results/accuracy_cpu_seeds

Each argument is one finished study folder (``python -m benchmarks.accuracy --seed N --out DIR``), with the Mask
R-CNN row in its ``rows/``. Writes ``OUT.json`` (every row of every seed, each with its ``seed``; the claims) and
``OUT.md`` (the table of means and spreads, then one line per claim).

The claims are those of the issue that asked for this study, each checked on the rows named there only: the
fixed resolutions, the Mask R-CNN row, the size rule, and the **default switch** (the rows with
``"default_switch": true``: the fit ``dynamask train`` ends with, on its dynamic-phase model, at the study's
budgets). A budget's default-switch figure is the mean over the fit's inits (the fit's own seed): judging the
best init would be the best of several variants. "mean" claims use the mean over seeds; "every seed" claims
must hold on each seed.

The ladder and the Mask R-CNN comparison read the base model's fixed rows. Tables 5 and 8 and the equal-cost
mix compare the switch with the policies of **its own model** (rows ``train-fixed-S``, ``train-size-rule``:
the same detector and mask head, so only the routing differs) where the study has them, and print the base
model's figures beside; a study without them is judged against the base model's rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.accuracy.report import fixed_line
from dynamask.atomic import write_text_atomic

STEP = 0.005  # +0.5 AP per doubling (the 0-1 scale)
T6_COST, T6_GAIN = 1.3, 0.01  # ≤ 1.3x the Mask R-CNN head's cost, ≥ its AP + 1.0
T8_GAIN = 0.005  # ≤ the size rule's cost, ≥ its AP + 0.5
T5_COST, T5_GAP = 0.6, 0.01  # ≤ 0.6x the top resolution's cost, within 1.0 AP of it
ROUTING, MIX_GAIN = 0.6, 0.01  # routing value ≥ 0.6 and ≥ +1.0 AP over the equal-cost fixed mix


def load(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "accuracy_cpu.json")) as f:
        study = json.load(f)
    seed = int(study["config"]["seed"])
    for r in study["rows"]:
        r.setdefault("seed", seed)
    return study


def default_switch_budgets(rows: list[dict[str, Any]]) -> dict[float, dict[str, float | None]]:
    """Budget C_t → the default switch's mean segm AP, cost and routing value over its inits."""
    out: dict[float, dict[str, float | None]] = {}
    by: dict[float, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("default_switch"):
            by.setdefault(float(r["target_gmacs"]), []).append(r)
    for budget, rs in sorted(by.items()):
        caps = [r["routing_captured"] for r in rs]
        out[budget] = {"segm_ap": statistics.fmean(r["segm_ap"] for r in rs),
                       "gmacs": statistics.fmean(r["mask_gmacs_per_instance"] for r in rs),
                       "captured": None if any(c is None for c in caps) else statistics.fmean(caps),
                       "inits": len(rs)}
    return out


def seed_claims(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one seed that the claims read (None where a row is missing)."""
    fixed = sorted((r for r in rows if r["policy"] == "fixed"), key=lambda r: r["resolution"])
    own = sorted((r for r in rows if r["policy"] == "own-fixed"), key=lambda r: r["resolution"])
    by = {r["name"]: r for r in rows}
    mrcnn, base_size = by.get("maskrcnn-28"), by.get("size-rule")
    size = by.get("train-size-rule", base_size)
    ref_fixed = own or fixed  # Tables 5 and 8 and the mix: the switch's own model where measured
    sw = default_switch_budgets(rows)
    out: dict[str, Any] = {"ladder": [r["segm_ap"] for r in fixed], "resolutions": [r["resolution"] for r in fixed],
                           "fixed_28": next((r["segm_ap"] for r in fixed if r["resolution"] == 28), None),
                           "maskrcnn": None if mrcnn is None else mrcnn["segm_ap"],
                           "bbox_ap": {r["name"]: r.get("bbox_ap") for r in rows},
                           "switch": {f"{b:g}": v for b, v in sw.items()},
                           "judged_on": "own" if own else "base"}

    def best_under(cost: float) -> tuple[float, float] | None:
        cands = [(v["segm_ap"], b) for b, v in sw.items() if v["gmacs"] is not None and v["gmacs"] <= cost]
        return max(cands) if cands else None

    if mrcnn is not None:
        out["t6"] = {"ref_ap": mrcnn["segm_ap"], "cap": T6_COST * mrcnn["mask_gmacs_per_instance"],
                     "best": best_under(T6_COST * mrcnn["mask_gmacs_per_instance"])}
    for key, ref in (("t8", size), ("t8_base", base_size if own else None)):
        if ref is not None:
            out[key] = {"ref_ap": ref["segm_ap"], "cap": ref["mask_gmacs_per_instance"],
                        "best": best_under(ref["mask_gmacs_per_instance"])}
    for key, line in (("t5", ref_fixed), ("t5_base", fixed if own else [])):
        if line:
            top = line[-1]
            out[key] = {"ref_ap": top["segm_ap"], "cap": T5_COST * top["mask_gmacs_per_instance"],
                        "best": best_under(T5_COST * top["mask_gmacs_per_instance"])}

    def over(line: list[dict[str, Any]], v: dict[str, Any]) -> float | None:
        m = fixed_line(line, float(v["gmacs"] or 0))
        return None if m is None else v["segm_ap"] - m[0]

    out["routing"] = {f"{b:g}": {"captured": v["captured"], "over_mix": over(ref_fixed, v),
                                 "over_base_mix": over(fixed, v) if own else None}
                      for b, v in sw.items()}
    return out


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals and len(vals) == len(xs) else None


def judge(per_seed: dict[int, dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """``(claim, holds (None: not measured), the figures)`` for each of the issue's claims."""
    seeds = sorted(per_seed)
    out: list[tuple[str, bool | None, str]] = []
    ladders = [per_seed[s]["ladder"] for s in seeds]
    if ladders and all(len(lad) == len(ladders[0]) and len(lad) > 1 for lad in ladders):
        mean = [statistics.fmean(col) for col in zip(*ladders)]
        steps = [b - a for a, b in zip(mean, mean[1:])]
        res = per_seed[seeds[0]]["resolutions"]
        text = (" → ".join(f"{100 * a:.1f}" for a in mean) + " (steps " + ", ".join(f"{100 * d:+.1f}" for d in steps)
                + "; per seed " + "; ".join(f"{s}: " + " / ".join(f"{100 * a:.1f}" for a in per_seed[s]["ladder"])
                                          for s in seeds) + ")")
        out.append((f"the ladder {'/'.join(f'{r}²' for r in res)} rises by ≥ +0.5 AP per doubling (mean)",
                    all(d >= STEP for d in steps), text))
    else:
        out.append(("the ladder rises (mean)", None, "fixed rows missing"))
    d28, mr = [per_seed[s]["fixed_28"] for s in seeds], [per_seed[s]["maskrcnn"] for s in seeds]
    if _mean(d28) is not None and _mean(mr) is not None:
        a, b = _mean(d28), _mean(mr)
        assert a is not None and b is not None
        out.append(("DynaMask's fixed 28² ≥ Mask R-CNN's 28² head, equal mask supervision (mean)", a >= b,
                    f"{100 * a:.1f} vs {100 * b:.1f} ({100 * (a - b):+.1f}); per seed "
                    + "; ".join(f"{s}: {100 * x:.1f} vs {100 * y:.1f}" for s, x, y in zip(seeds, d28, mr))))
    else:
        out.append(("DynaMask's fixed 28² ≥ Mask R-CNN's 28² (mean)", None, "rows missing"))
    # the switch's claims on the seeds whose study has default-switch rows (a ladder-only study has none)
    switch_seeds = [s for s in seeds if per_seed[s]["switch"]]
    missing = [s for s in seeds if s not in switch_seeds]
    unmeasured = f" (seed {', '.join(map(str, missing))}: no default-switch rows, not judged)" if missing else ""
    own = any(per_seed[s].get("judged_on") == "own" for s in switch_seeds)
    mine = " of its own model" if own else ""
    for key, name, gain, rule in (("t6", "Table 6", T6_GAIN, "≤ 1.3× the Mask R-CNN head's cost, ≥ its AP + 1.0"),
                                  ("t8", "Table 8", T8_GAIN, f"≤ the size rule{mine}'s cost, ≥ its AP + 0.5"),
                                  ("t5", "Table 5", -T5_GAP,
                                   f"≤ 0.6× the top resolution{mine}'s cost, within 1.0 AP of it")):
        parts, oks = [], []
        for s in switch_seeds:
            c = per_seed[s].get(key)
            if c is None:
                oks.append(None)
                parts.append(f"{s}: not measured")
                continue
            best = c["best"]
            if best is None:
                oks.append(False)
                b, v = min(per_seed[s]["switch"].items(), key=lambda kv: kv[1]["gmacs"], default=(None, None))
                near = "" if v is None else (f" (the cheapest, C_t {b}: {100 * v['segm_ap']:.1f} at {v['gmacs']:.4f} "
                                             f"vs {100 * c['ref_ap']:.1f})")
                parts.append(f"{s}: no default-switch budget costs ≤ {c['cap']:.4f} GMAC{near}")
                continue
            ap, budget = best
            oks.append(ap >= c["ref_ap"] + gain)
            ref = c["ref_ap"]
            part = f"{s}: C_t {budget:g} {100 * ap:.1f} vs {100 * ref:.1f} ({100 * (ap - ref):+.1f})"
            base = per_seed[s].get(f"{key}_base")
            if base is not None:
                bb = base["best"]
                part += (" [base model's rows: " + ("no budget costs ≤ " + f"{base['cap']:.4f}" if bb is None else
                         f"C_t {bb[1]:g} {100 * bb[0]:.1f} vs {100 * base['ref_ap']:.1f} "
                         f"({100 * (bb[0] - base['ref_ap']):+.1f})") + "]")
            parts.append(part)
        holds = None if any(o is None for o in oks) or not oks else all(oks)
        out.append((f"{name}: a default-switch row {rule} (every seed)", holds, "; ".join(parts) + unmeasured))
    parts, oks = [], []
    for s in switch_seeds:
        best = None
        for budget, v in per_seed[s]["routing"].items():
            ok = v["captured"] is not None and v["captured"] >= ROUTING and v["over_mix"] is not None \
                and v["over_mix"] >= MIX_GAIN
            cap = "undefined" if v["captured"] is None else f"{v['captured']:.2f}"
            mix = "n/a" if v["over_mix"] is None else f"{100 * v['over_mix']:+.1f}"
            base = v.get("over_base_mix")
            extra = "" if base is None else f" ({100 * base:+.1f} over the base model's)"
            parts.append(f"{s}/C_t {budget}: captured {cap}, {mix} AP over the mix{extra}")
            best = ok or bool(best)
        oks.append(bool(best))
    out.append((f"routing value of the default switch ≥ 0.6 and ≥ +1.0 AP over the equal-cost fixed mix{mine}, at "
                "one of the budgets (every seed)", all(oks) if oks else None, "; ".join(parts) + unmeasured))
    return out


ROW_KEYS = ("segm_ap", "bbox_ap", "boundary_ap", "mask_gmacs_per_instance")


def summary_rows(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per row name present in every seed: mean and spread (max − min) of each figure."""
    names = [r["name"] for r in studies[0]["rows"]]
    common = [n for n in names if all(any(r["name"] == n for r in st["rows"]) for st in studies)]
    out = []
    for n in common:
        rs = [next(r for r in st["rows"] if r["name"] == n) for st in studies]
        line: dict[str, Any] = {"name": n, "policy": rs[0]["policy"], "resolution": rs[0].get("resolution"),
                                "default_switch": bool(rs[0].get("default_switch")), "seeds": [r["seed"] for r in rs]}
        for k in ROW_KEYS:
            vals = [r.get(k) for r in rs]
            if all(v is not None for v in vals):
                line[k] = {"mean": statistics.fmean(vals), "spread": max(vals) - min(vals), "per_seed": vals}
        out.append(line)
    return out


def gt_box_table(studies: list[dict[str, Any]]) -> list[str]:
    """Mean mask IoU on the ground-truth boxes per category (the head alone, whatever the detector), mean over
    the seeds: DynaMask's base model at every resolution beside the Mask R-CNN head's 28²."""
    cats = list(studies[0].get("mean_iou") or {})
    if not cats:
        return []
    res = studies[0].get("resolutions") or []
    mr = [next((r for r in st["rows"] if r["name"] == "maskrcnn-28"), None) for st in studies]
    lines = ["", "Mean mask IoU on the ground-truth boxes (the head alone), mean over the seeds:", "",
             "| category | DynaMask " + " / ".join(f"{r}²" for r in res) + " | Mask R-CNN 28² |", "|---|---|---|"]
    cols: list[list[float]] = [[] for _ in res]
    mr_col: list[float] = []
    for c in cats:
        vals = [statistics.fmean(st["mean_iou"][c][k] for st in studies) for k in range(len(res))]
        for k, v in enumerate(vals):
            cols[k].append(v)
        per = [(r or {}).get("gt_box_iou_per_category", {}).get(c) for r in mr]
        m = statistics.fmean(per) if per and all(v is not None for v in per) else None
        if m is not None:
            mr_col.append(m)
        lines.append(f"| {c} | " + " / ".join(f"{v:.3f}" for v in vals) + f" | {'–' if m is None else f'{m:.3f}'} |")
    mean_mr = f"{statistics.fmean(mr_col):.3f}" if len(mr_col) == len(cats) else "–"
    lines.append("| mean of the categories | " + " / ".join(f"{statistics.fmean(col):.3f}" for col in cols)
                 + f" | {mean_mr} |")
    return lines


def predictability_lines(folders: list[str]) -> list[str]:
    """The section on how predictable each step's gain is, from each folder's ``switch_predictability.json``
    (``benchmarks/switch_predictability.py``; measured on held-out training images, not the validation split):
    what the routing-value claim rests on. Empty where no folder has one."""
    lines: list[str] = []
    for folder in folders:
        path = os.path.join(folder, "switch_predictability.json")
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            d = json.load(fh)
        where = os.path.basename(os.path.normpath(folder))
        if not lines:
            lines = ["", "## How predictable each step's gain is (`benchmarks/switch_predictability.py`)", "",
                     "Fitted on the training images but the last few, judged on those images' objects (not the "
                     "validation split); mean of the fit inits. *R²*: of the predicted IoU gain at each step; "
                     "*captured*: at each budget (GMAC per RoI on those objects).", "",
                     "| folder | RoIs of the fit | R² per step | captured |", "|---|---|---|---|"]
        for name, src in d.get("sources", {}).items():
            inits = src["inits"]
            r2 = [statistics.fmean(col) for col in zip(*(i["step_r2"] for i in inits))]
            cap = {b: statistics.fmean(i["captured"][b] for i in inits) for b in inits[0]["captured"]}
            heads = src.get("heads", 1)  # measured before the MSM's heads: one
            lines.append(f"| {where} | {name} ({src['rois']}; MSM of {heads} head{'s' if heads != 1 else ''}) | "
                         + " / ".join(f"{v:.2f}" for v in r2) + " | "
                         + ", ".join(f"{b}: {v:.2f}" for b, v in cap.items()) + " |")
            ens = src.get("ensemble")
            if ens is not None:
                lines.append(f"| {where} | {name}: the mean of the {len(inits)} inits' predictions | "
                             + " / ".join(f"{v:.2f}" for v in ens["step_r2"]) + " | "
                             + ", ".join(f"{b}: {v:.2f}" for b, v in ens["captured"].items()) + " |")
        for row in d.get("needed", []):
            lines.append(f"| {where} | a predictor with these R² (simulated) | "
                         + " / ".join(f"{v:.2f}" for v in row["step_r2"]) + " | "
                         + ", ".join(f"{b}: {v:.2f}" for b, v in row["captured"].items()) + " |")
    return lines


def write(out: str, folders: list[str]) -> list[tuple[str, bool | None, str]]:
    studies = [load(f) for f in folders]
    per_seed = {int(st["config"]["seed"]): seed_claims(st["rows"]) for st in studies}
    if len(per_seed) != len(studies):
        raise SystemExit("two study folders have the same seed: give one folder per seed")
    claims = judge(per_seed)
    rows = summary_rows(studies)
    data = {"seeds": sorted(per_seed), "folders": folders, "claims": [
        {"claim": c, "holds": h, "figures": t} for c, h, t in claims], "summary": rows,
        "rows": [r for st in studies for r in st["rows"]], "per_seed": {str(k): v for k, v in per_seed.items()},
        "config": {str(st["config"]["seed"]): st["config"] for st in studies}}
    write_text_atomic(out + ".json", json.dumps(data, indent=1))

    def f(v: Any) -> str:
        return "–" if v is None else f"{100 * v['mean']:.1f} ± {100 * v['spread'] / 2:.1f}"

    lines = [f"# Accuracy study over seeds {', '.join(map(str, sorted(per_seed)))}", "",
             "Mean over the seeds ± half the spread (max − min), segm/box/Boundary AP; GMAC per instance. "
             "Default-switch rows are the fit `dynamask train` ends with.", "",
             "| row | default switch | segm AP | box AP | Boundary AP | GMAC / inst. |", "|---|---|---|---|---|---|"]
    for r in rows:
        g = r.get("mask_gmacs_per_instance")
        cost = "–" if g is None else f"{g['mean']:.4f}"
        lines.append(f"| {r['name']} | {'yes' if r['default_switch'] else ''} | {f(r.get('segm_ap'))} | "
                     f"{f(r.get('bbox_ap'))} | {f(r.get('boundary_ap'))} | {cost} |")
    lines += gt_box_table(studies)
    lines += ["", "## The claims, on the default switch", ""]
    for c, h, t in claims:
        verdict = "not measured" if h is None else ("holds" if h else "does not hold")
        lines.append(f"- **{c}:** {verdict}: {t}.")
    lines += predictability_lines(folders)
    write_text_atomic(out + ".md", "\n".join(lines) + "\n")
    return claims


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.seeds", description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="finished study folders, one per seed")
    p.add_argument("--out", required=True, help="path without extension: writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    missing = [f for f in args.folders if not os.path.isfile(os.path.join(f, "accuracy_cpu.json"))]
    if missing:
        p.error(f"no accuracy_cpu.json in {', '.join(missing)} (run the study there first)")
    for c, h, _ in write(args.out, args.folders):
        print(f"{'not measured' if h is None else ('holds' if h else 'does not hold'):>13}  {c}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
