"""Autocast kernels that compute in float32 and return the input's dtype, as torchvision's ops do.

``torch.library.register_autocast`` casts the inputs and returns the op's float32 result as it is; under
``torch.autocast`` torchvision's ``roi_align`` and ``deform_conv2d`` instead give back the dtype of their
input (``features`` / ``input``), so a half-precision network stays in half precision around them. The
kernels here do the same: the floating-point tensors (in lists too) are cast to float32, the op runs with
autocast excluded, and each output is cast to ``out_dtype(args)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_keep_alive: list[torch.library.Library] = []
_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA
)


def _to_float(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in x):
        return type(x)(_to_float(t) for t in x)
    return x


def register_float32_autocast(qualname: str, out_dtypes: Callable[[tuple], list[torch.dtype]]) -> None:
    """Registers the CPU and CUDA autocast kernels of ``qualname`` (``"dynamask::op"``).

    ``out_dtypes(args)`` gives the dtype of each output, in order (one entry for a single tensor).
    """
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    lib = torch.library.Library(namespace, "FRAGMENT")
    _keep_alive.append(lib)

    def kernel(_keyset, *args):
        dtypes = out_dtypes(args)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            out = op(*(_to_float(a) for a in args))
        if isinstance(out, torch.Tensor):
            return out.to(dtypes[0])
        return [o.to(d) for o, d in zip(out, dtypes)]

    for key in ("AutocastCPU", "AutocastCUDA"):
        lib.impl(name, kernel, key, with_keyset=True)
