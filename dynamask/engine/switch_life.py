"""The mask switch's life cycle in a training run: fitted when training ends, stored in the checkpoint,
restored on resume, the dynamic phase's switch put back, and the fit's report recorded.

``dynamask train --switch fit`` (the default) ends a DynaMask run with a fit of its switch; ``--switch paper``
keeps the dynamic phase's switch, as the paper's model has. The dynamic phase trains the Mask Switch through a
Gumbel sample of the per-resolution losses (the paper's Eq. 3). On the accuracy study
(``benchmarks/results/accuracy_cpu_paper_levels.md``, seed 0) the default dynamic-phase model's switch (row
``coupled-paper-roi-ct0.08``) captured 0.276 of the routing gain at 0.0653 GMAC per instance; the regression
fit of :mod:`dynamask.engine.switch_fit` on that model (rows ``train-fit-ct0.08-init*``, three inits) captured
0.645-0.649 at 0.079-0.083 GMAC, the budget C_t 0.08 that the Gumbel switch undershot. So a run ends with that
fit, to the model's own budget C_t, and the checkpoint keeps the dynamic phase's switch beside it
(``states["dynamic_phase_switch"]``): a run resumed for more epochs trains on from that switch, as one that
never stopped, and is fitted again at its end. Under DDP every process collects its share of the batches and
fits the same switch on all of them (:func:`~dynamask.engine.switch_fit.fit_model_switch`).

The checkpoint keys of the fit (:data:`FIT_KEY` in ``extra``, :data:`DYNAMIC_SWITCH_KEY` in ``states``) are
this module's alone: the trainer stores and restores them through :class:`SwitchLifecycle`, and the tools
read and write them through the functions below. The models are imported only where used, so that
:mod:`dynamask.engine.checkpoint` can ask :func:`is_fitted` without importing them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from dynamask.engine import distributed as dist_utils
from dynamask.engine.rng import rng_state, set_rng_state
from dynamask.engine.run_log import LOGGER

if TYPE_CHECKING:
    from dynamask.engine.switch_fit import FitReport
    from dynamask.models.detector import DynaMaskRCNN
    from dynamask.models.roi_heads import DynaMaskRoIHeads

# the fit's report in the checkpoint's ``extra``; the dynamic phase's switch among its ``states``
FIT_KEY = "switch_fit"
DYNAMIC_SWITCH_KEY = "dynamic_phase_switch"
log = logging.getLogger(LOGGER)


# ------------------------------------------------------------------------------ the checkpoint's keys
def is_fitted(ckpt: dict[str, Any]) -> bool:
    """Whether ``ckpt``'s model holds a fitted switch (by ``dynamask train`` or ``dynamask fit-switch``)."""
    extra = ckpt.get("extra")
    return isinstance(extra, dict) and FIT_KEY in extra


