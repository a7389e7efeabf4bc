"""The Predictor and evaluation take a DynaMask model's masks unpasted (``model(images, paste_masks=False)``)
and paste only what they keep: thresholded by score first (Predictor), straight to RLE (evaluation). Their
results must equal, bit for bit, what pasting every detection into a float canvas gave: the same model
behind a wrapper that hides its type takes that old path."""

import json

import pytest
import torch
from model_helpers import one_thread, synthetic_batch, tiny_model  # noqa: F401

from dynamask import Predictor
from dynamask.data.masks import encode_masks
from dynamask.engine.evaluate import run_model
from dynamask.models import mask_handoff


class Opaque(torch.nn.Module):
    """The model behind a wrapper: not a DynaMaskRCNN, so callers get pasted float masks from it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.backbone = model.backbone  # so that run_model still records each image's input size

    def forward(self, images):
        return self.model(images)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model(box_score_thresh=0.0).eval()


@pytest.fixture(scope="module")
def images():
    return synthetic_batch()[0]


def test_unpasted_output_pastes_to_the_same_pixels(model, images):
    with torch.no_grad():
        dense = model(images)
        unpasted = model(images, paste_masks=False)
    for d, u in zip(dense, unpasted):
        assert "masks" not in u and set(u) == set(d) - {"masks"} | {mask_handoff.HANDOFF_KEY}
        for k in ("boxes", "scores", "labels", "mask_resolution"):
            assert torch.equal(u[k], d[k]), k
        size = tuple(d["masks"].shape[-2:])
        keep = torch.arange(len(d["scores"])) % 3 != 1  # any subset, in any pattern
        for t in (0.0, 0.3, 0.5, 0.52, 1.0):  # 0 and 1: every pixel / only probability-1 pixels
            got = mask_handoff.paste_binary(u[mask_handoff.HANDOFF_KEY], u["boxes"], size, t, keep)
            assert torch.equal(got, d["masks"][keep, 0] >= t), t
        for t in (0.3, 0.5):
            rles = mask_handoff.paste_rle(u[mask_handoff.HANDOFF_KEY], u["boxes"], size, t)
            assert rles == encode_masks(d["masks"][:, 0] >= t)  # same dicts, same key order


def _same(a, b):
    assert a.image_size == b.image_size and len(a) == len(b) and a.cat_ids == b.cat_ids
    for name in ("boxes", "scores", "labels", "category_ids", "masks", "mask_resolution"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _spy(monkeypatch, name):
    """Counts the calls of ``mask_handoff.<name>`` (still called through)."""
    calls = []
    real = getattr(mask_handoff, name)
    monkeypatch.setattr(mask_handoff, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("mask_thresh", [0.5, 0.0, 1.0])
def test_predictor_results_are_unchanged(model, images, mask_thresh, monkeypatch):
    with torch.no_grad():
        scores = sorted(float(s) for s in model(images)[0]["scores"])
    pasted = _spy(monkeypatch, "paste_binary")
    for score_thresh in (0.0, (scores[3] + scores[4]) / 2, 1.0):  # all, some, none of the detections
        new = Predictor(model, device="cpu", score_thresh=score_thresh, mask_thresh=mask_thresh)(images)
        old = Predictor(Opaque(model), device="cpu", score_thresh=score_thresh, mask_thresh=mask_thresh)(images)
        for a, b in zip(new, old):
            _same(a, b)
        if score_thresh == 0.0 and mask_thresh == 0.5:
            assert all(len(r) > 0 and r.masks.any() for r in new)
    assert len(pasted) == 3 * len(images)  # the new path ran: once per image and threshold


class _Images(torch.utils.data.Dataset):
    """``dynamask.data.CocoDetection``'s interface, over in-memory images: ``(image, {"image_id"})`` items,
    ``coco.imgs`` (the annotated sizes) and ``cat_ids``."""

    def __init__(self, images, scale=1):
        self.images = images
        imgs = {i + 1: {"height": int(im.shape[1]) * scale, "width": int(im.shape[2]) * scale}
                for i, im in enumerate(images)}
        self.coco = type("Coco", (), {"imgs": imgs})()
        self.cat_ids = [4, 9]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], {"image_id": torch.tensor(i + 1)}


@pytest.mark.parametrize("scale", [1, 2], ids=["rle-path", "annotated-at-twice-the-size"])
@pytest.mark.parametrize("threshold", [0.5, 0.0])
def test_evaluation_results_are_unchanged(model, images, scale, threshold, monkeypatch):
    """The same results.json content: straight to RLE where the annotated size is the image's; where it is
    not (or the threshold is 0, which the RLE op refuses), pasted and resampled as before."""
    data = _Images(images, scale)
    kw = dict(progress=False, batch_size=2, mask_threshold=threshold)
    encoded = _spy(monkeypatch, "paste_rle")
    new = run_model(model, data, **kw)
    assert len(encoded) == (len(images) if scale == 1 and threshold > 0 else 0)
    old = run_model(Opaque(model), data, **kw)
    assert json.dumps(new) == json.dumps(old)
    with torch.no_grad():
        assert len(new) == sum(len(o["scores"]) for o in model(images)) and all("input_size" in r for r in new)
    assert {tuple(r["segmentation"]["size"]) for r in new} == {(64 * scale, 80 * scale)}
