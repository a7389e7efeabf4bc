"""Process-group helpers for DistributedDataParallel under ``torchrun`` (nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(device_type: str) -> bool:
    """Initialise the default process group from torchrun's variables when WORLD_SIZE > 1.

    Returns True when this call created the group (so the caller destroys it). A group that already exists
    (e.g. set up by a test's spawn) is used as is.
    """
    if is_distributed():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Elementwise max of a few flags/numbers over all processes."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of named scalars over all processes (every process must pass the same names)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float32, device=device)
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))


def gather_lists(items: list[Any]) -> list[Any] | None:
    """Concatenation, in rank order, of every process's list (picklable items) on rank 0; None elsewhere.

    One collective per process, whatever the lengths: the evaluation shards may be uneven.
    """
    if not is_distributed() or world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part] if is_main() else None


def _as_param_layout(shape: tuple[int, ...], stride: tuple[int, ...], grad: torch.Tensor) -> torch.Tensor:
    if grad.stride() == stride or grad.layout != torch.strided:
        return grad
    return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def match_grad_layouts(model: torch.nn.Module) -> list[Any]:
    """Makes every gradient arrive with its parameter's exact strides; returns the hook handles.

    DDP copies each gradient into a bucket view that has the parameter's strides, and warns ("Grad strides
    do not match bucket view strides") when they differ, as they do for a 1×1 conv fed channels-last
    input: its weight ``[O, I, 1, 1]`` gets a channels-last gradient, strides (I, 1, I, I) against
    (I, 1, 1, 1). Autograd accepts that gradient as is (strides of size-1 dimensions do not count in its
    layout contract), and DDP then takes a slow strided copy each step. Only parameters with a size-1
    dimension can differ this way (any other mismatch autograd itself copies into the parameter's
    layout), so only those get a hook, which rewrites a mismatched gradient (tiny: a 1×1 conv's weight).
    """
    return [p.register_hook(functools.partial(_as_param_layout, tuple(p.shape), p.stride()))
            for p in model.parameters() if p.requires_grad and 1 in p.shape]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (e.g. BatchNorm running statistics) to every process: DDP broadcasts them at the
    start of each training forward, so after the last one each process holds its own update."""
    if is_distributed() and world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def all_gather_rows(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every process's ``[n_p, ...]`` tensor (same trailing shape and dtype everywhere, ``n_p`` may differ,
    0 included) concatenated in rank order, on every process, on the CPU.

    Two collectives whatever the sizes: the row counts, then the rows padded to the largest count (on
    ``device``: nccl gathers CUDA tensors only).
    """
    if not is_distributed() or world_size() == 1:
        return t.cpu()
    counts = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(world_size())]
    dist.all_gather(all_counts, counts)
    sizes = [int(c.item()) for c in all_counts]
    if max(sizes) == 0:
        return t.cpu()
    padded = t.new_zeros((max(sizes), *t.shape[1:]), device=device)
    padded[: t.shape[0]] = t.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n].cpu() for p, n in zip(parts, sizes)])


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers of ``module`` to every process (in place)."""
    if is_distributed() and world_size() > 1:
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)
