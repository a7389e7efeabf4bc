"""Training-step speed: DynaMask against torchvision's Mask R-CNN on the same backbone, images and recipe.

    python benchmarks/train_speed.py                       # the demo model and R50-FPN, 2 threads
    python benchmarks/train_speed.py --models demo --iters 8 --out benchmarks/results/train_speed_cpu.md

Two pairs of models, each pair on the same synthetic shapes images (``dynamask.data.shapes``) with the same
RPN and box-head settings:

- ``demo``: the demo's DynaMask (``scripts/demo.py``'s ``ARCH_KWARGS``: ResNet-18-FPN at 128 px, narrow
  widths) against torchvision's Mask R-CNN with the same backbone, FPN and box-head widths and its own mask
  head (four 3×3 convs at the FPN width, deconv, class-specific 28² predictor);
- ``r50``: the default DynaMask ResNet-50-FPN against torchvision's default Mask R-CNN ResNet-50-FPN, at
  ``--size`` px (512 by default: a CPU step at 800 px takes minutes).

One training step (forward with losses, backward, SGD step) per timed call, the two models of a pair in turn
(A, B, A, B: the machine's drift hits both); medians of ``--iters`` after one warm-up step; seconds per image
and the ratio DynaMask ÷ torchvision. DynaMask trains every resolution of every sampled RoI (the pretrain
phase; the dynamic phase adds the switch on detached features). Randomly initialised weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from _timing import device_name, markdown_table, publish  # noqa: E402

from dynamask.data import CocoDetection, collate_fn  # noqa: E402
from dynamask.data.shapes import generate, split_paths  # noqa: E402
from dynamask.models import dynamask_resnet_fpn  # noqa: E402
from dynamask.models.maskrcnn import maskrcnn_resnet_fpn  # noqa: E402

# Settings both models of a pair share (torchvision's MaskRCNN arguments, which the DynaMask builder takes too).
SHARED = ("depth", "num_classes", "min_size", "max_size", "rpn_batch_size_per_image", "box_batch_size_per_image",
          "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
          "rpn_post_nms_top_n_test", "box_detections_per_img", "fpn_channels", "box_representation_size")


def model_pair(name: str, size: int) -> tuple[dict, dict, int, int]:
    """(DynaMask kwargs, torchvision kwargs, image size, images per step) for a pair."""
    if name == "demo":
        from demo import ARCH_KWARGS, BATCH, SIZE

        ours = dict(ARCH_KWARGS)
        peer = {k: v for k, v in ours.items() if k in SHARED}
        peer["mask_head_layers"] = (ours["fpn_channels"],) * 4
        return ours, peer, SIZE, BATCH
    if name == "r50":
        common = dict(depth=50, num_classes=8, min_size=size, max_size=size)
        return dict(common), dict(common), size, 2
    raise ValueError(f"unknown model pair {name!r} (demo or r50)")


def step_fn(model: torch.nn.Module, loader) -> Callable[[], None]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    batches = iter(loader)

    def step() -> None:
        nonlocal batches
        try:
            images, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, targets = next(batches)
        loss = sum(model(list(images), list(targets)).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(name: str, size: int, iters: int, root: str) -> list[str]:
    ours_kw, peer_kw, px, batch = model_pair(name, size)
    generate(root, train=4 * batch, val=0, size=px, seed=0)
    ds = CocoDetection(*split_paths(root, "train"))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, collate_fn=collate_fn)
    torch.manual_seed(0)
    models = {"DynaMask": dynamask_resnet_fpn(**ours_kw).train(),
              "torchvision Mask R-CNN": maskrcnn_resnet_fpn(**peer_kw).train()}
    steps = {k: step_fn(m, loader) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(iters + 1):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i > 0:  # the first step of each is a warm-up
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) / batch for k, v in times.items()}
    peer = med["torchvision Mask R-CNN"]
    return [[f"{name} ({px} px, {batch} images/step)", k, f"{t:.3f}", f"{t / peer:.2f}"] for k, t in med.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["demo", "r50"], choices=["demo", "r50"])
    ap.add_argument("--size", type=int, default=512, help="image size of the r50 pair")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.models):
            rows += measure(name, args.size, args.iters, os.path.join(tmp, str(i)))
            print(f"{name}: done", file=sys.stderr, flush=True)
    import dynamask

    text = (f"Training step (forward with losses, backward, SGD), {device_name('cpu')}; torch {torch.__version__}; "
            f"dynamask from {os.path.dirname(dynamask.__file__)}; median of {args.iters} alternating steps after one "
            "warm-up.\n\n" + markdown_table(["pair", "model", "s per image", "÷ torchvision"], rows) + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
