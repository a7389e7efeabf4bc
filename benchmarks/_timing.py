"""Shared timing helpers for the benchmarks: interleaved runs, medians, device sync, markdown."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: str, reps: int, warmup: int = 1
) -> dict[str, float]:
    """Runs each callable `warmup` times, then `reps` rounds in turn (A, B, A, B, ...); median seconds each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name() -> str:
    """The CPU's model name and its AVX flags, from ``lscpu`` (e.g. "Intel(R) Xeon(R) Processor @ 2.80GHz,
    avx2 avx512f avx512bw ...")."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("Flags:"):
                flags = " ".join(f for f in line.split()[1:] if f == "avx2" or f.startswith("avx512"))
    except OSError:
        pass
    return f"{model}, {flags or 'no AVX2/AVX-512 flags'}"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model, AVX flags, thread count and the instruction set that dynamask's
    CPU kernels picked (``dynamask.ops.cpu_isa``)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    from dynamask import ops

    isa = ops.cpu_isa() if hasattr(ops, "cpu_isa") else "avx2 or baseline (a build before the AVX-512 instances)"
    return f"CPU ({cpu_name()}; {torch.get_num_threads()} threads; dynamask kernels: {isa})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ms(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.2f} s"


def publish(text: str, out: str | None) -> None:
    """Prints a benchmark's markdown and, when ``out`` is given, writes it there too."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
