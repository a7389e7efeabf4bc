"""DynaMask: instance segmentation with dynamic mask resolution (CVPR 2023), on our own kernels."""

from dynamask import _extension  # noqa: F401  (loads the kernels first, with a clear error if missing)
from dynamask import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
