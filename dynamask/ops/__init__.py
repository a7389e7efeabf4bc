"""The kernels of dynamask, as torch ops (``torch.ops.dynamask.*``) with documented Python wrappers.

Each op has a CPU and a CUDA kernel, autograd where training needs it, a fake kernel for
``torch.compile``, and a slow pure-PyTorch twin in :mod:`dynamask.ops._reference` used by the tests.
"""

from dynamask._extension import _C
from dynamask.ops._args import to_rois
from dynamask.ops.debug import full_checks, full_checks_enabled, set_full_checks
from dynamask.ops.deform_conv import deform_conv2d
from dynamask.ops.group_by_resolution import group_by_resolution
from dynamask.ops.paste_masks import paste_masks, paste_masks_rle
from dynamask.ops.roi_align import roi_align_multilevel, roi_align_stages


def cuda_available() -> bool:
    """Whether the CUDA kernels were compiled into this build of ``dynamask._C``."""
    return bool(_C.cuda_available())


def cpu_isa() -> str:
    """The instruction set of the CPU kernels' hot loops in this process: ``"avx512"``, ``"avx2"`` or
    ``"baseline"`` (the widest the CPU has, unless ``DYNAMASK_NO_AVX512=1`` or ``DYNAMASK_NO_AVX2=1`` is set;
    read once per process). Benchmarks print it beside their figures."""
    return str(_C.cpu_isa())


__all__ = [
    "cpu_isa",
    "cuda_available",
    "deform_conv2d",
    "full_checks",
    "full_checks_enabled",
    "group_by_resolution",
    "paste_masks",
    "paste_masks_rle",
    "roi_align_multilevel",
    "roi_align_stages",
    "set_full_checks",
    "to_rois",
]
