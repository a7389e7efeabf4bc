"""Evaluation during training (``dynamask train --eval-every N``) and ``best.pth``.

After every N-th epoch the model is evaluated as it stands (its own mask switch at that point: the switch
fit, if any, comes only when training ends) on the validation split, every process on its share of the
images under DDP. Boundary AP is left out of these evaluations (it is the slowest part of an evaluation on
COCO and not what the best checkpoint is chosen by); the final evaluation has it. Rank 0 logs the metrics to
``log.txt``, adds a row to ``metrics.csv`` (and TensorBoard when installed) and keeps ``best.pth``: the
weights (no optimiser state, as ``dynamask strip`` writes) of the evaluation with the highest segm AP,
written atomically. A resumed run reads the best AP so far from the ``best.pth`` it finds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from dynamask.engine import distributed as dist_utils
from dynamask.engine.checkpoint import load_checkpoint, unwrap
from dynamask.engine.run_log import LOGGER

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
