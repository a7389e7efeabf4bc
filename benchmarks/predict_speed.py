"""Predictor and evaluation time per image: masks pasted as the caller needs them (after) against every
detection pasted into a full-size float canvas (before), in one process.

    python benchmarks/predict_speed.py [--demo-reps 7] [--reps 3] [--post-reps 15] [--threads 2] [--r50-images 1]
                                       [--out FILE.md]

After: ``Predictor`` and ``evaluate`` take a DynaMask model's masks unpasted (``model(images,
paste_masks=False)``); the Predictor pastes only the detections scoring at or above its threshold, straight
to bool, and evaluation pastes straight to COCO RLE (``dynamask.ops.paste_masks_rle``). Before: the same
library code with the model behind a wrapper that hides its type, which takes the path every model took
before (the model pastes every detection into a float ``[N, 1, H, W]`` canvas; the Predictor drops the
low-scoring ones and thresholds the rest, evaluation thresholds and encodes them with pycocotools). Both
variants give the same results, checked here first (same ``Instances``, same ``results.json`` bytes).

Two models, random weights (nothing is downloaded), box score threshold 0 so that every image has
detections to paste: the demo's (scripts/demo.py's ARCH_KWARGS: ResNet-18 FPN, 128-px shapes images, at most
30 detections per image) and ResNet-50 FPN on 800×1216 images (100 detections per image, what COCO evaluation
keeps; masks routed 14/28/56/112 in the paper's Table 9 proportions 0.35/0.34/0.21/0.10, as benchmarks/e2e.py
does). The Predictor's score threshold is set from the models' own scores to keep a realistic number of
detections: about 5 per demo image and 8 per 800×1216 image (COCO has 7.3 objects per image); the table
says how many it kept. Medians of ``--demo-reps`` / ``--reps`` interleaved runs (before, after, before,
after, ...) after one untimed run of each (the equality check). ``evaluate`` is the whole call (inference,
results, COCOeval bbox and segm) without Boundary AP, which at 800×1216 takes minutes per image, the same in
both variants. The model's forward pass is most of each whole call and the same in both, so the part the
change touches is also timed alone (``--post-reps`` runs on outputs computed once): from the unpasted masks
to the Predictor's bool masks, and to evaluation's result dicts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
from _timing import interleaved_medians, markdown_table, publish  # noqa: E402
from demo import ARCH_KWARGS  # noqa: E402
from e2e import FixedMix  # noqa: E402

from dynamask import Predictor  # noqa: E402
from dynamask.data import CocoDetection  # noqa: E402
from dynamask.data.shapes import generate, split_paths  # noqa: E402
from dynamask.engine.coco_eval import output_to_results  # noqa: E402
from dynamask.engine.evaluate import evaluate  # noqa: E402
from dynamask.models import dynamask_resnet50_fpn, dynamask_resnet_fpn, mask_handoff  # noqa: E402
from dynamask.models.flops import HeadCosts  # noqa: E402

TABLE9_MIX = (0.35, 0.34, 0.21, 0.10)


def cpu_model_name() -> str:
    """The CPU's ``model name`` line of /proc/cpuinfo (the platform's processor string where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


