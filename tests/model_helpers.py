"""Small models and synthetic data shared by the model tests (kept tiny: 2 CPU cores)."""

from __future__ import annotations

import torch
from torch import nn

from dynamask.models import dynamask_resnet_fpn

TINY = dict(depth=18, num_classes=3, min_size=64, max_size=96, trunk_channels=32, stage_channels=(16, 8, 8),
            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=20, box_batch_size_per_image=16, box_detections_per_img=8, mask_roi_size=7)


def tiny_model(**overrides) -> nn.Module:
    kw = dict(TINY)
    kw.update(overrides)
    return dynamask_resnet_fpn(**kw)


def synthetic_batch(seed: int = 0, size: tuple[int, int] = (64, 80)) -> tuple[list[torch.Tensor], list[dict]]:
    """Two images; image 0 has a red rectangle (label 1) and a green disc (label 2), image 1 one rectangle."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images, targets = [], []
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(2):
        img = torch.rand(3, h, w, generator=g) * 0.2
        boxes, labels, masks = [], [], []
        rect = torch.zeros(h, w, dtype=torch.uint8)
        x1, y1, x2, y2 = (6, 8, 40, 44) if i == 0 else (30, 10, 74, 50)
        rect[y1:y2, x1:x2] = 1
        img[0][rect.bool()] = 0.9
        boxes.append([x1, y1, x2, y2])
        labels.append(1)
        masks.append(rect)
        if i == 0:
            disc = (((yy - 40) ** 2 + (xx - 60) ** 2) < 14**2).to(torch.uint8)
            img[1][disc.bool()] = 0.9
            boxes.append([46, 26, 74, 54])
            labels.append(2)
            masks.append(disc)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "masks": torch.stack(masks)})
    return images, targets


def pair_detections(a: dict, b: dict) -> list[int]:
    """For each detection of ``a`` (``boxes [N, 4]``, ``scores [N]``, ``labels [N]``), the index of the
    same-label detection of ``b`` nearest in box and score, each used once.

    Two runs that sum in another order (batching pads images, another CPU vectorises differently,
    another implementation of the same op) agree to float noise, which can swap two near-equal scores
    in the score-sorted output: compare detections by pairing, not by position."""
    assert len(a["scores"]) == len(b["scores"]), (len(a["scores"]), len(b["scores"]))
    taken: set[int] = set()
    pairs = []
    for i in range(len(a["scores"])):
        same = [j for j in (b["labels"] == a["labels"][i]).nonzero()[:, 0].tolist() if j not in taken]
        assert same, f"detection {i} (label {int(a['labels'][i])}) has no partner"
        dist = [float((b["boxes"][j] - a["boxes"][i]).abs().max() + (b["scores"][j] - a["scores"][i]).abs())
                for j in same]
        j = same[min(range(len(same)), key=dist.__getitem__)]
        taken.add(j)
        pairs.append(j)
    return pairs


class MacCounter:
    """Counts multiply-accumulates of Conv2d / Linear / DeformConv2d modules with forward hooks."""

    def __init__(self, module: nn.Module) -> None:
        from dynamask.models import DeformConv2d

        self.macs = 0
        self.handles = []
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, DeformConv2d)):
                self.handles.append(m.register_forward_hook(self._conv))
            elif isinstance(m, nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear))

    def _conv(self, m, inputs, out):
        kh, kw = m.kernel_size
        self.macs += out.numel() * (m.in_channels // m.groups) * kh * kw

    def _linear(self, m, inputs, out):
        self.macs += out.numel() * m.in_features

    def close(self) -> None:
        for h in self.handles:
            h.remove()


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test machine's 2 cores are shared; intra-op threads then spin against each other (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A tiny DynaMask for 64-px shapes, the small switch fit and the run settings that the training tests share
TRAIN_TINY = dict(depth=18, min_size=64, max_size=64, trunk_channels=16, stage_channels=[8, 8, 8], mask_roi_size=7,
                  fpn_channels=32, box_representation_size=64, rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
                  rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=16, box_batch_size_per_image=32,
                  box_detections_per_img=10)
SMALL_FIT = dict(switch_fit_batches=3, switch_fit_epochs=2, switch_fit_calibration_images=3)


def train_config(shapes: str, out, **kw):
    """A TrainConfig of a tiny two-phase run on the shapes data set at ``shapes`` (no flips, so that a fit
    made beside the run sees the same images)."""
    from dynamask.data.shapes import split_paths
    from dynamask.engine.train import TrainConfig

    img, ann = split_paths(shapes, "train")
    base = dict(train_images=img, train_ann=ann, out_dir=str(out), arch="dynamask_resnet_fpn", arch_kwargs=TRAIN_TINY,
                pretrain_epochs=1, epochs=1, batch_size=2, optimizer="adamw", lr=1e-4, warmup_iters=1, lr_steps=(),
                workers=0, log_every=1, progress=False, seed=5, flip_prob=0.0, **SMALL_FIT)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module", name="shapes")
def shapes_fixture(tmp_path_factory):
    """A shapes data set of 6 training and 2 validation images of 64 px (import it to use ``shapes``)."""
    from dynamask.data.shapes import generate

    root = str(tmp_path_factory.mktemp("shapes"))
    generate(root, train=6, val=2, size=64, seed=2)
    return root
