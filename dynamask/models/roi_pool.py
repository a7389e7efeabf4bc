"""Multi-level RoI pooling on our kernel: torchvision's ``MultiScaleRoIAlign`` contract, and the pooled RoIs
with what the mask head's stages read again (levels, scales, RoIs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from dynamask import ops
from dynamask.ops import to_rois
from dynamask.ops._args import check_sampling_ratio


def infer_scales(features: Sequence[Tensor], image_shapes: Sequence[tuple[int, int]]) -> list[float]:
    """torchvision's ``MultiScaleRoIAlign`` rule: scale = 2^round(log2(feature side / largest image side))."""
    max_h = max(int(s[0]) for s in image_shapes)
    scales = []
    for f in features:
        approx = float(f.shape[-2]) / float(max_h)
        scales.append(2.0 ** round(math.log2(approx)))
    return scales


class PooledRoIs(NamedTuple):
    """What :meth:`MultiLevelRoIPool.pool` returns: the pooled features and what it derived to pool them,
    which the mask head's stages read again."""

    features: Tensor  # [R, C, S, S]
    levels: list[Tensor]  # the pyramid levels, finest first, each [N, C, H_l, W_l]
    scales: list[float]  # their spatial scales (1/4, 1/8, ...)
    rois: Tensor  # [R, 5] (batch index, x1, y1, x2, y2), image-major


class MultiLevelRoIPool(nn.Module):
    """Drop-in for torchvision's ``MultiScaleRoIAlign`` on :func:`dynamask.ops.roi_align_multilevel`.

    Same inputs and levels (LevelMapper, canonical 224 at P4, mapped by the kernel) and scales inferred the
    same way, so with ``aligned=False`` its output equals torchvision's with the same ``canonical_scale``.

    Args:
        featmap_names: names of the pyramid levels in the feature dict, finest first.
        output_size: S. sampling_ratio: samples per bin and axis; 0, or torchvision's -1: adaptive
            (ceil(box side / S)); other negative values are refused. aligned: half-pixel shift.
        canonical_scale: box side (image pixels) that goes to P4; a box of side s goes to level
            ``floor(4 + log2(s / canonical_scale))``. 224 is FPN's value for ~800-px images; on small
            images every object falls below it and lands on P2, so a smaller value spreads them over
            the pyramid (deeper, more semantic features for larger objects).
    """

    def __init__(self, *, featmap_names: Sequence[str] = ("0", "1", "2", "3"), output_size: int = 7,
                 sampling_ratio: int = 2, aligned: bool = False, canonical_scale: float = 224.0) -> None:
        super().__init__()
        if not 0 < canonical_scale < math.inf:
            raise ValueError(f"canonical_scale must be a positive finite number, got {canonical_scale}")
        check_sampling_ratio(sampling_ratio, op="MultiLevelRoIPool")  # refused here, not at the first forward
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_scale = float(canonical_scale)

    def levels(self, features: dict[str, Tensor]) -> list[Tensor]:
        return [features[name] for name in self.featmap_names]

    def pool(self, features: dict[str, Tensor], boxes: list[Tensor],
             image_shapes: list[tuple[int, int]]) -> PooledRoIs:
        """features: name → ``[N, C, H_l, W_l]``; boxes: per image ``[n_i, 4]`` → :class:`PooledRoIs`
        (features ``[R, C, S, S]``)."""
        feats = self.levels(features)
        scales = infer_scales(feats, image_shapes)
        rois = to_rois(boxes)
        pooled = ops.roi_align_multilevel(feats, rois, self.output_size, scales, sampling_ratio=self.sampling_ratio,
                                          aligned=self.aligned, canonical_scale=self.canonical_scale)
        return PooledRoIs(pooled, feats, scales, rois)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        """features: name → ``[N, C, H_l, W_l]``; boxes: per image ``[n_i, 4]`` → ``[R, C, S, S]``."""
        return self.pool(features, boxes, image_shapes).features
