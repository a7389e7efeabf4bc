"""torch.compile(model) inference on the CPU gives what eager inference gives, on a tiny DynaMask, under
the "msm" routing policy and a fixed resolution (the default inductor backend: it checks each custom
op's output layout against its fake kernel, which is how a wrong fake kernel showed).

Slow for a test, nearly all of it Dynamo tracing torchvision's detection code and inductor lowering the
~20 graphs between graph breaks (the second policy recompiles only the mask branch): measured on the
project's shared 2-core machine, 88 s with inductor's on-disk cache warm, 270 s cold under heavy load.
One image keeps it at that.
"""

import pytest
import torch
from model_helpers import one_thread, synthetic_batch, tiny_model  # noqa: F401


def _paired(eager: dict, compiled: dict) -> None:
    """The same detections, in the same order: discrete outputs equal, continuous ones close.

    Inductor fuses and reorders float32 arithmetic, so values differ by a few ulps per layer: about 1e-6
    relative after ~20 layers (measured: boxes 4e-5 px, scores 3e-7, mask probabilities 7e-5). The bounds
    leave a 10-25x margin and still catch a wrong layout or kernel (errors of 1e-1 and more)."""
    assert len(eager["boxes"]) == len(compiled["boxes"]) > 0
    assert torch.equal(eager["labels"], compiled["labels"])
    assert torch.equal(eager["mask_resolution"], compiled["mask_resolution"])
    torch.testing.assert_close(compiled["boxes"], eager["boxes"], rtol=0, atol=1e-3)
    torch.testing.assert_close(compiled["scores"], eager["scores"], rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled["masks"], eager["masks"], rtol=0, atol=1e-3)


@pytest.mark.slow
def test_compiled_inference_equals_eager():
    torch.manual_seed(0)
    model = tiny_model(box_score_thresh=0.0).eval()
    images, _ = synthetic_batch()
    images = images[:1]  # one image: Dynamo unrolls the per-image loops, so each image costs tracing time
    compiled = torch.compile(model)
    for policy in ("msm", 28):
        model.mask_policy = policy
        with torch.inference_mode():
            eager = model(images)
            got = compiled(images)
        assert len(got) == len(eager) == 1
        _paired(eager[0], got[0])
    # both policies ran their own routing: the fixed one sends every detection to 28 x 28
    assert (got[0]["mask_resolution"] == 28).all()