def fit_record(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The fit's report as ``ckpt`` records it (plain values), or None when it was not fitted."""
    return ckpt.get("extra", {}).get(FIT_KEY)


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
    msm = cast("DynaMaskRoIHeads", model.roi_heads).msm
    msm.load_state_dict({k: v.to(msm.cost_penalty.device) for k, v in state.items()})
    return True


def refitted(ckpt: dict[str, Any], *, record: dict[str, Any],
             before: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """``(extra, states)`` of ``ckpt`` once its switch is fitted again (``dynamask fit-switch``): ``record``
    as the fit's report, and as the dynamic phase's switch the one ``ckpt`` kept beside an earlier fit, or
    else ``before``, the switch this fit replaced (the model's own, which the dynamic phase trained)."""
    extra = dict(ckpt.get("extra", {}))
    states = dict(ckpt.get("states", {}))
    if DYNAMIC_SWITCH_KEY not in states and FIT_KEY not in extra:
        states[DYNAMIC_SWITCH_KEY] = before
    extra[FIT_KEY] = record
    return extra, states


# ---------------------------------------------------------------------------------------- the fit
def can_fit(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a mask switch to fit (a DynaMask detector)."""
    from dynamask.models.roi_heads import DynaMaskRoIHeads

    return isinstance(getattr(model, "roi_heads", None), DynaMaskRoIHeads)


def resolutions(model: torch.nn.Module) -> list[int]:
    """The mask head's resolutions (for :meth:`~dynamask.engine.switch_fit.FitReport.summary`)."""
    return list(cast("DynaMaskRoIHeads", model.roi_heads).mask_head.resolutions)


def fit_at_end(model: torch.nn.Module, dataset: Any, *, batches: int, batch_size: int, epochs: int, seed: int,
               calibration_images: int, progress: bool) -> tuple[FitReport, dict[str, Any], dict[str, Tensor]]:
    """Fits ``model``'s switch (in place; every process of a DDP run calls this) to its own budget on
    ``batches`` batches of ``dataset`` (training images, their transforms applied). Returns the fit's report,
    what the checkpoint's ``extra`` records of it (plain values) and the switch's state dict from before (the
    dynamic phase's switch, on the CPU)."""
    from dynamask.engine import switch_fit

    heads = cast("DynaMaskRoIHeads", model.roi_heads)
    before = {k: v.detach().cpu().clone() for k, v in heads.msm.state_dict().items()}
    report = switch_fit.fit_model_switch(cast("DynaMaskRCNN", model), dataset, target_gmacs=heads.target_gmacs,
                                         num_batches=batches, batch_size=batch_size, epochs=epochs, seed=seed,
                                         calibration_images=calibration_images, progress=progress)
    fit = {**report.as_dict(), "batches": batches, "batch_size": batch_size, "seed": seed,
           "world_size": dist_utils.world_size()}
    return report, fit, before


# ------------------------------------------------------------------------------------- one run's switch
class SwitchLifecycle:
    """The switch of one training run: what its checkpoints store of the fit, and the fit itself.

    ``model``: the run's model (not its DDP wrapper). ``ends_with``: "fit" or "paper" (``--switch``).
    ``phases``: the model trains in DynaMask's two phases; only such a run is fitted.
    """

    def __init__(self, *, model: torch.nn.Module, ends_with: str, phases: bool) -> None:
        self.model, self.ends_with = model, ends_with
        self.fits = phases and ends_with == "fit" and can_fit(model)  # the run ends with a fit
        self.record: dict[str, Any] | None = None  # the fit's report, once the switch is fitted
        self.dynamic_switch: dict[str, Tensor] | None = None  # then, the switch the dynamic phase trained
        self.unfitted = False  # a finished fitted run resumed with --switch paper: its fit undone, not yet saved

    @property
    def due(self) -> bool:
        """Whether the run, once trained, still has its fit to make."""
        return self.fits and self.record is None

    @property
    def fitted(self) -> bool:
        """Whether the model holds the fit, with the dynamic phase's switch kept beside it."""
        return self.record is not None and self.dynamic_switch is not None

    def restore(self, ckpt: dict[str, Any], *, finished: bool) -> None:
        """On resume, after the model's weights are loaded from ``ckpt``: a fitted checkpoint's model trains
        on (``finished`` False) from the dynamic phase's switch, to be fitted again at the end; a finished one
        keeps its fit, or with ``--switch paper`` gets the dynamic phase's switch back (:attr:`unfitted`:
        the caller saves that at once)."""
        record = fit_record(ckpt)
        if record is None:
            return
        if not finished:
            use_dynamic_phase_switch(self.model, ckpt)
        elif self.ends_with == "paper":
            self.unfitted = use_dynamic_phase_switch(self.model, ckpt)
        else:
            self.record, self.dynamic_switch = record, dynamic_phase_switch(ckpt)

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint's ``extra`` adds for the switch: the fit's report once fitted."""
        return {} if self.record is None else {FIT_KEY: self.record}

    def checkpoint_states(self) -> dict[str, dict[str, Tensor]] | None:
        """A checkpoint's ``states``: the dynamic phase's switch beside a fitted one (None before a fit)."""
        return None if self.dynamic_switch is None else {DYNAMIC_SWITCH_KEY: self.dynamic_switch}

    def fit(self, dataset: Any, *, batches: int, batch_size: int, epochs: int, seed: int, calibration_images: int,
            progress: bool, save: Callable[[], object]) -> dict[str, Any] | None:
        """The fit that ends the run (every process calls this), then ``save()`` (the checkpoint again, now
        with :meth:`checkpoint_extra` and :meth:`checkpoint_states`) and the fit's summary in the log. The
        random states are left as training left them, so a run resumed for more epochs continues from them.
        Returns the fit's report (None when the data gave it nothing to learn from: the dynamic phase's
        switch stays, with a warning)."""
        from dynamask.engine import switch_fit

        rng = rng_state()
        try:
            report, self.record, self.dynamic_switch = fit_at_end(
                self.model, dataset, batches=batches, batch_size=batch_size, epochs=epochs, seed=seed,
                calibration_images=calibration_images, progress=progress)
        except switch_fit.NoRoIsError as exc:  # raised by every process alike (decided on the gathered data)
            log.info(f"warning: {exc}; the checkpoint keeps the switch the dynamic phase trained")
            return None
        finally:
            set_rng_state(rng)
        save()
        log.info(report.summary(resolutions(self.model)))
        return self.record

    def dynamic_phase_msm(self) -> torch.nn.Module:
        """A copy of the model's switch holding the dynamic phase's weights (of a :attr:`fitted` run), on the
        model's device: evaluated beside the fitted one when training ends."""
        msm = cast("DynaMaskRoIHeads", self.model.roi_heads).msm
        dynamic = copy.deepcopy(msm)
        state = cast("dict[str, Tensor]", self.dynamic_switch)
        dynamic.load_state_dict({k: v.to(msm.cost_penalty.device) for k, v in state.items()})
        return dynamic
