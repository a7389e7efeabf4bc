"""Training: SGD with linear warm-up and step decay, DynaMask's two phases, AMP, DDP, exact resume.

``train(TrainConfig(...))`` trains any model built by a registered builder (``dynamask.engine.checkpoint``)
that follows torchvision's detection contract: ``model(images, targets)`` returns a dict of losses. Models
with a ``mask_training`` attribute (DynaMask) get ``"pretrain"`` for ``pretrain_epochs`` epochs, then
``"dynamic"`` for ``epochs`` more, as the paper counts (1 + 12); ``lr_steps`` count dynamic epochs and the
warm-up starts the run. Other models train ``epochs`` epochs.

Exact resume: a checkpoint holds the model, optimiser, scheduler, grad scaler, RNG states, epoch and
iteration; the sampler is a function of (seed, epoch) and each sample's augmentation a function of
(seed, epoch, index) (:mod:`~dynamask.data.samplers`), so a run resumed mid-epoch sees the same batches and
random draws as one that never stopped. Under ``torchrun`` every process runs this function; rank 0 logs and
writes checkpoints.

This module is the run and its loop; the settings are :mod:`~dynamask.engine.train_config`'s, the run is built
by :mod:`~dynamask.engine.train_build`, the optimiser and schedule are :mod:`~dynamask.engine.recipe`'s, the
switch fit that ends a DynaMask run is :mod:`~dynamask.engine.switch_life`'s. The run folder: ``last.pth``,
``config.yaml`` (the resolved settings, :mod:`~dynamask.engine.run_config`), ``log.txt``
(:mod:`~dynamask.engine.run_log`), ``metrics.csv`` and ``loss.png`` (:mod:`~dynamask.engine.loss_plot`),
``best.pth`` with ``eval_every`` and ``eval/`` (:mod:`~dynamask.engine.train_eval`). ``freeze="detector"``
trains the mask branch alone (:mod:`~dynamask.engine.freeze`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from dynamask.engine import distributed as dist_utils
from dynamask.engine import freeze, recipe, run_config, run_log, train_eval
from dynamask.engine.checkpoint import save_checkpoint
from dynamask.engine.loss_plot import plot_run
from dynamask.engine.metrics_log import CsvLog, tensorboard_writer
from dynamask.engine.rng import rng_state
from dynamask.engine.stop_requests import StopRequests
from dynamask.engine.train_build import Run, build_run, run_device
from dynamask.engine.train_config import TrainConfig, resolved_switch

__all__ = ["NonFiniteLossError", "TrainConfig", "resolved_switch", "train"]
log = logging.getLogger(run_log.LOGGER)  # everything a run says: log.txt and the console (run_log)


def train(cfg: TrainConfig, *, on_iteration: Callable[[int, dict[str, float]], None] | None = None,
          dry_run: bool = False, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train; returns ``{"status", "epoch", "iteration", "checkpoint", "plan", "metrics"?}``.

    ``status``: "done", or "stopped" (signal, ``time_limit`` or ``max_iters``; a checkpoint was written), or
    "dry run": with ``dry_run`` the run is built and checked and its plan printed, and nothing is trained,
    fitted or written (but the run folder, created and probed by the checks).
    A non-finite loss raises :class:`NonFiniteLossError` and leaves the last good checkpoint in place.
    ``on_iteration(iteration, losses)`` is called after each step (for tests and tools).
    ``provenance``: what the command line resolved into ``cfg`` (``--data``, ``--recipe``, the command),
    recorded in ``OUT/config.yaml`` beside the settings (:mod:`dynamask.engine.run_config`).
    """
    cfg.validate()  # before any work: numbers in range, device present, out_dir writable
    cfg.validate_val_data()  # the split evaluated at the end, checked now rather than after the training
    device = run_device(cfg)
    created_group = dist_utils.init_from_env(device.type)
    try:
        with run_log.run_logger(cfg.out_dir, main=dist_utils.is_main(), to_file=not dry_run,
                                console_progress=not cfg.progress):
            return _train(cfg, device, on_iteration, dry_run=dry_run, provenance=provenance)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


class NonFiniteLossError(FloatingPointError):
    """A loss (or, at a save, a weight) went NaN or infinite; the last good checkpoint is left in place."""


