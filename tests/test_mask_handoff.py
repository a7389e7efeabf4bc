"""The typed hand-off from the mask head to the paste: each image's groups are the head's outputs of its
detections, its rows put them back in detection order, and the model's outputs carry no hand-off."""

import pytest
import torch
from model_helpers import one_thread, tiny_model  # noqa: F401
from test_paste_masks import fma_bound

from dynamask import ops
from dynamask.models import mask_handoff
from dynamask.models.mask_handoff import MaskHandoff, count_groups, handoff_from_choice, split_by_image

RES = (14, 28, 56, 112)


def fake_head(choice, image_ids, num_images):
    """What predict_masks hands split_by_image, for masks whose every value is the RoI's number: ``(per
    RoI masks at every resolution, hand-offs)``."""
    r = choice.shape[0]
    per_roi = [torch.arange(r, dtype=torch.float32)[:, None, None].expand(r, s, s) for s in RES]
    perm, _ = ops.group_by_resolution(choice, len(RES))
    counts = count_groups(choice, image_ids, len(RES), num_images)
    sorted_choice = choice[perm]
    # the head's output k: the RoIs routed to k, in the sorted order
    probs = [per_roi[k][perm][sorted_choice == k] for k in range(len(RES))]
    return per_roi, split_by_image(probs, perm, choice, image_ids, counts, counts.tolist())


@pytest.mark.parametrize("seed", range(4))
def test_split_by_image_puts_every_mask_back_in_detection_order(seed):
    g = torch.Generator().manual_seed(seed)
    per_image = [int(n) for n in torch.randint(0, 9, (4,), generator=g)]  # some images without detections
    image_ids = torch.cat([torch.full((n,), b) for b, n in enumerate(per_image)])
    choice = torch.randint(0, len(RES), (image_ids.shape[0],), generator=g)
    counts = count_groups(choice, image_ids, len(RES), len(per_image))
    assert counts.tolist() == [[int(((choice == k) & (image_ids == b)).sum()) for b in range(4)] for k in range(4)]
    _, handoffs = fake_head(choice, image_ids, len(per_image))
    first = 0
    for h, n in zip(handoffs, per_image):
        mine = torch.arange(first, first + n)  # this image's RoIs
        first += n
        assert isinstance(h, MaskHandoff) and h.rows.dtype == torch.int64 and h.rows.shape == (n,)
        for k, masks in enumerate(h.masks):  # group k: the image's RoIs routed to k, in detection order
            assert masks.shape[1:] == (RES[k], RES[k])
            assert masks[:, 0, 0].tolist() == [float(i) for i in mine[choice[mine] == k]]
        # rows: row rows[n] of the groups counted in order is detection n's mask
        flat = torch.cat([m[:, 0, 0] for m in h.masks])
        assert flat[h.rows].tolist() == [float(i) for i in mine]
        assert sorted(h.rows.tolist()) == list(range(n))


def test_split_by_image_with_no_rois():
    empty = torch.zeros(0, dtype=torch.int64)
    _, handoffs = fake_head(empty, empty, 2)
    assert len(handoffs) == 2
    assert all(h.rows.shape == (0,) and [m.shape[0] for m in h.masks] == [0] * 4 for h in handoffs)


def test_handoff_from_choice_equals_the_heads_form():
    choice = torch.tensor([2, 0, 3, 0, 1, 2])
    image_ids = torch.zeros(6, dtype=torch.int64)
    per_roi, (h,) = fake_head(choice, image_ids, 1)
    other = handoff_from_choice(per_roi, choice)
    assert torch.equal(other.rows, h.rows)
    assert all(torch.equal(a, b) for a, b in zip(other.masks, h.masks))


def test_paste_reads_each_detection_at_its_own_resolution():
    torch.manual_seed(0)
    choice = torch.tensor([3, 0, 0, 2, 1, 3, 1])
    masks = [torch.rand(7, s, s) for s in RES]
    boxes = torch.rand(7, 2) * 40
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(7, 2) * 20], 1)
    pasted = mask_handoff.paste(handoff_from_choice(masks, choice), boxes, (50, 60))
    assert pasted.shape == (7, 1, 50, 60) and pasted.dtype == torch.float32
    for i, k in enumerate(choice.tolist()):
        alone = ops.paste_masks(masks[k][i:i + 1], boxes[i:i + 1], (50, 60), threshold=None)
        assert torch.equal(pasted[i], alone), i


def test_model_hands_over_and_pastes_in_detection_order():
    """The heads' eval output: torchvision's entries, mask_resolution and the hand-off; the model's: masks."""
    torch.manual_seed(0)
    model = tiny_model(box_score_thresh=0.0).eval()
    model.mask_policy = lambda feats, boxes, sizes: torch.arange(feats.shape[0]) % 4
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.no_grad():
        il, _ = model.transform(images)
        feats = model.backbone(il.tensors)
        proposals, _ = model.rpn(il, feats)
        heads_out, _ = model.roi_heads(feats, proposals, il.image_sizes)
        out = model(images)
    res = model.roi_heads.mask_head.resolutions
    first = 0
    for det, final in zip(heads_out, out):
        assert set(det) == {"boxes", "labels", "scores", "mask_resolution", "mask_handoff"}
        h = det["mask_handoff"]
        n = det["boxes"].shape[0]
        assert n > 0 and h.rows.shape == (n,)
        expected = torch.tensor([res[i % 4] for i in range(first, first + n)])
        first += n
        assert torch.equal(det["mask_resolution"], expected)
        assert [m.shape[0] for m in h.masks] == [int((expected == s).sum()) for s in res]
        assert set(final) == {"boxes", "labels", "scores", "mask_resolution", "masks"}
        # each detection's own mask, pasted alone into its (rescaled) box, is its canvas
        flat = [m for group in h.masks for m in group]
        for i in range(n):
            assert flat[int(h.rows[i])].shape[-1] == expected[i]
            alone = ops.paste_masks(flat[int(h.rows[i])][None], final["boxes"][i:i + 1],
                                    tuple(final["masks"].shape[-2:]), threshold=None)
            torch.testing.assert_close(final["masks"][i], alone, rtol=0, atol=1e-6)


@pytest.mark.cuda
def test_cuda_hand_off_never_waits_on_the_device():
    """After the one host sync (the [K, B] table), splitting and pasting only queue device work."""
    choice = torch.tensor([3, 0, 0, 2, 1, 3, 1, 2, 0], device="cuda")
    image_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1], device="cuda")
    perm, _ = ops.group_by_resolution(choice, len(RES))
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(9, 2, generator=g) * 30
    boxes = torch.cat([boxes, boxes + 4 + torch.rand(9, 2, generator=g) * 15], 1).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counts = count_groups(choice, image_ids, len(RES), 2)
        torch.cuda.set_sync_debug_mode("default")
        counts_host = counts.tolist()  # the one sync
        probs = [torch.rand(sum(c), s, s, device="cuda") for c, s in zip(counts_host, RES)]
        torch.cuda.set_sync_debug_mode("error")
        handoffs = split_by_image(probs, perm, choice, image_ids, counts, counts_host)
        canvases = [mask_handoff.paste(h, b, (40, 50)) for h, b in zip(handoffs, boxes.split([4, 5]))]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = split_by_image([p.cpu() for p in probs], perm.cpu(), choice.cpu(), image_ids.cpu(), counts.cpu(),
                         counts_host)
    for h, c, b in zip(cpu, canvases, boxes.cpu().split([4, 5])):
        torch.testing.assert_close(c.cpu(), mask_handoff.paste(h, b, (40, 50)), rtol=0, atol=fma_bound(RES))
