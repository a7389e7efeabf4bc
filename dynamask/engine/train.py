"""Training: SGD with linear warm-up and step decay, DynaMask's two phases, AMP, DDP, exact resume.

``train(TrainConfig(...))`` trains any model built by a registered builder (``dynamask.engine.checkpoint``)
that follows torchvision's detection contract: ``model(images, targets)`` returns a dict of losses. Models
with a ``mask_training`` attribute (DynaMask) get ``"pretrain"`` for ``pretrain_epochs`` epochs, then
``"dynamic"`` for ``epochs`` more, as the paper counts (1 + 12); ``lr_steps`` count dynamic epochs and the
warm-up starts the run. Other models train ``epochs`` epochs.

Exact resume: a checkpoint holds the model, optimiser, scheduler, grad scaler, RNG states, epoch and
iteration; the sampler is a function of (seed, epoch) and each sample's augmentation a function of
(seed, epoch, index), so a run resumed mid-epoch sees the same batches and random draws as one that never
stopped. Under ``torchrun`` every process runs this function; rank 0 logs and writes checkpoints.

The run folder: ``last.pth``, ``config.yaml`` (the resolved settings, :mod:`~dynamask.engine.run_config`),
``log.txt`` (:mod:`~dynamask.engine.run_log`), ``metrics.csv`` and ``loss.png``
(:mod:`~dynamask.engine.loss_plot`), ``best.pth`` with ``eval_every`` (:mod:`~dynamask.engine.train_eval`).
``freeze="detector"`` trains the mask branch alone (:mod:`~dynamask.engine.freeze`).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dynamask.checks import check_mask_costs
from dynamask.engine import distributed as dist_utils
from dynamask.engine import freeze, recipe, run_config, run_log, switch_fit, train_eval, train_switch
from dynamask.engine.checkpoint import (
    build_model,
    load_checkpoint,
    make_arch,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from dynamask.engine.freeze import FreezeChoice
from dynamask.engine.loss_plot import plot_run
from dynamask.engine.metrics_log import CsvLog, tensorboard_writer
from dynamask.engine.train_flags import json_dict, option
from dynamask.engine.train_flags import mask_costs as parse_mask_costs
from dynamask.models.mask_losses import ROUTING_SIGNALS
from dynamask.models.switch_input import SWITCH_INPUTS

METHOD = "DynaMask's method (the model's defaults, which are the paper's, unless given)"
log = logging.getLogger(run_log.LOGGER)  # everything a run says: log.txt and the console (run_log)


@dataclass
class TrainConfig:
    """Everything a training run needs. Iteration counts are per process; ``batch_size`` is per process.

    Each field is declared with its ``dynamask train`` flag (:mod:`dynamask.engine.train_flags`).
    """

    train_images: str = option(help="folder of the training images (default: DATA/train with --data)")
    train_ann: str = option(help="COCO (or LVIS) annotation file of the training images (default: --data's)")
    out_dir: str = option(help="run folder: last.pth, config.yaml, log.txt, metrics.csv, loss.png, eval/ (required, "
                          "unless --config gives it; default: none)", option="--out", metavar="OUT")
    arch: str = option("dynamask_resnet_fpn", "builder name; maskrcnn_resnet_fpn is the peer")
    # num_classes is filled from the data if absent
    arch_kwargs: dict[str, Any] = option(factory=dict, help="builder keyword arguments as JSON, e.g. '{\"depth\": "
                                         "18}' or '{\"weights\": \"runs/x/last.pth\"}'", type=json_dict)
    epochs: int = option(12, "dynamic epochs (mask switch trained), counted after --pretrain-epochs; a model "
                         "without the two phases trains this many epochs")
    pretrain_epochs: int = option(1, "epochs before the dynamic ones, every resolution supervised and no mask "
                                  "switch: a run is pretrain + dynamic epochs, as the paper's 1 + 12")
    batch_size: int = option(2, "images per process")
    optimizer: Literal["sgd", "adamw"] = option("sgd", "sgd (with --momentum) or adamw (faster from random "
                                                "initialisation)")
    lr: float = option(0.02, "base learning rate (the paper's 0.02 is for a total batch of 16)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "weight decay (L2 for sgd, decoupled for adamw)")
    warmup_iters: int = option(500, "iterations of linear lr warm-up at the start of the run")
    warmup_factor: float = option(0.001, "lr multiplier the warm-up starts from")
    lr_steps: tuple[int, ...] = option((8, 11), "lr x gamma after these dynamic epochs (8 11: after the pretrain "
                                       "epochs and 8 and 11 dynamic ones); the warm-up starts the run")
    gamma: float = option(0.1, "lr multiplier at each of --lr-steps")
    clip_grad_norm: float | None = option(None, "clip the gradients' total norm to this (default: no clipping)")
    amp: bool = option(True, "no mixed precision on CUDA")  # mixed precision; only on CUDA
    workers: int = option(2, "data-loading processes per training process")
    flip_prob: float = option(0.5, "probability of a horizontal flip of each training image")
    resize: tuple[int, int] | None = option(None, "multi-scale training: the model draws the shorter side from "
                                            "LOW..HIGH per image, and uses HIGH at test (paper: 640 800; default: "
                                            "the model's min_size)", metavar=("LOW", "HIGH"))
    max_size: int | None = option(None, "cap of the longer side (default: the model's max_size)")
    # DynaMask's method (None: the model's default; see dynamask.engine.recipe). The budget is on unless
    # budget=False; its default C_t is the paper's 54%-fewer-FLOPs setting rescaled to this head.
    target_gmacs: float | None = option(
        None, "C_t, mask-head GMAC per RoI. Default: 0.4/1.40 of the head's top-resolution cost, the paper's "
        "54%%-fewer-FLOPs setting (C_t 0.4 of its 1.40-GMAC head) rescaled to this head", group=METHOD)
    budget: bool = option(True, "no FLOPs budget term in the dynamic phase", group=METHOD)
    budget_weight: float | None = option(None, "lambda2, weights budget and entropy (default: the model's, 0.4)",
                                         group=METHOD)
    edge_weight: float | None = option(None, "lambda1, weights the edge loss (default: the model's, 0.1)",
                                       group=METHOD)
    gumbel_tau: float | None = option(None, "Gumbel-softmax temperature (default: the model's, 0.5)", group=METHOD)
    routing_signal: str | None = option(
        None, "what the switch learns from: each resolution's loss against its own target (paper, the default), "
        "all scored by BCE on the finest grid (grid) or in a band around the outline (boundary), or by 1 - soft "
        "IoU on the finest grid (iou)", group=METHOD, choices=ROUTING_SIGNALS)
    coupled: bool | None = option(
        None, "the stages keep their own supervision in the dynamic phase and the switch learns from detached "
        "losses (default: coupled, the paper's Eq. 3)", group=METHOD, option="--decoupled",
        action="store_const", const=False)
    switch_input: str | None = option(
        None, "what the switch reads: the RoI feature (roi, the default), the trunk's output (trunk), or the "
        "trunk's output with its 14x14 mask and edge logits (mask)", group=METHOD, choices=SWITCH_INPUTS)
    switch: Literal["paper", "fit"] | None = option(
        None, "the mask switch the run ends with: fit (the default) regresses each RoI's mask IoU and prices the "
        "resolutions so that the mean head cost meets C_t exactly, when training ends (dynamask.engine."
        "train_switch); paper keeps the switch the dynamic phase trained through Gumbel-softmax under the soft "
        "budget (Eq. 3), the paper's model and --recipe paper's default. --no-switch-fit: --switch paper",
        group=METHOD)
    switch_fit_batches: int = option(900, "training batches (of --batch-size images, over all processes) the "
                                     "switch fit runs the trained model on", group=METHOD)
    switch_fit_epochs: int = option(15, "epochs of the switch fit over those RoIs", group=METHOD)
    switch_fit_calibration_images: int = option(
        200, "training images on whose detections the fitted switch's price is set (0: on the training RoIs)",
        group=METHOD)
    freeze: FreezeChoice = option(
        "none", "detector: train only the mask head (r-FPN stages, predictors) and the switch on a frozen detector "
        "(backbone, FPN, RPN, box head keep the weights given in --arch-kwargs: weights or torchvision_weights)")
    seed: int = option(0, "seed of the model's initialisation, the data order and the augmentations")
    # seconds of training in this run; then checkpoint and stop (the flag is in minutes)
    time_limit: float | None = option(None, "minutes; then checkpoint and stop (default: no limit)", scale=60.0,
                                      metavar="MINUTES")
    max_iters: int | None = option(None, "stop (with a checkpoint) after this many iterations in total (default: "
                                   "no limit)")
    log_every: int = option(20, "iterations between the progress lines of log.txt and metrics.csv")
    eval_every: int | None = option(
        None, "evaluate on the validation split after every N epochs (with the model's own switch at that point; "
        "needs --val-images/--val-ann or --data with a val split) and keep best.pth by segm AP (default: only when "
        "training ends)", metavar="N")
    resume: str | None = option(None, "continue from a checkpoint (default with no path: OUT/last.pth)", nargs="?",
                                const="auto")
    device: str | None = option(None, "e.g. cpu or cuda:0 (default: this process's GPU, else cpu)")
    progress: bool = option(True, "no progress bar (log.txt is written either way)")
    val_images: str | None = option(None, "evaluate on this split when training ends (default: DATA/val with "
                                    "--data, if it exists)")
    val_ann: str | None = option(None, "annotation file of --val-images (default: --data's val split)")
    mask_costs: dict[int, float] | None = option(
        None, "per-resolution mask-head GMAC for the final evaluation, e.g. 14=0.23,28=0.52 (default: a DynaMask "
        "model's own)", type=parse_mask_costs)
    repeat_factor_threshold: float | None = option(
        None, "LVIS's repeat-factor sampling of images with rare categories (threshold default 0.001; default: "
        "off)", option="--repeat-factor-sampling", type=float, nargs="?", const=0.001, metavar="THRESH")


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's), or AdamW, which trains a randomly initialised model much faster
    in a short schedule (the CPU demo)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


class NonFiniteLossError(FloatingPointError):
    pass


def lr_factor(it: int, *, warmup_iters: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    """Multiplier of the base lr at iteration ``it``: linear warm-up from ``warmup_factor``, step decay."""
    f = gamma ** bisect.bisect_right(milestones, it)
    if it < warmup_iters:
        alpha = it / warmup_iters
        f *= warmup_factor * (1 - alpha) + alpha
    return f


class WarmupStepSchedule:
    """The lr multiplier as an object, so ``LambdaLR.state_dict`` saves its settings as plain values."""

    def __init__(self, warmup_iters: int, warmup_factor: float, milestones: list[int], gamma: float) -> None:
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor
        self.milestones, self.gamma = list(milestones), gamma

    def __call__(self, it: int) -> float:
        return lr_factor(it, warmup_iters=self.warmup_iters, warmup_factor=self.warmup_factor,
                         milestones=self.milestones, gamma=self.gamma)


class _SeededSamples(Dataset):
    """Runs the wrapped dataset's random transforms under a seed made of (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = cast("Sequence[Any]", dataset), seed, 0  # a map-style one

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # index may be a sample id i + k * len (the k-th copy of item i in an epoch, see RepeatFactorSampler),
        # so that each copy gets its own random transform
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % (2**63))
            return self.dataset[index % len(self.dataset)]


