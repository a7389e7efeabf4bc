"""Building a training run (:func:`build_run`): the device, the training data, the model, the optimiser and
its schedule, and a resumed run's state restored from its checkpoint.

The data set is opened once, by :func:`open_train_dataset`, and handed to what needs it: the model gets only
its label map and class count, the loader the data set itself. The order of the steps is the order of the
errors a user meets: the method's settings before the (possibly long) reading of the annotations, the data
before the model is built, everything before the first step.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from dynamask.checks import check_mask_costs
from dynamask.data import Compose, RandomHorizontalFlip, collate_fn
from dynamask.data.lvis import RepeatFactorSampler, open_dataset, repeat_factors
from dynamask.data.samplers import ResumableSampler, SeededSamples
from dynamask.engine import distributed as dist_utils
from dynamask.engine import freeze, recipe, run_log
from dynamask.engine.checkpoint import build_model, load_checkpoint, make_arch
from dynamask.engine.rng import seed_all, set_rng_state
from dynamask.engine.switch_life import SwitchLifecycle
from dynamask.engine.train_config import TrainConfig, resolved_switch

log = logging.getLogger(run_log.LOGGER)


@dataclass(kw_only=True)
class RunRecord:
    """What the run's checkpoints and ``config.yaml`` record of it."""

    arch: dict[str, Any]  # the checkpoint's architecture (rebuilds with no weight file)
    build_kwargs: dict[str, Any]  # the builder arguments the model was built with (weight files included)
    label_map: dict[int, tuple[int, str]]
    extra: dict[str, Any]  # every checkpoint's ``extra``: iters_per_epoch, world_size, config


@dataclass(kw_only=True)
class TrainData:
    """Each process's share of a seeded shuffle (or of LVIS's repeat-factor sampling), resumable mid-epoch."""

    seeded: SeededSamples  # the training images, each sample's augmentation seeded
    sampler: ResumableSampler | RepeatFactorSampler
    loader: DataLoader
    iters_per_epoch: int


@dataclass(kw_only=True)
class Optimisation:
    """What a step updates, and with what."""

    params: list[torch.nn.Parameter]  # the parameters that train (a frozen detector's stay out)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    use_amp: bool
    trained_params: list[str] | None = None  # with --freeze detector: the names of the parameters that train


@dataclass(kw_only=True)
class Run:
    """What one training run works with, built by :func:`build_run` (with a resumed run's state restored)."""

    model: torch.nn.Module  # the model itself (checkpoints, phases, the switch)
    ddp_model: torch.nn.Module  # what the step calls: the model, or its DDP wrapper
    record: RunRecord
    data: TrainData
    optim: Optimisation
    switch: SwitchLifecycle
    pretrain_epochs: int
    total_epochs: int
    ckpt_path: str
    resume_path: str | None
    epoch: int = 0
    iteration: int = 0
    last_good: str | None = None  # the checkpoint a non-finite loss leaves in place

    @property
    def phases(self) -> bool:
        """DynaMask: a pretrain phase, then the dynamic one."""
        return hasattr(self.model, "mask_training")


def run_device(cfg: TrainConfig) -> torch.device:
    """``cfg.device``, else this process's GPU, else the CPU."""
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_utils.local_rank())
    return torch.device("cpu")


