import pytest
import torch

import dynamask.ops


def _cuda_ok() -> bool:
    return torch.cuda.is_available() and dynamask.ops.cuda_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_ok():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and dynamask built with its CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
