"""The DynaMask detector: torchvision's GeneralizedRCNN (transform, backbone, RPN) + our RoI heads.

A drop-in for ``torchvision.models.detection.maskrcnn_resnet50_fpn``: ``model(images, targets)`` returns
a dict of losses in training; ``model(images)`` returns, per image, ``boxes``, ``labels``, ``scores``,
``masks [N, 1, H, W]`` (float probabilities, pasted into the original image) and ``mask_resolution
[N]`` (14/28/56/112).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _resize_image_and_masks, resize_boxes

from dynamask.checks import check_kwargs, model_num_classes
from dynamask.models import mask_handoff, mask_inference, mask_losses
from dynamask.models.inputs import check_images, check_targets
from dynamask.models.mask_head import DynaMaskHead
from dynamask.models.msm import MaskSwitchModule
from dynamask.models.roi_heads import MASK_DEFAULTS, DynaMaskRoIHeads, MultiLevelRoIPool
from dynamask.models.switch_input import switch_channels

DEFAULT_ANCHOR_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512)
# What GeneralizedRCNNTransform takes besides min_size, max_size, image_mean and image_std.
TRANSFORM_KWARGS = ("size_divisible", "fixed_size", "_skip_resize")


def default_anchor_generator(sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES) -> AnchorGenerator:
    """FPN anchors, one size per level (torchvision's 32–512 by default), ratios 0.5/1/2."""
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per FPN level (5: P2-P6), got {len(sizes)}")
    return AnchorGenerator(tuple((int(s),) for s in sizes), ((0.5, 1.0, 2.0),) * 5)


class SafeResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform, except that no side is resized below 1 pixel: a 2x3840 image scaled to a
    1333-pixel long side would have a short side of 0 (torchvision fails there); here it gets 1. Every other
    image is resized exactly as torchvision does."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        h, w = image.shape[-2:]
        if self.fixed_size is not None or (self.training and self._skip_resize):
            return super().resize(image, target)
        # the smallest scale any of the sizes torchvision may draw gives; floor() as its interpolate does
        lowest = min(min(self.min_size) / min(h, w), self.max_size / max(h, w))
        if math.floor(min(h, w) * lowest) >= 1:
            return super().resize(image, target)
        side = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        scale = min(side / min(h, w), self.max_size / max(h, w))
        size = (max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))
        image, target = _resize_image_and_masks(image, side, self.max_size, target, (size[1], size[0]))
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        return image, target


