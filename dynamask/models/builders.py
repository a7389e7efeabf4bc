"""Builders of DynaMask detectors on ResNet-FPN backbones (plain functions, no registry).

Weights are local files only (nothing is downloaded), read with ``torch.load(weights_only=True)``:

- ``weights``: a DynaMask state dict, or a checkpoint dict holding one under ``"model"`` (a path or the dict);
  or, as torchvision's builders take it, a torchvision weights enum, ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``
  (or ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``): its file is read from the torch hub cache
  (:mod:`dynamask.models.hub_weights`) and imported as ``torchvision_weights`` below, with FrozenBatchNorm
  ``eps=0`` as torchvision sets it for these weights; ``num_classes`` then defaults to the enum's categories;
- ``weights_backbone``: a torchvision ResNet (ImageNet) state dict, path, or enum (``ResNet50_Weights.IMAGENET1K_V1``
  for depth 50, ..., read from the hub cache); ignored when ``weights`` is given, as in torchvision;
- ``torchvision_weights``: a path or state dict of torchvision's ``maskrcnn_resnet50_fpn`` (same
  depth): its backbone, FPN, RPN and box head are loaded, the box predictor only when ``num_classes``
  matches; the mask head stays freshly initialised (a ``UserWarning`` says so). Note that torchvision's
  released COCO weights were trained with FrozenBatchNorm ``eps=0`` (torchvision calls
  ``overwrite_eps(model, 0.0)`` after loading them); the enum does it, a path or state dict does not: do the
  same for bit-identical detections with those weights.

Backbone freezing and normalisation follow torchvision: with no pretrained weights every layer trains
and BatchNorm is ordinary; with any weights, FrozenBatchNorm and 3 trainable layers by default.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum, resnet
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _validate_trainable_layers
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from dynamask.checks import UnknownArgumentError, first_non_finite, model_num_classes, torch_load_detail
from dynamask.models import hub_weights
from dynamask.models.detector import DynaMaskRCNN, check_detector_kwargs
from dynamask.models.mask_head import DynaMaskHead
from dynamask.models.msm import DEFAULT_HEADS, switch_for

RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
TORCHVISION_PREFIXES = ("backbone.", "rpn.", "roi_heads.box_head.")
BOX_PREDICTOR_PREFIX = "roi_heads.box_predictor."

StateDict = Mapping[str, Tensor]
Weights = str | os.PathLike | StateDict
PAPER_IMAGE_SIDE = 800  # the shorter side the paper's stage levels (P4, P3, P2) were designed for
PAPER_STAGE_LEVELS = (2, 1, 0)  # the FPN level each r-FPN stage fuses, as indices into [P2, P3, P4, P5]


def stage_levels_for(min_size: int | Sequence[int]) -> tuple[int, ...]:
    """The FPN level each r-FPN stage fuses, for images whose shorter side is ``min_size`` (the largest of
    several): the paper's P4, P3, P2 at ~800 px, one level finer per halving of the images, never finer than
    P2. At 192 px that is P2 for every stage: the objects sit two levels finer than on 800-px images, and the
    paper's P4 (12 × 12 there) added nothing to a 28² mask (the accuracy study, docs/method.md §3)."""
    side = max(min_size) if isinstance(min_size, Sequence) else int(min_size)
    if side < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    shift = max(0, round(math.log2(PAPER_IMAGE_SIDE / side)))
    return tuple(max(level - shift, 0) for level in PAPER_STAGE_LEVELS)


DEFAULT_NUM_CLASSES = 91  # torchvision's, when neither num_classes nor a weights enum says


def _load(source: str | os.PathLike | StateDict, what: str) -> dict[str, Tensor]:
    named = _named(source, what)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{named}: file not found")
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # never relay torch's advice to load the file unsafely
            raise ValueError(f"{named}: not a readable torch state dict ({torch_load_detail(exc)})") from None
    else:
        obj = source
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"{named} must be a path to a state dict or a state dict, got {type(obj).__name__}")
    bad = first_non_finite(obj)
    if bad is not None:
        raise ValueError(f"{named}: weights hold NaN or infinite values (parameter {bad!r})")
    return dict(obj)


def _named(source: Any, what: str) -> str:
    return f"{what} {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else what


