"""The accuracy study's training phases and what they need: the data sets, the models, the seeded batches,
one phase of training (:func:`train_phase`) and the switches trained on a frozen model
(:func:`train_switches`, :class:`CostAwareSwitch`); and the study folder's file helpers."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from .config import StudyConfig


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_state(path: str, state: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def datasets(cfg: StudyConfig, out: str):
    from dynamask.data import CocoDetection, Compose, RandomHorizontalFlip
    from dynamask.data.shapes import generate, split_paths

    root = os.path.join(out, "data")
    if not os.path.exists(split_paths(root, "val")[1]):
        log(f"generating {cfg.n_train} + {cfg.n_val} images of {cfg.size} px")
        generate(root, train=cfg.n_train, val=cfg.n_val, size=cfg.size, seed=cfg.seed, max_objects=cfg.max_objects,
                 radius_range=cfg.radius_range)
    train = CocoDetection(*split_paths(root, "train"), Compose([RandomHorizontalFlip(0.5)]))
    val = CocoDetection(*split_paths(root, "val"))
    return train, val


def build_dynamask(cfg: StudyConfig, **routing: Any):
    from dynamask.models import dynamask_resnet_fpn

    return dynamask_resnet_fpn(**cfg.arch, **routing)


def build_maskrcnn(cfg: StudyConfig):
    from dynamask.models.maskrcnn import maskrcnn_resnet_fpn

    return maskrcnn_resnet_fpn(**cfg.maskrcnn)


def batches(dataset, batch: int, iters: int, seed: int):
    """``iters`` batches of a seeded shuffle (epochs as needed): :func:`dynamask.engine.switch_fit.sample_batches`."""
    from dynamask.engine.switch_fit import sample_batches

    return sample_batches(dataset, batch_size=batch, num_batches=iters, seed=seed)


def train_phase(model, dataset, cfg: StudyConfig, *, iters: int, seed: int, lr: float, warmup: int,
                drop_at: float | None, desc: str, msm_lr: float | None = None) -> dict[str, float]:
    """AdamW (weight decay 1e-4), linear warm-up, lr ÷10 after ``drop_at`` of the iterations; gradients
    clipped at norm 10. The switch (if any) trains at ``msm_lr``. Returns timing and the last losses."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model.train()
    msm = getattr(getattr(model, "roi_heads", None), "msm", None)
    msm_ids = {id(p) for p in msm.parameters()} if msm is not None and msm_lr is not None else set()
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in msm_ids]
    groups = [{"params": rest, "lr": lr}]
    if msm_ids:
        groups.append({"params": list(msm.parameters()), "lr": msm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    base = [g["lr"] for g in groups]
    params = [p for g in groups for p in g["params"]]
    t0 = time.time()
    last: dict[str, float] = {}
    bar = tqdm(total=iters, desc=desc, dynamic_ncols=True, mininterval=5.0)
    for it, (images, targets) in enumerate(batches(dataset, cfg.batch, iters, seed)):
        f = min(1.0, 0.001 + (1 - 0.001) * it / warmup) if warmup and it < warmup else 1.0
        if drop_at is not None and it >= drop_at * iters:
            f *= 0.1
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss at iteration {it}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        last = {k: float(v.detach()) for k, v in losses.items()}
        bar.update(1)
        if it % 25 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    secs = time.time() - t0
    return {"seconds": secs, "sec_per_iter": secs / max(iters, 1), **{f"last_{k}": v for k, v in last.items()}}


class CostAwareSwitch(torch.nn.Module):
    """An MSM that regresses each resolution's (centred) loss, ``[R, K]``; its forward returns
    ``-(predicted ℓ_k + μ·C_k)``, so that the argmax every caller takes is the Lagrangian choice
    argmin_k(ℓ̂_k + μ C_k). Costs exactly the MSM's MACs (the μ·C term is K additions)."""

    def __init__(self, msm: torch.nn.Module, costs: list[float]) -> None:
        super().__init__()
        self.msm = msm
        self.register_buffer("costs", torch.tensor(costs, dtype=torch.float32))
        self.register_buffer("mu", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(self.msm(x) + self.mu * self.costs)


def calibrate_mu(pred: torch.Tensor, costs: torch.Tensor, target: float) -> float:
    """μ for predicted losses ``pred`` ``[N, K]`` (choice argmin_k(pred_ik + μ C_k)): the library's
    :func:`dynamask.engine.switch_fit.calibrate_mu` on the scores ``-pred``."""
    from dynamask.engine.switch_fit import calibrate_mu as calibrate

    return calibrate(-pred, costs, target)


def new_switch(model, reads: str, estimator: str = "gumbel"):
    """A fresh MSM for ``model`` that reads ``reads`` (:mod:`dynamask.models.switch_input`); for the
    "regress" estimator wrapped in a :class:`CostAwareSwitch`."""
    from dynamask.models.flops import mask_head_gmacs
    from dynamask.models.msm import switch_for

    head = model.roi_heads.mask_head
    msm = switch_for(head, reads=reads)
    if estimator == "regress":
        return CostAwareSwitch(msm, list(mask_head_gmacs(head).values()))
    return msm


def train_switches(model, dataset, cfg: StudyConfig, variants, *, seed: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Trains one new switch per variant on the FROZEN model, all on the same batches. Each learns from
    its signal (detached per-resolution losses of the frozen head) under its budget and temperature."""
    import torch.nn.functional as F
    from tqdm import tqdm

    from dynamask.engine import switch_fit
    from dynamask.engine.routing_probe import mask_iou_top_grid
    from dynamask.models import mask_losses
    from dynamask.models.flops import mask_head_gmacs
    from dynamask.models.switch_input import switch_view

    torch.manual_seed(seed)
    model.eval()
    heads = model.roi_heads
    head = heads.mask_head
    costs = torch.tensor(list(mask_head_gmacs(head).values()), dtype=torch.float32)
    switches = {v.name: new_switch(model, v.reads, v.estimator) for v in variants}
    params = [p for m in switches.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    signals = sorted({v.signal for v in variants} - {"probe"})
    # the regression switches' predictions on the last training batches, for setting μ
    calib: dict[str, list[torch.Tensor]] = {v.name: [] for v in variants if v.estimator == "regress"}
    calib_from = cfg.switch_iters - max(1, cfg.switch_iters // 3)
    t0 = time.time()
    for m in switches.values():
        m.train()
    bar = tqdm(total=cfg.switch_iters, desc="switches (frozen model)", dynamic_ncols=True, mininterval=5.0)
    for it, (images, targets) in enumerate(batches(dataset, cfg.batch, cfg.switch_iters, seed)):
        with torch.no_grad():
            frozen = switch_fit.frozen_head_outputs(model, images, targets)
            if frozen is None:
                bar.update(1)
                continue
            roi_features, trunk, mask_logits, edge_logits, mask_t, edge_t = frozen
            sig = {s: mask_losses.routing_signal_losses(mask_logits, edge_logits, mask_t, edge_t, signal=s,
                                                        edge_weight=heads.edge_weight) for s in signals}
            if any(v.signal == "probe" for v in variants):
                sig["probe"] = 1.0 - mask_iou_top_grid([x.sigmoid() for x in mask_logits], mask_t[-1]).float()
        total = 0.0
        for v in variants:
            view = switch_view(v.reads, head, roi_features, trunk)
            if v.estimator == "regress":
                pred = switches[v.name].msm(view)
                centred = sig[v.signal] - sig[v.signal].mean(dim=1, keepdim=True)
                total = total + F.mse_loss(pred - pred.mean(dim=1, keepdim=True), centred)
                if it >= calib_from:
                    calib[v.name].append(pred.detach())
                continue
            logits = switches[v.name](view)
            probs = logits.softmax(dim=1)
            y = mask_losses.gumbel_hard(logits, v.tau) if v.estimator == "gumbel" else probs
            total = total + (y * sig[v.signal]).sum(dim=1).mean() + v.budget_weight * (
                mask_losses.entropy_loss(probs) + mask_losses.budget_loss(probs, costs, v.target_gmacs))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        bar.update(1)
    bar.close()
    for v in variants:
        if v.estimator == "regress":
            sw = switches[v.name]
            sw.mu.fill_(calibrate_mu(torch.cat(calib[v.name]) if calib[v.name] else torch.zeros(0, len(costs)),
                                     sw.costs, v.target_gmacs))
    secs = time.time() - t0
    state = {name: m.state_dict() for name, m in switches.items()}
    return state, {"seconds": secs, "sec_per_iter": secs / max(cfg.switch_iters, 1)}
