"""NumPy names that the evaluation packages of the index still call after NumPy removed them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np


def _in1d(a: Any, b: Any, *args: Any, **kwargs: Any) -> np.ndarray:
    return np.isin(a, b, *args, **kwargs).ravel()


# lvis 0.5.3 calls np.float (removed in NumPy 1.24); cityscapesscripts 2.3.0 calls np.in1d (removed in 2.4).
REMOVED = {"float": float, "in1d": _in1d}


@contextlib.contextmanager
def removed_numpy_names(*names: str) -> Iterator[None]:
    """Put back the named NumPy functions (as they behaved) for the duration of the block, where missing."""
    added = [n for n in names if n not in np.__dict__]
    for n in added:
        setattr(np, n, REMOVED[n])
    try:
        yield
    finally:
        for n in added:
            delattr(np, n)
