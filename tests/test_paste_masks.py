"""paste_masks / paste_masks_rle against the grid_sample reference, pycocotools and hand-derived values."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from dynamask.ops import paste_masks, paste_masks_rle
from dynamask.ops._reference.paste_masks import paste_masks_reference

IMAGE = (61, 83)  # (H, W), odd sizes on purpose


def random_boxes(n, image=IMAGE, seed=0):
    """Fractional boxes of all sizes: tiny (< 1 px), partly or wholly outside, and whole-image."""
    g = torch.Generator().manual_seed(seed)
    H, W = image
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W * 1.3, H * 1.3]) - torch.tensor([W * 0.15, H * 0.15])
    wh = torch.rand(n, 2, generator=g) ** 2 * torch.tensor([W, H]) + 0.05
    boxes = torch.cat([xy, xy + wh], 1)
    special = torch.tensor(
        [
            [0.0, 0.0, W, H],  # whole image
            [-5.5, -3.25, W + 4.75, H + 2.5],  # larger than the image
            [10.2, 7.7, 10.6, 8.1],  # tiny: 0.4 px
            [20.45, 20.45, 20.55, 20.55],  # tiny around a pixel centre
            [-30.0, 5.0, -2.0, 25.0],  # wholly left of the image
            [W - 3.3, H - 2.2, W + 9.1, H + 7.7],  # bottom-right corner, mostly outside
        ]
    )
    return torch.cat([boxes, special])[:n] if n < len(special) else torch.cat([special, boxes[: n - len(special)]])


def compare_thresholded(out, groups, boxes, threshold, image=IMAGE):
    """Bool output vs the reference, ignoring pixels whose reference value is within 1e-4 of the threshold."""
    ref_f = paste_masks_reference(groups, boxes, image, None)
    ref = ref_f >= threshold
    assert out.dtype == torch.bool and out.shape == ref.shape
    close = (ref_f - threshold).abs() < 1e-4
    assert torch.equal(out.cpu() & ~close, ref & ~close)


@pytest.mark.parametrize("S", [1, 2, 14, 28])
def test_single_resolution_float_against_reference(S):
    boxes = random_boxes(40, seed=S)
    masks = torch.rand(40, S, S)
    out = paste_masks(masks, boxes, IMAGE, threshold=None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, paste_masks_reference(masks, boxes, IMAGE, None), rtol=0, atol=2e-5)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.9])
def test_mixed_resolutions_thresholded_against_reference(threshold):
    sizes, counts = [14, 28, 56, 112], [7, 5, 4, 3]
    boxes = random_boxes(sum(counts), seed=1)
    groups = [torch.rand(n, s, s) for n, s in zip(counts, sizes)]
    out = paste_masks(groups, boxes, IMAGE, threshold=threshold)
    compare_thresholded(out, groups, boxes, threshold)
    dense = paste_masks(groups, boxes, IMAGE, threshold=None)
    torch.testing.assert_close(dense, paste_masks_reference(groups, boxes, IMAGE, None), rtol=0, atol=2e-5)
    # one call on mixed groups equals one call per group
    starts = np.cumsum([0] + counts)
    for j, g in enumerate(groups):
        torch.testing.assert_close(
            paste_masks(g, boxes[starts[j] : starts[j + 1]], IMAGE, None), dense[starts[j] : starts[j + 1]]
        )


def test_smooth_masks_threshold_exact():
    """Masks far from the threshold everywhere: bool output equals the reference pixel for pixel."""
    boxes = random_boxes(30, seed=3)
    masks = (torch.rand(30, 28, 28) > 0.5).float() * 0.8 + 0.1  # 0.1 or 0.9
    out = paste_masks(masks, boxes, IMAGE, threshold=0.5)
    compare_thresholded(out, masks, boxes, 0.5)


def test_hand_derived_values():
    # A 2x2 mask over the box [0, 4) x [0, 2): cells are 2 px wide, 1 px tall.
    m = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    out = paste_masks(m, torch.tensor([[0.0, 0.0, 4.0, 2.0]]), (3, 6), threshold=None)[0]
    # Row 0 (centre 0.5) samples cell row 0 exactly; x centres 0.5..5.5 sample columns -0.25 .. 2.25.
    expected_row0 = torch.tensor([0.75, 0.75, 0.25, 0.0, 0.0, 0.0])
    torch.testing.assert_close(out[0], expected_row0)
    torch.testing.assert_close(out[1], torch.zeros(6))
    torch.testing.assert_close(out[2], torch.zeros(6))
    # A uniform mask fills its box and fades over half a cell outside it.
    u = paste_masks(torch.ones(1, 4, 4), torch.tensor([[2.0, 2.0, 6.0, 6.0]]), (8, 8), threshold=None)[0]
    assert torch.all(u[2:6, 2:6] == 1) and torch.all(u[:, 7] == 0) and torch.all(u[0] == 0)
    torch.testing.assert_close(u[3, 1], torch.tensor(0.0))  # centre 1.5 samples cell -1.0: both taps off


def test_zero_masks_and_empty_image():
    out = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (40, 50))
    assert out.shape == (0, 40, 50) and out.dtype == torch.bool
    out = paste_masks([], torch.zeros(0, 4), (40, 50), threshold=None)
    assert out.shape == (0, 40, 50) and out.dtype == torch.float32
    out = paste_masks([torch.zeros(0, 14, 14), torch.rand(2, 28, 28)], random_boxes(2), (0, 50))
    assert out.shape == (2, 0, 50)


def test_degenerate_boxes_paste_nothing():
    boxes = torch.tensor([[10.0, 10.0, 10.0, 20.0], [30.0, 5.0, 20.0, 15.0]])
    out = paste_masks(torch.ones(2, 28, 28), boxes, IMAGE, threshold=None)
    assert not out.any()


def test_non_contiguous_and_half_inputs():
    boxes = random_boxes(12, seed=5)
    big = torch.rand(12, 30, 30)
    masks = big[:, 1:29, 2:30].transpose(1, 2)  # non-contiguous view
    boxes_view = boxes.t().contiguous().t()  # non-contiguous [N, 4]
    assert not masks.is_contiguous() and not boxes_view.is_contiguous()
    ref = paste_masks_reference(masks, boxes, IMAGE, None)
    torch.testing.assert_close(paste_masks(masks, boxes_view, IMAGE, None), ref, rtol=0, atol=2e-5)
    out_half = paste_masks(masks.half(), boxes, IMAGE, None)
    torch.testing.assert_close(
        out_half, paste_masks_reference(masks.half().float(), boxes, IMAGE, None), rtol=0, atol=2e-5
    )
    out64 = paste_masks(masks.double(), boxes.double(), IMAGE, None)
    torch.testing.assert_close(out64, ref, rtol=0, atol=2e-5)


def test_threshold_at_or_below_zero_sets_every_pixel():
    out = paste_masks(torch.zeros(1, 14, 14), torch.tensor([[5.0, 5.0, 9.0, 9.0]]), (12, 12), threshold=0.0)
    assert out.all()


def test_bad_inputs_name_the_argument():
    masks = torch.rand(3, 28, 28)
    with pytest.raises(ValueError, match="3 masks but boxes has 2 rows"):
        paste_masks(masks, random_boxes(2), IMAGE)
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        paste_masks(masks, torch.zeros(3, 5), IMAGE)
    with pytest.raises(ValueError, match=r"masks\[0\] must be \[n, S, S\]"):
        paste_masks(torch.rand(3, 28), random_boxes(3), IMAGE)
    with pytest.raises(ValueError, match=r"masks\[1\] must be \[n, S, S\]"):
        paste_masks([torch.rand(1, 14, 14), torch.rand(2, 28, 27)], random_boxes(3), IMAGE)
    with pytest.raises(ValueError, match=r"masks\[1\] has dtype"):
        paste_masks([torch.rand(1, 14, 14), torch.rand(2, 28, 28).double()], random_boxes(3), IMAGE)
    with pytest.raises(ValueError, match="floating"):
        paste_masks(torch.ones(3, 28, 28, dtype=torch.uint8), random_boxes(3), IMAGE)
    with pytest.raises(ValueError, match=r"boxes\[1\] has a non-finite"):
        paste_masks(masks, torch.tensor([[0.0, 0, 5, 5], [0, 0, float("nan"), 5], [1, 1, 2, 2]]), IMAGE)
    with pytest.raises(ValueError, match="image_size"):
        paste_masks(masks, random_boxes(3), (10, 20, 30))
    with pytest.raises(TypeError, match="masks must be"):
        paste_masks("masks", random_boxes(3), IMAGE)


def test_opcheck():
    groups = [torch.rand(2, 14, 14), torch.rand(3, 28, 28)]
    boxes = random_boxes(5)
    for thr in (0.5, None):
        torch.library.opcheck(torch.ops.dynamask.paste_masks.default, (groups, boxes, 20, 30, thr))
    torch.library.opcheck(
        torch.ops.dynamask.paste_masks.default, ([torch.zeros(0, 28, 28)], torch.zeros(0, 4), 20, 30, 0.5)
    )


# ---------------------------------------------------------------- RLE


def coco_encode(dense):
    return mask_util.encode(np.asfortranarray(dense.numpy().astype(np.uint8).transpose(1, 2, 0)))


@pytest.mark.parametrize("image", [IMAGE, (1, 1), (7, 300), (300, 5)])
def test_rle_equals_pycocotools_encode_of_dense(image):
    sizes, counts = [14, 28, 56, 112], [6, 6, 5, 3]
    boxes = random_boxes(sum(counts), image=image, seed=7)
    groups = [torch.rand(n, s, s) for n, s in zip(counts, sizes)]
    rles = paste_masks_rle(groups, boxes, image, threshold=0.5)
    dense = paste_masks(groups, boxes, image, threshold=0.5)
    expected = coco_encode(dense)
    assert len(rles) == len(expected)
    for got, exp in zip(rles, expected):
        assert got["size"] == list(exp["size"]) and got["counts"] == exp["counts"]
    decoded = mask_util.decode(rles)
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), dense.numpy())


def test_rle_edge_cases():
    # masks set from the first pixel on, all-zero masks, no masks, masks covering the whole image
    boxes = torch.tensor([[0.0, 0.0, 83.0, 61.0], [-20.0, -20.0, -10.0, -10.0], [0.0, 0.0, 10.0, 10.0]])
    masks = torch.stack([torch.ones(14, 14), torch.ones(14, 14), torch.zeros(14, 14)])
    rles = paste_masks_rle(masks, boxes, IMAGE)
    dense = paste_masks(masks, boxes, IMAGE)
    for got, exp in zip(rles, coco_encode(dense)):
        assert got["counts"] == exp["counts"]
    assert paste_masks_rle(torch.zeros(0, 28, 28), torch.zeros(0, 4), IMAGE) == []
    assert mask_util.area(rles).tolist() == dense.sum((1, 2)).tolist()


def test_rle_bad_threshold():
    with pytest.raises(ValueError, match="threshold must be a positive"):
        paste_masks_rle(torch.rand(1, 14, 14), random_boxes(1), IMAGE, threshold=0.0)


def test_rle_opcheck():
    groups = [torch.rand(2, 14, 14), torch.rand(3, 28, 28)]
    torch.library.opcheck(
        torch.ops.dynamask.paste_masks_rle.default,
        (groups, random_boxes(5), 20, 30, 0.5),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


# ---------------------------------------------------------------- CUDA
# CPU and CUDA run the same float32 arithmetic (paste_masks_common.h, one copy for host and device) on
# identical inputs; they can differ only where nvcc fuses a multiply-add. The cell coordinate
# c = (p + 0.5 - x1) * (S / L) - 0.5 then loses or keeps one rounding of the product, <= u32 * (S + 1)
# cells where a tap is on the mask (-1 < c < S), and a bilinear sample of values in [0, 1] moves by at
# most that per axis; the two-tap sums of the interpolation, three more roundings of values <= 1.


def fma_bound(sizes):
    u32 = torch.finfo(torch.float32).eps / 2
    return 2 * u32 * (max(sizes) + 1) + 3 * u32


@pytest.mark.cuda
@pytest.mark.parametrize("threshold", [0.5, None])
def test_cuda_matches_cpu(threshold):
    sizes, counts = [14, 28, 56, 112], [9, 7, 5, 3]
    boxes = random_boxes(sum(counts), seed=11)
    groups = [torch.rand(n, s, s) for n, s in zip(counts, sizes)]
    cpu = paste_masks(groups, boxes, IMAGE, threshold)
    gpu = paste_masks([g.cuda() for g in groups], boxes.cuda(), IMAGE, threshold)
    assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype
    if threshold is None:
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=fma_bound(sizes))
    else:  # pixels within 1e-4 (> fma_bound) of the threshold may go either way
        compare_thresholded(gpu, groups, boxes, threshold)


@pytest.mark.cuda
def test_cuda_many_groups_half_empty_and_opcheck():
    groups = [torch.rand(2, s, s).half() for s in range(1, 40)]  # 39 groups > one launch's table
    boxes = random_boxes(78, seed=2)
    out = paste_masks([g.cuda() for g in groups], boxes.cuda(), IMAGE, None)
    torch.testing.assert_close(out.cpu(), paste_masks(groups, boxes, IMAGE, None), rtol=0, atol=fma_bound(range(1, 40)))
    groups, boxes = [g.cuda() for g in groups], boxes.cuda()
    empty = paste_masks(torch.zeros(0, 28, 28, device="cuda"), torch.zeros(0, 4, device="cuda"), IMAGE)
    assert empty.shape == (0, *IMAGE) and empty.is_cuda
    torch.library.opcheck(torch.ops.dynamask.paste_masks.default, (groups[:3], boxes[:6], 20, 30, 0.5))
    rles = paste_masks_rle(groups, boxes, IMAGE)
    for got, exp in zip(rles, coco_encode(paste_masks(groups, boxes, IMAGE).cpu())):
        assert got["counts"] == exp["counts"]
