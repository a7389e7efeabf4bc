"""`dynamask train`'s flags, generated from :class:`~dynamask.engine.train_config.TrainConfig`'s fields.

Each field is declared once, with :func:`option`: its default, its help, and what its flag needs beyond
what the field's type says (another spelling, a choice list, a parser). :func:`add_train_flags` turns the
fields into argparse options whose ``dest`` is the field's name, and :func:`config_kwargs` turns parsed
arguments back into TrainConfig keyword arguments. Flags that are not settings of a run (``--data``,
``--recipe``, ``--backbone-weights``) stay in :mod:`dynamask.cli`.

The flag of a field ``name`` is ``--name`` with dashes, typed from the annotation: ``int``/``float``/``str``
(``X | None`` defaults to None), ``Literal[...]`` as choices, ``tuple[int, ...]`` as ``nargs="*"``,
``tuple[int, int]`` as ``nargs=2``, and a ``bool`` that defaults to True as ``--no-name``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

# metadata keys of a field: "help", "flag" (argparse keyword arguments and "option", the spelling),
# "group" (an argument group's title), "scale" (the config holds the flag's value times this)
_META = "train_flag"


def option(default: Any = dataclasses.MISSING, help: str | None = None, *, factory: Any = None,
           group: str | None = None, scale: float | None = None, **flag: Any) -> Any:
    """A TrainConfig field and the flag it gets. ``flag``: argparse keyword arguments, and ``option`` for a
    spelling other than ``--field-name``."""
    meta = {_META: {"help": help, "flag": flag, "group": group, "scale": scale}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def json_dict(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"depth\": 18}'")
    return value


def mask_costs(text: str) -> dict[int, float]:
    """An argparse type: ``14=0.23,28=0.52,56=0.85,112=1.29`` -> {14: 0.23, ...}."""
    try:
        costs = {int(k): float(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected RES=GMAC pairs like 14=0.23,28=0.52, got {text!r}") from exc
    bad = [f"{k}={v}" for k, v in costs.items() if k < 1 or not (v >= 0 and v != float("inf"))]
    if bad or not costs:
        raise argparse.ArgumentTypeError(f"resolutions must be >= 1 and costs finite and >= 0, got {text!r}")
    return costs


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _argparse_kwargs(f: dataclasses.Field, tp: Any) -> tuple[str, dict[str, Any]]:
    meta = f.metadata[_META]
    flag = dict(meta["flag"])
    spelled = flag.pop("option", None)
    dashed = f.name.replace("_", "-")
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = None if f.default is dataclasses.MISSING else f.default  # a required field: None until given
    kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
    name = spelled or "--" + dashed
    base = _strip_optional(tp)
    origin = typing.get_origin(base)
    if base is bool and "action" not in flag:
        if default is not True:
            raise TypeError(f"TrainConfig.{f.name}: a bool field needs a flag action unless it defaults to True")
        name = spelled or "--no-" + dashed  # on by default: the flag turns it off
        kw.update(action="store_false", default=True)
    elif origin is typing.Literal:
        kw.update(choices=typing.get_args(base), default=default)
    elif origin is tuple:
        args = typing.get_args(base)
        kw.update(type=args[0], nargs="*" if args[-1] is Ellipsis else len(args),
                  default=None if default is None else list(default))
    elif base in (int, float, str):
        kw.update(type=base, default=default)
    else:
        kw.update(default=default)  # the flag's own "type" (a parser) says how to read it
    kw.update(flag)
    return name, kw


def add_train_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """One option per field of ``config`` (a TrainConfig) declared with :func:`option`."""
    hints = typing.get_type_hints(config)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if _META not in f.metadata:
            continue
        title = f.metadata[_META]["group"]
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        name, kw = _argparse_kwargs(f, hints[f.name])
        target.add_argument(name, **kw)


def config_kwargs(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """TrainConfig keyword arguments from parsed arguments (lists back to tuples, scaled units)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if _META not in f.metadata or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        scale = f.metadata[_META]["scale"]
        if isinstance(value, list):
            value = tuple(value)
        elif scale is not None and value is not None:
            value = scale * value
        out[f.name] = value
    return out
