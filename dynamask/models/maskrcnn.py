"""torchvision's Mask R-CNN as a builder with our checkpoint contract: the peer, and a stand-in for tests.

``maskrcnn_resnet_fpn(depth=18, num_classes=8, ...)`` follows the same contract as the DynaMask builders
(torchvision detection-model inputs and outputs), so training, evaluation and checkpoints treat both alike.
It never downloads weights.
"""

from __future__ import annotations

import torch
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_nn_ops

from dynamask.models.detector import SafeResizeTransform
from dynamask.models.roi_heads import subsample_positives

_NORMS = {"frozen_bn": misc_nn_ops.FrozenBatchNorm2d, "bn": torch.nn.BatchNorm2d}


def maskrcnn_resnet_fpn(
    *,
    num_classes: int,
    depth: int = 50,
    norm: str = "frozen_bn",
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    rpn_batch_size_per_image: int = 256,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
    box_detections_per_img: int = 100,
    fpn_channels: int = 256,
    box_representation_size: int = 1024,
    mask_head_layers: tuple[int, ...] = (256, 256, 256, 256),
    roi_canonical_scale: float = 224.0,
    mask_rois_per_image: int | None = None,
) -> MaskRCNN:
    """torchvision Mask R-CNN with a ResNet-``depth`` FPN backbone, randomly initialised (weights=None).

    Args:
        num_classes: including the background (``CocoDetection.num_classes``).
        depth: 18, 34, 50 or 101.
        norm: "frozen_bn" (torchvision's default, identity when not pretrained) or "bn" (trainable BatchNorm).
        min_size, max_size, rpn_*, box_*: torchvision's ``MaskRCNN`` arguments.
        fpn_channels, box_representation_size, mask_head_layers: widths (torchvision's defaults: 256, 1024,
            four 256-channel convs); narrower ones make a small model for CPU runs and tests.
        roi_canonical_scale: the box side the box and mask RoI poolers send to P4 (FPN's 224, for ~800-px
            images), as DynaMask's builders' argument of the same name, so that both map boxes alike.
        mask_rois_per_image: at most this many positive RoIs per image (a random subset) train the mask head,
            as DynaMask's argument of the same name, so that both heads get the same mask supervision; None
            (torchvision's): every positive.
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"depth must be 18, 34, 50, 101 or 152, got {depth}")
    body = getattr(resnet, f"resnet{depth}")(weights=None, norm_layer=_NORMS[norm])
    c = 512 if depth < 50 else 2048
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[c // 8, c // 4, c // 2, c],
        out_channels=fpn_channels,
        norm_layer=None,
    )
    if not 0 < roi_canonical_scale < float("inf"):
        raise ValueError(f"roi_canonical_scale must be a positive finite number, got {roi_canonical_scale}")
    levels = ["0", "1", "2", "3"]
    box_pool = MultiScaleRoIAlign(levels, 7, 2, canonical_scale=int(roi_canonical_scale))
    mask_pool = MultiScaleRoIAlign(levels, 14, 2, canonical_scale=int(roi_canonical_scale))
    box_head = TwoMLPHead(fpn_channels * 7 * 7, box_representation_size)
    mask_head = MaskRCNNHeads(fpn_channels, list(mask_head_layers), 1)
    model = MaskRCNN(
        backbone,
        num_classes=None,  # given through the predictors
        box_roi_pool=box_pool,
        box_head=box_head,
        box_predictor=_box_predictor(box_representation_size, num_classes),
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
        mask_predictor=_mask_predictor(mask_head_layers[-1], num_classes),
        min_size=min_size,
        max_size=max_size,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
    )
    if mask_rois_per_image is not None:
        model.roi_heads = CappedMaskRoIHeads.like(model.roi_heads, mask_rois_per_image=mask_rois_per_image)
    # the same resizing, but a 2x3840 image keeps a 1-pixel side instead of failing
    model.transform = SafeResizeTransform.like(model.transform)
    return model


class CappedMaskRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` whose mask loss trains on at most ``mask_rois_per_image`` positives per
    image, a random subset drawn as DynaMask's (:func:`~dynamask.models.roi_heads.subsample_positives`); the box
    branch and inference are torchvision's, unchanged.

    torchvision's forward builds the mask loss from locals it does not expose, so the training forward runs
    it with the mask branch off (box losses only), keeping the sampled proposals, and then runs the mask
    branch itself on the capped positives.
    """

    mask_rois_per_image: int
    _mask_off: bool = False
    _sampled: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None

    @classmethod
    def like(cls, heads: RoIHeads, *, mask_rois_per_image: int) -> CappedMaskRoIHeads:
        """The same modules and settings as ``heads`` (shared, not copied), with the cap."""
        if mask_rois_per_image < 1:
            raise ValueError(f"mask_rois_per_image must be None or >= 1, got {mask_rois_per_image}")
        capped = cls.__new__(cls)
        capped.__dict__.update(heads.__dict__)
        capped.mask_rois_per_image = int(mask_rois_per_image)
        return capped

    def has_mask(self) -> bool:
        return not self._mask_off and super().has_mask()

    def select_training_samples(self, proposals, targets):  # type: ignore[no-untyped-def]
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self._sampled = (proposals, matched_idxs, labels)
        return proposals, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[no-untyped-def]
        if not self.training or not super().has_mask():
            return super().forward(features, proposals, image_shapes, targets)
        self._mask_off, self._sampled = True, None
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            self._mask_off = False
        assert self._sampled is not None and targets is not None  # training: select_training_samples ran
        sampled, matched, labels = self._sampled
        self._sampled = None
        mask_proposals, pos_matched = [], []
        for boxes, idx, lab in zip(sampled, matched, labels):
            pos = subsample_positives(torch.where(lab > 0)[0], self.mask_rois_per_image)
            mask_proposals.append(boxes[pos])
            pos_matched.append(idx[pos])
        x = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        losses["loss_mask"] = maskrcnn_loss(x, mask_proposals, [t["masks"] for t in targets],
                                            [t["labels"] for t in targets], pos_matched)
        return result, losses


def _box_predictor(representation: int, num_classes: int):
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FastRCNNPredictor(representation, num_classes)


def _mask_predictor(channels: int, num_classes: int):
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    return MaskRCNNPredictor(channels, channels, num_classes)
