"""dynamask.ops.deform_conv2d against torchvision, F.conv2d, our pure-PyTorch reference, gradcheck
and opcheck; CUDA tests are marked and skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import dynamask.ops as ops
from dynamask.ops._reference.deform_conv2d import deform_conv2d_reference


def _make(B, C, C_out, H, W, k=(3, 3), stride=1, pad=1, dil=1, groups=1, dg=1, mask=True, bias=True,
          offset_scale=1.0, dtype=torch.float64, device="cpu"):
    kh, kw = k
    s, p, d = (stride, stride) if isinstance(stride, int) else stride, (pad, pad), (dil, dil)
    out_h = (H + 2 * p[0] - (d[0] * (kh - 1) + 1)) // s[0] + 1
    out_w = (W + 2 * p[1] - (d[1] * (kw - 1) + 1)) // s[1] + 1
    g = dict(dtype=dtype, device=device)
    t = {
        "input": torch.randn(B, C, H, W, **g),
        "offset": torch.randn(B, 2 * dg * kh * kw, out_h, out_w, **g) * offset_scale,
        "weight": torch.randn(C_out, C // groups, kh, kw, **g),
        "bias": torch.randn(C_out, **g) if bias else None,
        "mask": torch.rand(B, dg * kh * kw, out_h, out_w, **g) if mask else None,
    }
    kwargs = dict(stride=s, padding=p, dilation=d)
    return t, kwargs


def _grads(fn, tensors, kwargs, seed=1, **extra):
    leaves = {n: v.detach().clone().requires_grad_() for n, v in tensors.items() if v is not None}
    args = {n: leaves.get(n) for n in tensors}
    out = fn(args["input"], args["offset"], args["weight"], args["bias"], mask=args["mask"], **kwargs, **extra)
    # Drawn on the CPU and moved: a CUDA generator gives other numbers for the same seed, and a CPU-vs-CUDA
    # comparison must backpropagate the same upstream gradient on both.
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), go, allow_unused=True) if out.numel() else [
        torch.zeros_like(v) for v in leaves.values()]
    return out, dict(zip(leaves, grads))


def _tv(input, offset, weight, bias, mask=None, stride=1, padding=0, dilation=1):
    return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


CASES = [
    # B, C, C_out, H, W, kernel, stride, pad, dil, groups, dg, mask, bias, offset_scale
    (0, 6, 4, 7, 7, (3, 3), 1, 1, 1, 1, 1, True, True, 1.0),
    (1, 5, 7, 9, 8, (3, 3), 1, 1, 1, 1, 1, False, False, 2.0),
    (7, 6, 10, 11, 9, (3, 3), 2, 1, 1, 2, 2, True, True, 3.0),
    (33, 4, 6, 6, 7, (3, 3), 1, 2, 2, 1, 2, True, False, 1.0),
    (3, 6, 6, 9, 8, (3, 3), 1, 2, 2, 3, 2, False, True, 10.0),  # runs split by weight groups
    (2, 12, 8, 8, 10, (2, 3), (2, 1), 0, 1, 2, 3, True, True, 1.5),  # non-square kernel, stride
    (2, 10, 6, 6, 6, (3, 3), 1, 1, 1, 2, 1, True, True, 40.0),  # samples far outside the input
    (4, 3, 5, 5, 5, (1, 1), 1, 0, 1, 1, 3, True, True, 0.7),
    # one weight group and one deform group with 4/8/16/32/64/128 channels: the compile-time-width loops
    (3, 8, 8, 9, 9, (3, 3), 1, 1, 1, 1, 1, True, True, 2.0),
    (2, 16, 5, 7, 6, (3, 3), 1, 1, 1, 1, 1, False, True, 40.0),  # samples far outside the input
    (2, 32, 4, 8, 7, (3, 3), 2, 1, 1, 1, 1, True, False, 1.0),
    (5, 4, 3, 6, 6, (3, 3), 1, 0, 1, 1, 1, True, True, 0.5),  # samples on the border: clamped corners
    (1, 64, 6, 5, 5, (3, 3), 1, 1, 1, 1, 1, True, True, 1.0),
    (2, 128, 3, 4, 5, (3, 3), 1, 1, 1, 1, 1, False, True, 3.0),  # the head's 28² stage width
    (2, 8, 4, 9, 9, (5, 5), 1, 2, 1, 1, 1, True, True, 1.5),  # > 9 taps: sampled per tap, not planned
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-C{c[1]}-g{c[9]}-dg{c[10]}-s{c[6]}-d{c[8]}")
def test_matches_torchvision_values_and_grads(case):
    B, C, C_out, H, W, k, s, p, d, groups, dg, mask, bias, scale = case
    t, kw = _make(B, C, C_out, H, W, k, s, p, d, groups, dg, mask, bias, scale)
    out, grads = _grads(ops.deform_conv2d, t, kw)
    out_tv, grads_tv = _grads(_tv, t, kw)
    assert out.shape == out_tv.shape
    torch.testing.assert_close(out, out_tv, rtol=1e-10, atol=1e-10)
    for name in grads_tv:
        torch.testing.assert_close(grads[name], grads_tv[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_float32_matches_torchvision():
    t, kw = _make(5, 16, 8, 12, 12, dg=2, dtype=torch.float32)
    out, grads = _grads(ops.deform_conv2d, t, kw)
    out_tv, grads_tv = _grads(_tv, t, kw)
    torch.testing.assert_close(out, out_tv, rtol=1e-4, atol=1e-4)
    for name in grads_tv:
        torch.testing.assert_close(grads[name], grads_tv[name], rtol=1e-3, atol=1e-3, msg=f"grad of {name}")


def test_large_prime_batch():
    t, kw = _make(1031, 1, 2, 3, 3, dg=1, dtype=torch.float64)
    out, grads = _grads(ops.deform_conv2d, t, kw)
    out_tv, grads_tv = _grads(_tv, t, kw)
    torch.testing.assert_close(out, out_tv)
    for name in grads_tv:
        torch.testing.assert_close(grads[name], grads_tv[name], msg=f"grad of {name}")


def test_batch_zero_is_empty():
    t, kw = _make(0, 4, 6, 8, 8, stride=2)
    out = ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **kw)
    assert out.shape == (0, 6, 4, 4)


def test_batched_equals_single():
    t, kw = _make(5, 6, 4, 9, 9, dg=2, groups=2)
    out = ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **kw)
    for b in range(5):
        one = ops.deform_conv2d(t["input"][b:b + 1], t["offset"][b:b + 1], t["weight"], t["bias"],
                                mask=t["mask"][b:b + 1], **kw)
        torch.testing.assert_close(out[b:b + 1], one, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stride,dil,groups", [(1, 1, 1), (2, 1, 2), (1, 2, 1)])
def test_zero_offsets_equal_conv2d(stride, dil, groups):
    t, kw = _make(3, 8, 6, 10, 11, stride=stride, dil=dil, groups=groups, dg=2, mask=False)
    out = ops.deform_conv2d(t["input"], torch.zeros_like(t["offset"]), t["weight"], t["bias"], **kw)
    ref = F.conv2d(t["input"], t["weight"], t["bias"], groups=groups, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_matches_pure_pytorch_reference():
    t, kw = _make(3, 6, 4, 8, 7, groups=2, dg=3, offset_scale=2.0)
    res = torch.randn(3, 4, 8, 7, dtype=torch.float64)
    out, grads = _grads(ops.deform_conv2d, {**t, "residual": None}, kw, residual=res, activation="relu")
    ref, grads_ref = _grads(deform_conv2d_reference, {**t, "residual": None}, kw, residual=res, activation="relu")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-8, atol=1e-8, msg=f"grad of {name}")


def test_residual_and_relu_epilogue():
    t, kw = _make(4, 6, 6, 7, 7, dg=2)
    leaves = {n: v.clone().requires_grad_() for n, v in t.items()}
    res = torch.randn(4, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    out = ops.deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], mask=leaves["mask"],
                            residual=res, activation="relu", **kw)
    ref = torch.relu(
        _tv(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], leaves["mask"], **kw) + res
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert (out == 0).any() and (out > 0).any()
    go = torch.randn_like(out)
    inputs = [*leaves.values(), res]
    for a, b, name in zip(torch.autograd.grad(out, inputs, go), torch.autograd.grad(ref, inputs, go),
                          [*leaves, "residual"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("C,groups,dg", [(4, 2, 2), (8, 1, 1)], ids=["generic", "fixed-width"])
def test_gradcheck_float64(C, groups, dg):
    t, kw = _make(2, C, 4, 5, 5, groups=groups, dg=dg, offset_scale=1.3)
    res = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    leaves = [t["input"], t["offset"], t["weight"], t["bias"], t["mask"]]
    for v in leaves:
        v.requires_grad_()

    def fn(x, off, w, b, m, r):
        return ops.deform_conv2d(x, off, w, b, mask=m, residual=r, **kw)

    assert torch.autograd.gradcheck(fn, (*leaves, res), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradcheck_relu_no_mask():
    t, kw = _make(1, 2, 2, 4, 4, dg=1, mask=False, offset_scale=0.8)
    x, off, w, b = (t[n].requires_grad_() for n in ("input", "offset", "weight", "bias"))
    assert torch.autograd.gradcheck(
        lambda *a: ops.deform_conv2d(*a, activation="relu", **kw), (x, off, w, b), eps=1e-6, atol=1e-5)


def test_non_contiguous_inputs():
    t, kw = _make(3, 8, 6, 9, 9, dg=2, dtype=torch.float64)
    nc = {
        "input": t["input"].to(memory_format=torch.channels_last),
        "offset": t["offset"].transpose(2, 3).contiguous().transpose(2, 3),
        "weight": t["weight"].to(memory_format=torch.channels_last),
        "bias": torch.stack([t["bias"], t["bias"]], 1)[:, 0],
        "mask": t["mask"].transpose(0, 1).contiguous().transpose(0, 1),
    }
    assert not any(v.is_contiguous() for v in nc.values())
    out, grads = _grads(ops.deform_conv2d, nc, kw)
    ref, grads_ref = _grads(ops.deform_conv2d, t, kw)
    torch.testing.assert_close(out, ref)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=f"grad of {name}")


@pytest.mark.parametrize("C,groups,dg", [(6, 2, 2), (16, 1, 1)], ids=["generic", "fixed-width"])
def test_channels_last_input_gives_channels_last_output(C, groups, dg):
    """The CPU kernel reads a channels-last input in place and writes a channels-last output (the
    r-FPN stages run channels-last): values and gradients equal torchvision's on the NCHW tensors, with
    several images per 1x1-convolution call, and a residual in either layout."""
    t, kw = _make(5, C, 8, 9, 8, groups=groups, dg=dg, offset_scale=2.0)
    cl = dict(t, input=t["input"].contiguous(memory_format=torch.channels_last))
    for res in (torch.randn(5, 8, 9, 8, dtype=torch.float64),
                torch.randn(5, 8, 9, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)):
        out, grads = _grads(ops.deform_conv2d, cl, kw, residual=res, activation="relu")
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        ref, grads_ref = _grads(lambda *a, res=res, **k: torch.relu(_tv(*a, **k) + res), t, kw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")
    x = cl["input"].clone().requires_grad_()
    off, w = t["offset"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: ops.deform_conv2d(*a, mask=t["mask"], **kw), (x, off, w),
                                    eps=1e-6, atol=1e-5, fast_mode=True)


def test_half_and_autocast_on_cpu():
    t, kw = _make(2, 4, 4, 6, 6, dtype=torch.float32)
    ref = ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **kw)
    half = ops.deform_conv2d(*(t[n].bfloat16() for n in ("input", "offset", "weight", "bias")),
                             mask=t["mask"].bfloat16(), **kw)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, rtol=0.05, atol=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.deform_conv2d(*(t[n].bfloat16() for n in ("input", "offset", "weight", "bias")),
                                mask=t["mask"], **kw)
    # computed in float32, returned in the input's dtype (as torchvision's deform_conv2d does)
    assert out.dtype == torch.bfloat16
    want = ops.deform_conv2d(*(t[n].bfloat16().float() for n in ("input", "offset", "weight", "bias")),
                             mask=t["mask"], **kw).bfloat16()
    assert torch.equal(out, want)


def test_bad_inputs_raise_clear_errors():
    t, kw = _make(2, 4, 4, 6, 6)
    x, off, w, b, m = (t[n] for n in ("input", "offset", "weight", "bias", "mask"))
    with pytest.raises(ValueError, match="offset must have 2 \\* kh \\* kw \\* deform_groups channels"):
        ops.deform_conv2d(x, off[:, :17], w, b, mask=m, **kw)
    with pytest.raises(ValueError, match="mask must have shape"):
        ops.deform_conv2d(x, off, w, b, mask=m[:, :5], **kw)
    with pytest.raises(ValueError, match="offset must have shape"):
        ops.deform_conv2d(x, off[:, :, :5], w, b, mask=m, **kw)
    with pytest.raises(ValueError, match="weight has dtype"):
        ops.deform_conv2d(x, off, w.float(), b, mask=m, **kw)
    with pytest.raises(ValueError, match="not a multiple of deform_groups"):
        ops.deform_conv2d(x[:, :3], off.repeat(1, 2, 1, 1)[:, :54], w[:, :3], b, **kw)
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.deform_conv2d(x, off, w, b, mask=m, residual=torch.zeros(2, 4, 5, 5, dtype=x.dtype), **kw)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.deform_conv2d(x, off, w, b[:3], mask=m, **kw)
    with pytest.raises(ValueError, match="input must be"):
        ops.deform_conv2d(x[0], off, w, b, **kw)
    with pytest.raises(ValueError, match="activation"):
        ops.deform_conv2d(x, off, w, b, activation="gelu", **kw)
    with pytest.raises(ValueError, match="on meta but input is on cpu"):
        ops.deform_conv2d(x, off.to("meta"), w, b, **kw)


def test_opcheck():
    t, kw = _make(1, 4, 2, 3, 3, groups=2, dg=2)
    res = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    for v in (t["input"], t["offset"], t["weight"], t["mask"]):
        v.requires_grad_()
    args = (t["input"], t["offset"], t["weight"], t["bias"], t["mask"], res, 1, 1, 1, 1, 1, 1, True)
    torch.library.opcheck(torch.ops.dynamask.deform_conv2d.default, args)


# ----------------------------------------------------------------------------------------- CUDA
# float64 CPU-vs-CUDA on identical inputs: the kernels sum the same terms in another order, with fused
# multiply-adds on the device, so |difference| <= 2 * n * u64 * sum|terms| (u64 = 1.1e-16). Forward:
# n <= 6 * 9 products per output plus 4 corners, each |term| < 5 * 5 * 10 (weight, input, offsets scaled up
# to 10 only move the samples): < 1e-11. Gradients: n <= 33 * 36 = 1188 terms (weight), 9 * 121 (input,
# atomic), each below 4 * 4 * 5: < 8e-9. So 1e-9 and 1e-8; a wrong tap or a lost term is ~1e-1.


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: f"B{c[0]}-g{c[9]}-dg{c[10]}")
def test_cuda_matches_cpu(case):
    B, C, C_out, H, W, k, s, p, d, groups, dg, mask, bias, scale = case
    t, kw = _make(B, C, C_out, H, W, k, s, p, d, groups, dg, mask, bias, scale)
    out, grads = _grads(ops.deform_conv2d, t, kw)
    tc = {n: (v.cuda() if v is not None else None) for n, v in t.items()}  # the same numbers, moved
    out_c, grads_c = _grads(ops.deform_conv2d, tc, kw)  # and the same upstream gradient (drawn on the CPU)
    torch.testing.assert_close(out_c.cpu(), out, rtol=1e-9, atol=1e-9)
    for name in grads:
        torch.testing.assert_close(grads_c[name].cpu(), grads[name], rtol=1e-8, atol=1e-8, msg=f"grad of {name}")


@pytest.mark.cuda
def test_cuda_epilogue_prime_batch_and_stream():
    t, kw = _make(37, 16, 16, 14, 14, dg=1, dtype=torch.float32, device="cuda")
    res = torch.randn(37, 16, 14, 14, device="cuda")
    stream = torch.cuda.Stream()
    # the inputs were made on the default stream: the side stream must wait for them before reading
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], residual=res,
                                activation="relu", **kw)
    stream.synchronize()
    ref = torch.relu(_tv(t["input"], t["offset"], t["weight"], t["bias"], t["mask"], **kw) + res)
    # float32, two implementations summing n = 16 * 9 products of 4-corner samples, plus bias and residual,
    # in any order: |difference| <= 2 * n * u32 * sum|terms|, with sum|terms| computed per element on
    # absolute values (the bilinear weights and the mask are >= 0), plus one rounding of the output.
    s_abs = _tv(t["input"].abs(), t["offset"], t["weight"].abs(), t["bias"].abs(), t["mask"], **kw) + res.abs()
    _assert_within(out, ref, 2 * 160 * U32 * s_abs + U32 * ref.abs(), "float32 forward vs torchvision")


@pytest.mark.cuda
def test_cuda_gradcheck_and_empty():
    t, kw = _make(2, 4, 4, 5, 5, groups=2, dg=2, offset_scale=1.3, device="cuda")
    leaves = [t[n].requires_grad_() for n in ("input", "offset", "weight", "bias", "mask")]
    # The input gradient is scattered with atomic adds, so two backward passes may sum its terms in another
    # order. Each input pixel gets at most kh * kw * H_out * W_out = 225 terms of one-hot Jacobian rows, each
    # below |w| * |m| < 5: two float64 orders differ by at most 2 * 225 * u64 * 225 * 5 < 6e-11.
    assert torch.autograd.gradcheck(lambda x, o, w, b, m: ops.deform_conv2d(x, o, w, b, mask=m, **kw), leaves,
                                    eps=1e-6, atol=1e-5, nondet_tol=1e-10)
    e, kw = _make(0, 4, 4, 6, 6, device="cuda")
    out = ops.deform_conv2d(e["input"], e["offset"], e["weight"], e["bias"], mask=e["mask"], **kw)
    assert out.shape == (0, 4, 6, 6)
    with pytest.raises(ValueError, match="is on cpu but input is on cuda"):
        ops.deform_conv2d(t["input"].detach(), t["offset"].detach().cpu(), t["weight"].detach(), **kw)


@pytest.mark.cuda
def test_cuda_deterministic_mode_rejects_the_atomic_backward():
    """The input gradient is built with atomic adds: under torch.use_deterministic_algorithms(True) its
    backward must raise (as torchvision's does), while the forward stays allowed."""
    t, kw = _make(2, 4, 4, 6, 6, dtype=torch.float32, device="cuda")
    x = t["input"].requires_grad_()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = ops.deform_conv2d(x, t["offset"], t["weight"], t["bias"], mask=t["mask"], **kw)
        with pytest.raises(RuntimeError, match="deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)


def test_cpu_deterministic_mode_allows_backward():
    """The CPU backward sums in a fixed order: deterministic mode must not reject it."""
    t, kw = _make(2, 4, 4, 6, 6)
    x = t["input"].requires_grad_()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ops.deform_conv2d(x, t["offset"], t["weight"], t["bias"], mask=t["mask"], **kw).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert x.grad is not None


# ----------------------------------------------------------------------------------- half precision
U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of float32, the accumulation type of half inputs


def _assert_within(got, ref, bound, what):
    """Element-wise |got - ref| <= bound (got is moved to ref's device and dtype)."""
    err = (got.detach().to(ref.device, ref.dtype) - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements beyond the bound; worst "
                           f"error {float(err.max()):.3g}, its bound {float(bound.flatten()[err.argmax()]):.3g}")


def _half_case(dtype, device):
    """Inputs rounded to dtype, their float64 twins (the reference sees exactly the rounded numbers), and
    an upstream gradient drawn on the CPU, rounded likewise."""
    t, kw = _make(3, 16, 8, 9, 10, dg=2, offset_scale=2.0)
    res = torch.randn(3, 8, 9, 10, dtype=torch.float64)
    # Offsets of whole eighths that are never whole pixels: exact in both dtypes, and no sample lands on a
    # pixel row or column, where the offset gradient jumps (either one-sided derivative would be right).
    frac = torch.randint(1, 8, t["offset"].shape, dtype=torch.float64) / 8
    off = torch.randint(-3, 3, t["offset"].shape, dtype=torch.float64) + frac
    t = {**t, "offset": off, "residual": res}
    exact = {n: v.to(dtype).double() for n, v in t.items()}
    low = {n: v.to(device, dtype) for n, v in exact.items()}
    go = torch.randn(3, 8, 9, 10, dtype=torch.float64).to(dtype).double()
    return exact, low, go, kw


def _call(fn, t, kw, **overrides):
    a = {**t, **overrides}
    return fn(a["input"], a["offset"], a["weight"], a["bias"], mask=a["mask"], residual=a["residual"], **kw)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_forward_and_backward(dtype, device):
    """Half/bf16 deform conv against the float64 reference of the same rounded inputs.

    Error model (u = the dtype's unit roundoff, 2^-11 for float16, 2^-8 for bfloat16):
    - forward: the sampled columns may be stored in the dtype (one rounding each: <= u * sum|w * col|), the
      n = C_in * kh * kw = 144 products and the bias and residual are summed in float32 (<= n * u32 *
      sum|terms|; 160 >= 144 + 4 corners + 2), and the result is rounded once (<= u * |out|);
    - backward: likewise, one rounding of the intermediate gradient columns and of each result
      (2 u * (|ref| + sum|terms|)), and float32 sums of the depths listed below.
    sum|terms| is computed per element by the reference on absolute values (bilinear weights are >= 0).
    A float16 sum, or a wrong tap, breaks these bounds by an order of magnitude."""
    u = torch.finfo(dtype).eps / 2
    exact, low, go, kw = _half_case(dtype, device)
    leaves = {n: v.clone().requires_grad_() for n, v in low.items()}
    out = _call(ops.deform_conv2d, leaves, kw)
    assert out.dtype == dtype and out.device.type == device
    ex = {n: v.clone().requires_grad_() for n, v in exact.items()}
    ref = _call(deform_conv2d_reference, ex, kw)
    absd = {n: v.abs() for n, v in exact.items()}
    s_fwd = _call(deform_conv2d_reference, absd, kw, offset=exact["offset"])
    _assert_within(out, ref, u * ref.abs() + u * s_fwd + 2 * 160 * U32 * s_fwd, f"{dtype} forward")

    got = torch.autograd.grad(out, list(leaves.values()), go.to(device, dtype))
    exp = torch.autograd.grad(ref, list(ex.values()), go)
    # sum|terms| of each gradient: the reference's backward on absolute values (offset: see below)
    ab = {n: v.clone().requires_grad_() for n, v in absd.items()}
    ab["offset"] = exact["offset"].clone().requires_grad_()
    s_bwd = dict(zip(ab, torch.autograd.grad(_call(deform_conv2d_reference, ab, kw), list(ab.values()), go.abs())))
    # The offset gradient sums (x_corner differences) * m * (w . go) over C_in/dg = 8 channels and 4 corners:
    # |terms| <= 2 max|x| * |m| * sum_c sum_o |w| |go| ; bound it per element with einsum.
    dg, K = 2, 9
    B, _, Ho, Wo = go.shape
    wg = exact["weight"].abs().view(8, dg, 8, K)  # [C_out, dg, C_in/dg, K]
    a = torch.einsum("odck,bop->bdkp", wg, go.abs().view(B, 8, Ho * Wo))  # sum_c sum_o |w| |go|
    s_off = 2 * exact["input"].abs().max() * exact["mask"].abs().view(B, dg, K, Ho * Wo) * a
    s_bwd["offset"] = s_off.view(B, dg, K, 1, Ho, Wo).expand(B, dg, K, 2, Ho, Wo).reshape(B, 2 * dg * K, Ho, Wo)
    # summation depth of each gradient: the columns' gradient (C_out = 8 terms), then 810 scattered terms
    # (input), 8 channels x 4 corners (offset, mask), B * H_out * W_out = 270 positions of 4-corner columns
    # (weight, bias); rounded up
    terms = {"input": 1024, "offset": 64, "weight": 512, "bias": 512, "mask": 64, "residual": 1}
    for (name, g), e in zip(zip(leaves, got), exp):
        assert g.dtype == dtype, name
        s = s_bwd[name]
        _assert_within(g, e, 2 * u * (e.abs() + s) + 2 * terms[name] * U32 * s, f"{dtype} grad of {name}")


def _offset_layouts(off):
    """The same offsets in the layouts the CPU kernel reads in place, and one it copies."""
    b, c, h, w = off.shape
    wide = torch.zeros(b, c + 14, h, w, dtype=off.dtype).contiguous(memory_format=torch.channels_last)
    wide[:, :c] = off
    return {
        "nchw": off.contiguous(),
        "channels-last": off.contiguous(memory_format=torch.channels_last),
        "channel slice of channels-last": wide[:, :c],  # what the FAM's 32-wide offset convs give
        "channel slice of nchw": torch.cat([off, off[:, :3]], 1)[:, :c],
        "transposed planes (copied)": off.transpose(2, 3).contiguous().transpose(2, 3),
    }


@pytest.mark.parametrize("C,groups,dg,H,W", [(16, 1, 1, 9, 8), (6, 2, 2, 7, 9), (16, 1, 1, 6, 1), (8, 1, 1, 1, 7)],
                         ids=["fixed-width", "generic", "out_w=1", "out_h=1"])
@pytest.mark.parametrize("input_layout", ["nchw", "channels-last"])
def test_offsets_in_any_layout_give_identical_results(C, groups, dg, H, W, input_layout):
    """The CPU forward reads offsets through their strides (channels-last, or a channel slice of a wider
    tensor: the FAM's offset convs) instead of copying them: every layout gives bit-identical outputs to
    contiguous offsets, and the offsets' gradients flow back through the view."""
    t, kw = _make(3, C, 6, H, W, groups=groups, dg=dg, offset_scale=2.0, mask=False)
    x = t["input"] if input_layout == "nchw" else t["input"].contiguous(memory_format=torch.channels_last)
    res = torch.randn(3, 6, H, W, dtype=torch.float64)
    ref = ops.deform_conv2d(x, t["offset"].contiguous(), t["weight"], t["bias"], residual=res, activation="relu", **kw)
    for name, off in _offset_layouts(t["offset"]).items():
        out = ops.deform_conv2d(x, off, t["weight"], t["bias"], residual=res, activation="relu", **kw)
        assert torch.equal(out, ref), name
    # gradients through a channel slice equal those of the contiguous offsets
    base = t["offset"].clone().requires_grad_()
    (g_base,) = torch.autograd.grad(ops.deform_conv2d(x, base, t["weight"], t["bias"], **kw).square().sum(), [base])
    wide = torch.zeros(3, base.shape[1] + 14, H, W, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wide[:, :base.shape[1]] = t["offset"]
    wide.requires_grad_()
    (g_wide,) = torch.autograd.grad(
        ops.deform_conv2d(x, wide[:, :base.shape[1]], t["weight"], t["bias"], **kw).square().sum(), [wide])
    torch.testing.assert_close(g_wide[:, :base.shape[1]], g_base, rtol=0, atol=0)
    assert not g_wide[:, base.shape[1]:].any()
