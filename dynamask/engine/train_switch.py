"""The switch fit that ends a DynaMask training run (``dynamask train --switch fit``, the default;
``--switch paper`` keeps the dynamic phase's switch, as the paper's model has).

The dynamic phase trains the Mask Switch through a Gumbel sample of the per-resolution losses (the paper's
Eq. 3). On the accuracy study (``benchmarks/results/accuracy_cpu.md``, seed 0) the default dynamic-phase model's
switch (row ``coupled-paper-roi-ct0.08``) captured 0.276 of the routing gain at 0.0653 GMAC per instance; the
regression fit of :mod:`dynamask.engine.switch_fit` on that model (rows ``train-fit-ct0.08-init*``, three
inits) captured 0.645-0.649 at 0.079-0.083 GMAC, the budget C_t 0.08 that the Gumbel switch undershot. So a run
ends with that fit, to the model's own budget C_t, and the checkpoint keeps the dynamic phase's switch beside
it (``states["dynamic_phase_switch"]``): a run resumed for more epochs trains on from that switch, as one that
never stopped, and is fitted again at its end. Under DDP every process collects its share of the batches and
fits the same switch on all of them (:func:`~dynamask.engine.switch_fit.fit_model_switch`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from dynamask.engine import distributed as dist_utils
from dynamask.engine import switch_fit
from dynamask.models.detector import DynaMaskRCNN
from dynamask.models.roi_heads import DynaMaskRoIHeads

# the fit's report in the checkpoint's ``extra``; the dynamic phase's switch among its ``states``
FIT_KEY = "switch_fit"
DYNAMIC_SWITCH_KEY = "dynamic_phase_switch"


def can_fit(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a mask switch to fit (a DynaMask detector)."""
    return isinstance(getattr(model, "roi_heads", None), DynaMaskRoIHeads)


def fit_at_end(model: torch.nn.Module, dataset: Any, *, batches: int, batch_size: int, epochs: int, seed: int,
               calibration_images: int,
               progress: bool) -> tuple[switch_fit.FitReport, dict[str, Any], dict[str, Tensor]]:
    """Fits ``model``'s switch (in place; every process of a DDP run calls this) to its own budget on
    ``batches`` batches of ``dataset`` (training images, their transforms applied). Returns the fit's report,
    what the checkpoint's ``extra`` records of it (plain values) and the switch's state dict from before (the
    dynamic phase's switch, on the CPU)."""
    heads = cast(DynaMaskRoIHeads, model.roi_heads)
    before = {k: v.detach().cpu().clone() for k, v in heads.msm.state_dict().items()}
    report = switch_fit.fit_model_switch(cast(DynaMaskRCNN, model), dataset, target_gmacs=heads.target_gmacs,
                                         num_batches=batches, batch_size=batch_size, epochs=epochs, seed=seed,
                                         calibration_images=calibration_images, progress=progress)
    fit = {**report.as_dict(), "batches": batches, "batch_size": batch_size, "seed": seed,
           "world_size": dist_utils.world_size()}
    return report, fit, before


def dynamic_phase_switch(ckpt: dict[str, Any]) -> dict[str, Tensor] | None:
    """The state dict of the switch the dynamic phase trained, kept in a fitted run's checkpoint (None in
    any other checkpoint: there the model's own switch is that one)."""
    return ckpt.get("states", {}).get(DYNAMIC_SWITCH_KEY)


def use_dynamic_phase_switch(model: torch.nn.Module, ckpt: dict[str, Any]) -> bool:
    """Puts the dynamic phase's switch of ``ckpt`` into ``model`` (built from it); False when the checkpoint
    was not fitted (the model's switch already is that one)."""
    state = dynamic_phase_switch(ckpt)
    if state is None:
        return False
    msm = cast(DynaMaskRoIHeads, model.roi_heads).msm
    msm.load_state_dict({k: v.to(msm.cost_penalty.device) for k, v in state.items()})
    return True


def resolutions(model: torch.nn.Module) -> list[int]:
    """The mask head's resolutions (for :meth:`~dynamask.engine.switch_fit.FitReport.summary`)."""
    return list(cast(DynaMaskRoIHeads, model.roi_heads).mask_head.resolutions)
