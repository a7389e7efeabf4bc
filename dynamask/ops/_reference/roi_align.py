"""Pure-PyTorch RoIAlign (torchvision's conventions), one RoI at a time. Slow; for tests only."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _bilinear(plane: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """plane [C, H, W]; y, x: sample coordinates of the same shape [...] -> [C, ...]."""
    C, H, W = plane.shape
    if H == 0 or W == 0:  # an empty map has nothing to sample
        return plane.new_zeros((C, *y.shape))
    outside = (y < -1.0) | (y > H) | (x < -1.0) | (x > W)
    y = y.clamp(min=0)
    x = x.clamp(min=0)
    y0 = y.floor().long()
    x0 = x.floor().long()
    y_last = y0 >= H - 1
    x_last = x0 >= W - 1
    y0 = torch.where(y_last, torch.full_like(y0, H - 1), y0)
    x0 = torch.where(x_last, torch.full_like(x0, W - 1), x0)
    y = torch.where(y_last, y0.to(y.dtype), y)
    x = torch.where(x_last, x0.to(x.dtype), x)
    y1 = torch.where(y_last, y0, y0 + 1)
    x1 = torch.where(x_last, x0, x0 + 1)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    flat = plane.reshape(C, H * W)

    def tap(yy, xx):
        return flat[:, (yy * W + xx).reshape(-1)].reshape(C, *yy.shape)

    val = hy * hx * tap(y0, x0) + hy * lx * tap(y0, x1) + ly * hx * tap(y1, x0) + ly * lx * tap(y1, x1)
    return torch.where(outside, torch.zeros_like(val), val)


def roi_align_reference(
    feature: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float,
    sampling_ratio: int, aligned: bool,
) -> Tensor:
    """feature [N, C, H, W], rois [R, 5] -> [R, C, ph, pw]; same semantics as torchvision.ops.roi_align."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    R, C = rois.shape[0], feature.shape[1]
    out = feature.new_zeros((R, C, ph, pw))
    offset = 0.5 if aligned else 0.0
    for r in range(R):
        b = int(rois[r, 0])
        x1, y1, x2, y2 = (rois[r, 1:] * spatial_scale - offset).tolist()
        w, h = x2 - x1, y2 - y1
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        bh, bw = h / ph, w / pw
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(h / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(w / pw)
        if gh <= 0 or gw <= 0:
            continue
        dt = feature.dtype
        iy = (torch.arange(gh, dtype=dt) + 0.5) * bh / gh
        ix = (torch.arange(gw, dtype=dt) + 0.5) * bw / gw
        ys = y1 + torch.arange(ph, dtype=dt)[:, None] * bh + iy[None, :]  # [ph, gh]
        xs = x1 + torch.arange(pw, dtype=dt)[:, None] * bw + ix[None, :]  # [pw, gw]
        Y = ys[:, None, :, None].expand(ph, pw, gh, gw)
        X = xs[None, :, None, :].expand(ph, pw, gh, gw)
        vals = _bilinear(feature[b], Y.to(feature.device), X.to(feature.device))  # [C, ph, pw, gh, gw]
        out[r] = vals.sum(dim=(-1, -2)) / max(gh * gw, 1)
    return out


def fpn_levels_reference(rois: Tensor, spatial_scales: list[float], canonical_scale: float = 224.0) -> Tensor:
    """FPN LevelMapper (torchvision's formula, in the boxes' dtype, a box of side ``canonical_scale`` at
    level 4); non-positive areas -> finest level."""
    k_min = round(-math.log2(spatial_scales[0]))
    k_max = k_min + len(spatial_scales) - 1
    w = rois[:, 3] - rois[:, 1]
    h = rois[:, 4] - rois[:, 2]
    area = w * h
    k = torch.floor(4 + torch.log2(torch.sqrt(area) / canonical_scale) + 1e-6)
    k = torch.where(area > 0, k, torch.full_like(k, k_min))
    return (k.clamp(k_min, k_max) - k_min).to(torch.int64)


def roi_align_multilevel_reference(
    features: list[Tensor], rois: Tensor, output_size, spatial_scales, sampling_ratio=2, aligned=True, levels=None,
    canonical_scale=224.0
) -> Tensor:
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    if levels is None:
        levels = fpn_levels_reference(rois, list(spatial_scales), canonical_scale)
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], ph, pw))
    for l, f in enumerate(features):
        idx = (levels == l).nonzero().flatten()
        if idx.numel():
            out[idx] = roi_align_reference(f, rois[idx], (ph, pw), spatial_scales[l], sampling_ratio, aligned)
    return out


def roi_align_stages_reference(features, rois, stages, spatial_scales, sampling_ratio=2, aligned=True):
    return [
        roi_align_reference(features[l], rois[:n], s, spatial_scales[l], sampling_ratio, aligned)
        for l, s, n in stages
    ]
