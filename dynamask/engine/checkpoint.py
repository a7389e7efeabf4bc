"""Checkpoints (docs/method.md §2): one ``torch.save``d dict of plain types and tensors, written atomically.

Keys: ``format_version``, ``arch`` (``{"name": builder name, "kwargs": {...}}``), ``label_map`` (contiguous
label -> (COCO category id, name)), ``model`` (state dict), and for training runs ``optimizer``,
``scheduler``, ``scaler``, ``epoch`` (the epoch in progress, = epochs completed at an epoch boundary),
``iteration`` (optimiser steps completed), ``rng`` (:mod:`~dynamask.engine.rng`); a run whose switch was
fitted also keeps the fit's keys (:mod:`~dynamask.engine.switch_life`, their only reader and writer). Loaded
with ``weights_only=True``, so a file can rebuild the model with no code but the builder it names.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import torch

from dynamask.atomic import write_atomic
from dynamask.checks import check_kwargs, first_non_finite, model_num_classes, parameter_names, torch_load_detail
from dynamask.engine import switch_life

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "arch", "label_map", "model")
# What a training run saves and `--resume` needs; `dynamask fit-switch` writes checkpoints without them.
RESUME_KEYS = ("optimizer", "scheduler", "epoch", "iteration", "rng")

# Builder name -> builder function. A plain dict; the model builders are added from dynamask.models on first
# use (the engine depends on the model, never the other way round).
BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {}
_MODEL_BUILDER_NAMES = ("dynamask_resnet50_fpn", "dynamask_resnet_fpn")


def builders() -> dict[str, Callable[..., torch.nn.Module]]:
    """The builder registry, filled on first call: DynaMask's builders (when ``dynamask.models`` exists) and
    torchvision's Mask R-CNN (``maskrcnn_resnet_fpn``, the peer)."""
    if not BUILDERS:
        from dynamask.models.maskrcnn import maskrcnn_resnet_fpn

        BUILDERS["maskrcnn_resnet_fpn"] = maskrcnn_resnet_fpn
        models: types.ModuleType | None
        try:
            import dynamask.models

            models = dynamask.models
        except ModuleNotFoundError as exc:
            if exc.name not in ("dynamask.models",):
                raise
            models = None
        for name in _MODEL_BUILDER_NAMES:
            if models is not None and hasattr(models, name):
                BUILDERS[name] = getattr(models, name)
    return BUILDERS


PRE_STAGE_LEVEL_ARCHS = ("dynamask_resnet_fpn", "dynamask_resnet50_fpn")


def build_model(arch: dict[str, Any]) -> torch.nn.Module:
    """Build the model an ``arch`` dict (``{"name", "kwargs"}``) describes."""
    name = arch.get("name")
    table = builders()
    if name not in table:
        raise KeyError(
            f"unknown architecture {name!r}; known builders: {sorted(table)}"
            + ("" if "dynamask_resnet_fpn" in table else " (dynamask.models is not available in this install)")
        )
    kwargs = dict(arch.get("kwargs", {}))
    if name in PRE_STAGE_LEVEL_ARCHS and "stage_levels" not in kwargs:
        # a DynaMask checkpoint saved before the stage levels followed the image size (every new one records
        # them): its stages fused the paper's P4, P3, P2 whatever the images
        kwargs["stage_levels"] = [2, 1, 0]
    valid = parameter_names(table[name])  # None: the builder takes **kwargs and checks them itself
    if valid is not None:
        check_kwargs(kwargs, valid, where=name)
    return table[name](**kwargs)


def make_arch(name: str, **kwargs: Any) -> dict[str, Any]:
    """``{"name": name, "kwargs": kwargs}``, checking that the arguments are plain values a checkpoint holds."""
    _check_plain(kwargs, f"arguments of {name}")
    return {"name": name, "kwargs": dict(kwargs)}


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, where)
        return
    raise TypeError(f"{where}: {value!r} ({type(value).__name__}) is not a plain value a checkpoint can store")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    ):
        model = model.module
    return model


def save_checkpoint(
    path: str,
    *,
    arch: dict[str, Any],
    label_map: dict[int, tuple[int, str]],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    epoch: int | None = None,
    iteration: int | None = None,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    states: dict[str, dict[str, torch.Tensor]] | None = None,
) -> str:
    """Write a checkpoint atomically (a temporary file in the same folder, then ``os.replace``), with the
    permissions the umask gives an ordinary file.

    ``extra``: plain values (a run's settings, reports). ``states``: named state dicts kept beside the
    model's (e.g. the switch the dynamic phase trained, :mod:`dynamask.engine.switch_life`)."""
    _check_plain(arch, "arch")
    ckpt: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "label_map": {int(k): (int(v[0]), str(v[1])) for k, v in label_map.items()},
        "model": unwrap(model).state_dict(),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if epoch is not None:
        ckpt["epoch"] = int(epoch)
    if iteration is not None:
        ckpt["iteration"] = int(iteration)
    if rng is not None:
        ckpt["rng"] = rng
    if extra:
        _check_plain(extra, "extra")
        ckpt["extra"] = extra
    if states:
        ckpt["states"] = {str(name): {str(k): v.detach().cpu() for k, v in sd.items()} for name, sd in states.items()}
    return write_checkpoint(ckpt, path)


