"""Loads the compiled kernels (``dynamask._C``) and says what to do when that fails."""

from __future__ import annotations

import torch

_HOW_TO_BUILD = (
    "Build it against the torch you are importing: from a checkout run\n"
    "    pip install --no-build-isolation -e .\n"
    "(or `python setup.py build_ext --inplace`; set DYNAMASK_WITH_CUDA=0 to skip the CUDA kernels)."
)


def _load():
    try:
        from dynamask import _C  # noqa: F401  (loading it registers torch.ops.dynamask.*)
    except ImportError as exc:
        raise ImportError(
            f"dynamask's compiled kernels (dynamask._C) could not be loaded: {exc}\n"
            "This usually means the package was not built, or was built against another torch "
            f"(you have torch {torch.__version__}).\n{_HOW_TO_BUILD}"
        ) from exc
    built = _C.TORCH_VERSION
    running = torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        raise ImportError(
            f"dynamask._C was built against torch {built} but torch {torch.__version__} is imported; "
            f"C++ ops are not compatible across torch releases.\n{_HOW_TO_BUILD}"
        )
    return _C


_C = _load()
