"""Evaluation during training (``dynamask train --eval-every N``), ``best.pth``, and the evaluation when
training ends.

After every N-th epoch the model is evaluated as it stands (its own mask switch at that point: the switch
fit, if any, comes only when training ends) on the validation split, every process on its share of the
images under DDP. Boundary AP is left out of these evaluations (it is the slowest part of an evaluation on
COCO and not what the best checkpoint is chosen by); the final evaluation has it. Rank 0 logs the metrics to
``log.txt``, adds a row to ``metrics.csv`` (and TensorBoard when installed) and keeps ``best.pth``: the
weights (no optimiser state, as ``dynamask strip`` writes) of the evaluation with the highest segm AP,
written atomically. A resumed run reads the best AP so far from the ``best.pth`` it finds.

When training ends the model is evaluated once more, with boundary AP, into ``OUT/eval/``; a run whose switch
was fitted is evaluated with the dynamic phase's switch too (``OUT/eval/dynamic_phase_switch/``), and both
switches' routing is probed on the validation split's ground-truth boxes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from dynamask.engine import distributed as dist_utils
from dynamask.engine.checkpoint import load_checkpoint, save_checkpoint, unwrap
from dynamask.engine.metrics_log import CsvLog
from dynamask.engine.run_log import LOGGER

if TYPE_CHECKING:
    from dynamask.engine.switch_life import SwitchLifecycle
    from dynamask.engine.train_build import RunRecord

BEST_FILE = "best.pth"
BEST_KEY = "best"  # what best.pth's ``extra`` records of its evaluation: epoch, iteration, segm_AP
log = logging.getLogger(LOGGER)


def open_val(cfg: Any, *, say: bool) -> Any:
    """The validation split, or None when there is none or it is an LVIS file that cannot be scored here
    (the lvis package missing; ``say``: a note is logged then)."""
    from dynamask.data.lvis import LvisDetection, open_dataset
    from dynamask.engine.lvis_eval import lvis_available

    if cfg.val_images is None or cfg.val_ann is None:  # check_val_data refuses one without the other
        return None
    val = open_dataset(cfg.val_images, cfg.val_ann)
    if isinstance(val, LvisDetection) and not lvis_available():
        if say:
            log.info(f"note: {cfg.val_ann} is an LVIS file, which is scored by the lvis package (pip install "
                     f"lvis); not evaluated. Once it is installed: dynamask eval {cfg.out_dir}/last.pth --lvis ...")
        return None
    return val


def due(cfg: Any, epochs_done: int) -> bool:
    """Whether an evaluation is due after ``epochs_done`` epochs."""
    return bool(cfg.eval_every) and epochs_done > 0 and epochs_done % cfg.eval_every == 0


class BestCheckpoint:
    """Keeps ``OUT/best.pth``: the weights of the evaluation with the highest segm AP so far."""

    def __init__(self, out_dir: str) -> None:
        self.path = os.path.join(out_dir, BEST_FILE)
        self.ap: float | None = None
        if dist_utils.is_main() and os.path.isfile(self.path):  # a resumed run: beat the best of before
            record = load_checkpoint(self.path).get("extra", {}).get(BEST_KEY, {})
            self.ap = record.get("segm_AP")

    def offer(self, metrics: dict[str, Any], *, epoch: int, iteration: int,
              write: Callable[[str, dict[str, Any]], Any]) -> bool:
        """When ``metrics``' segm AP beats the best so far, ``write(path, record)`` writes the model's weights
        to best.pth with ``record`` (epoch, iteration, segm_AP) in its ``extra``; returns whether it did."""
        ap = metrics.get("segm", {}).get("AP")
        if ap is None or (self.ap is not None and ap <= self.ap):
            return False
        write(self.path, {"epoch": int(epoch), "iteration": int(iteration), "segm_AP": float(ap)})
        self.ap = float(ap)
        return True


def evaluate_during_training(model: torch.nn.Module, val: Any, cfg: Any, device: torch.device) -> dict[str, Any] | None:
    """Every process evaluates its share of ``val`` with ``model`` as it is; rank 0 gets the metrics (None
    elsewhere). The caller puts the model back into training mode (each epoch starts with that)."""
    from dynamask.engine.evaluate import evaluate

    dist_utils.broadcast_buffers(unwrap(model))  # every shard evaluated with rank 0's statistics
    return evaluate(unwrap(model), val, device=device, costs=cfg.mask_costs, out_dir=None, boundary=False,
                    progress=False)


def metric_row(metrics: dict[str, Any], *, epoch: int, iteration: int) -> dict[str, Any]:
    """The ``metrics.csv`` row (and TensorBoard scalars) of one evaluation during training."""
    row: dict[str, Any] = {"epoch": epoch, "iteration": iteration}
    for kind in ("bbox", "segm"):
        if kind in metrics:
            row[f"val_{kind}_AP"] = metrics[kind]["AP"]
    if metrics.get("mask_gmac_per_instance") is not None:
        row["val_mask_gmac_per_instance"] = metrics["mask_gmac_per_instance"]
    return row


def evaluate_after_epoch(model: torch.nn.Module, val: Any, cfg: Any, device: torch.device, *, epoch: int,
                         iteration: int, best: BestCheckpoint, record: RunRecord, csv_log: CsvLog | None,
                         tb: Any) -> None:
    """``--eval-every``: the model as it stands on the validation split; the metrics to log.txt, metrics.csv
    and TensorBoard (``tb``, or None), and best.pth when its segm AP is the best so far (rank 0)."""
    log.info(f"evaluating after epoch {epoch} (iteration {iteration}) on {cfg.val_ann}")
    metrics = evaluate_during_training(model, val, cfg, device)
    if metrics is None:  # another rank: rank 0 keeps the records
        return
    row = metric_row(metrics, epoch=epoch, iteration=iteration)
    if csv_log is not None:
        csv_log.write(row)
    if tb is not None:
        for k, v in row.items():
            if k.startswith("val_"):
                tb.add_scalar(f"val/{k[4:]}", v, iteration)

    def write(path: str, evaluation: dict[str, Any]) -> None:
        save_checkpoint(path, arch=record.arch, label_map=record.label_map, model=model, epoch=epoch,
                        iteration=iteration, extra={**record.extra, BEST_KEY: evaluation})

    from dynamask.engine.evaluate import format_metrics

    kept = best.offer(metrics, epoch=epoch, iteration=iteration, write=write)
    ap = metrics.get("segm", {}).get("AP")
    log.info(format_metrics(metrics))
    log.info(f"epoch {epoch}: segm AP {100 * ap:.1f}" + (f"; best so far: {best.path}" if kept else
                                                         f" (best so far {100 * (best.ap or 0):.1f})")
             if ap is not None else f"epoch {epoch}: no segm AP (the model predicts no masks)")


def evaluate_at_end(model: torch.nn.Module, cfg: Any, device: torch.device, *,
                    switch: SwitchLifecycle) -> dict[str, Any] | None:
    """Every process evaluates its share of the validation images; rank 0 gathers them and returns the
    metrics (None elsewhere, or when an LVIS file cannot be scored here). With a :attr:`~SwitchLifecycle.fitted`
    switch, ``metrics["switches"]`` compares it with the dynamic phase's (:func:`compare_switches`)."""
    from dynamask.engine.evaluate import evaluate

    is_main = dist_utils.is_main()
    val = open_val(cfg, say=is_main)
    if val is None:
        return None
    dist_utils.broadcast_buffers(model)  # every shard evaluated with the checkpoint's statistics
    metrics = evaluate(model, val, device=device, costs=cfg.mask_costs,
                       out_dir=os.path.join(cfg.out_dir, "eval"), progress=cfg.progress and is_main)
    if switch.fitted:
        # a fitted run: the dynamic phase's (the paper's) switch too, on the same model and images
        switches = compare_switches(model, val, cfg, device, fitted=metrics if is_main else None,
                                    dynamic_msm=switch.dynamic_phase_msm())
        if is_main and metrics is not None:
            metrics["switches"] = switches
    return metrics if is_main else None


