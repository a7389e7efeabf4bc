"""The DynaMask model: dual-level FPN mask head, Mask Switch Module, losses, dispatcher and builders."""

from dynamask.models.builders import dynamask_resnet50_fpn, dynamask_resnet_fpn, load_torchvision_maskrcnn
from dynamask.models.detector import DynaMaskRCNN
from dynamask.models.fam import DeformConv2d, FeatureAggregation
from dynamask.models.mask_head import RESOLUTIONS, DynaMaskHead
from dynamask.models.msm import MaskSwitchModule
from dynamask.models.roi_heads import DynaMaskRoIHeads
from dynamask.models.roi_pool import MultiLevelRoIPool

__all__ = [
    "RESOLUTIONS",
    "DeformConv2d",
    "DynaMaskHead",
    "DynaMaskRCNN",
    "DynaMaskRoIHeads",
    "FeatureAggregation",
    "MaskSwitchModule",
    "MultiLevelRoIPool",
    "dynamask_resnet50_fpn",
    "dynamask_resnet_fpn",
    "load_torchvision_maskrcnn",
]
