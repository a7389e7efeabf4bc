"""The accuracy study's rows: each evaluates one model of the study (the base model's fixed resolutions, size
rule, oracle and frozen-model switches; the library's switch fits; a dynamic-phase row; Mask R-CNN) on the
validation split and writes one JSON file per row (``OUT/rows/NAME.json``)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from .config import CoupledVariant, FitPlan, StudyConfig, SwitchVariant
from .evaluate import evaluate_fixed_model, evaluate_policies, maskrcnn_gt_box_iou
from .phases import build_dynamask, build_maskrcnn, load_state, log, new_switch, save_state, train_phase


class StudyRows:
    """The row methods of :class:`benchmarks.accuracy.study.Study`, which supplies the folder's bookkeeping
    they use (``ckpt``, ``row_path``, ``have_rows``, ``timing``, ``save_rows``), the trained phases
    (``model_from``, ``switches``) and the attributes below. Each method skips a row already written."""

    cfg: StudyConfig
    out: str
    progress: bool
    train: Any  # the training and validation splits (dynamask.data.CocoDetection)
    val: Any
    meta: dict[str, Any]

    def base_rows(self) -> None:
        from dynamask.engine.routing_probe import gt_box_routing
        from dynamask.models.flops import mask_head_gmacs, msm_gmacs, switch_input_macs

        cfg = self.cfg
        model = self.model_from("base")
        res = list(model.roi_heads.mask_head.resolutions)
        names = [f"fixed-{s}" for s in res] + ["size-rule", "oracle"] + [v.name for v in cfg.switches]
        if self.have_rows(names):
            return
        policies = [f"fixed-{s}" for s in res] + ["size-rule", "oracle"]
        # a rerun after variants were added evaluates only the missing switch rows
        redo = not self.have_rows(policies)
        names = [n for n in names if redo or not self.have_rows([n])]
        state = self.switches()
        head = model.roi_heads.mask_head
        switches = {}
        for v in cfg.switches:
            if v.name not in names:
                continue
            m = new_switch(model, v.reads, v.estimator)
            m.load_state_dict(state[v.name])
            m.eval()
            switches[v.name] = ((m, v.reads), msm_gmacs(m) + switch_input_macs(v.reads, head) / 1e9)
        costs = mask_head_gmacs(model)
        t0 = time.time()
        log("base model: every policy on the validation detections")
        metrics = evaluate_policies(model, self.val, costs=costs, switches=switches, fixed=redo, size_rule=redo,
                                    oracle=redo, progress=self.progress)
        log("base model: ground-truth boxes")
        probe = gt_box_routing(model, self.val, switches={n: s for n, (s, _) in switches.items()},
                               progress=self.progress)
        from dynamask.engine.routing_value import oracle_choice, per_category
        from dynamask.models.routing_policy import size_policy  # noqa: F401  (GT-box size rule below)

        gt_choices = dict(probe["choices"])
        k = len(res)
        for j, s in enumerate(res):
            gt_choices[f"fixed-{s}"] = np.full(len(probe["categories"]), j)
        gt_choices["oracle"] = oracle_choice(probe["iou"])
        gt_choices["size-rule"] = self._gt_size_choice(k)
        cats = per_category(probe["iou"], probe["categories"], kinds=probe["kinds"])
        self.meta["iou_gain"] = {n: c["iou_gain"] for n, c in cats.items()}
        self.meta["mean_iou"] = {n: c["mean_iou"] for n, c in cats.items()}
        self.meta["categories"] = probe["kinds"]
        self.meta["resolutions"] = res
        self.meta["costs"] = {str(r): g for r, g in costs.items()}
        self.timing("base_eval" if redo else f"base_eval+{len(names)}", {"seconds": time.time() - t0})
        rows = []
        for name in names:
            variant = next((v for v in cfg.switches if v.name == name), None)
            policy = ("fixed" if name.startswith("fixed") else "size" if name == "size-rule"
                      else "oracle" if name == "oracle" else "msm")
            rows.append(self._row(name, policy, metrics[name], probe, gt_choices[name],
                                  resolution=int(name.split("-")[1]) if policy == "fixed" else None,
                                  variant=variant, trained="frozen base" if variant else "base"))
        self.save_rows(rows)

    def fit_rows(self, plan: FitPlan | None) -> None:
        """Switches fitted by the library to a frozen model of the study (:class:`FitPlan`): the collected
        training RoIs are cached in ``ckpt/switch_data[-ON].pt``, each init's fitted (unpriced) switch in
        ``ckpt/fit[-ON].pth``; each row's price is set on the detections of ``plan.calibration_images``
        training images (:func:`dynamask.engine.switch_fit.calibrate_on_detections`, as ``dynamask
        fit-switch`` and ``dynamask train`` do). A plan on a dynamic-phase row's model waits for that row."""
        from dynamask.engine import switch_fit
        from dynamask.engine.routing_probe import gt_box_routing
        from dynamask.models.flops import mask_head_gmacs, msm_gmacs

        if plan is None or not os.path.exists(self.ckpt(plan.on)):
            return
        model = self.model_from(plan.on)
        heads = model.roi_heads
        res = list(heads.mask_head.resolutions)
        own = [n for n in plan.own_rows(res) if not self.have_rows([n])]
        if self.have_rows(plan.names()) and not own:
            return
        costs = list(mask_head_gmacs(heads.mask_head).values())
        path = self.ckpt(plan.cache("fit"))
        state: dict[str, Any] = load_state(path) if os.path.exists(path) else {}
        nh = heads.msm.num_heads
        if any(plan.state_key(i, nh) not in state for i in plan.inits):
            data = self._switch_data(model, plan)
            for init in plan.inits:
                if plan.state_key(init, nh) in state:
                    continue
                rep = switch_fit.fit_switch(heads.msm, data, costs=costs, target_gmacs=None, epochs=plan.epochs,
                                            seed=init, average_epochs=plan.average_epochs, progress=self.progress)
                self.timing(f"{plan.cache('fit')}_{plan.state_key(init, nh)}",
                            {"seconds": rep.seconds, "losses": rep.losses})
                state[plan.state_key(init, nh)] = {k: v.clone() for k, v in heads.msm.state_dict().items()}
                save_state(path, state)
        names = [n for n in plan.names() if not self.have_rows([n])]
        switches, penalties = {}, {}
        cost_t = torch.tensor(costs)
        for init in plan.inits:
            todo = [n for n in names if n.endswith(f"-init{init}")]
            if not todo:
                continue
            heads.msm.load_state_dict(state[plan.state_key(init, nh)])
            t0 = time.time()
            batches = switch_fit.sample_batches(self.train, batch_size=self.cfg.batch,
                                                num_batches=-(-plan.calibration_images // self.cfg.batch),
                                                seed=self.cfg.seed + 4)
            dets = switch_fit.detection_scores(model, (images for images, _ in batches), progress=False)
            self.timing(f"{plan.cache('fit')}_price_init{init}",
                        {"seconds": time.time() - t0, "detections": int(dets.raw.shape[0])})
            for name in todo:
                m = new_switch(model, "roi")
                m.load_state_dict(state[plan.state_key(init, nh)])
                m.set_confidence_weighted(plan.confidence_weighted)
                switch_fit.price(m, dets.raw, cost_t, float(name.split("-ct")[1].split("-")[0]), dets.confidence)
                m.eval()
                penalties[name] = [float(x) for x in m.cost_penalty]
                switches[name] = ((m, "roi"), msm_gmacs(m))
        t0 = time.time()
        log(f"fitted switches: {len(names)} rows on the validation detections"
            + (f", and {plan.on}'s own fixed resolutions, size rule and oracle" if own else ""))
        metrics = evaluate_policies(model, self.val, costs=mask_head_gmacs(model), switches=switches,
                                    fixed=bool(own), size_rule=bool(own), oracle=bool(own), progress=self.progress)
        probe = gt_box_routing(model, self.val, switches={n: s for n, (s, _) in switches.items()},
                               progress=self.progress)
        self.timing(f"{plan.cache('fit')}_eval+{len(names)}", {"seconds": time.time() - t0})
        rows = []
        for name in names:
            c = float(name.split("-ct")[1].split("-")[0])
            v = SwitchVariant(name, signal="iou", reads="roi", target_gmacs=c, estimator="fit")
            row = self._row(name, "msm", metrics[name], probe, probe["choices"][name], variant=v,
                            trained="frozen base" if plan.on == "base" else f"frozen {plan.on}")
            # the fit on the default dynamic-phase row's model is what `dynamask train` ends with by default
            row["default_switch"] = plan.is_default()
            row["fit"] = {"on": plan.on, "batches": plan.batches, "epochs": plan.epochs,
                          "averaged_epochs": plan.averaged(), "heads": nh,
                          "init": int(name.rsplit("init", 1)[1]),
                          "calibrated_on": "detections", "calibration_images": plan.calibration_images,
                          "confidence_weighted": plan.confidence_weighted,
                          "cost_penalty": penalties[name]}
            rows.append(row)
        rows += self._own_rows(own, metrics, probe, plan.on)
        self.save_rows(rows)

    def _own_rows(self, names: list[str], metrics: dict[str, Any], probe: dict[str, Any],
                  on: str) -> list[dict[str, Any]]:
        """The rows ``train-fixed-S``, ``train-size-rule`` and ``train-oracle`` of the model ``on`` (its
        policies in ``metrics`` as ``evaluate_policies`` names them). Their policies are ``own-fixed``,
        ``own-size`` and ``own-oracle``: the study's ``fixed``/``size``/``oracle`` rows stay the base model's."""
        from dynamask.engine.routing_value import oracle_choice

        k = len(probe["resolutions"])
        rows = []
        for name in names:
            policy = name.removeprefix("train-")  # fixed-S, size-rule, oracle: evaluate_policies' names
            if policy.startswith("fixed-"):
                s = int(policy.split("-")[1])
                choice = np.full(len(probe["categories"]), list(probe["resolutions"]).index(s))
                rows.append(self._row(name, "own-fixed", metrics[policy], probe, choice, resolution=s,
                                      trained=f"frozen {on}"))
            elif policy == "size-rule":
                rows.append(self._row(name, "own-size", metrics[policy], probe, self._gt_size_choice(k),
                                      trained=f"frozen {on}"))
            else:
                rows.append(self._row(name, "own-oracle", metrics[policy], probe, oracle_choice(probe["iou"]),
                                      trained=f"frozen {on}"))
        return rows

    def _switch_data(self, model, plan: FitPlan):
        """The switch fit's training RoIs (collected once, cached)."""
        from dynamask.engine import switch_fit

        data_path = self.ckpt(plan.cache("switch_data"))
        if os.path.exists(data_path):
            d = load_state(data_path)
            return switch_fit.SwitchData(d["inputs"], d["iou"])
        t0 = time.time()
        log(f"switch fit: collecting {plan.batches} training batches on the frozen {plan.on} model")
        batches = switch_fit.sample_batches(self.train, batch_size=self.cfg.batch, num_batches=plan.batches,
                                            seed=self.cfg.seed + 3)
        data = switch_fit.collect(model, batches, total=plan.batches, progress=self.progress)
        save_state(data_path, {"inputs": data.inputs, "iou": data.iou})
        self.timing(f"{plan.cache('fit')}_collect", {"seconds": time.time() - t0, "rois": data.inputs.shape[0]})
        return data

    def _gt_size_choice(self, k: int) -> np.ndarray:
        """Eq. 8 on every ground-truth box of the validation split (input frame), in probe order."""
        from dynamask.models.routing_policy import size_policy

        model_size = self.cfg.arch["min_size"]
        out = []
        for i in range(len(self.val)):
            _, target = self.val[i]
            info = self.val.coco.imgs[int(target["image_id"])]
            scale = model_size / min(int(info["height"]), int(info["width"]))
            out.append(size_policy(target["boxes"] * scale, k).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _row(self, name: str, policy: str, m: dict[str, Any], probe: dict[str, Any] | None,
             gt_choice: np.ndarray | None, *, resolution: int | None = None, variant=None,
             trained: str = "") -> dict[str, Any]:
        from dynamask.engine.routing_value import category_routing, routing_value, shares

        k = len(probe["resolutions"]) if probe is not None else 4
        row: dict[str, Any] = {
            "name": name, "policy": policy, "resolution": resolution,
            "routing_loss": None, "target_gmacs": None,
            "seed": self.cfg.seed, "bbox_ap": m["bbox"]["AP"] if "bbox" in m else None,
            "segm_ap": m["segm"]["AP"], "segm_ap50": m["segm"]["AP50"], "segm_ap75": m["segm"]["AP75"],
            "boundary_ap": m["boundary"]["AP"], "mask_gmacs_per_instance": m["mask_gmacs_per_instance"],
            "resolution_share": None, "routing_captured": None, "trained": trained, "detections": m["detections"],
        }
        if probe is not None and gt_choice is not None:
            names = list(probe["kinds"])
            row["resolution_share"] = shares(gt_choice, probe["categories"], k, names)
            row["mean_index"] = {n: (float(np.mean(gt_choice[np.asarray(probe["categories"]) == n]))
                                     if n in probe["categories"] else None) for n in names}
        if variant is not None:
            frozen = trained.startswith("frozen")  # a switch trained or fitted on a frozen model
            coupled = getattr(variant, "coupled", False) if not frozen else False
            mode = "frozen" if frozen else ("coupled" if coupled else "decoupled")
            row["routing_loss"] = f"{variant.signal}-{mode}"
            row["target_gmacs"] = variant.target_gmacs
            row["switch_input"] = variant.reads
            row["gumbel_tau"] = variant.tau
            row["budget_weight"] = variant.budget_weight
            value = routing_value(probe["iou"], gt_choice)
            row["routing_value"] = value.as_dict()
            row["routing_captured"] = value.captured
            row["estimator"] = getattr(variant, "estimator", "gumbel")
            # what a router that knows only the category captures with the same counts (a yardstick)
            counts = np.bincount(gt_choice, minlength=k)
            cat = category_routing(probe["iou"], probe["categories"], counts)
            row["routing_category_captured"] = routing_value(probe["iou"], cat).captured
        return row

    def coupled_row(self, v: CoupledVariant) -> None:
        from dynamask.engine.routing_probe import gt_box_routing
        from dynamask.models.flops import mask_head_gmacs, msm_gmacs

        if self.have_rows([v.name]):
            return
        routing = {"routing_signal": v.signal, "coupled": v.coupled, "switch_input": v.reads,
                   "gumbel_tau": v.tau, "budget_weight": v.budget_weight, "target_gmacs": v.target_gmacs}
        path = self.ckpt(v.name)
        if not os.path.exists(path):
            model = build_dynamask(self.cfg, **routing)
            pre = load_state(self.ckpt("pretrain"))["model"]
            if v.reads != "roi":  # a switch of another input width starts fresh
                pre = {k: t for k, t in pre.items() if not k.startswith("roi_heads.msm.")}
            model.load_state_dict(pre, strict=v.reads == "roi")
            model.mask_training = "dynamic"
            info = train_phase(model, self.train, self.cfg, iters=self.cfg.phase_iters, seed=self.cfg.seed + 1,
                               lr=self.cfg.lr / 10, warmup=0, drop_at=None, desc=v.name, msm_lr=self.cfg.lr)
            save_state(path, {"model": model.state_dict()})
            self.timing(v.name, info)
        model = self.model_from(v.name, **routing)
        t0 = time.time()
        sw = {v.name: ((model.roi_heads.msm, v.reads), msm_gmacs(model))}
        metrics = evaluate_policies(model, self.val, costs=mask_head_gmacs(model), switches=sw, fixed=False,
                                    size_rule=False, oracle=False, progress=self.progress)
        probe = gt_box_routing(model, self.val, switches={v.name: sw[v.name][0]}, progress=self.progress)
        self.timing(f"{v.name}_eval", {"seconds": time.time() - t0})
        row = self._row(v.name, "msm", metrics[v.name], probe, probe["choices"][v.name], variant=v,
                        trained="coupled" if v.coupled else "decoupled")
        self.save_rows([row])

    def maskrcnn_row(self) -> None:
        from dynamask.models.flops import maskrcnn_mask_head_gmacs

        if self.have_rows(["maskrcnn-28"]):
            return
        cfg = self.cfg
        path = self.ckpt("maskrcnn")
        torch.manual_seed(cfg.seed)
        model = build_maskrcnn(cfg)
        if not os.path.exists(path):
            pre = self.ckpt("maskrcnn-pretrain")
            if os.path.exists(pre):
                model.load_state_dict(load_state(pre)["model"])
            else:
                info = train_phase(model, self.train, cfg, iters=cfg.pretrain_iters, seed=cfg.seed, lr=cfg.lr,
                                   warmup=cfg.warmup, drop_at=None, desc="Mask R-CNN (pretrain schedule)")
                save_state(pre, {"model": model.state_dict()})
                self.timing("maskrcnn-pretrain", info)
            info = train_phase(model, self.train, cfg, iters=cfg.phase_iters, seed=cfg.seed + 1, lr=cfg.lr / 10,
                               warmup=0, drop_at=None, desc="Mask R-CNN (phase schedule)")
            save_state(path, {"model": model.state_dict()})
            self.timing("maskrcnn", info)
        model.load_state_dict(load_state(path)["model"])
        gmacs = maskrcnn_mask_head_gmacs(model)
        m = evaluate_fixed_model(model, self.val, gmacs_per_instance=gmacs, progress=self.progress)
        row = self._row("maskrcnn-28", "maskrcnn", m, None, None, resolution=28, trained="maskrcnn")
        # its 28² masks on the ground-truth boxes, scored on the grid DynaMask's resolutions are scored on
        probe = maskrcnn_gt_box_iou(model, self.val, top=cfg.arch["mask_roi_size"] * 8, progress=self.progress)
        cats = np.asarray(probe["categories"])
        row["gt_box_iou"] = float(probe["iou"].mean()) if len(cats) else None
        row["gt_box_iou_per_category"] = {str(c): float(probe["iou"][cats == c].mean()) for c in sorted(set(cats))}
        self.save_rows([row])
