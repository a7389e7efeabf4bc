"""Batched RoIAlign over an FPN pyramid: all RoIs, all levels (and all r-FPN stages) in one call.

Box coordinates are in image pixels; ``spatial_scales[l]`` maps them onto ``features[l]``
(1/4 for P2, 1/8 for P3, ...). Semantics follow ``torchvision.ops.roi_align`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dynamask.ops import (
    _roi_align_registrations,  # noqa: F401  (autograd, autocast, fake kernels)
    debug,
)
from dynamask.ops._args import as_rois, check_sampling_ratio, pair


def _as_features(features: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(f"features must be a list of [N, C, H, W] tensors, got {type(features).__name__}")
    return list(features)


def _inputs(features: Sequence[Tensor], rois: Tensor | Sequence[Tensor],
            spatial_scales: Sequence[float]) -> tuple[list[Tensor], Tensor]:
    """The checks both RoIAlign ops make first: ``(features as a list, rois as [R, 5])``."""
    feats = _as_features(features)
    rois_t = as_rois(rois)
    if len(spatial_scales) != len(feats):
        raise ValueError(f"spatial_scales has {len(spatial_scales)} entries but features has {len(feats)} levels")
    _check_devices(feats, rois_t)
    return feats, rois_t


def _check_devices(features: list[Tensor], rois: Tensor) -> None:
    for l, f in enumerate(features):
        if not isinstance(f, Tensor):
            raise TypeError(f"features[{l}] must be a tensor, got {type(f).__name__}")
        if f.device != rois.device:
            raise ValueError(
                f"features[{l}] is on {f.device} but rois is on {rois.device}; all inputs must be on one device"
            )


def _check_power_of_two_scales(spatial_scales: Sequence[float]) -> None:
    logs = [-math.log2(s) if s > 0 else float("nan") for s in spatial_scales]
    ok = all(abs(v - round(v)) < 1e-6 for v in logs) and all(
        round(logs[i + 1]) == round(logs[i]) + 1 for i in range(len(logs) - 1)
    )
    if not ok:
        raise ValueError(
            "spatial_scales must be consecutive powers of two (e.g. [1/4, 1/8, 1/16, 1/32]) when levels is "
            f"None, since the FPN level rule depends on them; got {list(spatial_scales)}"
        )


def roi_align_multilevel(
    features: Sequence[Tensor],
    rois: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scales: Sequence[float],
    sampling_ratio: int = 2,
    aligned: bool = True,
    levels: Tensor | None = None,
    *,
    canonical_scale: float = 224.0,
) -> Tensor:
    """RoIAlign of every RoI on its own pyramid level, in one kernel call.

    Args:
        features: L tensors ``[N, C, H_l, W_l]`` (same N, C, dtype and device).
        rois: ``[R, 5]`` rows of (batch index, x1, y1, x2, y2) in image pixels, or a list of N
            per-image ``[n_i, 4]`` box tensors.
        output_size: S or (S_h, S_w).
        spatial_scales: L floats, feature pixels per image pixel.
        sampling_ratio: samples per bin and axis; 0 = adaptive (ceil(roi_size / output_size)); -1 is
            torchvision's spelling of adaptive and means 0; other negative values are refused.
        aligned: shift boxes by -0.5 pixel (True, the correct convention) or not (torchvision's
            ``MultiScaleRoIAlign`` uses False).
        levels: ``[R]`` int64 level index per RoI; None = FPN's rule
            ``k = floor(4 + log2(sqrt(area) / canonical_scale) + 1e-6)`` clamped to the given levels, with
            k_min = -log2(spatial_scales[0]), computed by the kernel. A box of non-positive area goes to
            the finest level.
        canonical_scale: the box side (image pixels) that the rule maps to level 4: torchvision's
            ``LevelMapper`` uses 224, for ~800-px images; a positive finite number.

    Returns:
        ``[R, C, S_h, S_w]``, in the order of ``rois``.

    Raises:
        ValueError: a ``canonical_scale`` that is not positive and finite; on the CPU, a batch index
            that is not an integer in ``[0, N)``, a non-finite box or a level out of range. On CUDA such
            a RoI pools to zeros instead, unless :func:`dynamask.ops.full_checks` is on (see
            :mod:`dynamask.ops.debug`).
    """
    feats, rois_t = _inputs(features, rois, spatial_scales)
    if levels is None:
        _check_power_of_two_scales(spatial_scales)
    ph, pw = pair(output_size, op="roi_align_multilevel", name="output_size")
    ratio = check_sampling_ratio(sampling_ratio, op="roi_align_multilevel")
    if debug.full_checks_enabled():
        debug.check_rois("roi_align_multilevel", rois_t, feats[0].shape[0])
        if levels is not None:
            debug.check_levels("roi_align_multilevel", levels, len(feats))
    return torch.ops.dynamask.roi_align_multilevel(
        feats, rois_t, levels, [float(s) for s in spatial_scales], ph, pw, ratio, bool(aligned),
        float(canonical_scale),
    )


def roi_align_stages(
    features: Sequence[Tensor],
    rois: Tensor | Sequence[Tensor],
    stages: Sequence[tuple[int, int, int]],
    spatial_scales: Sequence[float],
    sampling_ratio: int = 2,
    aligned: bool = True,
    *,
    channels_last: bool = False,
) -> list[Tensor]:
    """Several crops of prefixes of ``rois``, each from its own level and at its own size, in one call.

    Args:
        features: L tensors ``[N, C_l, H_l, W_l]``; channel counts may differ between levels.
        rois: ``[R, 5]`` (batch index, x1, y1, x2, y2), or a list of per-image ``[n_i, 4]`` boxes.
        stages: entries ``(level_index, output_size, count)``; entry j crops
            ``features[level_index]`` for ``rois[:count]`` at ``output_size x output_size``.
        spatial_scales: L floats.
        sampling_ratio: as :func:`roi_align_multilevel` (0 or -1: adaptive).
        aligned: as :func:`roi_align_multilevel`.
        channels_last: return the crops in ``torch.channels_last`` memory format (same shapes and values).
            The CPU kernel writes them so directly, which the mask head's channels-last stages read without
            a layout copy; on CUDA it is a copy of the NCHW crops.

    Returns:
        One tensor per stage, ``[count_j, C_{level_j}, S_j, S_j]``; equal to
        ``torchvision.ops.roi_align(features[l], rois[:count], S, spatial_scales[l], sampling_ratio, aligned)``.
    """
    feats, rois_t = _inputs(features, rois, spatial_scales)
    ratio = check_sampling_ratio(sampling_ratio, op="roi_align_stages")
    levels, sizes, counts = [], [], []
    for j, stage in enumerate(stages):
        if len(stage) != 3:
            raise ValueError(f"stages[{j}] must be (level_index, output_size, count), got {stage!r}")
        levels.append(int(stage[0]))
        sizes.append(int(stage[1]))
        counts.append(int(stage[2]))
    if debug.full_checks_enabled():
        debug.check_rois("roi_align_stages", rois_t, feats[0].shape[0], max(counts, default=0))
    return list(
        torch.ops.dynamask.roi_align_stages(
            feats, rois_t, levels, sizes, counts, [float(s) for s in spatial_scales], ratio,
            bool(aligned), bool(channels_last),
        )
    )
