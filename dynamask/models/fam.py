"""Feature Aggregation Module (FAM) of the r-FPN stages, and the deformable-conv layer it is built on.

docs/method.md §3 fixes the FAM as: offset conv 1 on ``concat(L↑, P̃)`` → deformable conv 1 on ``L↑`` with
``P̃`` added as the residual, then ReLU (one fused ``dynamask.ops.deform_conv2d`` call) → offset conv 2
on that fused feature → deformable conv 2, ReLU. One deform group, 3×3 kernels everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynamask import ops


class DeformConv2d(nn.Module):
    """A deformable convolution holding its weight, so that FLOP hooks and ``state_dict`` see it.

    Calls :func:`dynamask.ops.deform_conv2d` with the fused epilogue (bias, optional residual, optional
    ReLU). Deform groups are inferred by the op from the offset's channels.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: k (square).
        padding: zero padding on each side.
        bias: whether to learn a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, padding: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (1, 1)
        self.padding = (padding, padding)
        self.dilation = (1, 1)
        self.groups = 1
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor, *, residual: Tensor | None = None,
                activation: str | None = None) -> Tensor:
        """x ``[B, C_in, H, W]``, offset ``[B, 2·k·k, H, W]``, residual ``[B, C_out, H, W]``
        → ``[B, C_out, H, W]``."""
        return ops.deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                                 dilation=self.dilation, residual=residual, activation=activation)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}"


class FeatureAggregation(nn.Module):
    """FAM: aligns the upsampled r-FPN feature ``L↑`` to the i-FPN crop ``P̃`` and fuses them.

    Layers (C = ``channels``, k = 3, 1 deform group):

    - ``offset1``: Conv2d(2C → 18, 3×3) on ``concat(L↑, P̃)``, zero-initialised (starts as a plain conv);
    - ``deform1``: DeformConv2d(C → C, 3×3) on ``L↑``, ``+ P̃`` (residual), ReLU — one fused op call;
    - ``offset2``: Conv2d(C → 18, 3×3) on the fused feature, zero-initialised;
    - ``deform2``: DeformConv2d(C → C, 3×3), ReLU.

    Args:
        channels: C, the stage width (both inputs and the output have C channels).
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        k = 3
        self.offset1 = nn.Conv2d(2 * channels, 2 * k * k, k, padding=1)
        self.deform1 = DeformConv2d(channels, channels, k, padding=1)
        self.offset2 = nn.Conv2d(channels, 2 * k * k, k, padding=1)
        self.deform2 = DeformConv2d(channels, channels, k, padding=1)
        for conv in (self.offset1, self.offset2):
            nn.init.zeros_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, low: Tensor, crop: Tensor) -> Tensor:
        """low ``L↑`` ``[R, C, S, S]``, crop ``P̃`` ``[R, C, S, S]`` → ``[R, C, S, S]``."""
        offset = self.offset1(torch.cat([low, crop], dim=1))
        fused = self.deform1(low, offset, residual=crop, activation="relu")
        offset = self.offset2(fused)
        return self.deform2(fused, offset, activation="relu")
