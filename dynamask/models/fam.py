"""Feature Aggregation Module (FAM) of the r-FPN stages, and the deformable-conv layer it is built on.

docs/method.md §3 fixes the FAM as: offset conv 1 on ``concat(L↑, P̃)`` → deformable conv 1 on ``L↑`` with
``P̃`` added as the residual, then ReLU (one fused ``dynamask.ops.deform_conv2d`` call) → offset conv 2
on that fused feature → deformable conv 2, ReLU. One deform group, 3×3 kernels everywhere.

How the offset convs run (:class:`OffsetConv2d`; the parameters and the arithmetic are those of the two
``nn.Conv2d`` above): offset conv 1 is the sum of a conv over ``L↑`` and a conv over ``P̃`` (the two halves
of its weight), so the ``2C``-channel concatenation is never built; on the CPU each conv computes 32 output
channels (the 18 offsets and 14 zero rows) and the deformable conv reads the first 18 of that channels-last
output in place. On the 2-core Ice Lake of benchmarks/results/mask_head_cpu.md, 100 RoIs at 112²: cat + the
18-channel conv 492 ms, the two 32-wide convs summed 318 ms (oneDNN is slow at 18 output channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamask import ops

# Output width of the offset convs on the CPU (oneDNN runs 32 channels faster than 18; see the module doc).
CPU_OFFSET_WIDTH = 32


class OffsetConv2d(nn.Conv2d):
    """A 3×3 ``nn.Conv2d`` over the channel concatenation of its inputs, without building it.

    ``forward(a, b, ...)`` equals ``nn.Conv2d.forward(torch.cat([a, b, ...], dim=1))``: the sum of one conv
    per input over its slice of the weight. On the CPU each of those convs computes ``CPU_OFFSET_WIDTH``
    output channels (the weight padded with zero rows) and the result is a channel slice of that
    (channels-last when the inputs are), which ``dynamask.ops.deform_conv2d`` reads in place. Parameters,
    ``state_dict`` keys and MAC counts (hooks see the ``out_channels``-wide output) are ``nn.Conv2d``'s.
    """

    def forward(self, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        """inputs ``[R, C_i, H, W]`` with ``sum C_i == in_channels`` → ``[R, out_channels, H, W]``."""
        widths = [x.shape[1] for x in inputs]
        if not inputs or sum(widths) != self.in_channels:
            raise ValueError(f"OffsetConv2d: the inputs have {widths} channels, the conv takes {self.in_channels}")
        weight, bias = self.weight, self.bias
        pad = CPU_OFFSET_WIDTH - self.out_channels if inputs[0].device.type == "cpu" else 0
        if pad > 0:  # zero rows: the extra channels are computed and never read
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, pad))
            bias = None if bias is None else F.pad(bias, (0, pad))
        out: Tensor | None = None
        c0 = 0
        for x, c in zip(inputs, widths):
            y = F.conv2d(x, weight[:, c0:c0 + c], bias if out is None else None, self.stride, self.padding,
                         self.dilation)
            out = y if out is None else out.add_(y)
            c0 += c
        assert out is not None  # inputs is non-empty (checked above)
        return out[:, :self.out_channels]


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

    - ``offset1``: Conv2d(2C → 18, 3×3) on ``concat(L↑, P̃)`` (an :class:`OffsetConv2d`: the concatenation is
      never built), zero-initialised (starts as a plain conv);
    - ``deform1``: DeformConv2d(C → C, 3×3) on ``L↑``, ``+ P̃`` (residual), ReLU — one fused op call;
    - ``offset2``: Conv2d(C → 18, 3×3) on the fused feature, zero-initialised;
    - ``deform2``: DeformConv2d(C → C, 3×3), ReLU.

    Args:
        channels: C, the stage width (both inputs and the output have C channels).
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        k = 3
        self.offset1 = OffsetConv2d(2 * channels, 2 * k * k, k, padding=1)
        self.deform1 = DeformConv2d(channels, channels, k, padding=1)
        self.offset2 = OffsetConv2d(channels, 2 * k * k, k, padding=1)
        self.deform2 = DeformConv2d(channels, channels, k, padding=1)
        for conv in (self.offset1, self.offset2):
            nn.init.zeros_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, low: Tensor, crop: Tensor) -> Tensor:
        """low ``L↑`` ``[R, C, S, S]``, crop ``P̃`` ``[R, C, S, S]`` → ``[R, C, S, S]``."""
        offset = self.offset1(low, crop)
        fused = self.deform1(low, offset, residual=crop, activation="relu")
        offset = self.offset2(fused)
        return self.deform2(fused, offset, activation="relu")