def compare_switches(model: torch.nn.Module, val: Any, cfg: Any, device: torch.device, *,
                     fitted: dict[str, Any] | None, dynamic_msm: torch.nn.Module) -> dict[str, Any] | None:
    """Rows of both switches of a fitted run: segm AP, GMAC per instance and the routing value on the
    validation split's ground-truth boxes (:mod:`dynamask.engine.routing_probe`). Every process evaluates
    its shard of the images with ``dynamic_msm`` (the dynamic phase's switch) swapped in; rank 0 probes the
    routing. ``fitted``: rank 0's metrics of the fitted switch."""
    from dynamask.engine.evaluate import evaluate
    from dynamask.engine.routing_probe import gt_box_routing
    from dynamask.engine.routing_value import routing_value

    is_main = dist_utils.is_main()
    detector = cast(Any, model)  # a DynaMask detector: it has a switch
    heads = detector.roi_heads
    fitted_msm, heads.msm = heads.msm, dynamic_msm
    try:
        dynamic = evaluate(detector, val, device=device, costs=cfg.mask_costs,
                           out_dir=os.path.join(cfg.out_dir, "eval", "dynamic_phase_switch"),
                           progress=cfg.progress and is_main)
    finally:
        heads.msm = fitted_msm
    if not is_main or fitted is None or dynamic is None:
        return None
    probe = gt_box_routing(detector, val, switches={"fitted": (fitted_msm, heads.switch_input),
                                                 "dynamic_phase": (dynamic_msm, heads.switch_input)},
                           progress=cfg.progress, device=device)
    rows = {}
    for name, m in (("fitted", fitted), ("dynamic_phase", dynamic)):
        value = routing_value(probe["iou"], probe["choices"][name]) if len(probe["iou"]) else None
        rows[name] = {"segm_AP": m["segm"]["AP"] if "segm" in m else None,
                      "mask_gmac_per_instance": m.get("mask_gmac_per_instance"),
                      "routing_captured": None if value is None else value.captured}
    return rows
