"""The DynaMask detector: a torchvision ``MaskRCNN`` (transform, backbone, RPN, box settings) with our RoI heads.

A drop-in for ``torchvision.models.detection.maskrcnn_resnet50_fpn``: ``isinstance(model, MaskRCNN)``;
``model(images, targets)`` returns a dict of losses in training; ``model(images)`` returns, per image,
``boxes``, ``labels``, ``scores``, ``masks [N, 1, H, W]`` (float probabilities, pasted into the original
image) and ``mask_resolution [N]`` (14/28/56/112).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _resize_image_and_masks, resize_boxes
from torchvision.ops import MultiScaleRoIAlign

from dynamask.checks import UnknownArgumentError, check_kwargs, model_num_classes
from dynamask.models import mask_handoff, mask_losses, routing_policy
from dynamask.models.inputs import check_images, check_targets
from dynamask.models.mask_head import DynaMaskHead
from dynamask.models.msm import MaskSwitchModule, switch_for
from dynamask.models.roi_heads import (
    MASK_DEFAULTS,
    DynaMaskRoIHeads,
    MaskBranchSettings,
    MultiLevelRoIPool,
    box_branch_settings,
)

DEFAULT_ANCHOR_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512)
# What GeneralizedRCNNTransform takes besides min_size, max_size, image_mean and image_std.
TRANSFORM_KWARGS = ("size_divisible", "fixed_size", "_skip_resize")
# torchvision's MaskRCNN arguments of the mask branch that DynaMask's replaces, and what to use instead.
REPLACED_MASK_ARGS = {
    "mask_roi_pool": "DynaMask pools its RoI features itself (mask_roi_size of the builders, aligned=True)",
    "mask_predictor": "DynaMask's mask head predicts at every resolution itself (mask_head=DynaMaskHead(...))",
}


def default_anchor_generator(sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES) -> AnchorGenerator:
    """FPN anchors, one size per level (torchvision's 32–512 by default), ratios 0.5/1/2."""
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per FPN level (5: P2-P6), got {len(sizes)}")
    return AnchorGenerator(tuple((int(s),) for s in sizes), ((0.5, 1.0, 2.0),) * 5)


class SafeResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform, except that no side is resized below 1 pixel: a 2x3840 image scaled to a
    1333-pixel long side would have a short side of 0 (torchvision fails there); here it gets 1. Every other
    image is resized exactly as torchvision does."""

    @classmethod
    def like(cls, transform: GeneralizedRCNNTransform) -> SafeResizeTransform:
        """A safe transform with ``transform``'s settings (sizes, normalisation, padding)."""
        return cls(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                   size_divisible=transform.size_divisible, fixed_size=transform.fixed_size,
                   _skip_resize=transform._skip_resize)

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


class DynaMaskRCNN(MaskRCNN):
    """Mask R-CNN with the DynaMask mask branch: a ``torchvision.models.detection.MaskRCNN``, so code that
    asks ``isinstance(model, MaskRCNN)`` (torchvision's ``references/detection/engine.py`` does, to decide
    whether to evaluate "segm") treats it as one.

    torchvision's ``MaskRCNN``/``FasterRCNN`` constructor builds the RPN, the transform and the box-branch
    settings from torchvision's own arguments and defaults (``min_size``, ``max_size``, ``image_mean``,
    ``image_std``, ``rpn_*``, ``box_*``, ``bbox_reg_weights``, ``size_divisible``, ``fixed_size``, ...: pass
    them as keywords); then the transform becomes a :class:`SafeResizeTransform` and the RoI heads a
    :class:`~dynamask.models.roi_heads.DynaMaskRoIHeads` with those settings. torchvision's own mask branch
    (``mask_roi_pool``, ``mask_predictor``, a ``MaskRCNNHeads`` as ``mask_head``) is refused: DynaMask's
    replaces it.

    Args:
        backbone: a ResNet-FPN (any ``out_channels``, levels "0".."3" + "pool").
        num_classes: including background; None only with a ``box_predictor`` (as torchvision).
        anchor_sizes: one anchor size per level P2–P6 when ``rpn_anchor_generator`` is None (torchvision's
            32–512; scale them down with the images, e.g. 16–256 for 128-px images).
        box_representation_size: width of the default box head (``TwoMLPHead``; torchvision's 1024).
        roi_canonical_scale: box side that the RoI poolers send to P4 (FPN's 224 for ~800-px images;
            scale it with the images, e.g. 56 for 128-px images, so larger objects read deeper levels).
        mask_head: the dual-level FPN head (default widths when None).
        msm: the Mask Switch Module (default when None).
        edge_weight, budget_weight, target_gmacs, gumbel_tau, mask_policy, mask_training,
            mask_rois_per_image, routing_signal, coupled, switch_input: see
            :class:`~dynamask.models.roi_heads.DynaMaskRoIHeads`.
        **kwargs: torchvision's ``MaskRCNN`` arguments, with its defaults, except that ``box_roi_pool`` is
            ours by default (:class:`~dynamask.models.roi_heads.MultiLevelRoIPool`, 7×7, sampling ratio 2,
            ``aligned=False``: torchvision's ``MultiScaleRoIAlign``, on our kernel; a ``MultiScaleRoIAlign``
            is used as given). Any other name is refused, naming the closest valid one.
    """

    roi_heads: DynaMaskRoIHeads
    transform: SafeResizeTransform

    def __init__(self, backbone: nn.Module, num_classes: int | None = 91, *,
                 anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES, box_representation_size: int = 1024,
                 roi_canonical_scale: float = 224.0,
                 mask_head: DynaMaskHead | None = None, msm: MaskSwitchModule | None = None,
                 # the mask branch's settings (roi_heads.MaskBranchSettings, whose defaults these are)
                 edge_weight: float = MASK_DEFAULTS.edge_weight, budget_weight: float = MASK_DEFAULTS.budget_weight,
                 target_gmacs: float | None = MASK_DEFAULTS.target_gmacs, gumbel_tau: float = MASK_DEFAULTS.gumbel_tau,
                 mask_policy: routing_policy.Policy = MASK_DEFAULTS.mask_policy,
                 mask_training: str = MASK_DEFAULTS.mask_training,
                 mask_rois_per_image: int | None = MASK_DEFAULTS.mask_rois_per_image,
                 routing_signal: mask_losses.RoutingSignal = MASK_DEFAULTS.routing_signal,
                 coupled: bool = MASK_DEFAULTS.coupled, switch_input: str = MASK_DEFAULTS.switch_input,
                 **kwargs: Any) -> None:
        check_detector_kwargs(kwargs, mask_head, where=type(self).__name__)  # a typo would reach the transform
        out_channels: int = cast(int, backbone.out_channels)  # torchvision's backbones declare it
        # Built here, in this order, so that a seeded model gets the same initial weights as before
        # DynaMaskRCNN derived from MaskRCNN: RPN head, mask head, box head, box predictor, switch.
        anchors = kwargs.pop("rpn_anchor_generator", None)
        anchors = default_anchor_generator(anchor_sizes) if anchors is None else anchors
        rpn_head = kwargs.pop("rpn_head", None)
        if rpn_head is None:
            rpn_head = RPNHead(out_channels, anchors.num_anchors_per_location()[0])
        mask_head = DynaMaskHead(in_channels=out_channels) if mask_head is None else mask_head
        box_pool = kwargs.pop("box_roi_pool", None)
        if box_pool is None:
            box_pool = MultiLevelRoIPool(output_size=7, sampling_ratio=2, aligned=False,
                                         canonical_scale=roi_canonical_scale)
        elif not isinstance(box_pool, (MultiLevelRoIPool, MultiScaleRoIAlign)):
            raise TypeError(f"box_roi_pool must be a MultiLevelRoIPool or torchvision's MultiScaleRoIAlign, got "
                            f"{type(box_pool).__name__}")
        box_head = kwargs.pop("box_head", None)
        if box_head is None:
            box_head = TwoMLPHead(out_channels * box_pool.output_size[0] ** 2, box_representation_size)
        box_predictor = kwargs.pop("box_predictor", None)
        if box_predictor is None:
            if num_classes is None:
                raise ValueError("num_classes is None: give the number of classes (background included) or a "
                                 "box_predictor")
            box_predictor = FastRCNNPredictor(box_representation_size, num_classes)
        if msm is None:
            msm = switch_for(mask_head, reads=switch_input)
        # torchvision's constructor: RPN, transform and box-branch settings from torchvision's arguments.
        # Its mask branch gets placeholders (it would otherwise build an unused 4-conv head) and its RoI heads
        # are then replaced by ours, which take their box-branch settings from the ones it built.
        super().__init__(backbone, None, rpn_anchor_generator=anchors, rpn_head=rpn_head,
                         box_roi_pool=box_pool if isinstance(box_pool, MultiScaleRoIAlign) else None,
                         box_head=box_head, box_predictor=box_predictor,
                         mask_head=nn.Identity(), mask_predictor=nn.Identity(), **kwargs)
        self.roi_heads = DynaMaskRoIHeads(
            box_roi_pool=box_pool, box_head=box_head, box_predictor=box_predictor,
            **box_branch_settings(cast(RoIHeads, self.roi_heads)),  # torchvision's, until replaced here
            mask_head=mask_head, msm=msm,
            mask_roi_pool=MultiLevelRoIPool(output_size=mask_head.resolutions[0], sampling_ratio=2, aligned=True,
                                            canonical_scale=roi_canonical_scale),
            settings=MaskBranchSettings(edge_weight=edge_weight, budget_weight=budget_weight, target_gmacs=target_gmacs,
                                        gumbel_tau=gumbel_tau, mask_policy=mask_policy, mask_training=mask_training,
                                        mask_rois_per_image=mask_rois_per_image, routing_signal=routing_signal,
                                        coupled=coupled, switch_input=switch_input),
        )
        self.transform = SafeResizeTransform.like(cast(GeneralizedRCNNTransform, self.transform))

    @property
    def mask_training(self) -> str:
        """"pretrain" (all resolutions supervised, MSM unused) or "dynamic" (Eq. 3–7)."""
        return self.roi_heads.mask_training

    @mask_training.setter
    def mask_training(self, mode: str) -> None:
        self.roi_heads.mask_training = mode

    @property
    def mask_policy(self) -> routing_policy.Policy:
        """Inference routing: "msm", "size", 14/28/56/112, or a callable (see ``choose_resolutions``)."""
        return self.roi_heads.mask_policy

    @mask_policy.setter
    def mask_policy(self, policy: routing_policy.Policy) -> None:
        self.roi_heads.mask_policy = policy

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, *,
                paste_masks: bool = True):
        """Training: dict of losses. Eval: per image ``boxes, labels, scores, masks [N,1,H,W],
        mask_resolution [N]`` in the original image frame.

        Images must be ``[3, H, W]`` finite floats in [0, 1] (float16 / bfloat16 ones are converted to the
        model's dtype); in training, each target's boxes must overlap its image, its labels be in
        ``1 .. num_classes - 1`` and its ``masks`` be ``[N, H, W]`` of its image, one per box.
        ``model([])`` returns ``[]`` in eval mode.

        ``paste_masks=False`` (eval): each image's masks stay unpasted, as ``mask_handoff`` (a
        :class:`~dynamask.models.mask_handoff.MaskHandoff`) in place of ``masks``, for a caller that pastes
        only some detections or straight to RLE (:func:`~dynamask.models.mask_handoff.paste_binary`,
        :func:`~dynamask.models.mask_handoff.paste_rle`): the same pixels, without N full-size float canvases.
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
        if self.training or not paste_masks:
            return out
        # the heads hand each image's masks over as a MaskHandoff; postprocess rescaled the boxes to the
        # original images, so each canvas is its image's size
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        return [mask_handoff.paste_instance_masks(det, size) for det, size in zip(out, sizes)]


def valid_kwargs() -> set[str]:
    """The keyword arguments :class:`DynaMaskRCNN` takes: its own, torchvision's ``MaskRCNN`` ones (but the
    mask branch's it replaces) and the transform's."""
    return (_keywords(DynaMaskRCNN.__init__) | _keywords(MaskRCNN.__init__) | set(TRANSFORM_KWARGS)) - set(
        REPLACED_MASK_ARGS)


def _keywords(fn: Any) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def check_detector_kwargs(kwargs: Mapping[str, Any], mask_head: Any = None, *, where: str,
                          extra: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuses what :class:`DynaMaskRCNN` cannot take, in one line: torchvision's mask-branch arguments that
    DynaMask's branch replaces (saying what to use instead), a ``mask_head`` that is not a
    :class:`~dynamask.models.mask_head.DynaMaskHead`, and unknown names (naming the closest valid one among
    :func:`valid_kwargs` and ``extra``)."""
    for name, instead in REPLACED_MASK_ARGS.items():
        if name in kwargs:
            raise UnknownArgumentError(f"{where}() does not take torchvision's {name}: {instead}")
    if mask_head is not None and not isinstance(mask_head, DynaMaskHead):
        raise TypeError(f"{where}(): mask_head must be a DynaMaskHead (DynaMask's mask branch replaces "
                        f"torchvision's), got {type(mask_head).__name__}")
    check_kwargs(kwargs, valid_kwargs() | set(extra), where=where)
