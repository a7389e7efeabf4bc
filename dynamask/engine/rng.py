"""The process's random states (torch's CPU and current CUDA generators, Python's, numpy's) as plain values.

A training checkpoint keeps them under ``rng`` (:mod:`dynamask.engine.checkpoint`) so that a resumed run
draws what one that never stopped would; the switch fit at the end of a run (:mod:`dynamask.engine.switch_life`)
saves and puts them back around its own draws. Kept apart from the checkpoint module so that both can use
them without importing each other.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The random states of torch (CPU and the current CUDA device), Python and numpy, as plain values."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the legacy form, as the global MT19937 state always is
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Puts back what :func:`rng_state` returned (a checkpoint's lists of the Python state read as tuples)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    """Seeds torch, Python and numpy alike (a new run's model initialisation)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _to_tuple(v: Any) -> Any:
    return tuple(_to_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v
