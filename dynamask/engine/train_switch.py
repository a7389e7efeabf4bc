"""The switch fit that ends a DynaMask training run (``dynamask train``; ``--no-switch-fit`` skips it).

The dynamic phase trains the Mask Switch through a Gumbel sample of the per-resolution losses (the paper's
Eq. 3); on the accuracy study that switch captured 0.28 of the routing gain, and the regression fit of
:mod:`dynamask.engine.switch_fit` on the same frozen model 0.62-0.72 at the same budget (three inits,
``benchmarks/results/accuracy_cpu.md``). So a run ends with that fit, to the model's own budget C_t, and
the checkpoint keeps the dynamic phase's switch beside it (``states["dynamic_phase_switch"]``): a run
resumed for more epochs trains on from that switch, as one that never stopped, and is fitted again at its
end. Under DDP every process collects its share of the batches and fits the same switch on all of them
(:func:`~dynamask.engine.switch_fit.fit_model_switch`).
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
               calibration_images: int, progress: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Fits ``model``'s switch (in place; every process of a DDP run calls this) to its own budget on
    ``batches`` batches of ``dataset`` (training images, their transforms applied). Returns the fit's report
    (plain values) and the switch's state dict from before (the dynamic phase's switch, on the CPU)."""
    heads = cast(DynaMaskRoIHeads, model.roi_heads)
    before = {k: v.detach().cpu().clone() for k, v in heads.msm.state_dict().items()}
    report = switch_fit.fit_model_switch(cast(DynaMaskRCNN, model), dataset, target_gmacs=heads.target_gmacs,
                                         num_batches=batches, batch_size=batch_size, epochs=epochs, seed=seed,
                                         calibration_images=calibration_images, progress=progress)
    fit = {**report.as_dict(), "batches": batches, "batch_size": batch_size, "seed": seed,
           "world_size": dist_utils.world_size()}
    return fit, before


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


def fit_summary(fit: dict[str, Any], model: torch.nn.Module) -> str:
    """One line on a finished fit of ``model``'s switch (``fit_at_end``'s report)."""
    resolutions = cast(DynaMaskRoIHeads, model.roi_heads).mask_head.resolutions
    shares = ", ".join(f"{s}²: {100 * f:.0f}%" for s, f in zip(resolutions, fit["shares"]))
    on = "training positives" if fit["calibrated_on"] == "positives" else "detections of training images"
    budget = "none" if fit["target_gmacs"] is None else f"{fit['target_gmacs']:.4g}"
    return (f"switch fit: {fit['rois']} training RoIs, {fit['epochs']} epochs (weights averaged over the last "
            f"{fit['averaged_epochs']}), {fit['seconds']:.0f} s; price {fit['mu']:.4g} per GMAC set on "
            f"{fit['calibration_rois']} {on}: {shares}; mean head cost {fit['mean_gmacs']:.4g} GMAC (budget "
            f"{budget})")