class _ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch) that can start part-way through an epoch."""

    start = 0  # samples of this process's share to skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class _StopRequests:
    """SIGINT / SIGTERM set a flag that the loop acts on at the next step boundary; a second SIGINT raises."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_utils.local_rank())
    return torch.device("cpu")


def _dataset(cfg: TrainConfig):
    from dynamask.data import Compose, RandomHorizontalFlip
    from dynamask.data.lvis import open_dataset

    transforms = []  # sizes are the model transform's (multi-scale in training): no resizing here
    if cfg.flip_prob > 0:
        transforms.append(RandomHorizontalFlip(cfg.flip_prob))
    return open_dataset(cfg.train_images, cfg.train_ann, Compose(transforms))  # COCO or LVIS


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
    from tqdm import tqdm

    from dynamask.data import collate_fn
    from dynamask.engine.train_checks import check_config, check_val_data

    check_config(cfg)  # before any work: numbers in range, device present, out_dir writable
    check_val_data(cfg)  # the split evaluated at the end, checked now rather than after the training
    device = _device(cfg)
    created_group = dist_utils.init_from_env(device.type)
    try:
        with run_log.run_logger(cfg.out_dir, main=dist_utils.is_main(), to_file=not dry_run,
                                console_progress=not cfg.progress):
            return _train(cfg, device, on_iteration, tqdm, collate_fn, dry_run, provenance)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


