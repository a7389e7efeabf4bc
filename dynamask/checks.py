"""Up-front checks of what a user passes (keyword arguments, numbers, devices, output folders), each raising
an error that names the argument at fault, so that bad input fails before any work is done."""

from __future__ import annotations

import difflib
import inspect
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch


class UnknownArgumentError(TypeError, ValueError):
    """An unknown keyword argument: a ``TypeError``, as Python raises for one, and a ``ValueError``, so that
    command-line tools report it as bad input."""


def check_kwargs(kwargs: Mapping[str, Any], valid: Iterable[str], *, where: str) -> None:
    """Refuse keyword arguments outside ``valid``, naming the closest valid one (a typo such as ``min_szie``
    would otherwise be dropped silently, and the default used)."""
    valid = sorted(set(valid))
    unknown = [k for k in kwargs if k not in valid]
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    noun = "argument" if len(unknown) == 1 else "arguments"
    raise UnknownArgumentError(f"{where}() got unexpected keyword {noun} {', '.join(parts)}")


def parameter_names(fn: Callable[..., Any]) -> set[str] | None:
    """The keyword names ``fn`` accepts, or None when it takes ``**kwargs`` (then it checks them itself)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """``value`` is a finite number (an integer if asked) within the bounds; else a ValueError naming it."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    want = "an integer" if integer else "a finite number"
    if lo and hi:
        want += f" in {lo}, {hi}"
    elif lo:
        want += (" > " if low_open else " >= ") + f"{low:g}"
    elif hi:
        want += (" < " if high_open else " <= ") + f"{high:g}"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value) and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


def check_device(device: str | torch.device | None, *, name: str = "--device") -> torch.device | None:
    """The device ``device`` names, checked to exist here (None stays None: the caller's default)."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device!r}: no CUDA GPU is available here (torch.cuda.is_available() is "
                             "False); use cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{name} {device!r}: MPS is not available here; use cpu")
    elif d.type != "cpu":
        raise ValueError(f"{name} {device!r}: dynamask runs on cpu, cuda or mps, not {d.type}")
    return d


def check_output_dir(path: str, *, name: str = "--out") -> None:
    """Create ``path`` if needed and prove it writable (a file made and removed), so that a run fails now
    rather than at its first save, after the work before it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path}: exists and is not a folder")
    try:
        _probe_writable(path)
    except OSError as exc:
        raise ValueError(f"{name} {path}: cannot write there ({exc.strerror or exc})") from exc


def _probe_writable(folder: str) -> None:
    """Create ``folder`` if needed and make and remove a file there (an OSError says why it cannot)."""
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    os.close(fd)
    os.remove(probe)


def check_output_file(path: str, *, name: str = "--out") -> None:
    """``path`` can be written as a file: not a folder, its folder created if needed and proved writable (a
    file made and removed there), so that a run fails now rather than at its save, after the work before it."""
    if os.path.isdir(path):
        raise ValueError(f"{name} {path}: is a folder; give the file to write (e.g. {os.path.join(path, 'x')})")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        _probe_writable(folder)
    except OSError as exc:
        blocker = _first_file_above(folder)
        if blocker != folder or os.path.isfile(folder):  # makedirs met a file where a folder must be
            raise ValueError(f"{name} {path}: {blocker} is a file, not a folder") from None
        raise ValueError(f"{name} {path}: cannot write there ({exc.strerror or exc})") from exc


def _first_file_above(folder: str) -> str:
    """The nearest existing path at or above ``folder`` when it is a file (what blocks the folder), else
    ``folder``."""
    path = folder
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path if os.path.exists(path) and not os.path.isdir(path) else folder


def torch_load_detail(exc: BaseException) -> str:
    """What went wrong in ``torch.load(..., weights_only=True)``, on one line, without torch's hint that
    ``weights_only=False`` "will likely succeed": for a file of unknown origin that advice runs whatever
    code the file holds."""
    lines = []
    for line in str(exc).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and "weights_only" not in line and not line.startswith(("Please file", "Check the documentation")):
            lines.append(line)
    return lines[0] if lines else type(exc).__name__


def first_non_finite(state: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor of a state dict holding NaN or infinity, or None."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta":
            if not bool(torch.isfinite(value).all()):
                return str(key)
    return None


def model_num_classes(model: torch.nn.Module) -> int | None:
    """The classes a detector's box predictor scores, the background included (torchvision's
    ``num_classes``); None for a model without torchvision's ``roi_heads.box_predictor.cls_score``."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    cls_score = getattr(predictor, "cls_score", None)
    return int(cls_score.out_features) if isinstance(cls_score, torch.nn.Linear) else None


def fixed_mask_resolution(model: torch.nn.Module) -> int | None:
    """The side of the masks a torchvision-style Mask R-CNN predicts, read from its layers: its mask RoI
    pool's output size times the upsampling of its mask predictor's transposed convs (14 × 2 = 28).

    None for a model that reports each mask's resolution itself (DynaMask's ``mask_resolution``) or has
    no mask branch. Evaluation and the predictor report every mask of a fixed-resolution model at this size.
    """
    heads = getattr(model, "roi_heads", None)
    if heads is None or hasattr(getattr(heads, "mask_head", None), "resolutions"):
        return None
    pool = getattr(heads, "mask_roi_pool", None)
    predictor = getattr(heads, "mask_predictor", None)
    if pool is None or predictor is None:
        return None
    size = pool.output_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    for m in predictor.modules():
        if isinstance(m, torch.nn.ConvTranspose2d):
            side *= int(m.stride[0])
    return side


def model_resolutions(model: torch.nn.Module) -> list[int] | None:
    """The mask resolutions a model reports (DynaMask's 14/28/56/112, a fixed-resolution model's one)."""
    head = getattr(getattr(model, "roi_heads", None), "mask_head", None)
    if head is not None and hasattr(head, "resolutions"):
        return [int(r) for r in head.resolutions]
    fixed = fixed_mask_resolution(model)
    return None if fixed is None else [fixed]


def check_mask_costs(costs: Mapping[int, float] | None, model: torch.nn.Module, *,
                     flag: str = "--mask-costs") -> None:
    """Every resolution the model can report has a finite, non-negative cost (else the report fails at the
    end of the evaluation, after running the whole dataset)."""
    if costs is None:
        return
    bad = {r: c for r, c in costs.items() if not (math.isfinite(c) and c >= 0)}
    if bad:
        raise ValueError(f"{flag}: costs must be finite and >= 0, got {bad}")
    wanted = model_resolutions(model)
    missing = [r for r in wanted or [] if r not in costs]
    if missing:
        raise ValueError(f"{flag}: no cost for resolution(s) {missing}; this model segments at {wanted}")
