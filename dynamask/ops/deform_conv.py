"""Deformable convolution (DCNv1/v2) with a fused epilogue: bias, residual, ReLU.

Semantics and offset layout are those of ``torchvision.ops.deform_conv2d``; the kernels
(``torch.ops.dynamask.deform_conv2d``) work in bounded tiles of images and output positions, so no
whole-batch columns buffer is ever allocated, and the CPU kernel runs on all of torch's threads.
The Feature Aggregation Module's "align, add the crop, activate" is one call::

    deform_conv2d(x, offset, weight, padding=1, residual=crop, activation="relu")
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynamask.ops import _deform_conv2d_registrations  # noqa: F401  (autograd, autocast, fake kernels)
from dynamask.ops._args import pair


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
    activation: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """Deformable convolution, ``+ residual``, then ReLU when ``activation="relu"``.

    Equals ``torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation,
    mask)`` followed by ``+ residual`` and ``relu``, computed in one op with gradients for every
    tensor argument.

    Args:
        input: ``(B, C_in, H, W)``.
        offset: ``(B, 2 * dg * kh * kw, H_out, W_out)``, in input pixels; channel
            ``2 * (d * kh * kw + i * kw + j)`` is the y offset of tap ``(i, j)`` of deform group ``d``,
            the next one its x offset. The number of deform groups ``dg`` is inferred from it and must
            divide ``C_in``. Samples at or beyond one pixel outside the input read zero.
        weight: ``(C_out, C_in / groups, kh, kw)``; the weight groups are inferred from it.
        bias: ``(C_out,)`` or None.
        stride, padding, dilation: int or ``(h, w)``.
        mask: ``(B, dg * kh * kw, H_out, W_out)`` modulation (DCNv2) or None.
        activation: None or ``"relu"``.
        residual: ``(B, C_out, H_out, W_out)`` added before the activation, or None.

    Returns:
        ``(B, C_out, H_out, W_out)`` with ``H_out = (H + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1``.
    """
    if activation not in (None, "relu"):
        raise ValueError(f"deform_conv2d: activation must be None or 'relu', got {activation!r}")
    for name, t in (("input", input), ("offset", offset), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"deform_conv2d: {name} must be a tensor, got {type(t).__name__}")
    for name, u in (("offset", offset), ("weight", weight), ("bias", bias), ("mask", mask), ("residual", residual)):
        if u is not None and u.device != input.device:
            raise ValueError(
                f"deform_conv2d: {name} is on {u.device} but input is on {input.device}; all tensors must be on "
                "one device"
            )
    sh, sw = pair(stride, op="deform_conv2d", name="stride")
    ph, pw = pair(padding, op="deform_conv2d", name="padding")
    dh, dw = pair(dilation, op="deform_conv2d", name="dilation")
    return torch.ops.dynamask.deform_conv2d(
        input, offset, weight, bias, mask, residual, sh, sw, ph, pw, dh, dw, activation == "relu"
    )