@dataclass
class _Run:
    """What one training run works with, built by :func:`_build` (with a resumed run's state restored)."""

    model: torch.nn.Module  # the model itself (checkpoints, phases)
    ddp_model: torch.nn.Module  # what the step calls: the model, or its DDP wrapper
    arch: dict[str, Any]  # what the checkpoint records (rebuilds with no weight file)
    build_kwargs: dict[str, Any]  # the builder arguments the model was built with (weight files included)
    label_map: dict[int, tuple[int, str]]
    seeded: _SeededSamples
    sampler: Any  # _ResumableSampler or RepeatFactorSampler: set_epoch(), start
    loader: DataLoader
    iters_per_epoch: int
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    use_amp: bool
    phases: bool  # DynaMask: a pretrain phase, then the dynamic one
    pretrain_epochs: int
    total_epochs: int
    ckpt_path: str
    resume_path: str | None
    epoch: int = 0
    iteration: int = 0
    last_good: str | None = None  # the checkpoint a non-finite loss leaves in place
    fit: dict[str, Any] | None = None  # the switch fit's report, once the switch is fitted
    dynamic_switch: dict[str, Tensor] | None = None  # then, the switch the dynamic phase trained
    unfitted: bool = False  # a finished fitted run resumed with --switch paper (its fit undone)
    trained_params: list[str] | None = None  # with --freeze detector: the parameters that train


