"""What the ``dynamask`` command checks before any work, and how it reports errors and exit statuses."""

from __future__ import annotations

import argparse
import math
import os
import signal
from collections.abc import Mapping
from typing import Any

# Files `dynamask infer` writes whole; an earlier run's are removed first so none is mixed with a new run.
INFER_RESULT_FILES = ("results.json", "images.json", "skipped.json")


def unit_interval(text: str) -> float:
    """argparse type: a finite number in [0, 1] (a score or probability threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def remove_old_results(out: str) -> None:
    """Remove what an earlier ``infer`` wrote in ``out`` whole, so a new run's files are never mixed with
    it (overlays are replaced one by one; ``images.json`` names the ones of this run)."""
    for name in INFER_RESULT_FILES:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.remove(path)


def train_exit_status(result: Mapping[str, Any]) -> int:
    """0 for a finished run or one stopped by its own limits; 128 + the signal's number (130 for SIGINT,
    143 for SIGTERM) for one stopped by a signal, so ``dynamask train ... && dynamask eval ...`` stops too."""
    reason = result.get("stop_reason")
    if reason in ("SIGINT", "SIGTERM"):
        return 128 + int(signal.Signals[reason])
    if reason == "signal in another process":
        return 128 + int(signal.SIGTERM)
    return 0


def one_line(exc: BaseException) -> str:
    """An exception's message on one line; a bare ``KeyError('x')`` becomes ``missing key 'x'``."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and not str(exc.args[0]).count(" "):
        return f"missing key {exc.args[0]!r}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(exc).__name__