def build_run(cfg: TrainConfig, device: torch.device) -> Run:
    """Model, data and optimiser of a new run, or of a resumed one with its state restored."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "last.pth")
    resume_path = ckpt_path if cfg.resume == "auto" else cfg.resume
    ckpt = load_checkpoint(resume_path, map_location="cpu", resume=True) if resume_path else None
    settings = {k: getattr(cfg, k) for k in recipe.METHOD_SETTINGS}
    if ckpt is None:  # settings checked before the (possibly long) reading of the annotations
        kwargs = recipe.model_kwargs(cfg.arch, cfg.arch_kwargs, resize=cfg.resize, max_size=cfg.max_size,
                                     budget=cfg.budget, settings=settings)
    dataset = open_train_dataset(cfg)
    if ckpt is not None:
        model, arch, build_kwargs = resumed_model(cfg, device, ckpt, resume_path=str(resume_path),
                                                  label_map=dataset.label_map, settings=settings)
    else:
        model, arch, build_kwargs = new_model(cfg, device, kwargs, label_map=dataset.label_map,
                                              num_classes=dataset.num_classes)
    phases = hasattr(model, "mask_training")
    pretrain_epochs = cfg.pretrain_epochs if phases else 0
    data = build_data(cfg, dataset, device)
    check_mask_costs(cfg.mask_costs, model, flag="mask_costs")  # the final report needs every resolution
    extra = {"iters_per_epoch": data.iters_per_epoch, "world_size": dist_utils.world_size(),
             "config": cfg.as_record()}
    run = Run(model=model, ddp_model=model, record=RunRecord(arch=arch, build_kwargs=build_kwargs,
                                                             label_map=dataset.label_map, extra=extra),
              data=data, optim=build_optimisation(cfg, model, device, pretrain_epochs=pretrain_epochs,
                                                  iters_per_epoch=data.iters_per_epoch),
              switch=SwitchLifecycle(model=model, ends_with=resolved_switch(cfg), phases=phases),
              pretrain_epochs=pretrain_epochs, total_epochs=pretrain_epochs + cfg.epochs, ckpt_path=ckpt_path,
              resume_path=resume_path, last_good=resume_path)
    if ckpt is not None:
        restore(run, cfg, ckpt)
        del ckpt
    if dist_utils.world_size() > 1:
        dist_utils.match_grad_layouts(model)  # no strided copies (and warning) in DDP's gradient buckets
        run.ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    return run


def open_train_dataset(cfg: TrainConfig) -> Any:
    """The training images (COCO or LVIS), flipped at random; sizes are the model transform's (multi-scale in
    training), so nothing is resized here."""
    transforms = [RandomHorizontalFlip(cfg.flip_prob)] if cfg.flip_prob > 0 else []
    return open_dataset(cfg.train_images, cfg.train_ann, Compose(transforms))


def resumed_model(cfg: TrainConfig, device: torch.device, ckpt: dict[str, Any], *, resume_path: str,
                  label_map: dict[int, tuple[int, str]],
                  settings: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, arch, build_kwargs)`` of the checkpoint being resumed, whose architecture, categories and
    method settings must not change (the weights are loaded by :func:`restore`)."""
    if ckpt["arch"]["name"] != cfg.arch:
        raise ValueError(f"{resume_path}: checkpoint is of architecture {ckpt['arch']['name']!r}, not {cfg.arch!r}")
    arch = ckpt["arch"]
    if {int(k): tuple(v) for k, v in ckpt["label_map"].items()} != label_map:
        raise ValueError(f"{resume_path}: checkpoint's label map differs from the categories of {cfg.train_ann}")
    changed = sorted(k for k, v in settings.items() if v is not None and arch["kwargs"].get(k) != v)
    if changed:
        raise ValueError(f"{resume_path}: the run was trained with other {', '.join(changed)} "
                         f"({ {k: arch['kwargs'].get(k) for k in changed} }); a resumed run keeps its settings")
    seed_all(cfg.seed)
    return build_model(arch).to(device), arch, dict(arch["kwargs"])


def new_model(cfg: TrainConfig, device: torch.device, kwargs: dict[str, Any], *,
              label_map: dict[int, tuple[int, str]],
              num_classes: int) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, arch, build_kwargs)`` of a new run: ``kwargs`` (the builder arguments with the method's
    settings merged in, :func:`~dynamask.engine.recipe.model_kwargs`) completed from the data, the model
    built with the budget's default C_t when none was given, and what the checkpoint records of it."""
    given = kwargs.get("num_classes")
    if given is not None and given < num_classes:
        raise ValueError(
            f"--arch-kwargs num_classes {given}: {cfg.train_ann} has {num_classes - 1} categories, so "
            f"the model needs num_classes >= {num_classes} (num_classes counts the background, as "
            "torchvision's); leave it out to take it from the data")
    kwargs.setdefault("num_classes", num_classes)
    if kwargs.get("torchvision_weights") is not None and "torchvision_label_ids" not in kwargs:
        # torchvision's COCO weights on COCO's categories: their box predictor, cut to the data's labels
        ids = freeze.coco_label_ids(label_map)
        if ids is not None and kwargs["num_classes"] == len(ids) + 1:
            kwargs["torchvision_label_ids"] = ids
    if cfg.freeze == "detector":  # before the weights are read into a model: a class count that drops them
        freeze.check_torchvision_predictor(kwargs)
    build_arch = make_arch(cfg.arch, **kwargs)
    seed_all(cfg.seed)
    model = build_model(build_arch).to(device)
    heads = getattr(model, "roi_heads", None)
    stored = recipe.stored_kwargs(build_arch["kwargs"])
    if cfg.budget and "target_gmacs" not in stored and heads is not None and hasattr(heads, "target_gmacs"):
        # the budget is on by default; its C_t is a share of this head's cost, known once the head is built
        heads.target_gmacs = recipe.default_target_gmacs(model)
        stored["target_gmacs"] = heads.target_gmacs
    levels = getattr(getattr(heads, "mask_head", None), "stage_levels", None)
    if levels is not None:  # resolved from the image size: recorded, so that a rebuild fuses the same levels
        stored["stage_levels"] = list(levels)
    recipe.check_budget(model)  # a C_t below the cheapest resolution can never be met: refused now
    msm = getattr(heads, "msm", None)
    if msm is not None and (bool(msm.cost_penalty.any()) or bool(msm.confidence_weighted)):
        # weights of a fitted model: its price would bias the Gumbel logits the dynamic phase trains (and its
        # confidence rule belongs to that price; a fit whose budget needed no price, μ = 0, still sets the rule)
        msm.cost_penalty.zero_()
        msm.set_confidence_weighted(False)
        log.info("note: the weights' fitted switch price (cost_penalty) is reset to zero: the dynamic phase "
                 "trains the switch without it, and a fit at the end sets a new one")
    arch = make_arch(cfg.arch, **stored)  # what the checkpoint records: rebuilds with no weight file
    build_kwargs = dict(build_arch["kwargs"])  # the weight files too: config.yaml replays the build
    if "target_gmacs" in stored:
        build_kwargs["target_gmacs"] = stored["target_gmacs"]
    return model, arch, build_kwargs