def _train(cfg: TrainConfig, device: torch.device, on_iteration: Callable[[int, dict[str, float]], None] | None, *,
           dry_run: bool, provenance: dict[str, Any] | None) -> dict[str, Any]:
    run = build_run(cfg, device)
    plan = _plan(run, cfg)
    if dry_run:
        log.info("\n".join(plan))
        return {"status": "dry run", "epoch": run.epoch, "iteration": run.iteration, "checkpoint": None,
                "stop_reason": None, "plan": plan}
    log.info(f"dynamask train: run folder {os.path.abspath(cfg.out_dir)}")
    log.info("\n".join(plan))
    if dist_utils.is_main():  # what the run was, replayable: dynamask train --config OUT/config.yaml
        path = os.path.join(cfg.out_dir, run_config.CONFIG_FILE)
        run_config.write_run_config(path, run_config.run_settings(
            cfg, arch=run.record.arch["name"], arch_kwargs=run.record.build_kwargs, provenance=provenance))
        log.info(f"settings: {path} (replay: dynamask train --config {path})")
    if run.switch.unfitted:  # a finished fitted run resumed with --switch paper: the dynamic phase's switch is back
        _save(run)
    stop_reason = _loop(run, cfg, device, on_iteration)
    status = "done" if stop_reason is None else "stopped"
    result: dict[str, Any] = {"status": status, "epoch": run.epoch, "iteration": run.iteration,
                              "checkpoint": run.ckpt_path, "stop_reason": stop_reason, "plan": plan}
    # fit and evaluate a finished run, or one cut short by its own time or iteration cap (not one interrupted)
    ended = status == "done" or stop_reason in ("time limit", "max_iters")
    if ended and run.switch.due:
        result["switch_fit"] = run.switch.fit(
            run.data.seeded.dataset, batches=cfg.switch_fit_batches, batch_size=cfg.batch_size,
            epochs=cfg.switch_fit_epochs, seed=cfg.seed, calibration_images=cfg.switch_fit_calibration_images,
            progress=cfg.progress and dist_utils.is_main(), save=lambda: _save(run))
    if ended and cfg.val_ann:
        metrics = train_eval.evaluate_at_end(run.model, cfg, device, switch=run.switch)
        if metrics is not None:
            result["metrics"] = metrics
    if dist_utils.is_distributed():
        torch.distributed.barrier()
    log.info(f"{status}: epoch {run.epoch}, iteration {run.iteration}, checkpoint {run.ckpt_path}")
    if "metrics" in result:
        from dynamask.engine.evaluate import format_metrics

        log.info(format_metrics(result["metrics"]))
    return result


def _plan(run: Run, cfg: TrainConfig) -> list[str]:
    """What the run will do, as lines of text: the schedule, the batch, the lr, the input, the method, the
    switch it ends with, and what a frozen detector leaves to train."""
    plan = recipe.describe_plan(model=run.model, pretrain_epochs=run.pretrain_epochs, epochs=cfg.epochs,
                                iters_per_epoch=run.data.iters_per_epoch, batch_size=cfg.batch_size,
                                world=dist_utils.world_size(), optimizer=cfg.optimizer, lr=cfg.lr,
                                warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor,
                                lr_steps=cfg.lr_steps, gamma=cfg.gamma)
    plan.append(recipe.describe_switch(run.model, fit=run.switch.fits, batches=cfg.switch_fit_batches,
                                       epochs=cfg.switch_fit_epochs))
    trained = run.optim.trained_params
    if trained is not None:
        plan.append(f"freeze: the detector is frozen; {len(trained)} parameter tensors train (the mask "
                    "head and the switch); the RPN and box losses are logged, not back-propagated")
    return plan


# ------------------------------------------------------------------- the loop: logs, checkpoints, stops
def _loop(run: Run, cfg: TrainConfig, device: torch.device,
          on_iteration: Callable[[int, dict[str, float]], None] | None) -> str | None:
    """Epochs until done or stopped; a checkpoint after each epoch and at a stop (and an evaluation every
    ``eval_every`` epochs). Returns why it stopped (None: every epoch done)."""
    is_main = dist_utils.is_main()
    csv_log = CsvLog(os.path.join(cfg.out_dir, "metrics.csv")) if is_main else None
    if csv_log is not None:
        csv_log.truncate_after(run.iteration)
    tb = tensorboard_writer(os.path.join(cfg.out_dir, "tb")) if is_main else None
    val = train_eval.open_val(cfg, say=is_main) if cfg.eval_every else None
    best = train_eval.BestCheckpoint(cfg.out_dir) if val is not None else None
    start = time.monotonic()
    start_iteration = run.iteration
    stop_reason: str | None = None
    if run.resume_path is None and os.path.isfile(run.ckpt_path):
        log.info(f"warning: starting a new run; {run.ckpt_path} of an earlier run will be overwritten "
                 "(--resume continues it)")
    if cfg.max_iters is not None and run.iteration >= cfg.max_iters:  # resumed at the cap: no step to take
        stop_reason = "max_iters"
    # one bar for the whole run (to max_iters when that comes first), with its ETA
    total = run.total_epochs * run.data.iters_per_epoch
    total = min(total, cfg.max_iters) if cfg.max_iters is not None else total
    bar = tqdm(total=total, initial=min(run.iteration, total), disable=not (is_main and cfg.progress),
               dynamic_ncols=True, unit="it")
    with StopRequests() as stops, bar:
        while run.epoch < run.total_epochs and stop_reason is None:
            _start_epoch(run, cfg, bar)
            t_last, n_last = time.monotonic(), 0
            for images, targets in run.data.loader:
                loss_dict, loss = _step(run, cfg, images, targets, device)
                n_last += 1
                bar.update(1)
                last_of_epoch = run.iteration == (run.epoch + 1) * run.data.iters_per_epoch
                if run.iteration % cfg.log_every == 0 or last_of_epoch:
                    values = {k: float(v.detach()) for k, v in loss_dict.items()}
                    values["loss"] = float(loss.detach())
                    values = dist_utils.all_reduce_mean(values, device)
                    now = time.monotonic()
                    row = {"epoch": run.epoch + 1, "iteration": run.iteration,
                           "lr": run.optim.optimizer.param_groups[0]["lr"], **values,
                           "sec_per_iter": (now - t_last) / max(n_last, 1), "elapsed": now - start}
                    t_last, n_last = now, 0
                    if csv_log is not None:
                        csv_log.write(row)
                        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{row['lr']:.2g}")
                    if tb is not None:
                        for k, v in row.items():
                            tb.add_scalar(f"train/{k}", v, run.iteration)
                    pace = (now - start) / max(run.iteration - start_iteration, 1)  # this process's mean
                    log.info(run_log.progress_line(row, total_epochs=run.total_epochs, total_iterations=total,
                                                   sec_per_iter=pace), extra={run_log.PROGRESS: True})
                if on_iteration is not None:
                    on_iteration(run.iteration, {k: float(v.detach()) for k, v in loss_dict.items()})
                stop_reason = stops.agreed_reason(iteration=run.iteration, start=start, time_limit=cfg.time_limit,
                                                  max_iters=cfg.max_iters, device=device)
                if stop_reason is not None:
                    break
            if stop_reason is None:
                run.epoch += 1
            _save(run)
            run.last_good = run.ckpt_path
            if stop_reason is not None:
                log.info(f"stopped ({stop_reason}) at epoch {run.epoch + 1}, iteration {run.iteration}; "
                         f"checkpoint {run.ckpt_path}")
            elif val is not None and best is not None and train_eval.due(cfg, run.epoch):
                train_eval.evaluate_after_epoch(run.model, val, cfg, device, epoch=run.epoch,
                                                iteration=run.iteration, best=best, record=run.record,
                                                csv_log=csv_log, tb=tb)
            if is_main:  # loss.png beside the checkpoint just written
                plot_run(cfg.out_dir)
    if tb is not None:
        tb.close()
    return stop_reason


