"""Pure-PyTorch deformable convolution: bilinear sampling with torch ops, then the conv as a matmul.

Independent of torchvision and of our kernels, differentiable through autograd; it materialises the
whole columns tensor, so it is for small test inputs only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynamask.ops._args import pair


def deform_conv2d_reference(
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
    """Same contract as :func:`dynamask.ops.deform_conv2d` (torchvision's semantics and layout)."""
    op = "deform_conv2d_reference"
    sh, sw = pair(stride, op=op, name="stride")
    ph, pw = pair(padding, op=op, name="padding")
    dh, dw = pair(dilation, op=op, name="dilation")
    B, C, H, W = input.shape
    C_out, Cg, kh, kw = weight.shape
    groups, K = C // Cg, kh * kw
    dg = offset.shape[1] // (2 * K)
    out_h = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    L = out_h * out_w
    dev, dt = input.device, input.dtype

    # Undeformed sample positions [K, out_h, out_w]; tap k = i * kw + j.
    i = torch.arange(kh, device=dev).repeat_interleave(kw).view(K, 1, 1)
    j = torch.arange(kw, device=dev).repeat(kh).view(K, 1, 1)
    oy = torch.arange(out_h, device=dev).view(1, out_h, 1)
    ox = torch.arange(out_w, device=dev).view(1, 1, out_w)
    base_y = (oy * sh - ph + i * dh).to(dt)
    base_x = (ox * sw - pw + j * dw).to(dt)
    off = offset.view(B, dg, K, 2, out_h, out_w)
    y = base_y + off[:, :, :, 0]  # [B, dg, K, out_h, out_w]
    x = base_x + off[:, :, :, 1]

    # torchvision's rule: a sample at or beyond one pixel outside the map is 0; otherwise bilinear
    # with zero padding.
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    Cd = C // dg
    planes = input.reshape(B, dg, Cd, H * W)
    cols = input.new_zeros((B, dg, Cd, K * L))
    corners = ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx))
    for dy, dx, wgt in corners if H * W > 0 else ():  # an empty map has no corner: every column is 0
        yy, xx = y0 + dy, x0 + dx
        valid = inside & (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
        idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).nan_to_num(0).long().view(B, dg, 1, K * L)
        taps = torch.gather(planes, 3, idx.expand(B, dg, Cd, K * L))
        cols = cols + taps * torch.where(valid, wgt, torch.zeros_like(wgt)).view(B, dg, 1, K * L)
    if mask is not None:
        cols = cols * mask.reshape(B, dg, 1, K * L)

    # Convolution as a matmul: [groups, C_out/groups, Cg*K] @ [B, groups, Cg*K, L].
    cols = cols.view(B, groups, Cg * K, L)
    out = torch.matmul(weight.reshape(groups, C_out // groups, Cg * K), cols).reshape(B, C_out, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, C_out, 1, 1)
    if residual is not None:
        out = out + residual
    if activation == "relu":
        out = torch.relu(out)
    elif activation is not None:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return out
