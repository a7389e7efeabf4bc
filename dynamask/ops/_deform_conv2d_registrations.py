"""Autograd, autocast and fake (meta) kernels of the fused deformable convolution."""

from __future__ import annotations

import torch

try:  # Tensor.suggest_memory_format's Python twin, safe on fake and symbolic tensors
    from torch._prims_common import suggest_memory_format
except ImportError:  # pragma: no cover - older torch

    def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return torch.channels_last if cl else torch.contiguous_format

from dynamask.ops._autocast import register_float32_autocast  # noqa: E402

_ops = torch.ops.dynamask


def _out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


@torch.library.register_fake("dynamask::deform_conv2d")
def _deform_conv2d_fake(input, offset, weight, bias, mask, residual, stride_h, stride_w, pad_h, pad_w,
                        dilation_h, dilation_w, relu):
    torch._check(input.dim() == 4, lambda: "deform_conv2d: input must be [B, C_in, H, W]")
    torch._check(weight.dim() == 4, lambda: "deform_conv2d: weight must be [C_out, C_in / groups, kh, kw]")
    out_h = _out_size(input.shape[2], weight.shape[2], stride_h, pad_h, dilation_h)
    out_w = _out_size(input.shape[3], weight.shape[3], stride_w, pad_w, dilation_w)
    shape = (input.shape[0], weight.shape[0], out_h, out_w)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=_output_format(input, weight))


def _output_format(input, weight) -> torch.memory_format:
    """The layout the real kernels return: the CPU kernel keeps a channels-last input channels-last (the
    r-FPN stages run that way), unless there is a single output channel, where both layouts coincide;
    the CUDA kernel always returns a contiguous output."""
    if input.device.type == "cpu" and weight.shape[0] > 1 and suggest_memory_format(input) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("dynamask::deform_conv2d_backward")
def _deform_conv2d_backward_fake(grad, input, offset, weight, mask, stride_h, stride_w, pad_h, pad_w,
                                 dilation_h, dilation_w, need_input, need_offset_mask, need_weight):
    empty = input.new_empty((0,))
    return (
        input.new_empty(input.shape) if need_input else empty,
        offset.new_empty(offset.shape) if need_offset_mask else empty,
        mask.new_empty(mask.shape) if need_offset_mask and mask is not None else empty,
        weight.new_empty(weight.shape) if need_weight else empty,
    )


def _setup(ctx, inputs, output):
    input, offset, weight, bias, mask, residual, sh, sw, ph, pw, dh, dw, relu = inputs
    # With the ReLU fused in, its gate is read from the output (out > 0).
    ctx.save_for_backward(input, offset, weight, mask, output if relu else None)
    ctx.params = (sh, sw, ph, pw, dh, dw)
    ctx.relu = relu


def _backward(ctx, grad):
    input, offset, weight, mask, output = ctx.saved_tensors
    need = ctx.needs_input_grad  # input, offset, weight, bias, mask, residual, then the ints
    if ctx.relu:
        grad = grad.masked_fill(output <= 0, 0)
    grad_input = grad_offset = grad_mask = grad_weight = grad_bias = grad_residual = None
    if need[0] or need[1] or need[2] or need[4]:
        gi, go, gm, gw = _ops.deform_conv2d_backward(
            grad, input, offset, weight, mask, *ctx.params, need[0], need[1] or need[4], need[2]
        )
        grad_input = gi if need[0] else None
        grad_offset = go if need[1] else None
        grad_weight = gw if need[2] else None
        grad_mask = gm if need[4] else None
    if need[3]:
        grad_bias = grad.sum((0, 2, 3))
    if need[5]:
        grad_residual = grad
    return (grad_input, grad_offset, grad_weight, grad_bias, grad_mask, grad_residual) + (None,) * 7


torch.library.register_autograd("dynamask::deform_conv2d", _backward, setup_context=_setup)

# Under autocast the op computes in float32 and returns the input's dtype, as torchvision's deform_conv2d
# does: the bilinear weights and the position derivatives lose too much in half precision. Explicit half
# inputs are accepted (and computed in float inside the kernels).
register_float32_autocast("dynamask::deform_conv2d", lambda args: [args[0].dtype])
