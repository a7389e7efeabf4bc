"""``dynamask strip CKPT OUT``: a weights-only copy of a checkpoint, for inference and sharing.

    dynamask strip runs/x/last.pth runs/x/model.pth

The copy keeps what ``Predictor``, ``eval``, ``infer`` and ``fit-switch`` read (the architecture, the label
map, the weights, a fitted run's switch-fit report and the dynamic phase's switch) and the run's epoch,
iteration and settings as a record; it drops the optimiser, scheduler, grad scaler and RNG states, which only
``--resume`` needs (SGD's momentum alone is as large as the weights). It cannot be resumed.
"""

from __future__ import annotations

import argparse
import os

from dynamask.cli.common import same_file


def add_parser(sub) -> None:
    p = sub.add_parser("strip", help="write a weights-only copy of a checkpoint (no optimizer, scheduler or RNG "
                                     "state): for Predictor, eval, infer and fit-switch, not --resume")
    p.add_argument("checkpoint", help="a dynamask checkpoint, e.g. runs/x/last.pth")
    p.add_argument("out", help="the weights-only checkpoint to write (not the input's path)")
    p.set_defaults(func=run)


def size_text(nbytes: int) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as ``ls -h --si`` and file managers show them)."""
    if nbytes < 1000:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} TB"


def run(args: argparse.Namespace) -> int:
    from dynamask.checks import check_output_file
    from dynamask.engine.checkpoint import TRAINING_ONLY_KEYS, load_checkpoint, strip_training_state, write_checkpoint

    if same_file(args.out, args.checkpoint):  # through links too: the input holds a run's resumable state
        raise ValueError(f"OUT {args.out} is the input checkpoint {args.checkpoint}: write the stripped copy beside it")
    check_output_file(args.out)
    ckpt = load_checkpoint(args.checkpoint)  # weights_only=True, and checked (NaN weights refused)
    dropped = [k for k in TRAINING_ONLY_KEYS if k in ckpt]
    write_checkpoint(strip_training_state(ckpt, source=args.checkpoint), args.out)
    before, after = os.path.getsize(args.checkpoint), os.path.getsize(args.out)
    what = f"dropped {', '.join(dropped)}" if dropped else "it held no training state"
    print(f"wrote {args.out}: {size_text(after)} (from {size_text(before)}, {args.checkpoint}; {what})")
    return 0