class Hidden(nn.Module):
    """The model behind a wrapper that is not a DynaMaskRCNN: callers then get every mask pasted into a
    float canvas, as before."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.backbone = model.backbone  # evaluation records each image's network input size from its hook

    def forward(self, images: list[Tensor]):
        return self.model(images)


def score_cut(model: nn.Module, images: list[Tensor], per_image: int) -> float:
    """A score threshold keeping about ``per_image`` detections per image: halfway between the
    (per_image × len(images))-th best score of the images and the next, so no score sits on it."""
    with torch.no_grad():
        scores = sorted((float(s) for out in model(images) for s in out["scores"]), reverse=True)
    k = min(per_image * len(images), len(scores) - 1)
    return (scores[k - 1] + scores[k]) / 2


def smooth_images(root: str, count: int, size: tuple[int, int], seed: int) -> CocoDetection:
    """``count`` smooth colour images (bilinearly upsampled noise) of ``size`` (H, W), with a COCO file of 91
    categories (the model's labels 1..90) and two boxes per image; the annotations only give COCOeval
    something to score."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    for i in range(count):
        small = torch.rand(1, 3, h // 32, w // 32, generator=g)
        pixels = torch.nn.functional.interpolate(small, size=size, mode="bilinear", align_corners=False)[0]
        name = f"{i:06d}.png"
        Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
            os.path.join(root, "images", name))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for j, (x, y, bw, bh) in enumerate([(100, 80, 300, 200), (600, 300, 400, 350)]):
            anns.append({"id": 2 * i + j + 1, "image_id": i + 1, "category_id": 1 + (i + j) % 90,
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                         "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    ann = os.path.join(root, "ann.json")
    with open(ann, "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 91)]}, f)
    return CocoDetection(os.path.join(root, "images"), ann)


def post_model_fns(model: nn.Module, images: list[Tensor], cut: float, cat_ids: list[int]) -> dict[str, Callable]:
    """The part the change touches, on the model's outputs computed once: from the unpasted masks to the
    Predictor's bool masks / evaluation's result dicts, before (every detection pasted into a float canvas,
    then filtered / thresholded and encoded, as the model and the callers did) and after."""
    with torch.no_grad():
        outs = [model([im], paste_masks=False)[0] for im in images]
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    key = mask_handoff.HANDOFF_KEY

    def predictor_before() -> None:
        for o, size in zip(outs, sizes):
            dense = mask_handoff.paste(o[key], o["boxes"], size)
            keep = o["scores"] >= cut
            _ = dense[keep][:, 0] >= 0.5

    def predictor_after() -> None:
        for o, size in zip(outs, sizes):
            mask_handoff.paste_binary(o[key], o["boxes"], size, 0.5, o["scores"] >= cut)

    def results_before() -> None:
        for o, size in zip(outs, sizes):
            output_to_results(1, dict(o, masks=mask_handoff.paste(o[key], o["boxes"], size)), cat_ids)

    def results_after() -> None:
        for o, size in zip(outs, sizes):
            output_to_results(1, o, cat_ids, rles=mask_handoff.paste_rle(o[key], o["boxes"], size, 0.5))

    return {"Predictor before": predictor_before, "Predictor after": predictor_after,
            "evaluate before": results_before, "evaluate after": results_after}


def milliseconds(t: float) -> str:
    return f"{t * 1e3:.1f}" if abs(t) >= 0.01 else f"{t * 1e3:.3f}"


def rows_of(name: str, what: str, med: dict[str, float], n: int, cpu: str) -> list[list[str]]:
    rows = []
    for step in ("Predictor", "evaluate"):
        b, a = med[f"{step} before"] / n, med[f"{step} after"] / n
        rows.append([name, f"{step}, {what}", milliseconds(b), milliseconds(a), milliseconds(b - a), f"{a / b:.3f}",
                     cpu])
    return rows


def time_case(name: str, model: nn.Module, dataset: CocoDetection, per_image: int, reps: int, post_reps: int,
              work: str) -> tuple[list[list[str]], str]:
    """Times Predictor and evaluate, before and after, on ``dataset``'s images (whole calls, and the part
    after the model alone); table rows and a note."""
    model.eval()
    images = [dataset[i][0] for i in range(len(dataset))]
    heads = model.roi_heads
    costs = HeadCosts.of(model, msm=heads.mask_policy == "msm")  # the wrapper hides the model's own
    cut = score_cut(model, images, per_image)
    after = Predictor(model, device="cpu", score_thresh=cut, batch_size=1)
    before = Predictor(Hidden(model), device="cpu", score_thresh=cut, batch_size=1)
    # Boundary AP left out: at 800x1216 it takes minutes per image, the same in both variants
    kw: dict[str, Any] = dict(costs=costs, progress=False, boundary=False)
    # the equality checks, which are also each variant's untimed first run
    t0 = time.perf_counter()
    new, old = after(images), before(images)
    for a, b in zip(new, old):
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("boxes", "scores", "masks", "mask_resolution"))
    with tempfile.TemporaryDirectory() as a_dir, tempfile.TemporaryDirectory() as b_dir:
        evaluate(model, dataset, out_dir=a_dir, **kw)
        evaluate(Hidden(model), dataset, out_dir=b_dir, **kw)
        results = [open(os.path.join(d, "results.json"), "rb").read() for d in (a_dir, b_dir)]
        assert results[0] == results[1], f"{name}: results.json differs"
        detections = len(json.loads(results[0]))
    print(f"{name}: checked in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    whole = {
        "Predictor before": lambda: before(images),
        "Predictor after": lambda: after(images),
        "evaluate before": lambda: evaluate(Hidden(model), dataset, **kw),
        "evaluate after": lambda: evaluate(model, dataset, **kw),
    }
    n, cpu = len(images), cpu_model_name()
    rows = rows_of(name, "whole call", interleaved_medians(whole, "cpu", reps, warmup=0), n, cpu)
    post = post_model_fns(model, images, cut, dataset.cat_ids)
    rows += rows_of(name, "after the model only", interleaved_medians(post, "cpu", post_reps), n, cpu)
    kept = sum(len(r) for r in new) / n
    note = (f"{name}: {n} image{'s' if n > 1 else ''}, {detections / n:.1f} detections per image ({work}); the "
            f"Predictor (score_thresh {cut:.4g}) kept {kept:.1f} per image")
    return rows, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-reps", type=int, default=7, help="interleaved runs of the demo case (default 7)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved runs of the R-50 case (default 3)")
    ap.add_argument("--post-reps", type=int, default=15,
                    help="interleaved runs of the part after the model, on outputs computed once (default 15)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared 2-core machine, 2 threads spin against other work)")
    ap.add_argument("--demo-images", type=int, default=4, help="128-px shapes images (default 4)")
    ap.add_argument("--r50-images", type=int, default=1, help="800x1216 images (default 1; 0 skips the case)")
    ap.add_argument("--out", help="also write the markdown to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # other work on the machine, beside the figures
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as root:
        generate(os.path.join(root, "shapes"), train=0, val=args.demo_images, size=ARCH_KWARGS["min_size"], seed=3)
        shapes = CocoDetection(*split_paths(os.path.join(root, "shapes"), "val"))
        torch.manual_seed(0)
        demo = dynamask_resnet_fpn(**dict(ARCH_KWARGS, box_score_thresh=0.0))
        r, note = time_case("demo R-18-FPN, 128 px", demo, shapes, 5, args.demo_reps, args.post_reps,
                            "random weights, the random switch's routing")
        rows += r
        notes.append(note)
        if args.r50_images:
            big = smooth_images(os.path.join(root, "big"), args.r50_images, (800, 1216), seed=4)
            torch.manual_seed(0)
            r50 = dynamask_resnet50_fpn(num_classes=91, box_score_thresh=0.0, min_size=800, max_size=1216)
            r50.mask_policy = FixedMix(TABLE9_MIX)
            r, note = time_case("R-50-FPN, 800×1216", r50, big, 8, args.reps, args.post_reps,
                                "random weights, masks routed in Table 9's mix 0.35/0.34/0.21/0.10")
            rows += r
            notes.append(note)
    command = "python " + " ".join([os.path.relpath(__file__, os.getcwd()), *sys.argv[1:]])
    threads = torch.get_num_threads()
    text = (f"Predictor and evaluate, time per image: masks pasted only as needed (after) against every detection "
            f"pasted into a float canvas (before); the same results (checked). Measured {time.strftime('%Y-%m-%d')}, "
            f"load average {load:.1f} at the start; torch {torch.__version__}, {threads} "
            f"thread{'s' if threads > 1 else ''}; medians of interleaved runs: {args.demo_reps} (demo) and "
            f"{args.reps} (R-50) of the whole calls, {args.post_reps} of the part after the model (on outputs "
            "computed once). evaluate without Boundary AP.\n\n"
            f"Command: `{command}`\n\n"
            + markdown_table(["model, images", "step", "before (ms/image)", "after (ms/image)", "saved (ms/image)",
                              "after ÷ before", "CPU (/proc/cpuinfo)"], rows)
            + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    publish(text, args.out)


if __name__ == "__main__":
    main()
