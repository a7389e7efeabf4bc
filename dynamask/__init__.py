"""DynaMask: instance segmentation with dynamic mask resolution (CVPR 2023), on our own kernels."""

from dynamask import (
    _extension,  # noqa: F401  (loads the kernels first, with a clear error if missing)
    ops,
)
from dynamask._version import __version__

__all__ = ["Instances", "Predictor", "ops", "__version__"]


def __getattr__(name: str):
    # The Predictor pulls in the model, the engine and pycocotools; `import dynamask` stays cheap.
    if name in ("Instances", "Predictor"):
        from dynamask import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'dynamask' has no attribute {name!r}")
