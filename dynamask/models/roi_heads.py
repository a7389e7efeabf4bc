"""RoI heads of DynaMask: torchvision's box branch (pooled by our kernel) + the dynamic mask branch.

Reused from torchvision, unchanged: box head, box predictor, box coder, matcher, sampler, target
assignment, ``fastrcnn_loss`` and ``postprocess_detections`` (the class derives from torchvision's
``RoIHeads`` and overrides ``forward`` only, so no torchvision code is patched).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from dynamask import ops
from dynamask.models import mask_handoff, mask_losses, routing_policy
from dynamask.models.flops import mask_head_gmacs
from dynamask.models.mask_head import DynaMaskHead
from dynamask.models.msm import MaskSwitchModule
from dynamask.models.roi_pool import MultiLevelRoIPool, PooledRoIs
from dynamask.models.switch_input import check_switch_input, needs_trunk, switch_view

MASK_TRAINING_MODES = ("pretrain", "dynamic")


def subsample_positives(pos: Tensor, cap: int | None) -> Tensor:
    """A random subset of at most ``cap`` of the positive indices ``pos`` ``[P]``, kept in order (None: all).
    The one rule for the mask branch's supervision cap, DynaMask's and the capped Mask R-CNN peer's."""
    if cap is None or pos.numel() <= cap:
        return pos
    keep = torch.randperm(pos.numel(), device=pos.device)[:cap]
    return pos[keep.sort().values]


class TrainingPositives(NamedTuple):
    """The positive proposals that train the mask branch (:meth:`DynaMaskRoIHeads.training_positives`)."""

    boxes: list[Tensor]  # per image [p_i, 4], the network's input frame
    matched_idxs: list[Tensor]  # per image [p_i] int64: each one's ground-truth index
    labels: Tensor  # [P] int64, image-major: their classes


class HeadOutputs(NamedTuple):
    """The mask head at every resolution on given boxes (:meth:`DynaMaskRoIHeads.masks_every_resolution`)."""

    roi_features: Tensor  # [R, C, S_0, S_0]
    trunk: Tensor  # [R, C_0, S_0, S_0]
    mask_logits: list[Tensor]  # K × [R, S_k, S_k]
    edge_logits: list[Tensor]  # K × [R, S_k, S_k]


class Routed(NamedTuple):
    """The mask branch's routing step on one batch (:meth:`DynaMaskRoIHeads.route`)."""

    pooled: PooledRoIs
    trunk: Tensor | None  # [R, C_0, S_0, S_0] when the switch reads the trunk's output, else None
    choice: Tensor  # [R] int64 resolution index per RoI, image-major


def box_branch_settings(heads: RoIHeads) -> dict[str, Any]:
    """The box-branch settings of a built torchvision ``RoIHeads``, as :class:`DynaMaskRoIHeads` keywords
    (``fg_iou_thresh`` ... ``detections_per_img``): read back from what torchvision's ``FasterRCNN``
    constructor made of its arguments, so that its defaults stay the only ones."""
    return dict(fg_iou_thresh=heads.proposal_matcher.high_threshold,
                bg_iou_thresh=heads.proposal_matcher.low_threshold,
                batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
                positive_fraction=heads.fg_bg_sampler.positive_fraction,
                bbox_reg_weights=tuple(heads.box_coder.weights), score_thresh=heads.score_thresh,
                nms_thresh=heads.nms_thresh, detections_per_img=heads.detections_per_img)


@dataclass(frozen=True)
class MaskBranchSettings:
    """The mask branch's settings, passed whole to :class:`DynaMaskRoIHeads`; the defaults (the paper's λ1, λ2,
    τ; no budget; Eq. 3 routing) are also :class:`~dynamask.models.detector.DynaMaskRCNN`'s. See
    :class:`DynaMaskRoIHeads` for what each one means."""

    edge_weight: float = 0.1
    budget_weight: float = 0.4
    target_gmacs: float | None = None
    gumbel_tau: float = 0.5
    mask_policy: routing_policy.Policy = "msm"
    mask_training: str = "pretrain"
    mask_rois_per_image: int | None = None
    routing_signal: mask_losses.RoutingSignal = "paper"
    coupled: bool = True
    switch_input: str = "roi"


MASK_DEFAULTS = MaskBranchSettings()


