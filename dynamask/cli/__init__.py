"""The ``dynamask`` command: ``shapes``, ``convert``, ``train``, ``eval``, ``infer``, ``fit-switch``, ``strip``.

    dynamask shapes --out data/shapes --train 2000 --val 200 --size 192 --seed 0
    dynamask convert cityscapes data/cityscapes --split val --out data/cityscapes/instances_val.json
    dynamask train --data data/shapes --out runs/x --arch dynamask_resnet_fpn --arch-kwargs '{"depth": 18}'
    dynamask train --config runs/x/config.yaml --out runs/y      (replays run x's settings into runs/y)
    torchrun --nproc-per-node 2 -m dynamask train ...        (DDP: one process per GPU, or gloo on CPU)
    dynamask eval runs/x/last.pth --data data/shapes --out runs/x/eval
    dynamask infer runs/x/last.pth photos/ extra.jpg --out runs/x/infer     (or: infer IMAGES --weights CKPT)
    dynamask fit-switch runs/x/last.pth --data data/shapes --out runs/x/fitted.pth --budget-at 28
    dynamask strip runs/x/last.pth runs/x/model.pth                  (weights only, for inference)

Each command is a module of this package with ``add_parser(sub)`` and ``run(args)``; what they share is in
:mod:`dynamask.cli.common`. This module only assembles the parser and reports what a command raised.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dynamask._version import __version__
from dynamask.cli import convert, fit_switch, infer, shapes, strip, train
from dynamask.cli import eval as evaluate  # (`eval` would hide the builtin here)
from dynamask.cli.common import CliError, HelpFormatter, one_line

# the commands, in the order `dynamask --help` lists them
COMMANDS = (shapes, convert, train, evaluate, infer, fit_switch, strip)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamask", description="DynaMask instance segmentation",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"dynamask {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    for command in sub.choices.values():  # also accepted after the command; SUPPRESS keeps the top-level one
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of internal errors")
        command.formatter_class = HelpFormatter  # every flag's help shows its default
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given (train's --config tells the flags given from the file's)
    args.build_parser = build_parser  # for train's --config, which parses argv again: commands cannot import it
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        parser.error(str(exc))  # exits with status 2
    except (OSError, ValueError, KeyError, FloatingPointError) as exc:  # bad input: its message names it
        if args.debug:
            raise
        print(f"dynamask {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not bad input: one line, the traceback under --debug
        if args.debug:
            raise
        print(f"dynamask {args.command}: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0
