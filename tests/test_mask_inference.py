"""paste_instance_masks: the per-resolution outputs of one image pasted in detection order."""

import torch

from dynamask import ops
from dynamask.models.mask_inference import mask_probs_key, paste_instance_masks


def test_interleaved_resolutions_paste_in_detection_order():
    torch.manual_seed(0)
    resolutions = (14, 28, 56, 112)
    kinds = [3, 0, 0, 2, 3, 1, 1, 1, 0, 3, 2, 0]  # runs of every length, each resolution several times
    n = len(kinds)
    xy = torch.rand(n, 2) * torch.tensor([60.0, 40.0])
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2) * 30], 1)
    # Per resolution, the masks of the detections routed there, in detection order (as the head gives).
    per_det = [torch.rand(resolutions[k], resolutions[k]) for k in kinds]
    det = {"boxes": boxes, "mask_resolution": torch.tensor([resolutions[k] for k in kinds])}
    for k, s in enumerate(resolutions):
        rows = [m for m, kk in zip(per_det, kinds) if kk == k]
        det[mask_probs_key(s)] = torch.stack(rows) if rows else torch.zeros(0, s, s)
    out = paste_instance_masks(det, (48, 80), resolutions)
    assert out["masks"].shape == (n, 1, 48, 80) and out["masks"].dtype == torch.float32
    assert not any(key.startswith("mask_probs_") for key in out)
    for i in range(n):  # each instance pasted on its own
        alone = ops.paste_masks([per_det[i][None]], boxes[i:i + 1], (48, 80), threshold=None)[0]
        assert torch.equal(out["masks"][i, 0], alone), i


def test_no_detections():
    det = {"boxes": torch.zeros(0, 4), "mask_resolution": torch.zeros(0, dtype=torch.int64)}
    for s in (14, 28):
        det[mask_probs_key(s)] = torch.zeros(0, s, s)
    out = paste_instance_masks(det, (10, 12), (14, 28))
    assert out["masks"].shape == (0, 1, 10, 12)