def write_checkpoint(ckpt: dict[str, Any], path: str) -> str:
    """``torch.save`` a checkpoint dict to ``path`` atomically (:mod:`dynamask.atomic`: a failure leaves
    the earlier file whole), with the permissions the umask gives an ordinary file (0644 under umask 022)."""
    return write_atomic(path, lambda f: torch.save(ckpt, f), suffix=".pth")


# What a weights-only checkpoint (``dynamask strip``) keeps: what Predictor, eval, infer and fit-switch read
# (architecture, label map, weights, the switch fit's report and the dynamic phase's switch among the states),
# the run's position and settings as a record; the optimiser, scheduler, grad scaler and RNG states only
# serve ``--resume`` and are most of a training checkpoint's size.
TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "scaler", "rng")


STRIPPED_KEY = "stripped_from"  # in a stripped checkpoint's ``extra``: the file it was stripped from


def strip_training_state(ckpt: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """``ckpt`` without :data:`TRAINING_ONLY_KEYS`; ``source`` (the file it came from) is recorded."""
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_ONLY_KEYS}
    if source is not None:
        out["extra"] = {**out.get("extra", {}), STRIPPED_KEY: os.path.abspath(source)}
    return out


def load_checkpoint(path: str, *, map_location: str | torch.device = "cpu", arch_name: str | None = None,
                    resume: bool = False) -> dict:
    """Load and check a checkpoint (``weights_only=True``); weights holding NaN or infinity are refused.

    ``arch_name``: when given, a checkpoint of another architecture is refused with a clear error.
    ``resume``: the checkpoint must hold a training run's state (:data:`RESUME_KEYS`), not only weights.
    """
    if os.path.isdir(path):
        inside = os.path.join(path, "last.pth")
        hint = f" (did you mean {inside}?)" if os.path.isfile(inside) else ""
        raise ValueError(f"{path}: is a folder, not a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable dynamask checkpoint ({_load_error(exc)})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        keys = sorted(ckpt, key=str) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a dynamask checkpoint (needs keys {list(REQUIRED_KEYS)}, has {keys})")
    version = ckpt["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{path}: format_version must be an integer, got {version!r}")
    if not isinstance(ckpt["arch"], dict) or not isinstance(ckpt["label_map"], dict):
        raise ValueError(f"{path}: 'arch' and 'label_map' must be dicts, got {type(ckpt['arch']).__name__} "
                         f"and {type(ckpt['label_map']).__name__}")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {ckpt['format_version']} is newer than this dynamask reads ({FORMAT_VERSION})"
        )
    if arch_name is not None and ckpt["arch"].get("name") != arch_name:
        raise ValueError(f"{path}: checkpoint is of architecture {ckpt['arch'].get('name')!r}, not {arch_name!r}")
    if not isinstance(ckpt["model"], dict):
        raise ValueError(f"{path}: 'model' must be a state dict, got {type(ckpt['model']).__name__}")
    # NaN weights give no detection at all, silently: never run (or train on) them
    bad = first_non_finite(ckpt["model"])
    if bad is not None:
        raise ValueError(f"{path}: weights hold NaN or infinite values (parameter {bad!r}); this checkpoint "
                         "cannot be used")
    if resume:
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            extra = ckpt.get("extra")
            extra = extra if isinstance(extra, dict) else {}
            made_by = (" (written by `dynamask strip`)" if STRIPPED_KEY in extra else
                       " (written by `dynamask fit-switch`)" if switch_life.is_fitted(ckpt) else "")
            raise ValueError(f"{path}: an inference-only checkpoint{made_by} cannot be resumed: it has no "
                             f"{', '.join(missing)}; resume from the training run's own last.pth")
    return ckpt


def _load_error(exc: Exception) -> str:
    """What went wrong in ``torch.load``, without torch's advice to load unsafely (see torch_load_detail)."""
    return f"{torch_load_detail(exc)}; only tensors and plain values are read from a checkpoint"


def model_from_checkpoint(
    path: str, *, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights; returns ``(model, checkpoint)``.

    The label map must name every label the model can predict (checked before building, so a corrupt
    ``num_classes`` is named rather than allocated)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    labels = len(ckpt["label_map"])
    num_classes = ckpt["arch"].get("kwargs", {}).get("num_classes")
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"{path}: arch argument num_classes must be an integer >= 2, got {num_classes!r}")
        _check_label_map(path, num_classes, labels)
    try:
        model = build_model(ckpt["arch"])
    except (RuntimeError, MemoryError, OverflowError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"{path}: cannot build architecture {ckpt['arch'].get('name')!r} with arguments "
                         f"{ckpt['arch'].get('kwargs', {})}: {detail[:300]}") from exc
    built = model_num_classes(model)
    if built is not None:
        _check_label_map(path, built, labels)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit architecture {ckpt['arch']}: {exc}") from exc
    return model, ckpt


def _check_label_map(path: str, num_classes: int, labels: int) -> None:
    # a label the map lacks would fail only when the model first predicts it, mid-run
    if labels < num_classes - 1:
        raise ValueError(f"{path}: the model has num_classes {num_classes} (labels 1..{num_classes - 1}) but its "
                         f"label_map names only {labels} labels")
