"""Deformable convolution with a fused epilogue (bias, residual, ReLU).

PLACEHOLDER until the fused kernel lands (issue 3): calls torchvision's implementation so that the
model can be built against the final signature.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor


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
    """``torchvision.ops.deform_conv2d(...)`` (+ ``residual``), then ReLU when ``activation="relu"``.

    Shapes: input ``[B, C_in, H, W]``, offset ``[B, 2*dg*kh*kw, H_out, W_out]``, weight
    ``[C_out, C_in/groups, kh, kw]``, mask ``[B, dg*kh*kw, H_out, W_out]``, residual
    ``[B, C_out, H_out, W_out]`` → ``[B, C_out, H_out, W_out]``.
    """
    out = torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    if residual is not None:
        out = out + residual
    if activation == "relu":
        out = torch.relu(out)
    elif activation is not None:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return out
