"""The dual-level FPN mask head: a 14×14 trunk and three r-FPN stages (28, 56, 112).

Layers at the default widths (C_k = 256, 128, 64, 32 at S_k = 14, 28, 56, 112; docs/method.md §3):

- ``trunk``: 2 × (Conv2d 256→256 3×3, ReLU) at 14×14 → ``L_tiny``.
- stage s = 1, 2, 3 (→ 28, 56, 112), fusing the i-FPN level P4, P3, P2 respectively:

  - ``reduce[s]``: Conv2d C_{s-1}→C_s 1×1 at S_{s-1} (linear, so reducing before the ×2 bilinear
    upsample costs a quarter of reducing after it and gives the same result);
  - ``project[s]``: Conv2d 256→C_s 1×1 over the whole pyramid level, once per image (per-image work,
    not per RoI); the RoIs' crops ``P̃`` of the narrow map are taken by ONE
    :func:`dynamask.ops.roi_align_stages` call for all three stages at their own spatial scale
    (1/16, 1/8, 1/4), ``aligned=True``, sampling_ratio 2;
  - ``fam[s]``: :class:`~dynamask.models.fam.FeatureAggregation` on (upsampled L, P̃).

- ``mask_predictors[k]`` / ``edge_predictors[k]``: Conv2d C_k→1 1×1 at every resolution,
  class-agnostic (docs/method.md §3). Edge predictors are used in training only. With
  ``mask_classes = M > 1`` the mask predictors are class-specific (C_k→M, as Mask R-CNN's) and each RoI's
  mask is its label's channel: on data where one object's box holds another (a ring around a disk), a
  class-agnostic mask cannot tell which of the two it is asked for (benchmarks/results/accuracy_cpu_paper_levels.md).

At inference the RoIs come sorted by descending chosen resolution (the dispatcher), so stage s runs on
the contiguous prefix of RoIs that need it, and each RoI's mask predictor runs at its own resolution only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamask import ops
from dynamask.models.fam import FeatureAggregation

RESOLUTIONS: tuple[int, ...] = (14, 28, 56, 112)  # the default head's: a 14² RoI doubled by three stages


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:  # always, as built here; the check tells mypy
        nn.init.zeros_(conv.bias)
    return conv


def _predictor(cin: int, cout: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 1)
    nn.init.normal_(conv.weight, std=0.001)
    if conv.bias is not None:  # always, as built here; the check tells mypy
        nn.init.zeros_(conv.bias)
    return conv


class DynaMaskHead(nn.Module):
    """Trunk + r-FPN stages + per-resolution class-agnostic predictors.

    Args:
        in_channels: width of the i-FPN levels and of the 14×14 RoI feature (256).
        trunk_channels: width of the 14×14 trunk, C_0 (256).
        num_trunk_convs: number of 3×3 convs in the trunk (2).
        stage_channels: widths C_1, C_2, C_3 of the 28, 56, 112 stages (128, 64, 32).
        stage_levels: for each stage, the index of the i-FPN level it fuses in the feature list
            ``[P2, P3, P4, P5]`` (2, 1, 0 = P4, P3, P2).
        roi_size: side of the RoI feature (14); each stage doubles it.
        mask_classes: output channels of the mask predictors: 1 (class-agnostic, the default) or the
            detector's number of classes (background included, torchvision's convention), in which case
            every forward needs each RoI's label.
    """

    def __init__(self, *, in_channels: int = 256, trunk_channels: int = 256, num_trunk_convs: int = 2,
                 stage_channels: Sequence[int] = (128, 64, 32), stage_levels: Sequence[int] = (2, 1, 0),
                 roi_size: int = 14, mask_classes: int = 1) -> None:
        super().__init__()
        if len(stage_channels) != len(stage_levels):
            raise ValueError("stage_channels and stage_levels must have one entry per stage")
        if any(int(level) not in range(4) for level in stage_levels):
            raise ValueError(f"stage_levels index the FPN levels [P2, P3, P4, P5] (0-3), got {tuple(stage_levels)}")
        if mask_classes < 1:
            raise ValueError(f"mask_classes must be >= 1, got {mask_classes}")
        self.mask_classes = int(mask_classes)
        self.in_channels = in_channels
        self.stage_levels = tuple(int(level) for level in stage_levels)
        self.resolutions = tuple(roi_size * 2**k for k in range(len(stage_channels) + 1))
        self.channels = (trunk_channels, *[int(c) for c in stage_channels])

        trunk: list[nn.Module] = []
        cin = in_channels
        for _ in range(num_trunk_convs):
            trunk += [_conv(cin, trunk_channels, 3), nn.ReLU(inplace=True)]
            cin = trunk_channels
        self.trunk = nn.Sequential(*trunk)
        self.reduce = nn.ModuleList(_conv(self.channels[s - 1], self.channels[s], 1)
                                    for s in range(1, len(self.channels)))
        self.project = nn.ModuleList(_conv(in_channels, c, 1) for c in self.channels[1:])
        self.fam = nn.ModuleList(FeatureAggregation(channels=c) for c in self.channels[1:])
        self.mask_predictors = nn.ModuleList(_predictor(c, self.mask_classes) for c in self.channels)
        self.edge_predictors = nn.ModuleList(_predictor(c) for c in self.channels)

    @property
    def num_resolutions(self) -> int:
        return len(self.resolutions)

    def check_labels(self, labels: Tensor | None, num_rois: int) -> None:
        """A class-specific head needs one label per RoI (``[R]`` integers in ``[0, mask_classes)``; a label out
        of range fails at the channel lookup)."""
        if self.mask_classes == 1:
            return
        if labels is None:
            raise ValueError(f"this mask head is class-specific ({self.mask_classes} classes): pass each RoI's label")
        if labels.shape != (num_rois,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be [{num_rois}] int64, got {tuple(labels.shape)} {labels.dtype}")

    def predict(self, k: int, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mask logits of resolution k: x ``[R, C_k, S_k, S_k]``, labels ``[R]`` (class-specific heads)
        → ``[R, S_k, S_k]``."""
        logits = self.mask_predictors[k](x)
        if self.mask_classes == 1:
            return logits[:, 0]
        assert labels is not None  # check_labels ran
        return logits[torch.arange(x.shape[0], device=x.device), labels.to(torch.int64)]

    def run_trunk(self, roi_features: Tensor) -> Tensor:
        """The trunk: ``[R, C, S_0, S_0]`` RoI features → ``[R, C_0, S_0, S_0]``. Channels-last on the CPU: the
        3×3 convs at 14² ran 30% faster so, the input's copy included (100 RoIs, 2 threads: 239 against 343
        ms; benchmarks/results/mask_head_cpu.md), and the stages after it run channels-last anyway."""
        if roi_features.device.type == "cpu":
            roi_features = roi_features.contiguous(memory_format=torch.channels_last)
        return self.trunk(roi_features)

    def stage_features(self, roi_features: Tensor, features: Sequence[Tensor], spatial_scales: Sequence[float],
                       rois: Tensor, reach: Sequence[int], trunk: Tensor | None = None) -> list[Tensor]:
        """Runs the trunk and every stage on the prefix of RoIs that reaches it.

        Args:
            roi_features: ``[R, 256, 14, 14]`` RoI features.
            features: i-FPN levels ``[P2, P3, P4, (P5)]``, each ``[N, 256, H_l, W_l]``.
            spatial_scales: their scales (1/4, 1/8, ...).
            rois: ``[R, 5]`` (batch index, x1, y1, x2, y2) in the network's input frame.
            reach: K non-increasing ints; ``reach[k]`` = number of leading RoIs that reach resolution k
                (``reach[0] == R``).
            trunk: ``[R, C_0, S_0, S_0]`` the trunk's output on ``roi_features`` when the caller already
                computed it (a switch that reads it); None runs the trunk here.

        Returns:
            K tensors; entry k is ``[reach[k], C_k, S_k, S_k]``.
        """
        x = self.run_trunk(roi_features) if trunk is None else trunk
        outs = [x]
        active = [s for s in range(1, self.num_resolutions) if reach[s] > 0]
        if not active:
            return outs + [x.new_zeros((0, c, s, s)) for c, s in zip(self.channels[1:], self.resolutions[1:])]
        projected = [self.project[s - 1](features[self.stage_levels[s - 1]]) for s in active]
        scales = [float(spatial_scales[self.stage_levels[s - 1]]) for s in active]
        stages = [(j, self.resolutions[s], int(reach[s])) for j, s in enumerate(active)]
        # The stages run channels-last on the CPU: oneDNN's convolutions with few output channels (the
        # offset convs) ran faster on NHWC (benchmarks/results/mask_head_cpu.md), and the deformable conv
        # samples NHWC and returns NHWC, so no layer copies its input to another layout. The crops are
        # written channels-last by the RoIAlign kernel itself (a copy afterwards was a pass over memory).
        on_cpu = x.device.type == "cpu"
        crops = ops.roi_align_stages(projected, rois, stages, scales, sampling_ratio=2, aligned=True,
                                     channels_last=on_cpu)
        if on_cpu:
            x = x.contiguous(memory_format=torch.channels_last)
        for s in range(1, self.num_resolutions):
            n = int(reach[s])
            if n == 0:
                outs.append(x.new_zeros((0, self.channels[s], self.resolutions[s], self.resolutions[s])))
                continue
            low = self.reduce[s - 1](x[:n])
            low = F.interpolate(low, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.fam[s - 1](low, crops[active.index(s)])
            outs.append(x)
        return outs

    def forward_train(self, roi_features: Tensor, features: Sequence[Tensor], spatial_scales: Sequence[float],
                      rois: Tensor, trunk: Tensor | None = None,
                      labels: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """All resolutions for every RoI (training: every ℓ_k is needed). ``trunk``: see :meth:`stage_features`.
        ``labels``: ``[R]`` each RoI's class, needed by a class-specific head (``mask_classes > 1``).

        Returns:
            ``(mask_logits, edge_logits)``: K tensors each, entry k ``[R, S_k, S_k]``.
        """
        r = roi_features.shape[0]
        self.check_labels(labels, r)
        outs = self.stage_features(roi_features, features, spatial_scales, rois, [r] * self.num_resolutions, trunk)
        masks = [self.predict(k, x, labels) for k, x in enumerate(outs)]
        edges = [p(x)[:, 0] for p, x in zip(self.edge_predictors, outs)]
        return masks, edges

    def forward_dispatched(self, roi_features: Tensor, features: Sequence[Tensor],
                           spatial_scales: Sequence[float], rois: Tensor, counts: Sequence[int],
                           trunk: Tensor | None = None, labels: Tensor | None = None) -> list[Tensor]:
        """Inference on RoIs sorted by descending chosen resolution (``dynamask.ops.group_by_resolution``).

        Args:
            roi_features, rois: in sorted order (``[R, 256, 14, 14]``, ``[R, 5]``).
            counts: K ints, ``counts[k]`` = number of RoIs routed to resolution k.
            trunk: the trunk's output in sorted order, if already computed (see :meth:`stage_features`).
            labels: ``[R]`` classes in sorted order (class-specific heads only).

        Returns:
            K tensors of mask logits; entry k is ``[counts[k], S_k, S_k]`` for the RoIs routed to k, in
            sorted order (rows ``reach[k+1] : reach[k]``).
        """
        counts = [int(c) for c in counts]
        self.check_labels(labels, roi_features.shape[0])
        reach = [sum(counts[k:]) for k in range(self.num_resolutions)] + [0]
        outs = self.stage_features(roi_features, features, spatial_scales, rois, reach[:-1], trunk)
        return [self.predict(k, outs[k][reach[k + 1]:], None if labels is None else labels[reach[k + 1]:reach[k]])
                for k in range(self.num_resolutions)]
