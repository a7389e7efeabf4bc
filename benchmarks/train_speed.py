"""Training speed probe for choosing the demo recipe: seconds per iteration of a small Mask R-CNN on shapes.

    python benchmarks/train_speed.py --threads 2 --configs 128,4,narrow 192,4,narrow 256,4,narrow

Reports wall and process-CPU seconds per training iteration (median of --iters after 2 warm-up ones), the
iterations that fit in 15 minutes, and eval milliseconds per image, as a markdown table. On a shared machine
the CPU column is the steadier one (it also counts OpenMP spinning, so measure with --threads 1 for work).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from dynamask.data import CocoDetection, RandomHorizontalFlip, collate_fn
from dynamask.data.shapes import generate, split_paths
from dynamask.engine.baselines import maskrcnn_resnet_fpn

WIDTHS = {"wide": {}, "narrow": dict(fpn_channels=128, box_representation_size=256, mask_head_layers=(128, 128))}
SMALL = dict(rpn_batch_size_per_image=64, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
             rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64,
             box_detections_per_img=30)


def measure(root: str, size: int, batch: int, width: str, iters: int) -> str:
    ds = CocoDetection(*split_paths(root, "train"), transforms=RandomHorizontalFlip())
    torch.manual_seed(0)
    model = maskrcnn_resnet_fpn(num_classes=ds.num_classes, depth=18, min_size=size, max_size=size,
                                **SMALL, **WIDTHS[width])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=collate_fn))
    wall, cpu = [], []
    for _ in range(iters + 2):
        images, targets = next(loader)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    w, c = sorted(wall[2:])[iters // 2], sorted(cpu[2:])[iters // 2]
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(6):
            model([ds[i][0]])
    ev = (time.perf_counter() - t0) / 6
    return (f"| {size} | {batch} | {width} | {w:.2f} | {c:.2f} | {1 / w:.2f} | {int(900 / w)} | {1000 * ev:.0f} "
            f"| {os.getloadavg()[0]:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--configs", nargs="+", default=["128,4,narrow", "192,4,narrow", "256,4,narrow", "192,4,wide"],
                   help="SIZE,BATCH,WIDTHS (widths: narrow or wide)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        generate(root, train=64, val=0, size=256, seed=0)
        print(f"torch threads: {args.threads}, cores: {os.cpu_count()}")
        print("| px | batch | widths | wall s/iter | CPU s/iter | it/s | iters in 15 min | eval ms/img | load avg |")
        print("|---|---|---|---|---|---|---|---|---|")
        for cfg in args.configs:
            size, batch, width = cfg.split(",")
            print(measure(root, int(size), int(batch), width, args.iters), flush=True)


if __name__ == "__main__":
    main()
