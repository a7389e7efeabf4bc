"""Autograd, autocast and fake (meta) kernels of the batched RoIAlign ops."""

from __future__ import annotations

import torch

from dynamask.ops._autocast import register_float32_autocast

_ops = torch.ops.dynamask


@torch.library.register_fake("dynamask::roi_align_multilevel")
def _multilevel_fake(features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned,
                     canonical_scale=224.0):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_height, pooled_width))


@torch.library.register_fake("dynamask::roi_align_multilevel_backward")
def _multilevel_backward_fake(grad, rois, levels, spatial_scales, batch_size, channels, heights, widths,
                              sampling_ratio, aligned, canonical_scale=224.0):
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


@torch.library.register_fake("dynamask::roi_align_stages")
def _stages_fake(features, rois, stage_levels, stage_sizes, stage_counts, spatial_scales, sampling_ratio, aligned,
                 channels_last=False):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return [
        features[l].new_empty((n, features[l].shape[1], s, s)).contiguous(memory_format=layout)
        for l, s, n in zip(stage_levels, stage_sizes, stage_counts)
    ]


@torch.library.register_fake("dynamask::roi_align_stages_backward")
def _stages_backward_fake(grads, rois, stage_levels, spatial_scales, batch_size, channels, heights, widths,
                          sampling_ratio, aligned):
    return [rois.new_empty((batch_size, c, h, w)) for c, h, w in zip(channels, heights, widths)]


# The dispatcher drops a trailing argument that equals its schema default (canonical_scale=224,
# channels_last=False) before autograd sees the call, so a call passes 8 or 9 inputs (setup_context sees
# all 9: torch fills the defaults back in). torch 2.11's register_autograd wants exactly one gradient per
# input passed (2.14 also accepts one per schema argument), and ``ctx.needs_input_grad`` has one entry per
# input passed in both: the backward returns that many.


def _grads_for(ctx, feature_grads: list) -> tuple:
    return (feature_grads,) + (None,) * (len(ctx.needs_input_grad) - 1)


def _multilevel_setup(ctx, inputs, output):
    features, rois, levels, spatial_scales, _, _, sampling_ratio, aligned = inputs[:8]
    ctx.save_for_backward(rois, levels)
    ctx.canonical_scale = inputs[8] if len(inputs) > 8 else 224.0  # (torch fills it in; older ones may not)
    ctx.spatial_scales = spatial_scales
    ctx.batch_size = features[0].shape[0]
    ctx.channels = features[0].shape[1]
    ctx.heights = [f.shape[2] for f in features]
    ctx.widths = [f.shape[3] for f in features]
    ctx.sampling_ratio = sampling_ratio
    ctx.aligned = aligned


def _multilevel_backward(ctx, grad):
    rois, levels = ctx.saved_tensors
    grads = _ops.roi_align_multilevel_backward(
        grad, rois, levels, ctx.spatial_scales, ctx.batch_size, ctx.channels, ctx.heights, ctx.widths,
        ctx.sampling_ratio, ctx.aligned, ctx.canonical_scale,
    )
    return _grads_for(ctx, list(grads))


def _stages_setup(ctx, inputs, output):
    features, rois, stage_levels, _, _, spatial_scales, sampling_ratio, aligned = inputs[:8]
    ctx.save_for_backward(rois)
    ctx.stage_levels = stage_levels
    ctx.spatial_scales = spatial_scales
    ctx.batch_size = features[0].shape[0]
    ctx.channels = [f.shape[1] for f in features]
    ctx.heights = [f.shape[2] for f in features]
    ctx.widths = [f.shape[3] for f in features]
    ctx.sampling_ratio = sampling_ratio
    ctx.aligned = aligned


def _stages_backward(ctx, grads):
    (rois,) = ctx.saved_tensors
    grads = [g if g is not None else rois.new_zeros(0) for g in grads]
    out = _ops.roi_align_stages_backward(
        grads, rois, ctx.stage_levels, ctx.spatial_scales, ctx.batch_size, ctx.channels, ctx.heights,
        ctx.widths, ctx.sampling_ratio, ctx.aligned,
    )
    return _grads_for(ctx, list(out))


torch.library.register_autograd("dynamask::roi_align_multilevel", _multilevel_backward, setup_context=_multilevel_setup)
torch.library.register_autograd("dynamask::roi_align_stages", _stages_backward, setup_context=_stages_setup)

# Under autocast the ops compute in float32 and return the features' dtype, as torchvision's roi_align
# does: the kernels accumulate in float anyway, and the crops keep the precision of the network around.
register_float32_autocast("dynamask::roi_align_multilevel", lambda args: [args[0][0].dtype])
register_float32_autocast("dynamask::roi_align_stages", lambda args: [args[0][l].dtype for l in args[2]])