class DynaMaskRCNN(GeneralizedRCNN):
    """Mask R-CNN with the DynaMask mask branch.

    Args:
        backbone: a ResNet-FPN (any ``out_channels``, levels "0".."3" + "pool").
        num_classes: including background.
        anchor_sizes: one anchor size per level P2–P6 when ``rpn_anchor_generator`` is None (torchvision's
            32–512; scale them down with the images, e.g. 16–256 for 128-px images).
        roi_canonical_scale: box side that the RoI poolers send to P4 (FPN's 224 for ~800-px images;
            scale it with the images, e.g. 56 for 128-px images, so larger objects read deeper levels).
        mask_head: the dual-level FPN head (default widths when None).
        msm: the Mask Switch Module (default when None).
        edge_weight, budget_weight, target_gmacs, gumbel_tau, mask_policy, mask_training,
            mask_rois_per_image, routing_signal, coupled, switch_input: see
            :class:`~dynamask.models.roi_heads.DynaMaskRoIHeads`.
        The other arguments are torchvision's ``FasterRCNN`` ones, with its defaults; extra ``**kwargs``
        go to ``GeneralizedRCNNTransform`` as in torchvision (``size_divisible``, ``fixed_size``); any other
        name is refused, naming the closest valid one.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 91, *,
                 # transform
                 min_size: int | Sequence[int] = 800, max_size: int = 1333,
                 image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 # RPN
                 rpn_anchor_generator: AnchorGenerator | None = None,
                 anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES, rpn_head: nn.Module | None = None,
                 rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                 rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
                 rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 rpn_score_thresh: float = 0.0,
                 # box branch
                 box_head: nn.Module | None = None, box_predictor: nn.Module | None = None,
                 box_representation_size: int = 1024,
                 box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
                 box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                 bbox_reg_weights: tuple[float, float, float, float] | None = None,
                 # mask branch
                 roi_canonical_scale: float = 224.0,
                 mask_head: DynaMaskHead | None = None, msm: MaskSwitchModule | None = None,
                 # defaults declared once, in roi_heads.MaskBranchDefaults
                 edge_weight: float = MASK_DEFAULTS.edge_weight, budget_weight: float = MASK_DEFAULTS.budget_weight,
                 target_gmacs: float | None = MASK_DEFAULTS.target_gmacs, gumbel_tau: float = MASK_DEFAULTS.gumbel_tau,
                 mask_policy: mask_inference.Policy = MASK_DEFAULTS.mask_policy,
                 mask_training: str = MASK_DEFAULTS.mask_training,
                 mask_rois_per_image: int | None = MASK_DEFAULTS.mask_rois_per_image,
                 routing_signal: mask_losses.RoutingSignal = MASK_DEFAULTS.routing_signal,
                 coupled: bool = MASK_DEFAULTS.coupled, switch_input: str = MASK_DEFAULTS.switch_input,
                 **kwargs) -> None:
        out_channels: int = cast(int, backbone.out_channels)  # torchvision's backbones declare it
        check_kwargs(kwargs, valid_kwargs(), where=type(self).__name__)  # a typo would pass to the transform
        anchors = default_anchor_generator(anchor_sizes) if rpn_anchor_generator is None else rpn_anchor_generator
        rpn = RegionProposalNetwork(
            anchors, RPNHead(out_channels, anchors.num_anchors_per_location()[0]) if rpn_head is None else rpn_head,
            rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image, rpn_positive_fraction,
            dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
            rpn_nms_thresh, score_thresh=rpn_score_thresh,
        )
        mask_head = DynaMaskHead(in_channels=out_channels) if mask_head is None else mask_head
        box_pool = MultiLevelRoIPool(
            output_size=7, sampling_ratio=2, aligned=False, canonical_scale=roi_canonical_scale
        )
        roi_heads = DynaMaskRoIHeads(
            box_roi_pool=box_pool,
            box_head=(TwoMLPHead(out_channels * 7 * 7, box_representation_size) if box_head is None else box_head),
            box_predictor=(FastRCNNPredictor(box_representation_size, num_classes) if box_predictor is None
                           else box_predictor),
            fg_iou_thresh=box_fg_iou_thresh, bg_iou_thresh=box_bg_iou_thresh,
            batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
            bbox_reg_weights=bbox_reg_weights, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
            mask_head=mask_head,
            msm=(MaskSwitchModule(in_channels=switch_channels(switch_input, fpn_channels=out_channels,
                                                              trunk_channels=mask_head.channels[0],
                                                              mask_classes=mask_head.mask_classes),
                                  in_size=mask_head.resolutions[0]) if msm is None else msm),
            mask_roi_pool=MultiLevelRoIPool(output_size=mask_head.resolutions[0], sampling_ratio=2, aligned=True,
                                            canonical_scale=roi_canonical_scale),
            edge_weight=edge_weight, budget_weight=budget_weight, target_gmacs=target_gmacs,
            gumbel_tau=gumbel_tau, mask_policy=mask_policy, mask_training=mask_training,
            mask_rois_per_image=mask_rois_per_image, routing_signal=routing_signal, coupled=coupled,
            switch_input=switch_input,
        )
        transform = SafeResizeTransform(min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                                             image_std or [0.229, 0.224, 0.225], **kwargs)
        super().__init__(backbone, rpn, roi_heads, transform)

    @property
    def mask_training(self) -> str:
        """"pretrain" (all resolutions supervised, MSM unused) or "dynamic" (Eq. 3–7)."""
        return self.roi_heads.mask_training

    @mask_training.setter
    def mask_training(self, mode: str) -> None:
        self.roi_heads.mask_training = mode

    @property
    def mask_policy(self) -> mask_inference.Policy:
        """Inference routing: "msm", "size", 14/28/56/112, or a callable (see ``choose_resolutions``)."""
        return self.roi_heads.mask_policy

    @mask_policy.setter
    def mask_policy(self, policy: mask_inference.Policy) -> None:
        self.roi_heads.mask_policy = policy

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Training: dict of losses. Eval: per image ``boxes, labels, scores, masks [N,1,H,W],
        mask_resolution [N]`` in the original image frame.

        Images must be ``[3, H, W]`` finite floats in [0, 1] (float16 / bfloat16 ones are converted to the
        model's dtype); in training, each target's boxes must overlap its image, its labels be in
        ``1 .. num_classes - 1`` and its ``masks`` be ``[N, H, W]`` of its image, one per box.
        ``model([])`` returns ``[]`` in eval mode.
        """
        images = check_images(images, next(self.parameters()).dtype)
        if self.training:
            if not images:
                raise ValueError("training needs at least one image, got an empty list")
            if targets is not None:
                check_targets(images, targets, masks=True, num_classes=model_num_classes(self))
        elif not images:
            return []
        out = super().forward(images, targets)
        if self.training:
            return out
        # the heads hand each image's masks over as a MaskHandoff; postprocess rescaled the boxes to the
        # original images, so each canvas is its image's size
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        return [mask_handoff.paste_instance_masks(det, size) for det, size in zip(out, sizes)]


def valid_kwargs() -> set[str]:
    """The keyword arguments :class:`DynaMaskRCNN` takes (its own and the transform's)."""
    import inspect

    own = {p.name for p in inspect.signature(DynaMaskRCNN.__init__).parameters.values()
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    return own | set(TRANSFORM_KWARGS)
