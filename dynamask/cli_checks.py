"""What the ``dynamask`` command checks before any work, and how it reports errors and exit statuses."""

from __future__ import annotations

import argparse
import math
import os
import signal
from collections.abc import Mapping
from typing import Any

# Files `dynamask infer` writes whole, from one run: a new run replaces them only once it has succeeded.
INFER_RESULT_FILES = ("results.json", "images.json", "skipped.json")
# What `dynamask eval --out` writes (dynamask.engine.evaluate); `infer` would overwrite its results.json.
EVAL_OUTPUT_FILES = ("metrics.json", "summary.txt")


def unit_interval(text: str) -> float:
    """argparse type: a finite number in [0, 1] (a score or probability threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def _int_at_least(text: str, low: int, says: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {says}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "at least 1")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a budget, a cost)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed, a count that may be 0)."""
    return _int_at_least(text, 0, ">= 0")


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: through symbolic links (realpath) and hard links (samefile)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_infer_out(out: str) -> None:
    """Refuse an ``--out`` folder holding ``dynamask eval``'s outputs: infer's results.json would replace
    eval's, leaving its metrics.json without the results they were computed from."""
    found = [name for name in EVAL_OUTPUT_FILES if os.path.isfile(os.path.join(out, name))]
    if found:
        raise ValueError(f"--out {out} holds the outputs of `dynamask eval` ({', '.join(found)}); infer would "
                         "replace its results.json: choose another folder")


def check_eval_out(out: str) -> None:
    """Refuse an ``--out`` folder holding ``dynamask infer``'s outputs: eval's results.json would replace
    infer's, leaving its images.json naming results that are gone."""
    found = [name for name in ("images.json", "skipped.json") if os.path.isfile(os.path.join(out, name))]
    if found:
        raise ValueError(f"--out {out} holds the outputs of `dynamask infer` ({', '.join(found)}); eval would "
                         "replace its results.json: choose another folder")


def publish(stage: str, out: str, written: list[str], *, stale: tuple[str, ...] = ()) -> None:
    """Move the files a run wrote in ``stage`` (names relative to it) into ``out``, then remove the files
    named in ``stale`` that this run did not write (an earlier run's, which would be mixed with it). The
    results files go last, so that until then the earlier run's are whole."""
    last = [n for n in written if n in INFER_RESULT_FILES]
    for name in [n for n in written if n not in last] + last:
        os.replace(os.path.join(stage, name), os.path.join(out, name))
    for name in stale:
        if name not in written and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


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