def build_data(cfg: TrainConfig, dataset: Any, device: torch.device) -> TrainData:
    """The loader of this process's share of ``dataset``, each epoch's order a function of (seed, epoch)."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    seeded = SeededSamples(dataset, seed=cfg.seed)
    sampler: ResumableSampler | RepeatFactorSampler
    if cfg.repeat_factor_threshold:
        sampler = RepeatFactorSampler(repeat_factors(dataset, cfg.repeat_factor_threshold),
                                      num_replicas=world, rank=rank, seed=cfg.seed)
    else:
        sampler = ResumableSampler(seeded, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader_gen = torch.Generator().manual_seed(cfg.seed)  # keeps the DataLoader off the global RNG
    loader = DataLoader(
        seeded, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, collate_fn=collate_fn,
        generator=loader_gen, pin_memory=device.type == "cuda", persistent_workers=False,
    )
    iters_per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
    if iters_per_epoch == 0:
        raise ValueError(f"{cfg.train_ann}: no training images")
    return TrainData(seeded=seeded, sampler=sampler, loader=loader, iters_per_epoch=iters_per_epoch)


def build_optimisation(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, *, pretrain_epochs: int,
                       iters_per_epoch: int) -> Optimisation:
    """The optimiser of the parameters that train, its warm-up and step schedule, and AMP's grad scaler."""
    # a frozen detector's parameters stay out of the optimiser: no update, no weight decay, no state
    trained = freeze.freeze_detector(model) if cfg.freeze == "detector" else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = recipe.make_optimizer(params, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay)
    milestones = recipe.milestones(cfg.lr_steps, pretrain_epochs=pretrain_epochs, iters_per_epoch=iters_per_epoch)
    schedule = recipe.WarmupStepSchedule(warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor,
                                         milestones=milestones, gamma=cfg.gamma)
    use_amp = cfg.amp and device.type == "cuda"
    return Optimisation(params=params, optimizer=optimizer,
                        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
                        scaler=torch.amp.GradScaler("cuda", enabled=use_amp), use_amp=use_amp,
                        trained_params=trained)


def restore(run: Run, cfg: TrainConfig, ckpt: dict[str, Any]) -> None:
    """A resumed run's weights, optimiser, schedule, scaler, position, switch and RNG states."""
    run.model.load_state_dict(ckpt["model"])
    saved = ckpt.get("extra", {}).get("config", {}).get("optimizer", "sgd")
    if saved != cfg.optimizer:
        raise ValueError(f"{run.resume_path}: the run was trained with --optimizer {saved}, not {cfg.optimizer}; "
                         "resume with the same optimizer")
    frozen = ckpt.get("extra", {}).get("config", {}).get("freeze", "none")
    if frozen != cfg.freeze:  # the optimiser holds the parameters that trained: the same set must train on
        raise ValueError(f"{run.resume_path}: the run was trained with --freeze {frozen}, not {cfg.freeze}; resume "
                         "with the same --freeze")
    run.optim.optimizer.load_state_dict(ckpt["optimizer"])
    run.optim.scheduler.load_state_dict(ckpt["scheduler"])
    if "scaler" in ckpt:
        run.optim.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
    run.switch.restore(ckpt, finished=run.epoch >= run.total_epochs)
    saved_ipe = ckpt.get("extra", {}).get("iters_per_epoch")
    if saved_ipe is not None and saved_ipe != run.data.iters_per_epoch:
        raise ValueError(
            f"{run.resume_path}: saved with {saved_ipe} iterations per epoch, now {run.data.iters_per_epoch} "
            "(different data, batch size or number of processes); cannot continue exactly"
        )
    set_rng_state(ckpt["rng"])
