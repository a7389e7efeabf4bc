"""torchvision weights enums (``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``, ``ResNet50_Weights.IMAGENET1K_V1``, ...)
read from the local torch hub cache, never downloaded.

torchvision's builders download an enum's file into ``torch.hub.get_dir()/checkpoints/`` under the last
part of its URL; here that same file is read if it is there (put there by torchvision on a machine with a
network, or by hand), and refused in one line saying where to put it and where to fetch it from if not.
The file's hash is not checked (torchvision checks the 8 hex digits in its name): a file that is not a
state dict of the right architecture is refused when it is read or loaded.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import torch
from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, ResNet101_Weights, WeightsEnum
from torchvision.models.detection import (
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
)

# The detection weights whose backbone, FPN, RPN and box head are torchvision's ``maskrcnn_resnet50_fpn``'s.
DETECTOR_ENUMS: tuple[type[WeightsEnum], ...] = (MaskRCNN_ResNet50_FPN_Weights, FasterRCNN_ResNet50_FPN_Weights)
# The _v2 models have another box head (4 convs + GroupNorm, 1 FC) and RPN head: their weights do not fit.
V2_ENUMS: tuple[type[WeightsEnum], ...] = (MaskRCNN_ResNet50_FPN_V2_Weights, FasterRCNN_ResNet50_FPN_V2_Weights)
BACKBONE_ENUMS: dict[int, type[WeightsEnum]] = {18: ResNet18_Weights, 34: ResNet34_Weights, 50: ResNet50_Weights,
                                               101: ResNet101_Weights}


def enum_name(weights: WeightsEnum) -> str:
    """``"MaskRCNN_ResNet50_FPN_Weights.COCO_V1"``."""
    return f"{type(weights).__name__}.{weights.name}"


def hub_path(weights: WeightsEnum) -> str:
    """Where torchvision keeps ``weights``' file: ``torch.hub.get_dir()/checkpoints/<the URL's file name>``
    (``$TORCH_HOME/hub/checkpoints/...`` unless ``torch.hub.set_dir`` was called)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def cached_file(weights: WeightsEnum, what: str) -> str:
    """The local file of ``weights`` (argument ``what``); a missing one is refused in one line naming the
    path to put it at and the URL to fetch it from."""
    path = hub_path(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what}={enum_name(weights)}: {path} not found, and nothing is downloaded: fetch {weights.url} and "
            f"save it there (the torch hub cache, torch.hub.get_dir()/checkpoints; TORCH_HOME moves it)")
    return path


def zero_eps(weights: WeightsEnum) -> bool:
    """Whether torchvision's builder sets FrozenBatchNorm's eps to 0 after loading ``weights`` (its v1 COCO
    detectors were trained so)."""
    return weights in (MaskRCNN_ResNet50_FPN_Weights.COCO_V1, FasterRCNN_ResNet50_FPN_Weights.COCO_V1)


def num_categories(weights: WeightsEnum) -> int:
    """The classes the weights' box predictor scores, the background included (91 for COCO_V1)."""
    return len(weights.meta["categories"])


def check_detector_enum(weights: Any, depth: int) -> None:
    """``weights`` is the enum of a torchvision (Mask|Faster) R-CNN ResNet-50 FPN (v1) and ``depth`` is 50; else
    a one-line ValueError saying why not."""
    if isinstance(weights, V2_ENUMS):
        raise ValueError(f"weights={enum_name(weights)}: the _v2 models have another RPN and box head; DynaMask's "
                         "builders take the v1 architecture's weights (MaskRCNN_ResNet50_FPN_Weights.COCO_V1)")
    if not isinstance(weights, DETECTOR_ENUMS):
        raise ValueError(f"weights={enum_name(weights)}: a torchvision weights enum here must be "
                         "MaskRCNN_ResNet50_FPN_Weights or FasterRCNN_ResNet50_FPN_Weights (for a backbone, "
                         "use weights_backbone)")
    if depth != 50:
        raise ValueError(f"weights={enum_name(weights)} are ResNet-50 weights, but depth is {depth}")


def check_backbone_enum(weights: Any, depth: int) -> None:
    """``weights`` is the ImageNet enum of a ResNet-``depth``; else a one-line ValueError saying which fits."""
    expected = BACKBONE_ENUMS.get(depth)
    if expected is None or not isinstance(weights, expected):
        fits = f"{expected.__name__}" if expected is not None else "a ResNet enum"
        raise ValueError(f"weights_backbone={enum_name(weights)} does not fit a ResNet-{depth}: use {fits}")