def _start_epoch(run: Run, cfg: TrainConfig, bar: tqdm) -> None:
    """The phase of this epoch, the sampler positioned (mid-epoch on resume), the bar's description."""
    phase = ""
    if run.phases:
        # a property of DynaMask models; nn.Module's __setattr__ is typed for tensors and modules only
        run.model.mask_training = "pretrain" if run.epoch < run.pretrain_epochs else "dynamic"  # type: ignore[assignment]
        phase = f" ({run.model.mask_training})"
    offset = run.iteration - run.epoch * run.data.iters_per_epoch  # batches of this epoch already done (resume)
    run.data.sampler.set_epoch(run.epoch)
    run.data.sampler.start = offset * cfg.batch_size
    run.data.seeded.epoch = run.epoch
    run.ddp_model.train()
    if cfg.freeze == "detector":  # after train(): the frozen parts' BatchNorm keeps the weights' statistics
        freeze.detector_eval_mode(run.model)
    bar.set_description(f"epoch {run.epoch + 1}/{run.total_epochs}{phase}")


def _step(run: Run, cfg: TrainConfig, images, targets, device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """One optimisation step; a non-finite loss on any process stops every process before the update."""
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    opt = run.optim
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=opt.use_amp):
        loss_dict = run.ddp_model(images, targets)
    loss = freeze.trained_loss(loss_dict, cfg.freeze)  # a frozen detector's losses are logged, not trained
    (nonfinite,) = dist_utils.all_reduce_max([float(not torch.isfinite(loss).item())], device)
    if nonfinite:
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        kept = run.last_good or "none (no checkpoint was written yet)"
        raise NonFiniteLossError(
            f"non-finite loss at epoch {run.epoch + 1}, iteration {run.iteration + 1}: {values}. "
            f"Training stopped; last good checkpoint: {kept}"
        )
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    if cfg.clip_grad_norm:
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_(opt.params, cfg.clip_grad_norm)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    run.iteration += 1
    return loss_dict, loss


def _save(run: Run) -> str | None:
    """Rank 0 writes the checkpoint (atomically), with what the switch's life cycle stores; weights gone
    non-finite are never saved."""
    if not dist_utils.is_main():
        return None
    # a non-finite lr or gradient can leave NaN weights behind a finite last loss: never save those
    if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        raise NonFiniteLossError(f"non-finite weights at iteration {run.iteration}; not saved. Training stopped; "
                                 f"last good checkpoint: {run.last_good or 'none (no checkpoint was written yet)'}")
    rec, opt = run.record, run.optim
    return save_checkpoint(
        run.ckpt_path, arch=rec.arch, label_map=rec.label_map, model=run.model, optimizer=opt.optimizer,
        scheduler=opt.scheduler, scaler=opt.scaler, epoch=run.epoch, iteration=run.iteration, rng=rng_state(),
        extra={**rec.extra, **run.switch.checkpoint_extra()}, states=run.switch.checkpoint_states(),
    )
