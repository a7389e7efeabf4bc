"""The FAM's offset convs (``OffsetConv2d``): a conv over the concatenation of its inputs without building
it, and on the CPU a 32-wide conv whose first 18 channels the deformable conv reads in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynamask import ops
from dynamask.models.fam import CPU_OFFSET_WIDTH, FeatureAggregation, OffsetConv2d


def _pair(c_in=(5, 3), seed=0):
    torch.manual_seed(seed)
    conv = OffsetConv2d(sum(c_in), 18, 3, padding=1).double()
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    plain = nn.Conv2d(sum(c_in), 18, 3, padding=1).double()
    plain.load_state_dict(conv.state_dict())  # the same keys and shapes as nn.Conv2d's
    inputs = [torch.randn(4, c, 7, 6, dtype=torch.float64) for c in c_in]
    return conv, plain, inputs


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("c_in", [(5, 3), (8,)], ids=["two inputs", "one input"])
def test_equals_conv_over_the_concatenation(layout, c_in):
    conv, plain, inputs = _pair(c_in)
    xs = [x.contiguous(memory_format=layout).requires_grad_() for x in inputs]
    out = conv(*xs)
    ref = plain(torch.cat(xs, 1))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert out.shape == (4, 18, 7, 6)
    if layout == torch.channels_last:  # the 32-wide result, sliced: channels adjacent, positions 32 apart
        assert out.stride(1) == 1 and out.stride(3) == CPU_OFFSET_WIDTH
    go = torch.randn_like(ref)
    params = [conv.weight, conv.bias]
    got = torch.autograd.grad(out, [*xs, *params], go)
    want = torch.autograd.grad(ref, [*xs, plain.weight, plain.bias], go)
    for name, a, b in zip(["input"] * len(xs) + ["weight", "bias"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_gradcheck_float64():
    conv, _, inputs = _pair((2, 3))
    xs = tuple(x[:1, :, :4, :4].clone().requires_grad_() for x in inputs)
    assert torch.autograd.gradcheck(lambda a, b: conv(a, b), xs)


def test_hooks_see_the_nominal_output_and_bad_widths_raise():
    conv, _, inputs = _pair()
    shapes = []
    conv.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    conv(*inputs)
    assert shapes == [(4, 18, 7, 6)]  # MAC counters hooked on nn.Conv2d count 18 channels, not 32
    with pytest.raises(ValueError, match=r"\[5, 2\] channels, the conv takes 8"):
        conv(inputs[0], inputs[1][:, :2])
    with pytest.raises(ValueError, match="the conv takes 8"):
        conv()


def test_fam_equals_the_concatenating_formulation():
    """The FAM as docs/method.md writes it: offset conv 1 on cat(L↑, P̃), deform conv 1 with P̃ as residual
    and ReLU, offset conv 2, deform conv 2 and ReLU, with plain convs and the reference deform conv."""
    from dynamask.ops._reference.deform_conv2d import deform_conv2d_reference

    torch.manual_seed(0)
    fam = FeatureAggregation(channels=8).double()
    for conv in (fam.offset1, fam.offset2):
        nn.init.normal_(conv.weight, std=0.3)
    low = torch.randn(3, 8, 10, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    crop = torch.randn(3, 8, 10, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = fam(low, crop)

    def deform(x, off, layer, residual=None):
        y = deform_conv2d_reference(x, off, layer.weight, layer.bias, padding=(1, 1))
        return F.relu(y if residual is None else y + residual)

    off1 = F.conv2d(torch.cat([low, crop], 1), fam.offset1.weight, fam.offset1.bias, padding=1)
    fused = deform(low, off1, fam.deform1, crop)
    off2 = F.conv2d(fused, fam.offset2.weight, fam.offset2.bias, padding=1)
    torch.testing.assert_close(out, deform(fused, off2, fam.deform2), rtol=1e-10, atol=1e-10)
    assert ops.cpu_isa() in ("baseline", "avx2", "avx512")


@pytest.mark.cuda
def test_cuda_fam_matches_cpu():
    """On CUDA the offset convs are two 18-wide convs summed (no padding, NCHW): the FAM's output and
    gradients equal the CPU's (32-wide, channels-last) in float64."""
    torch.manual_seed(0)
    fam = FeatureAggregation(channels=8).double()
    for conv in (fam.offset1, fam.offset2):
        nn.init.normal_(conv.weight, std=0.3)
    low = torch.randn(3, 8, 10, 10, dtype=torch.float64)
    crop = torch.randn(3, 8, 10, 10, dtype=torch.float64)
    outs, grads = [], []
    for device, layout in (("cpu", torch.channels_last), ("cuda", torch.contiguous_format)):
        m = FeatureAggregation(channels=8).double().to(device)
        m.load_state_dict(fam.state_dict())
        a = low.to(device).contiguous(memory_format=layout).requires_grad_()
        b = crop.to(device).contiguous(memory_format=layout).requires_grad_()
        out = m(a, b)
        go = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape).to(device)
        g = torch.autograd.grad(out, [a, b, m.offset1.weight, m.deform1.weight], go)
        outs.append(out.cpu())
        grads.append([x.cpu() for x in g])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    for name, a, b in zip(["low", "crop", "offset1.weight", "deform1.weight"], grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=name)