class DynaMaskRoIHeads(RoIHeads):
    """torchvision's box branch + DynaMask's mask branch (dual-level FPN head, MSM, dispatcher).

    Args:
        box_roi_pool, box_head, box_predictor: as torchvision's ``RoIHeads``.
        fg_iou_thresh ... detections_per_img: as torchvision's ``RoIHeads``.
        mask_head: the dual-level FPN head.
        msm: the Mask Switch Module.
        mask_roi_pool: pools the 14×14 RoI feature (aligned=True by default).
        settings: the mask branch's :class:`MaskBranchSettings`, held as attributes of the same names (the
            training and the switch fit change some of them later):

            - ``edge_weight``: λ1. ``budget_weight``: λ2 (weights budget and entropy). ``target_gmacs``: C_t in
              GMAC per RoI (None = no budget term). ``gumbel_tau``: τ.
            - ``mask_policy``: inference routing ("msm", "size", 14/28/56/112 or a callable).
            - ``mask_training``: "pretrain" or "dynamic".
            - ``mask_rois_per_image``: at most this many positive RoIs per image (a random subset) train the
              mask branch; None trains it on every positive, as Mask R-CNN and the paper do. A speed knob for
              small CPU runs: the mask head's cost grows with the positives while the box branch learns.
            - ``routing_signal``: what the switch learns from in the dynamic phase: "paper" (each resolution's
              loss against its own target, Eq. 3), "grid" (all resolutions scored on the finest grid) or
              "boundary" (the same, in a band around the outline); see :mod:`dynamask.models.mask_losses`.
            - ``coupled``: True: Eq. 3 (one term trains the stages and the switch). False: the stages keep the
              pretrain supervision and the switch learns from detached losses.
            - ``switch_input``: what the MSM reads, detached: "roi" (the 14×14 RoI feature, docs/method.md §3),
              "trunk" (the trunk's output) or "mask" (the trunk's output and its 14² mask and edge logits);
              see :mod:`dynamask.models.switch_input`. The MSM's ``in_channels`` must match
              (:func:`~dynamask.models.switch_input.switch_channels`).
    """

    mask_sizes: Tensor  # [K] int64 buffer: S_k per resolution index

    def __init__(self, *, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: nn.Module,
                 fg_iou_thresh: float, bg_iou_thresh: float, batch_size_per_image: int,
                 positive_fraction: float, bbox_reg_weights: tuple[float, float, float, float] | None,
                 score_thresh: float, nms_thresh: float, detections_per_img: int,
                 mask_head: DynaMaskHead, msm: MaskSwitchModule, mask_roi_pool: MultiLevelRoIPool,
                 settings: MaskBranchSettings = MASK_DEFAULTS) -> None:
        super().__init__(box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
                         batch_size_per_image, positive_fraction, bbox_reg_weights, score_thresh, nms_thresh,
                         detections_per_img)
        if mask_roi_pool.output_size != (mask_head.resolutions[0],) * 2:
            raise ValueError(f"mask_roi_pool.output_size {mask_roi_pool.output_size} must be the mask head's first "
                             f"resolution {mask_head.resolutions[0]}")
        self.mask_head = mask_head
        # S_k per resolution index, on the model's device: mask_resolution is a gather, not a host copy
        # (a blocking copy to the GPU would wait for the device on every batch); not in the state dict
        self.register_buffer("mask_sizes", torch.tensor(mask_head.resolutions, dtype=torch.int64), persistent=False)
        self.msm = msm
        # GMAC per RoI at each resolution, for the budget term: a function of the head's layers, computed once
        self.mask_costs = tuple(mask_head_gmacs(mask_head).values())
        self.dyn_mask_roi_pool = mask_roi_pool
        self.edge_weight = float(settings.edge_weight)
        self.budget_weight = float(settings.budget_weight)
        self.target_gmacs = None if settings.target_gmacs is None else float(settings.target_gmacs)
        self.gumbel_tau = float(settings.gumbel_tau)
        self.mask_policy = settings.mask_policy
        self.mask_training = settings.mask_training
        if settings.mask_rois_per_image is not None and settings.mask_rois_per_image < 1:
            raise ValueError(f"mask_rois_per_image must be None or >= 1, got {settings.mask_rois_per_image}")
        self.mask_rois_per_image = settings.mask_rois_per_image
        mask_losses.check_routing(settings.routing_signal, settings.coupled)
        check_switch_input(settings.switch_input)
        self.routing_signal = settings.routing_signal
        self.coupled = settings.coupled
        self.switch_input = settings.switch_input

    # -- settings ---------------------------------------------------------------------------------
    @property
    def mask_training(self) -> str:
        return self._mask_training

    @mask_training.setter
    def mask_training(self, mode: str) -> None:
        if mode not in MASK_TRAINING_MODES:
            raise ValueError(f"mask_training must be one of {MASK_TRAINING_MODES}, got {mode!r}")
        self._mask_training = mode

    @property
    def mask_policy(self) -> routing_policy.Policy:
        return self._mask_policy

    @mask_policy.setter
    def mask_policy(self, policy: routing_policy.Policy) -> None:
        routing_policy.check_policy(policy, self.mask_head.resolutions)
        self._mask_policy = policy

    def has_mask(self) -> bool:  # torchvision's check_targets asks for "masks" when this is True
        return True

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
        """Same contract as torchvision's ``RoIHeads.forward`` for the entries torchvision knows.

        Eval: one dict per image with torchvision's ``boxes [N, 4]`` (input frame), ``labels [N]`` and
        ``scores [N]``, and two more entries, in place of torchvision's ``masks``:

        - ``mask_resolution``: ``[N]`` int64, each detection's mask side (14/28/56/112);
        - ``mask_handoff``: a :class:`~dynamask.models.mask_handoff.MaskHandoff` (not a tensor), the
          detections' mask probabilities grouped by resolution and each one's row among them.

        torchvision's ``transform.postprocess`` rescales ``boxes`` (and would paste a ``masks`` entry, of
        which there is none) and passes the two through; :class:`~dynamask.models.detector.DynaMaskRCNN`
        then replaces ``mask_handoff`` by the pasted ``masks [N, 1, H, W]``.
        Training: ``loss_classifier``, ``loss_box_reg`` and the mask-branch terms.
        """
        if not self.training:
            boxes, scores, labels = self.detect_boxes(features, proposals, image_shapes)
            result: list[dict[str, Any]] = [{"boxes": b, "labels": lab, "scores": s}
                                            for b, s, lab in zip(boxes, scores, labels)]
            self.predict_masks(features, result, image_shapes)
            return result, {}
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self._box_outputs(features, proposals, image_shapes)
        assert targets is not None
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        pos = self.training_positives(proposals, matched_idxs, labels)
        losses.update(self.mask_losses(features, pos.boxes, pos.matched_idxs, image_shapes, targets, pos.labels))
        return [], losses

    # -- the public door to the branches' outputs (evaluation, the switch fit, probes and the study) --------
    def _box_outputs(self, features: dict[str, Tensor], proposals: list[Tensor],
                     image_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        return self.box_predictor(box_features)

    def detect_boxes(self, features: dict[str, Tensor], proposals: list[Tensor],
                     image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The box branch at inference: per image ``boxes [n_i, 4]`` (input frame), ``scores [n_i]``,
        ``labels [n_i]`` (torchvision's ``postprocess_detections``: score threshold, NMS, top detections)."""
        class_logits, box_regression = self._box_outputs(features, proposals, image_shapes)
        return self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)

    def training_positives(self, proposals: list[Tensor], matched_idxs: list[Tensor],
                           labels: list[Tensor]) -> TrainingPositives:
        """The sampled proposals that train the mask branch: each image's positives, at most
        ``mask_rois_per_image`` of them (a random subset). Inputs per image, as ``select_training_samples``
        returns them: ``proposals [n_i, 4]``, ``matched_idxs [n_i]``, ``labels [n_i]``."""
        pos = [self._subsample_positives(torch.where(lab > 0)[0]) for lab in labels]
        return TrainingPositives([p[i] for p, i in zip(proposals, pos)], [m[i] for m, i in zip(matched_idxs, pos)],
                                 torch.cat([lab[i] for lab, i in zip(labels, pos)]))

    def sample_training_positives(self, proposals: list[Tensor],
                                  targets: list[dict[str, Tensor]]) -> TrainingPositives:
        """:meth:`training_positives` of proposals sampled as training samples them (torchvision's
        ``select_training_samples``: ground-truth boxes added, matched, a positive/negative sample)."""
        proposals, matched_idxs, labels, _ = self.select_training_samples(proposals, targets)
        return self.training_positives(proposals, matched_idxs, labels)

    def masks_every_resolution(self, features: dict[str, Tensor], boxes: list[Tensor],
                               image_shapes: list[tuple[int, int]], labels: Tensor | None = None) -> HeadOutputs:
        """Every stage of the mask head on every box (no routing): what training supervises and what a
        switch fit, a probe or the study compares across resolutions.

        Args:
            features: the backbone's output. boxes: per image ``[n_i, 4]`` in the network's input frame.
            labels: ``[R]`` the boxes' classes, image-major (read by a class-specific head only).
        """
        roi_features, levels, scales, rois = self._pool_masks(features, boxes, image_shapes)
        head = self.mask_head
        r = rois.shape[0]
        if r == 0:
            empty = [roi_features.new_zeros((0, s, s)) for s in head.resolutions]
            trunk = roi_features.new_zeros((0, head.channels[0], *roi_features.shape[-2:]))
            return HeadOutputs(roi_features, trunk, empty, list(empty))
        trunk = head.run_trunk(roi_features)
        masks, edges = head.forward_train(roi_features, levels, scales, rois, trunk, self._labels(labels))
        return HeadOutputs(roi_features, trunk, list(masks), list(edges))

    def switch_scores(self, features: dict[str, Tensor], boxes: list[Tensor],
                      image_shapes: list[tuple[int, int]]) -> Tensor:
        """The switch's unpriced scores ``[R, K]`` (``msm.raw``, before the cost penalty) on the boxes,
        image-major: what a price is set on."""
        pooled = self._pool_masks(features, boxes, image_shapes)
        return self.msm.raw(self.switch_features(pooled.features))

    def _subsample_positives(self, pos: Tensor) -> Tensor:
        """A random subset of at most ``mask_rois_per_image`` of the positive indices ``[P]`` (sorted)."""
        return subsample_positives(pos, self.mask_rois_per_image)

    def _pool_masks(self, features: dict[str, Tensor], boxes: list[Tensor],
                    image_shapes: list[tuple[int, int]]) -> PooledRoIs:
        """The mask head's S_0 × S_0 RoI features, with the levels, scales and RoIs its stages read."""
        return self.dyn_mask_roi_pool.pool(features, boxes, image_shapes)

    def mask_losses(self, features: dict[str, Tensor], proposals: list[Tensor], matched_idxs: list[Tensor],
                    image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]],
                    labels: Tensor | None = None) -> dict[str, Tensor]:
        """Mask-branch training losses on the positive RoIs (all K stages run on every one). ``labels``:
        ``[R]`` their classes (image-major), read by a class-specific head."""
        roi_features, levels, scales, rois = self._pool_masks(features, proposals, image_shapes)
        if rois.shape[0] == 0:
            return self._zero_mask_losses(roi_features)
        trunk = self.mask_head.run_trunk(roi_features) if needs_trunk(self.switch_input) else None
        mask_logits, edge_logits = self.mask_head.forward_train(roi_features, levels, scales, rois, trunk,
                                                                self._labels(labels))
        # under autocast the logits come in half precision; the losses (and Gumbel noise) run in float
        mask_logits, edge_logits = [x.float() for x in mask_logits], [x.float() for x in edge_logits]
        mask_t = mask_losses.mask_targets([t["masks"] for t in targets], proposals, matched_idxs,
                                          self.mask_head.resolutions)
        edge_t = [mask_losses.edge_targets(m) for m in mask_t]
        if self.mask_training == "pretrain":
            return mask_losses.pretrain_losses(mask_logits, edge_logits, mask_t, edge_t,
                                               edge_weight=self.edge_weight)
        msm_logits = self.msm(self.switch_features(roi_features, trunk)).float()
        costs = list(self.mask_costs)
        return mask_losses.dynamic_losses(mask_logits, edge_logits, mask_t, edge_t, msm_logits,
                                          edge_weight=self.edge_weight, budget_weight=self.budget_weight,
                                          target_gmacs=self.target_gmacs, costs_gmacs=costs, tau=self.gumbel_tau,
                                          routing_signal=self.routing_signal, coupled=self.coupled)

    def _labels(self, labels: Tensor | None) -> Tensor | None:
        """The labels a class-specific head reads; None for a class-agnostic one (so it never needs them)."""
        return labels if self.mask_head.mask_classes > 1 else None

    def switch_features(self, roi_features: Tensor, trunk: Tensor | None = None) -> Tensor:
        """What the MSM reads, detached (:func:`~dynamask.models.switch_input.switch_view`); ``trunk`` is
        computed here when needed and None."""
        return switch_view(self.switch_input, self.mask_head, roi_features, trunk)

    def _zero_mask_losses(self, roi_features: Tensor) -> dict[str, Tensor]:
        """Losses of a batch with no positive RoI (``roi_features [0, C, S, S]``): zeros still connected
        to the mask branch's parameters, and in the dynamic phase the entropy term all the same.

        The entropy term's frequencies are all-reduced over the processes under DDP, so every process
        must reach that collective on every step, with or without positives, and its backward too (so the
        empty probabilities are connected to the graph); here it contributes no RoI (count 0) and
        receives the other processes' frequencies.
        """
        zero = cast(Tensor, sum(p.sum() * 0.0 for p in self.mask_head.parameters()))  # the head has weights
        out = {"loss_mask": zero, "loss_edge": zero}
        if self.mask_training == "dynamic":
            zero = zero + sum(p.sum() * 0.0 for p in self.msm.parameters())
            probs = roi_features.new_zeros((0, self.msm.num_resolutions), dtype=torch.float32) + zero  # [0, K]
            if not (self.coupled and self.routing_signal == "paper"):
                out["loss_route"] = zero
            out["loss_entropy"] = zero + self.budget_weight * mask_losses.entropy_loss(probs)
            if self.target_gmacs is not None:
                out["loss_budget"] = zero
        return out

    @torch.no_grad()
    def route(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
              scores: list[Tensor] | None = None) -> Routed:
        """The mask branch's inference up to the choice, under the current ``mask_policy``: the pooled RoIs,
        the trunk's output when the switch reads it (run once, before the choice, for every RoI; else None)
        and the resolution index per RoI ``[R]`` int64 (image-major). ``scores``: per image ``[n_i]`` the
        detections' scores, which a fitted switch weighs its choice by (None: every box a sure one)."""
        pooled = self._pool_masks(features, boxes, image_shapes)
        reads_trunk = self.mask_policy == "msm" and needs_trunk(self.switch_input)
        trunk = self.mask_head.run_trunk(pooled.features) if reads_trunk else None
        seen = self.switch_features(pooled.features, trunk) if reads_trunk else pooled.features
        # only the switch reads the scores
        confidence = torch.cat(scores) if scores and self.mask_policy == "msm" else None
        choice = routing_policy.choose_resolutions(self.mask_policy, msm=self.msm, roi_features=seen, boxes=boxes,
                                                   image_sizes=image_shapes, resolutions=self.mask_head.resolutions,
                                                   confidence=confidence)
        return Routed(pooled, trunk, choice)

    def predict_masks(self, features: dict[str, Tensor], result: list[dict[str, Any]],
                      image_shapes: list[tuple[int, int]]) -> None:
        """Adds ``mask_resolution`` and ``mask_handoff`` to each image's detections (in place; see
        :meth:`forward`). The RoIs are sorted by resolution once; each image's hand-off holds views of the
        head's outputs and the row of each detection's mask, which the paste reads in box order."""
        boxes = [r["boxes"] for r in result]
        resolutions = self.mask_head.resolutions
        (roi_features, levels, scales, rois), trunk, choice = self.route(features, boxes, image_shapes,
                                                                         [r["scores"] for r in result])
        perm, _ = ops.group_by_resolution(choice, len(resolutions))
        image_ids = rois[:, 0].to(torch.int64)
        counts = mask_handoff.count_groups(choice, image_ids, len(resolutions), len(result))  # [K, B]
        counts_host = counts.tolist()  # the batch's one host sync: the stages' sizes and each image's share
        labels = torch.cat([r["labels"] for r in result]) if self.mask_head.mask_classes > 1 else None
        logits = self.mask_head.forward_dispatched(roi_features[perm], levels, scales, rois[perm],
                                                   [sum(c) for c in counts_host],
                                                   None if trunk is None else trunk[perm],
                                                   None if labels is None else labels[perm])
        handoffs = mask_handoff.split_by_image([x.sigmoid() for x in logits], perm, choice, image_ids, counts,
                                               counts_host)
        for r, handoff, c in zip(result, handoffs, choice.split([b.shape[0] for b in boxes])):
            r["mask_resolution"] = self.mask_sizes[c]
            r[mask_handoff.HANDOFF_KEY] = handoff
