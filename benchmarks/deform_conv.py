"""dynamask.ops.deform_conv2d against torchvision.ops.deform_conv2d: time and peak memory.

Shapes are the r-FPN stages of the DynaMask head (RoIs x C x H x W, 3x3, C -> C), with 2 and with 1
deform groups, forward and forward+backward. Times are medians of interleaved runs in one process
(CPU: torch.set_num_threads(--threads)); peak memory is measured in a fresh subprocess per case
(CPU: growth of the peak RSS over the inputs; CUDA: torch.cuda.max_memory_allocated over the inputs).

    python benchmarks/deform_conv.py                 # CPU, full shapes
    python benchmarks/deform_conv.py --quick         # smoke run: small batch, one repeat
    python benchmarks/deform_conv.py --device cuda --out benchmarks/results/deform_conv_cuda.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision

import dynamask.ops

SHAPES = [(100, 128, 28), (100, 64, 56), (100, 32, 112)]
IMPLS = {"dynamask": dynamask.ops.deform_conv2d, "torchvision": torchvision.ops.deform_conv2d}


def _inputs(batch, channels, size, dg, device, backward, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device)
    offset = torch.randn(batch, 2 * dg * 9, size, size, generator=gen).to(device)
    weight = (torch.randn(channels, channels, 3, 3, generator=gen) * 0.05).to(device)
    bias = torch.randn(channels, generator=gen).to(device)
    if backward:
        for t in (x, offset, weight, bias):
            t.requires_grad_()
    return x, offset, weight, bias


def _run(impl, tensors, backward):
    x, offset, weight, bias = tensors
    out = IMPLS[impl](x, offset, weight, bias, padding=1)
    if backward:
        out.backward(torch.ones_like(out))
        for t in tensors:
            t.grad = None
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_case(shape, dg, backward, device, repeats):
    tensors = _inputs(*shape, dg, device, backward)
    times = {impl: [] for impl in IMPLS}
    for impl in IMPLS:  # warm-up (and one-off allocations)
        _run(impl, tensors, backward)
    _sync(device)
    for _ in range(repeats):
        for impl in IMPLS:  # interleaved, so drifting load hits both alike
            _sync(device)
            t0 = time.perf_counter()
            _run(impl, tensors, backward)
            _sync(device)
            times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(v) for impl, v in times.items()}


def memory_case(impl, shape, dg, backward, device, threads):
    """Peak memory growth (MiB) of one call, in this (fresh) process."""
    torch.set_num_threads(threads)
    _run(impl, _inputs(2, 8, 8, dg, device, backward), backward)  # load kernels and libraries
    tensors = _inputs(*shape, dg, device, backward)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(impl, tensors, backward)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # The process's peak RSS (VmHWM) is reset to the current RSS first (Linux: clear_refs 5), so that
    # the peaks of importing torch do not hide the call's own.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss_kib("VmRSS")
    _run(impl, tensors, backward)
    peak = _rss_kib("VmHWM") if base is not None else None
    if peak is None:  # no /proc: ru_maxrss (KiB on Linux) only ever rises, so this can read low
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (peak - base) / 1024


def _rss_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_in_subprocess(impl, shape, dg, backward, device, threads):
    args = json.dumps([impl, list(shape), dg, backward, device, threads])
    res = subprocess.run([sys.executable, __file__, "--_memory-case", args], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 8 instead of 100, one repeat")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--sizes", type=int, nargs="+", help="only the shapes of these spatial sizes (28 56 112)")
    parser.add_argument("--_memory-case", dest="memory_case", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_case:
        impl, shape, dg, backward, device, threads = json.loads(args.memory_case)
        print(memory_case(impl, tuple(shape), dg, backward, device, threads))
        return

    torch.set_num_threads(args.threads)
    shapes = [(8, c, s) for _, c, s in SHAPES] if args.quick else SHAPES
    if args.sizes:
        shapes = [shape for shape in shapes if shape[2] in args.sizes]
    repeats = 1 if args.quick else args.repeats
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU, {args.threads} threads (torch {torch.__version__}, torchvision {torchvision.__version__})"
    lines = [
        f"deform_conv2d, 3x3, C -> C, padding 1, bias; {where}; median of {repeats} interleaved runs",
        "",
        "| RoIs×C×H×W | dg | pass | torchvision | dynamask | speed-up | peak MiB torchvision | peak MiB dynamask |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for shape in shapes:
        for dg in (2, 1):
            for backward in (False, True):
                t = time_case(shape, dg, backward, args.device, repeats)
                if args.no_memory:
                    mem = {impl: float("nan") for impl in IMPLS}
                else:
                    mem = {
                        impl: memory_in_subprocess(impl, shape, dg, backward, args.device, args.threads)
                        for impl in IMPLS
                    }
                line = (
                    f"| {'×'.join(map(str, shape))} | {dg} | {'fwd+bwd' if backward else 'fwd'} | "
                    f"{t['torchvision'] * 1e3:.1f} ms | {t['dynamask'] * 1e3:.1f} ms | "
                    f"{t['torchvision'] / t['dynamask']:.1f}× | {mem['torchvision']:.0f} | {mem['dynamask']:.0f} |"
                )
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