def _train(cfg, device, on_iteration, tqdm, collate_fn, dry_run: bool = False,
           provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    run = _build(cfg, device, collate_fn)
    extra = {"iters_per_epoch": run.iters_per_epoch, "world_size": dist_utils.world_size(),
             "config": _plain_config(cfg)}
    plan = recipe.describe_plan(model=run.model, pretrain_epochs=run.pretrain_epochs, epochs=cfg.epochs,
                                iters_per_epoch=run.iters_per_epoch, batch_size=cfg.batch_size,
                                world=dist_utils.world_size(), optimizer=cfg.optimizer, lr=cfg.lr,
                                warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor,
                                lr_steps=cfg.lr_steps, gamma=cfg.gamma)
    fits = run.phases and resolved_switch(cfg) == "fit" and train_switch.can_fit(run.model)
    plan.append(recipe.describe_switch(run.model, fit=fits, batches=cfg.switch_fit_batches,
                                       epochs=cfg.switch_fit_epochs))
    if run.trained_params is not None:
        plan.append(f"freeze: the detector is frozen; {len(run.trained_params)} parameter tensors train (the mask "
                    "head and the switch); the RPN and box losses are logged, not back-propagated")
    if dry_run:
        log.info("\n".join(plan))
        return {"status": "dry run", "epoch": run.epoch, "iteration": run.iteration, "checkpoint": None,
                "stop_reason": None, "plan": plan}
    log.info(f"dynamask train: run folder {os.path.abspath(cfg.out_dir)}")
    log.info("\n".join(plan))
    if dist_utils.is_main():  # what the run was, replayable: dynamask train --config OUT/config.yaml
        path = os.path.join(cfg.out_dir, run_config.CONFIG_FILE)
        run_config.write_run_config(path, run_config.run_settings(
            cfg, arch=run.arch["name"], arch_kwargs=run.build_kwargs, provenance=provenance))
        log.info(f"settings: {path} (replay: dynamask train --config {path})")
    if run.fit is not None:  # a resumed run that was fitted and has nothing left to train
        extra[train_switch.FIT_KEY] = run.fit
    if run.unfitted:  # a finished fitted run resumed with --switch paper: the dynamic phase's switch is back
        _save(run, extra)
    stop_reason = _loop(run, cfg, device, extra, on_iteration, tqdm)
    status = "done" if stop_reason is None else "stopped"
    result: dict[str, Any] = {"status": status, "epoch": run.epoch, "iteration": run.iteration,
                              "checkpoint": run.ckpt_path, "stop_reason": stop_reason, "plan": plan}
    # fit and evaluate a finished run, or one cut short by its own time or iteration cap (not one interrupted)
    ended = status == "done" or stop_reason in ("time limit", "max_iters")
    if ended and fits and run.fit is None:
        result["switch_fit"] = _fit_switch(run, cfg, extra)
    if ended and cfg.val_ann:
        metrics = _evaluate_at_end(run, cfg, device)
        if metrics is not None:
            result["metrics"] = metrics
    if dist_utils.is_distributed():
        torch.distributed.barrier()
    log.info(f"{status}: epoch {run.epoch}, iteration {run.iteration}, checkpoint {run.ckpt_path}")
    if "metrics" in result:
        from dynamask.engine.evaluate import format_metrics

        log.info(format_metrics(result["metrics"]))
    return result


def resolved_switch(cfg: TrainConfig) -> str:
    """The switch a run ends with: ``cfg.switch``, else the fit (``--recipe paper`` sets "paper")."""
    return cfg.switch or "fit"


def _fit_switch(run: _Run, cfg: TrainConfig, extra: dict[str, Any]) -> dict[str, Any] | None:
    """The switch fit that ends the run (:mod:`dynamask.engine.train_switch`), then the checkpoint again.
    Returns the fit's report (None when the data gave it nothing to learn from: the dynamic phase's switch
    stays, with a warning)."""
    is_main = dist_utils.is_main()
    rng = rng_state()  # as training left it: a run resumed for more epochs continues from it
    try:
        report, run.fit, run.dynamic_switch = train_switch.fit_at_end(
            run.model, run.seeded.dataset, batches=cfg.switch_fit_batches, batch_size=cfg.batch_size,
            epochs=cfg.switch_fit_epochs, seed=cfg.seed, calibration_images=cfg.switch_fit_calibration_images,
            progress=cfg.progress and is_main)
    except switch_fit.NoRoIsError as exc:  # raised by every process alike (decided on the gathered data)
        log.info(f"warning: {exc}; the checkpoint keeps the switch the dynamic phase trained")
        return None
    finally:
        set_rng_state(rng)
    extra[train_switch.FIT_KEY] = run.fit
    _save(run, extra)
    log.info(report.summary(train_switch.resolutions(run.model)))
    return run.fit


# ------------------------------------------------------------------------------------------- building
def _build(cfg: TrainConfig, device: torch.device, collate_fn) -> _Run:
    """Model, data and optimiser of a new run, or of a resumed one with its state restored."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "last.pth")
    resume_path = ckpt_path if cfg.resume == "auto" else cfg.resume
    ckpt = load_checkpoint(resume_path, map_location="cpu", resume=True) if resume_path else None
    model, arch, build_kwargs, label_map, dataset = _build_model(cfg, device, ckpt, resume_path)
    phases = hasattr(model, "mask_training")
    pretrain_epochs = cfg.pretrain_epochs if phases else 0
    seeded, sampler, loader, iters_per_epoch = _build_data(cfg, dataset, device, collate_fn)
    check_mask_costs(cfg.mask_costs, model, flag="mask_costs")  # the final report needs every resolution

    # a frozen detector's parameters stay out of the optimiser: no update, no weight decay, no state
    trained = freeze.freeze_detector(model) if cfg.freeze == "detector" else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    milestones = recipe.milestones(cfg.lr_steps, pretrain_epochs=pretrain_epochs, iters_per_epoch=iters_per_epoch)
    schedule = WarmupStepSchedule(cfg.warmup_iters, cfg.warmup_factor, milestones, cfg.gamma)
    use_amp = cfg.amp and device.type == "cuda"
    run = _Run(model=model, ddp_model=model, arch=arch, build_kwargs=build_kwargs, label_map=label_map,
               seeded=seeded, sampler=sampler, trained_params=trained,
               loader=loader, iters_per_epoch=iters_per_epoch, params=params, optimizer=optimizer,
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
               scaler=torch.amp.GradScaler("cuda", enabled=use_amp), use_amp=use_amp, phases=phases,
               pretrain_epochs=pretrain_epochs, total_epochs=pretrain_epochs + cfg.epochs, ckpt_path=ckpt_path,
               resume_path=resume_path, last_good=resume_path)
    if ckpt is not None:
        _restore(run, cfg, ckpt)
        del ckpt
    if dist_utils.world_size() > 1:
        dist_utils.match_grad_layouts(model)  # no strided copies (and warning) in DDP's gradient buckets
        run.ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    return run


def _build_model(cfg: TrainConfig, device: torch.device, ckpt: dict[str, Any] | None, resume_path: str | None):
    """``(model, arch, build_kwargs, label_map, dataset)``: the model of a new run (the method's settings merged
    into its builder arguments), or of the checkpoint being resumed (whose settings must not change)."""
    settings = {k: getattr(cfg, k) for k in recipe.METHOD_SETTINGS}
    if ckpt is None:  # settings checked before the (possibly long) reading of the annotations
        kwargs = recipe.model_kwargs(cfg.arch, cfg.arch_kwargs, resize=cfg.resize, max_size=cfg.max_size,
                                     budget=cfg.budget, settings=settings)
    dataset = _dataset(cfg)
    label_map = dataset.label_map
    if ckpt is not None:
        if ckpt["arch"]["name"] != cfg.arch:
            raise ValueError(f"{resume_path}: checkpoint is of architecture {ckpt['arch']['name']!r}, not {cfg.arch!r}")
        arch = ckpt["arch"]
        if {int(k): tuple(v) for k, v in ckpt["label_map"].items()} != label_map:
            raise ValueError(f"{resume_path}: checkpoint's label map differs from the categories of {cfg.train_ann}")
        changed = sorted(k for k, v in settings.items() if v is not None and arch["kwargs"].get(k) != v)
        if changed:
            raise ValueError(f"{resume_path}: the run was trained with other {', '.join(changed)} "
                             f"({ {k: arch['kwargs'].get(k) for k in changed} }); a resumed run keeps its settings")
        build_arch = arch
    else:
        given = kwargs.get("num_classes")
        if given is not None and given < dataset.num_classes:
            raise ValueError(
                f"--arch-kwargs num_classes {given}: {cfg.train_ann} has {dataset.num_classes - 1} categories, so "
                f"the model needs num_classes >= {dataset.num_classes} (num_classes counts the background, as "
                "torchvision's); leave it out to take it from the data")
        kwargs.setdefault("num_classes", dataset.num_classes)
        if kwargs.get("torchvision_weights") is not None and "torchvision_label_ids" not in kwargs:
            # torchvision's COCO weights on COCO's categories: their box predictor, cut to the data's labels
            ids = freeze.coco_label_ids(label_map)
            if ids is not None and kwargs["num_classes"] == len(ids) + 1:
                kwargs["torchvision_label_ids"] = ids
        if cfg.freeze == "detector":  # before the weights are read into a model: a class count that drops them
            freeze.check_torchvision_predictor(kwargs)
        build_arch = make_arch(cfg.arch, **kwargs)

    torch.manual_seed(cfg.seed)
    import random

    import numpy as np

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(build_arch).to(device)
    heads = getattr(model, "roi_heads", None)
    if ckpt is None:
        kwargs = recipe.stored_kwargs(build_arch["kwargs"])
        if cfg.budget and "target_gmacs" not in kwargs and heads is not None and hasattr(heads, "target_gmacs"):
            heads.target_gmacs = recipe.default_target_gmacs(model)  # the budget is on by default
            kwargs["target_gmacs"] = heads.target_gmacs
        recipe.check_budget(model)  # a C_t below the cheapest resolution can never be met: refused now
        msm = getattr(heads, "msm", None)
        if msm is not None and bool(msm.cost_penalty.any()):
            # weights of a fitted model: its price would bias the Gumbel logits the dynamic phase trains
            msm.cost_penalty.zero_()
            log.info("note: the weights' fitted switch price (cost_penalty) is reset to zero: the dynamic phase "
                     "trains the switch without it, and a fit at the end sets a new one")
        arch = make_arch(cfg.arch, **kwargs)  # what the checkpoint records: rebuilds with no weight file
        build_kwargs = dict(build_arch["kwargs"])  # the weight files too: config.yaml replays the build
        if "target_gmacs" in kwargs:
            build_kwargs["target_gmacs"] = kwargs["target_gmacs"]
    else:
        build_kwargs = dict(arch["kwargs"])
    return model, arch, build_kwargs, label_map, dataset


def _build_data(cfg: TrainConfig, dataset, device: torch.device, collate_fn):
    """``(seeded, sampler, loader, iters_per_epoch)``: each process's share of a seeded shuffle (or of
    LVIS's repeat-factor sampling), resumable mid-epoch."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    seeded = _SeededSamples(dataset, cfg.seed)
    sampler: Any
    if cfg.repeat_factor_threshold:
        from dynamask.data.lvis import RepeatFactorSampler, repeat_factors

        sampler = RepeatFactorSampler(repeat_factors(dataset, cfg.repeat_factor_threshold),
                                      num_replicas=world, rank=rank, seed=cfg.seed)
    else:
        sampler = _ResumableSampler(seeded, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader_gen = torch.Generator().manual_seed(cfg.seed)  # keeps the DataLoader off the global RNG
    loader = DataLoader(
        seeded, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, collate_fn=collate_fn,
        generator=loader_gen, pin_memory=device.type == "cuda", persistent_workers=False,
    )
    iters_per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
    if iters_per_epoch == 0:
        raise ValueError(f"{cfg.train_ann}: no training images")
    return seeded, sampler, loader, iters_per_epoch


def _restore(run: _Run, cfg: TrainConfig, ckpt: dict[str, Any]) -> None:
    """A resumed run's weights, optimiser, schedule, scaler, position and RNG states."""
    unwrap(run.model).load_state_dict(ckpt["model"])
    saved = ckpt.get("extra", {}).get("config", {}).get("optimizer", "sgd")
    if saved != cfg.optimizer:
        raise ValueError(f"{run.resume_path}: the run was trained with --optimizer {saved}, not {cfg.optimizer}; "
                         "resume with the same optimizer")
    frozen = ckpt.get("extra", {}).get("config", {}).get("freeze", "none")
    if frozen != cfg.freeze:  # the optimiser holds the parameters that trained: the same set must train on
        raise ValueError(f"{run.resume_path}: the run was trained with --freeze {frozen}, not {cfg.freeze}; resume "
                         "with the same --freeze")
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if "scaler" in ckpt:
        run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
    fit = ckpt.get("extra", {}).get(train_switch.FIT_KEY)
    if fit is not None:
        if run.epoch < run.total_epochs:  # more to train: from the dynamic phase's switch, fitted again at the end
            train_switch.use_dynamic_phase_switch(unwrap(run.model), ckpt)
        elif resolved_switch(cfg) == "paper":  # finished, and asked for the paper's switch: put it back
            run.unfitted = train_switch.use_dynamic_phase_switch(unwrap(run.model), ckpt)
        else:
            run.fit, run.dynamic_switch = fit, train_switch.dynamic_phase_switch(ckpt)
    saved_ipe = ckpt.get("extra", {}).get("iters_per_epoch")
    if saved_ipe is not None and saved_ipe != run.iters_per_epoch:
        raise ValueError(
            f"{run.resume_path}: saved with {saved_ipe} iterations per epoch, now {run.iters_per_epoch} "
            "(different data, batch size or number of processes); cannot continue exactly"
        )
    set_rng_state(ckpt["rng"])


# ------------------------------------------------------------------------------------------- the step
def _step(run: _Run, cfg: TrainConfig, images, targets, device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """One optimisation step; a non-finite loss on any process stops every process before the update."""
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=run.use_amp):
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
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.clip_grad_norm:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.iteration += 1
    return loss_dict, loss


# ------------------------------------------------------------------- the loop: logs, checkpoints, stops
def _save(run: _Run, extra: dict[str, Any]) -> str | None:
    """Rank 0 writes the checkpoint (atomically); weights gone non-finite are never saved."""
    if not dist_utils.is_main():
        return None
    # a non-finite lr or gradient can leave NaN weights behind a finite last loss: never save those
    if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        raise NonFiniteLossError(f"non-finite weights at iteration {run.iteration}; not saved. Training stopped; "
                                 f"last good checkpoint: {run.last_good or 'none (no checkpoint was written yet)'}")
    states = None if run.dynamic_switch is None else {train_switch.DYNAMIC_SWITCH_KEY: run.dynamic_switch}
    return save_checkpoint(
        run.ckpt_path, arch=run.arch, label_map=run.label_map, model=run.model, optimizer=run.optimizer,
        scheduler=run.scheduler, scaler=run.scaler, epoch=run.epoch, iteration=run.iteration, rng=rng_state(),
        extra=extra, states=states,
    )


def _loop(run: _Run, cfg: TrainConfig, device: torch.device, extra: dict[str, Any], on_iteration, tqdm) -> str | None:
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
    total = run.total_epochs * run.iters_per_epoch
    total = min(total, cfg.max_iters) if cfg.max_iters is not None else total
    bar = tqdm(total=total, initial=min(run.iteration, total), disable=not (is_main and cfg.progress),
               dynamic_ncols=True, unit="it")
    with _StopRequests() as stops, bar:
        while run.epoch < run.total_epochs and stop_reason is None:
            _start_epoch(run, cfg, bar)
            t_last, n_last = time.monotonic(), 0
            for images, targets in run.loader:
                loss_dict, loss = _step(run, cfg, images, targets, device)
                n_last += 1
                bar.update(1)
                last_of_epoch = run.iteration == (run.epoch + 1) * run.iters_per_epoch
                if run.iteration % cfg.log_every == 0 or last_of_epoch:
                    values = {k: float(v.detach()) for k, v in loss_dict.items()}
                    values["loss"] = float(loss.detach())
                    values = dist_utils.all_reduce_mean(values, device)
                    now = time.monotonic()
                    row = {"epoch": run.epoch + 1, "iteration": run.iteration,
                           "lr": run.optimizer.param_groups[0]["lr"], **values,
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
                stop_reason = _stop_reason(run, cfg, stops, start, device)
                if stop_reason is not None:
                    break
            if stop_reason is None:
                run.epoch += 1
            _save(run, extra)
            run.last_good = run.ckpt_path
            if stop_reason is not None:
                log.info(f"stopped ({stop_reason}) at epoch {run.epoch + 1}, iteration {run.iteration}; "
                         f"checkpoint {run.ckpt_path}")
            elif val is not None and best is not None and train_eval.due(cfg, run.epoch):
                _evaluate_during_training(run, cfg, device, extra, val, best, csv_log, tb)
            if is_main:  # loss.png beside the checkpoint just written
                plot_run(cfg.out_dir)
    if tb is not None:
        tb.close()
    return stop_reason


def _evaluate_during_training(run: _Run, cfg: TrainConfig, device: torch.device, extra: dict[str, Any], val,
                              best: train_eval.BestCheckpoint, csv_log: CsvLog | None, tb) -> None:
    """``--eval-every``: the model as it stands on the validation split; the metrics to log.txt, metrics.csv
    and TensorBoard, and best.pth when its segm AP is the best so far (rank 0)."""
    log.info(f"evaluating after epoch {run.epoch} (iteration {run.iteration}) on {cfg.val_ann}")
    metrics = train_eval.evaluate_during_training(run.model, val, cfg, device)
    if metrics is None:  # another rank: rank 0 keeps the records
        return
    row = train_eval.metric_row(metrics, epoch=run.epoch, iteration=run.iteration)
    if csv_log is not None:
        csv_log.write(row)
    if tb is not None:
        for k, v in row.items():
            if k.startswith("val_"):
                tb.add_scalar(f"val/{k[4:]}", v, run.iteration)

    def write(path: str, record: dict[str, Any]) -> None:
        save_checkpoint(path, arch=run.arch, label_map=run.label_map, model=run.model, epoch=run.epoch,
                        iteration=run.iteration, extra={**extra, train_eval.BEST_KEY: record})

    from dynamask.engine.evaluate import format_metrics

    kept = best.offer(metrics, epoch=run.epoch, iteration=run.iteration, write=write)
    ap = metrics.get("segm", {}).get("AP")
    log.info(format_metrics(metrics))
    log.info(f"epoch {run.epoch}: segm AP {100 * ap:.1f}" + (f"; best so far: {best.path}" if kept else
                                                             f" (best so far {100 * (best.ap or 0):.1f})")
             if ap is not None else f"epoch {run.epoch}: no segm AP (the model predicts no masks)")


def _start_epoch(run: _Run, cfg: TrainConfig, bar) -> None:
    """The phase of this epoch, the sampler positioned (mid-epoch on resume), the bar's description."""
    phase = ""
    if run.phases:
        # a property of DynaMask models; nn.Module's __setattr__ is typed for tensors and modules only
        run.model.mask_training = "pretrain" if run.epoch < run.pretrain_epochs else "dynamic"  # type: ignore[assignment]
        phase = f" ({run.model.mask_training})"
    offset = run.iteration - run.epoch * run.iters_per_epoch  # batches of this epoch already done (resume)
    run.sampler.set_epoch(run.epoch)
    run.sampler.start = offset * cfg.batch_size
    run.seeded.epoch = run.epoch
    run.ddp_model.train()
    if cfg.freeze == "detector":  # after train(): the frozen parts' BatchNorm keeps the weights' statistics
        freeze.detector_eval_mode(run.model)
    bar.set_description(f"epoch {run.epoch + 1}/{run.total_epochs}{phase}")


def _stop_reason(run: _Run, cfg: TrainConfig, stops: _StopRequests, start: float, device: torch.device) -> str | None:
    """Why to stop after this step, agreed by every process (they all stop at the same step boundary)."""
    late = cfg.time_limit is not None and time.monotonic() - start > cfg.time_limit
    signalled, over_time = dist_utils.all_reduce_max([float(stops.reason is not None), float(late)], device)
    if signalled or over_time:
        return (stops.reason or "signal in another process") if signalled else "time limit"
    if cfg.max_iters is not None and run.iteration >= cfg.max_iters:
        return "max_iters"
    return None


def _evaluate_at_end(run: _Run, cfg: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    """Every process evaluates its share of the validation images; rank 0 gathers them and returns the
    metrics (None elsewhere, or when an LVIS file cannot be scored here)."""
    from dynamask.engine.evaluate import evaluate

    is_main = dist_utils.is_main()
    val = train_eval.open_val(cfg, say=is_main)
    if val is None:
        return None
    dist_utils.broadcast_buffers(run.model)  # every shard evaluated with the checkpoint's statistics
    metrics = evaluate(run.model, val, device=device, costs=cfg.mask_costs,
                       out_dir=os.path.join(cfg.out_dir, "eval"), progress=cfg.progress and is_main)
    if run.fit is not None and run.dynamic_switch is not None:
        # a fitted run: the dynamic phase's (the paper's) switch too, on the same model and images
        switches = _compare_switches(run, cfg, val, device, metrics if is_main else None)
        if is_main and metrics is not None:
            metrics["switches"] = switches
    return metrics if is_main else None


def _compare_switches(run: _Run, cfg: TrainConfig, val, device: torch.device,
                      fitted: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rows of both switches of a fitted run: segm AP, GMAC per instance and the routing value on the
    validation split's ground-truth boxes (:mod:`dynamask.engine.routing_probe`). Every process evaluates
    its shard of the images with the dynamic phase's switch swapped in; rank 0 probes the routing."""
    import copy

    from dynamask.engine.evaluate import evaluate
    from dynamask.engine.routing import routing_value
    from dynamask.engine.routing_probe import gt_box_routing

    is_main = dist_utils.is_main()
    model = cast(Any, unwrap(run.model))
    heads = model.roi_heads
    dynamic_msm = copy.deepcopy(heads.msm)
    state = cast("dict[str, Tensor]", run.dynamic_switch)
    dynamic_msm.load_state_dict({k: v.to(heads.msm.cost_penalty.device) for k, v in state.items()})
    fitted_msm, heads.msm = heads.msm, dynamic_msm
    try:
        dynamic = evaluate(model, val, device=device, costs=cfg.mask_costs,
                           out_dir=os.path.join(cfg.out_dir, "eval", "dynamic_phase_switch"),
                           progress=cfg.progress and is_main)
    finally:
        heads.msm = fitted_msm
    if not is_main or fitted is None or dynamic is None:
        return None
    probe = gt_box_routing(model, val, switches={"fitted": (fitted_msm, heads.switch_input),
                                                 "dynamic_phase": (dynamic_msm, heads.switch_input)},
                           progress=cfg.progress, device=device)
    rows = {}
    for name, m in (("fitted", fitted), ("dynamic_phase", dynamic)):
        value = routing_value(probe["iou"], probe["choices"][name]) if len(probe["iou"]) else None
        rows[name] = {"segm_AP": m["segm"]["AP"] if "segm" in m else None,
                      "mask_gmac_per_instance": m.get("mask_gmac_per_instance"),
                      "routing_captured": None if value is None else value.captured}
    return rows


def _plain_config(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["lr_steps"] = list(d["lr_steps"])
    if d["resize"] is not None:
        d["resize"] = list(d["resize"])
    if d["mask_costs"] is not None:
        d["mask_costs"] = {int(k): float(v) for k, v in d["mask_costs"].items()}
    return d