def _load_into(module: nn.Module, state: dict[str, Tensor], named: str) -> None:
    """``module.load_state_dict(state)``; a mismatch names the file and its first differences."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"{named}: weights do not fit this architecture ({detail[:300]})") from exc


def select_box_classes(src: dict[str, Tensor], class_ids: Sequence[int]) -> dict[str, Tensor]:
    """``src`` with its box predictor cut to the classes ``class_ids`` (the source's class index of each of the
    model's labels 1, 2, ...; the background, 0, is kept first): torchvision's COCO models index their 91
    outputs by COCO category id, a COCO data set here numbers its 80 categories 1..80."""
    rows = torch.tensor([0, *[int(c) for c in class_ids]])
    out = dict(src)
    cls_w = src.get(BOX_PREDICTOR_PREFIX + "cls_score.weight")
    if cls_w is None:
        return out
    if int(rows.max()) >= cls_w.shape[0] or int(rows.min()) < 0:
        raise ValueError(f"torchvision_label_ids: class {int(rows.max())} is not among the weights' "
                         f"{cls_w.shape[0]} classes")
    box_rows = (rows[:, None] * 4 + torch.arange(4)).flatten()
    for name, index in (("cls_score.weight", rows), ("cls_score.bias", rows), ("bbox_pred.weight", box_rows),
                        ("bbox_pred.bias", box_rows)):
        key = BOX_PREDICTOR_PREFIX + name
        out[key] = src[key].index_select(0, index)
    return out


def load_torchvision_maskrcnn(model: DynaMaskRCNN, state: str | os.PathLike | StateDict,
                              class_ids: Sequence[int] | None = None) -> list[str]:
    """Loads backbone, FPN, RPN, box head (and the box predictor when the class count matches, or when
    ``class_ids`` maps the model's labels onto the weights' classes: :func:`select_box_classes`) from a
    torchvision ``maskrcnn_resnet50_fpn`` state dict. Returns the loaded keys."""
    src = _load(state, "torchvision_weights")
    if class_ids is not None:
        src = select_box_classes(src, class_ids)
    own = model.state_dict()
    prefixes: tuple[str, ...] = TORCHVISION_PREFIXES
    pred_key = BOX_PREDICTOR_PREFIX + "cls_score.weight"
    if pred_key in src and src[pred_key].shape == own[pred_key].shape:
        prefixes = prefixes + (BOX_PREDICTOR_PREFIX,)
    picked = {k: v for k, v in src.items() if k.startswith(prefixes) and not k.endswith("num_batches_tracked")}
    wanted = [k for k in own if k.startswith(prefixes)]
    missing = sorted(set(wanted) - set(picked))
    unexpected = sorted(set(picked) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"torchvision_weights do not match this architecture: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]} (is it a maskrcnn_resnet50_fpn state dict of this depth?)")
    model.load_state_dict(picked, strict=False)  # shape mismatches still raise
    return sorted(picked)


def _resnet_fpn(body: resnet.ResNet, trainable_layers: int, out_channels: int,
                fpn_norm: bool = False) -> BackboneWithFPN:
    """torchvision's ``_resnet_fpn_extractor`` (same freezing rule and module names, so torchvision
    weights load) with the FPN width as an argument instead of the fixed 256, and optionally GroupNorm
    (32 groups) after each FPN convolution."""
    if out_channels <= 0:
        raise ValueError(f"fpn_channels must be positive, got {out_channels}")
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in body.named_parameters():
        if not name.startswith(tuple(layers_to_train)):
            parameter.requires_grad_(False)
    return_layers = {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)}
    stage2 = body.inplanes // 8
    in_channels_list = [stage2 * 2 ** (k - 1) for k in (1, 2, 3, 4)]
    norm = functools.partial(nn.GroupNorm, min(32, out_channels)) if fpn_norm else None
    return BackboneWithFPN(body, return_layers, in_channels_list, out_channels, extra_blocks=LastLevelMaxPool(),
                           norm_layer=norm)


def dynamask_resnet_fpn(*, depth: int = 50, num_classes: int | None = None,
                        weights: Weights | WeightsEnum | None = None, progress: bool = True,
                        weights_backbone: Weights | WeightsEnum | None = None,
                        trainable_backbone_layers: int | None = None,
                        torchvision_weights: Weights | None = None,
                        torchvision_label_ids: Sequence[int] | None = None,
                        trunk_channels: int = 256, stage_channels: Sequence[int] = (128, 64, 32),
                        stage_levels: Sequence[int] | None = None, mask_roi_size: int = 14,
                        fpn_channels: int = 256, fpn_norm: bool = False,
                        frozen_bn: bool | None = None, class_specific_masks: bool = False,
                        msm_heads: int = DEFAULT_HEADS,
                        **kwargs: Any) -> DynaMaskRCNN:
    """A DynaMask detector on a ResNet-{18, 34, 50, 101} FPN.

    Args:
        depth: ResNet depth.
        num_classes: including background. None: the categories of a ``weights`` enum (91 for COCO_V1),
            else 91 (torchvision's default).
        weights: local DynaMask weights (the whole model; ``weights_backbone`` is then ignored), or a
            torchvision detection weights enum read from the torch hub cache (see the module docstring).
        progress: torchvision's argument, accepted so that its calls work unchanged; nothing is downloaded,
            so there is no progress to show.
        weights_backbone: local torchvision ResNet ImageNet weights, or their enum (hub cache).
        trainable_backbone_layers: 0–5 (torchvision's rule; 3 by default with weights, else 5).
        torchvision_weights: torchvision Mask R-CNN weights to import (see the module docstring).
        torchvision_label_ids: with torchvision's weights, the weights' class index of each label 1, 2, ... of
            this model (for a COCO data set, its COCO category ids): the box predictor is imported for those
            classes (``num_classes = len + 1``) instead of left untrained. ``dynamask train`` sets it when the
            data's categories are COCO's.
        trunk_channels: width of the 14×14 trunk (256; smaller for demo models).
        stage_channels: widths of the 28/56/112 stages ((128, 64, 32)).
        stage_levels: the FPN level each stage fuses, as an index into ``[P2, P3, P4, P5]``. None (the default):
            :func:`stage_levels_for` the images' ``min_size`` — the paper's (2, 1, 0) = P4, P3, P2 at
            torchvision's 800 px, (0, 0, 0) on 192-px images, where the paper's P4 added nothing to a 28²
            mask (docs/method.md §3).
        mask_roi_size: side of the RoI feature (14, the paper); the stages double it. Only tests and
            demos change it (e.g. 7 → 7/14/28/56, a quarter of the CPU time).
        fpn_channels: width of the FPN levels, which the RPN, box head, MSM and mask head read (256;
            torchvision's value). Demo models use 128.
        fpn_norm: GroupNorm in the FPN (False: torchvision's FPN, whose weights then load). Training from
            scratch converges faster with it ("Rethinking ImageNet Pre-training", He et al. 2019).
        frozen_bn: FrozenBatchNorm in the backbone and 3 trainable layers by default, as with weights
            (None: only when weights are given). A model trained from ImageNet weights records True in its
            checkpoint, so that it rebuilds without the weights file.
        class_specific_masks: one mask channel per class at every resolution, picked by each RoI's label
            (Mask R-CNN's predictor); False (the default, docs/method.md §3): class-agnostic masks. Costs
            ``(num_classes - 1) · C_k · S_k²`` MACs more per RoI at resolution k.
        msm_heads: heads of the Mask Switch Module, their outputs averaged (3; the paper's MSM is 1, which
            ``--recipe paper`` builds). A fitted switch's heads average out most of the variance between fits
            (docs/method.md §3, "Heads"); two more heads add 0.0013 GMAC per RoI.
        **kwargs: :class:`~dynamask.models.detector.DynaMaskRCNN` arguments (torchvision's ``min_size``,
            ``max_size``, ``box_score_thresh``, ``rpn_*``, ...; DynaMask's ``edge_weight``, ``budget_weight``,
            ``target_gmacs``, ``gumbel_tau``, ``mask_policy``, ``routing_signal``, ``coupled``,
            ``switch_input``, ...).
    """
    # a misspelt argument (min_szie) would otherwise fall through **kwargs and leave the default in place
    own = set(inspect.signature(dynamask_resnet_fpn).parameters) - {"kwargs"}  # only suggested: never in kwargs
    for name in ("backbone", "mask_head", "msm"):  # the builder makes these
        if name in kwargs:
            raise UnknownArgumentError(f"dynamask_resnet_fpn() builds the {name} itself; to pass your own, build "
                                       "a DynaMaskRCNN")
    check_detector_kwargs(kwargs, where="dynamask_resnet_fpn", extra=own)
    if depth not in RESNETS:
        raise ValueError(f"depth must be one of {sorted(RESNETS)}, got {depth}")
    # torchvision's enums: checked and their files found before anything is built
    detector_enum = weights if isinstance(weights, WeightsEnum) else None
    if detector_enum is not None:
        hub_weights.check_detector_enum(detector_enum, depth)
        if torchvision_weights is not None:
            raise ValueError("give torchvision's Mask R-CNN weights once: weights=<enum> or torchvision_weights")
        torchvision_weights = _load(hub_weights.cached_file(detector_enum, "weights"),
                                    f"weights={hub_weights.enum_name(detector_enum)}")
        weights = None
    if isinstance(weights_backbone, WeightsEnum):
        hub_weights.check_backbone_enum(weights_backbone, depth)
    if weights is not None or detector_enum is not None:
        weights_backbone = None  # the detector's weights hold the backbone's (torchvision does the same)
    if isinstance(weights_backbone, WeightsEnum):
        weights_backbone = hub_weights.cached_file(weights_backbone, "weights_backbone")
    if num_classes is None:
        num_classes = hub_weights.num_categories(detector_enum) if detector_enum else DEFAULT_NUM_CLASSES
    is_trained = weights is not None or weights_backbone is not None or torchvision_weights is not None
    if frozen_bn is not None:
        is_trained = frozen_bn
    trainable = _validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 3)
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    body = RESNETS[depth](weights=None, norm_layer=norm_layer)
    if weights_backbone is not None:
        _load_into(body, _load(weights_backbone, "weights_backbone"), _named(weights_backbone, "weights_backbone"))
    if fpn_norm and torchvision_weights is not None:
        raise ValueError("fpn_norm=True has no torchvision weights to import (torchvision's FPN has no norm)")
    backbone = _resnet_fpn(body, trainable, fpn_channels, fpn_norm)
    head = DynaMaskHead(in_channels=backbone.out_channels, trunk_channels=trunk_channels,
                        stage_channels=tuple(stage_channels),
                        stage_levels=tuple(stage_levels_for(kwargs.get("min_size", PAPER_IMAGE_SIDE))
                                           if stage_levels is None else stage_levels),
                        roi_size=mask_roi_size,
                        mask_classes=num_classes if class_specific_masks else 1)
    # built here, after the head (not by the detector), so that a seeded model keeps its initial weights
    msm = switch_for(head, reads=kwargs.get("switch_input", "roi"), num_heads=msm_heads)
    model = DynaMaskRCNN(backbone, num_classes, mask_head=head, msm=msm, **kwargs)
    if torchvision_weights is not None and weights is None:
        if torchvision_label_ids is not None and len(torchvision_label_ids) != num_classes - 1:
            raise ValueError(f"torchvision_label_ids names {len(torchvision_label_ids)} classes but num_classes "
                             f"{num_classes} has {num_classes - 1} besides the background")
        loaded = load_torchvision_maskrcnn(model, torchvision_weights, torchvision_label_ids)
        if detector_enum is not None and hub_weights.zero_eps(detector_enum):
            overwrite_eps(model, 0.0)  # as torchvision's builder: these weights were trained with eps 0
        source = (f"weights={hub_weights.enum_name(detector_enum)}" if detector_enum is not None
                  else _named(torchvision_weights, "torchvision_weights"))
        warnings.warn(untrained_head_message(source, model, loaded), UserWarning, stacklevel=2)
    if weights is not None:
        _load_into(model, _load(weights, "weights"), _named(weights, "weights"))
    return model


def untrained_head_message(source: str, model: DynaMaskRCNN, loaded: Sequence[str]) -> str:
    """One sentence: what imported torchvision weights (``source``) trained, and that the DynaMask mask head
    (and the box predictor, when ``num_classes`` differs and it was not ``loaded``) must still be trained."""
    if any(k.startswith(BOX_PREDICTOR_PREFIX) for k in loaded):
        return (f"{source}: the detector is trained but the DynaMask mask head is not, so its masks mean nothing "
                "until it is trained (e.g. `dynamask train --freeze detector`)")
    return (f"{source}: the backbone, FPN, RPN and box head are trained but the box predictor (num_classes "
            f"{model_num_classes(model)}, not the weights') and the DynaMask mask head are not, so detections and "
            "masks mean nothing until they are trained (e.g. `dynamask train`)")


def dynamask_resnet50_fpn(*, weights: Weights | WeightsEnum | None = None, progress: bool = True,
                          num_classes: int | None = None, weights_backbone: Weights | WeightsEnum | None = None,
                          trainable_backbone_layers: int | None = None, torchvision_weights: Weights | None = None,
                          **kwargs: Any) -> DynaMaskRCNN:
    """DynaMask on a ResNet-50 FPN; a drop-in for ``torchvision.models.detection.maskrcnn_resnet50_fpn``
    (same arguments: ``weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1``, ``progress``, ``num_classes``,
    ``weights_backbone=ResNet50_Weights.IMAGENET1K_V1``, ``trainable_backbone_layers``, torchvision's
    ``MaskRCNN`` keywords), except that enums are read from the torch hub cache, never downloaded, and that
    ``weights_backbone`` is None by default (torchvision's default is ImageNet weights).

    See :func:`dynamask_resnet_fpn` for the arguments.
    """
    return dynamask_resnet_fpn(depth=50, num_classes=num_classes, weights=weights, progress=progress,
                               weights_backbone=weights_backbone,
                               trainable_backbone_layers=trainable_backbone_layers,
                               torchvision_weights=torchvision_weights, **kwargs)
