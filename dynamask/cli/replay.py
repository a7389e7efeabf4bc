"""``dynamask train --config runs/x/config.yaml [flags]``: replay a run's settings, the flags given on the
command line overriding the file's (:mod:`dynamask.engine.run_config` writes and reads the file).

A flag counts as given when it is on the command line, whatever its value (``--lr 0.02`` overrides a file
holding 0.01, even though 0.02 is the default). The data paths go together: ``--data`` or any of
``--train-images``/``--train-ann``/``--val-images``/``--val-ann`` on the command line replaces all four of
the file's. ``--resume`` is never taken from the file: a replay is a new run.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

DATA_PATHS = ("train_images", "train_ann", "val_images", "val_ann")
_NOT_GIVEN = object()


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The ``dest`` of every train flag on the command line ``argv`` (parsed again with a marker as every
    default: whatever is not the marker afterwards was given). ``parser``: a fresh ``dynamask`` parser."""
    train = _subparser(parser, "train")
    dests = {a.dest for a in train._actions if a.dest not in ("help", "debug") and a.default is not argparse.SUPPRESS}
    train.set_defaults(**dict.fromkeys(dests, _NOT_GIVEN))
    parsed = parser.parse_args(argv)
    return {d for d in dests if getattr(parsed, d, _NOT_GIVEN) is not _NOT_GIVEN}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def replay(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``args`` with the file's settings for the flags not given, and those settings as TrainConfig values
    (exact: the caller puts them into the TrainConfig as they are, units and all)."""
    from dynamask.engine.run_config import read_run_config, replayed_values
    from dynamask.engine.train import TrainConfig

    data = read_run_config(args.config, TrainConfig)
    given = given_flags(parser, list(getattr(args, "argv", [])))
    values = replayed_values(data)
    if given & {"data", *DATA_PATHS}:  # data named on the command line: the file's paths give way, all four
        values = {k: v for k, v in values.items() if k not in DATA_PATHS}
    elif data.get("data") is not None:
        args.data = data["data"]  # a record of where the paths came from (they are resolved in the file)
    values = {k: v for k, v in values.items() if k not in given}
    scales = {f.name: f.metadata.get("train_flag", {}).get("scale") for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        scale = scales.get(key)  # the namespace holds flag units (minutes for time_limit)
        setattr(args, key, value / scale if scale and value is not None else value)
    return args, values
