"""``config.yaml``: the fully resolved settings of a training run, written beside its checkpoint.

The file is YAML (PyYAML, ``safe_dump`` / ``safe_load``: plain values only) so that a person can read and
edit it. Its ``train:`` mapping holds every :class:`~dynamask.engine.train_config.TrainConfig` field as the run used
it (after ``--data``, ``--recipe`` and ``--backbone-weights`` were resolved into fields), which is what
``dynamask train --config FILE`` replays; the other keys record where those values came from and what they
resolved to (the builder's arguments, the recipe's values, the dynamask version, the command line)::

    dynamask_version: 0.1.0
    command: [train, --data, data/shapes, --out, runs/x, ...]
    data: data/shapes
    recipe: null
    train: {train_images: ..., out_dir: runs/x, arch: dynamask_resnet_fpn, arch_kwargs: {...}, lr: 0.02, ...}
    resolved: {arch: dynamask_resnet_fpn, arch_kwargs: {num_classes: 8, target_gmacs: 0.0123, ...}}
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from dynamask._version import __version__
from dynamask.atomic import write_text_atomic

CONFIG_FILE = "config.yaml"
# TrainConfig fields that a replay does not take from the file: a replay is a new run (give --resume to
# continue one), so a resumed run's "resume: auto" would otherwise look for a checkpoint in the new folder.
NOT_REPLAYED = ("resume",)

_HEADER = """\
# dynamask train: the settings of this run, fully resolved. Replay it with
#   dynamask train --config {path} [--out OTHER_FOLDER] [any flag, which overrides this file]
# `train:` holds every setting (dynamask train's flags, in their TrainConfig units: time_limit in seconds)
# and is what a replay reads; the other keys record where they came from and what they resolved to.
"""


def plain(value: Any) -> Any:
    """``value`` as YAML's plain types: tuples as lists, mapping keys kept (ints stay ints)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def run_settings(cfg: Any, *, arch: str, arch_kwargs: dict[str, Any],
                 provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``config.yaml`` holds. ``cfg``: the run's TrainConfig; ``arch_kwargs``: the builder arguments
    the model was built with (``num_classes``, the method's defaults and weight files included);
    ``provenance``: what the command line resolved into ``cfg`` (``data``, ``recipe``, ``command``...)."""
    settings: dict[str, Any] = {"dynamask_version": __version__}
    settings.update(plain(provenance or {}))
    settings["train"] = plain(dataclasses.asdict(cfg))
    settings["resolved"] = {"arch": arch, "arch_kwargs": plain(arch_kwargs)}
    return settings


def write_run_config(path: str, settings: dict[str, Any]) -> str:
    """Writes ``settings`` to ``path`` atomically (a failure leaves an earlier file whole)."""
    text = _HEADER.format(path=path) + yaml.safe_dump(settings, sort_keys=False, default_flow_style=None,
                                                      allow_unicode=True, width=118)
    return write_text_atomic(path, text)


def read_run_config(path: str, config: type) -> dict[str, Any]:
    """The whole file, checked: a readable YAML mapping whose ``train:`` mapping names only fields of
    ``config`` (a TrainConfig). Raises a ValueError naming the file and the problem."""
    if os.path.isdir(path):
        inside = os.path.join(path, CONFIG_FILE)
        hint = f" (did you mean {inside}?)" if os.path.isfile(inside) else ""
        raise ValueError(f"--config {path}: is a folder, not a config file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config {path}: not readable YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise ValueError(f"--config {path}: not a dynamask run config (needs a `train:` mapping of settings, as "
                         f"dynamask train writes to OUT/{CONFIG_FILE})")
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(str(k) for k in data["train"] if k not in fields)
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) under train: {', '.join(unknown)} (written by "
                         f"dynamask {data.get('dynamask_version', '?')}; this is {__version__})")
    return data


def replayed_values(data: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig values a replay takes from the file (:data:`NOT_REPLAYED` left out); a list is a
    tuple field's value (as :func:`~dynamask.engine.train_flags.config_kwargs` reads a flag's list)."""
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in data["train"].items() if key not in NOT_REPLAYED}
