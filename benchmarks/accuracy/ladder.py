"""The fixed-resolution ladder of any checkpoint of a finished study (e.g. the dynamic-phase row's model, whose
switch the default fit replaces), on the study's validation split:

    python -m benchmarks.accuracy.ladder runs/accuracy coupled-paper-roi-ct0.08

prints ``{"fixed-14": AP, ...}`` (segm AP, 0-100). The study's own fixed rows are those of its base model; this
tells whether a later phase changed the stages themselves.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import torch


def ladder(out: str, name: str, *, progress: bool = False) -> dict[str, float]:
    """Segm AP (0-100) of checkpoint ``OUT/ckpt/NAME.pth`` at every fixed resolution, with the study's model."""
    from benchmarks.accuracy.config import StudyConfig
    from benchmarks.accuracy.evaluate import evaluate_policies
    from benchmarks.accuracy.phases import build_dynamask, datasets, load_state
    from dynamask.models.flops import mask_head_gmacs

    with open(os.path.join(out, "meta.json")) as f:
        saved = json.load(f)["config"]
    cfg = StudyConfig(**{k: v for k, v in saved.items() if k in ("size", "n_train", "n_val", "max_objects", "seed",
                                                                   "arch", "radius_range")})
    _, val = datasets(cfg, out)
    model = build_dynamask(cfg)
    model.load_state_dict(load_state(os.path.join(out, "ckpt", f"{name}.pth"))["model"], strict=True)
    res = evaluate_policies(model, val, costs=mask_head_gmacs(model), switches=None, fixed=True, size_rule=False,
                            oracle=False, progress=progress)
    return {k: round(100 * v["segm"]["AP"], 1) for k, v in res.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.ladder", description=__doc__.split("\n")[0])
    p.add_argument("out", help="a study folder")
    p.add_argument("checkpoint", help="a name in OUT/ckpt/ (without .pth), e.g. coupled-paper-roi-ct0.08")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    path = os.path.join(args.out, "ckpt", f"{args.checkpoint}.pth")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(args.out, "meta.json")):
        p.error(f"no {path} (or no meta.json in {args.out}): give a finished study folder and one of its checkpoints")
    torch.set_num_threads(args.threads)
    print(json.dumps(ladder(args.out, args.checkpoint, progress=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
