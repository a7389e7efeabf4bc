"""What every ``dynamask`` command shares: its one usage error, the checks made before any work, how errors
are put on one line, and how ``--help`` shows each flag. Imports no command module (they import this one).

Two kinds of failure reach :func:`dynamask.cli.main`: a :class:`CliError` is a usage problem (the flags do
not go together: ``dynamask: error: ...``, exit status 2); an ``OSError``/``ValueError`` is bad input (a
file that is missing or wrong: ``dynamask COMMAND: error: ...``, exit status 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from dynamask.data.shapes import split_paths

# Files `dynamask infer` writes whole, from one run: a new run replaces them only once it has succeeded.
INFER_RESULT_FILES = ("results.json", "images.json", "skipped.json")
# What `dynamask eval --out` writes (dynamask.engine.evaluate); `infer` would overwrite its results.json.
EVAL_OUTPUT_FILES = ("metrics.json", "summary.txt")


class CliError(Exception):
    """A usage problem reported as ``dynamask: error: ...`` with exit status 2."""


# --------------------------------------------------------------------------------------------- inputs
def split_files(args: argparse.Namespace, split: str, images: str | None, ann: str | None) -> tuple[str, str]:
    """The images folder and annotation file of ``split``: the flags', given both, else ``--data``'s."""
    if images and ann:
        return images, ann
    if args.data:
        return split_paths(args.data, split)
    raise CliError(f"give --data DIR (a dataset made by `dynamask shapes`) or both --{split}-images and --{split}-ann")


def checkpoint_label_map(ckpt: Mapping[str, Any]) -> dict[int, tuple[Any, ...]]:
    """A checkpoint's label map as a dataset's (int keys, tuple values: the file holds str keys and lists)."""
    return {int(k): tuple(v) for k, v in ckpt["label_map"].items()}


def check_label_map(ckpt: Mapping[str, Any], path: str, label_map: Mapping[int, Any], ann: str, *,
                    error: type[Exception] = CliError) -> None:
    """Refuse data whose categories are not those the checkpoint at ``path`` was trained on (``error``:
    ``eval`` reports it as a usage error, ``fit-switch`` as bad input)."""
    saved = checkpoint_label_map(ckpt)
    if saved != label_map:
        raise error(f"{path} was trained on categories {saved}, but {ann} has {label_map}")


def default_device(device: str | None) -> str:
    """``--device``, or a GPU when present, else cpu."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------- argparse types
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


# --------------------------------------------------------------------------------------------- outputs
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


# --------------------------------------------------------------------------------------------- reporting
def one_line(exc: BaseException) -> str:
    """An exception's message on one line; a bare ``KeyError('x')`` becomes ``missing key 'x'``."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and not str(exc.args[0]).count(" "):
        return f"missing key {exc.args[0]!r}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------- --help
# How ``dynamask COMMAND --help`` shows each flag: its help text and its default. argparse's
# ``ArgumentDefaultsHelpFormatter`` appends ``(default: X)`` to every help text; HelpFormatter does it in the
# words a reader needs: a flag's help that already says its default is left as it is (``None`` often means
# "the model's own", which only the text can say), a switch (a flag that takes no value) is off unless given
# and shows nothing more, ``None`` reads "none" and a list reads as it is typed (``8 11``).
def shown(value: Any) -> str:
    """A default as a user would type it."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every value-taking flag's default (see the comment above :func:`shown`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or not takes_value(action) or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        # the help text is %-formatted by argparse: a literal % in a default must be doubled
        return f"{text} (default: {shown(action.default).replace('%', '%%')})"
