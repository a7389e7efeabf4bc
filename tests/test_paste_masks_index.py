"""paste_masks / paste_masks_rle with ``index``: box n pastes mask row index[n] of the groups, so masks
grouped by resolution come out in box order; against the grid_sample reference and the old call form."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from test_paste_masks import IMAGE, compare_thresholded, fma_bound, random_boxes

from dynamask import ops
from dynamask.ops import paste_masks, paste_masks_rle
from dynamask.ops._reference.paste_masks import paste_masks_reference

SIZES = (14, 28, 56, 112)


def interleaved(counts, seed=0, sizes=SIZES):
    """Groups of masks (one per size), boxes, and an index that interleaves the groups over the boxes."""
    g = torch.Generator().manual_seed(seed)
    groups = [torch.rand(n, s, s, generator=g) for n, s in zip(counts, sizes)]
    n = sum(counts)
    index = torch.randperm(n, generator=g)
    return groups, random_boxes(n, seed=seed), index


def in_box_order(groups, index):
    """The old call form's input: one mask per box, in box order."""
    flat = [m for g in groups for m in g]
    return [flat[i][None] for i in index.tolist()]


@pytest.mark.parametrize("threshold", [None, 0.5, 0.3])
def test_interleaved_resolutions_against_reference_and_old_form(threshold):
    groups, boxes, index = interleaved([7, 5, 4, 3], seed=1)
    out = paste_masks(groups, boxes, IMAGE, threshold, index=index)
    ref = paste_masks_reference(groups, boxes, IMAGE, None, index=index)
    if threshold is None:
        assert out.dtype == torch.float32 and out.shape == (19, *IMAGE)
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    else:
        compare_thresholded(out, in_box_order(groups, index), boxes, threshold)
    # the same arithmetic as the old form on masks reordered into box order: equal, not just close
    assert torch.equal(out, paste_masks(in_box_order(groups, index), boxes, IMAGE, threshold))


def test_all_masks_of_one_resolution():
    groups, boxes, index = interleaved([12], seed=2, sizes=(28,))
    out = paste_masks(groups[0], boxes, IMAGE, None, index=index)
    torch.testing.assert_close(out, paste_masks_reference(groups, boxes, IMAGE, None, index=index), rtol=0, atol=2e-5)
    identity = paste_masks(groups[0], boxes, IMAGE, None, index=torch.arange(12))
    assert torch.equal(identity, paste_masks(groups[0], boxes, IMAGE, None))


def test_zero_boxes_and_empty_images():
    none = torch.zeros(0, dtype=torch.int64)
    out = paste_masks([torch.zeros(0, 14, 14), torch.zeros(0, 28, 28)], torch.zeros(0, 4), (40, 50), index=none)
    assert out.shape == (0, 40, 50) and out.dtype == torch.bool
    out = paste_masks([], torch.zeros(0, 4), (40, 50), None, index=none)
    assert out.shape == (0, 40, 50) and out.dtype == torch.float32
    # masks that no box reads (the index picks rows, it need not use them all)
    out = paste_masks(torch.rand(3, 14, 14), torch.zeros(0, 4), (40, 50), None, index=none)
    assert out.shape == (0, 40, 50)
    groups, boxes, index = interleaved([1, 2], seed=3)
    assert paste_masks(groups, boxes, (0, 50), index=index).shape == (3, 0, 50)
    assert paste_masks(groups, boxes, (40, 0), None, index=index).shape == (3, 40, 0)
    assert paste_masks_rle(groups, torch.zeros(0, 4), IMAGE, index=none) == []


def test_repeated_and_unused_rows():
    groups, boxes, _ = interleaved([2, 3], seed=4)
    index = torch.tensor([4, 0, 4])
    out = paste_masks(groups, boxes[:3], IMAGE, None, index=index)
    torch.testing.assert_close(out, paste_masks_reference(groups, boxes[:3], IMAGE, None, index=index),
                               rtol=0, atol=2e-5)


def test_out_of_image_and_degenerate_boxes():
    groups, _, index = interleaved([3, 3, 2, 2], seed=5)
    H, W = IMAGE
    boxes = torch.tensor([[-30.0, 5.0, -2.0, 25.0], [W + 1.0, 0.0, W + 9.0, 9.0], [-5.5, -3.25, W + 4.75, H + 2.5],
                          [10.0, 10.0, 10.0, 20.0], [30.0, 5.0, 20.0, 15.0], [W - 3.3, H - 2.2, W + 9.1, H + 7.7],
                          [10.2, 7.7, 10.6, 8.1], [0.0, 0.0, W, H], [5.0, 5.0, 6.0, 5.0], [20.0, 3.0, 40.0, 50.0]])
    out = paste_masks(groups, boxes, IMAGE, None, index=index)
    torch.testing.assert_close(out, paste_masks_reference(groups, boxes, IMAGE, None, index=index), rtol=0, atol=2e-5)
    for i in (0, 1, 3, 4, 8):  # wholly outside the image, or of zero or negative width or height
        assert not out[i].any(), i


def test_non_contiguous_inputs():
    groups, boxes, index = interleaved([4, 3, 2], seed=6)
    views = [torch.cat([g, g], 2)[:, :, ::2].transpose(1, 2) for g in groups]  # strided, transposed
    boxes_view = boxes.t().contiguous().t()
    index_view = torch.stack([index, index], 1)[:, 0]
    assert not any(v.is_contiguous() for v in views) and not boxes_view.is_contiguous()
    assert not index_view.is_contiguous()
    dense = [v.contiguous() for v in views]
    expected = paste_masks(dense, boxes, IMAGE, None, index=index)
    assert torch.equal(paste_masks(views, boxes_view, IMAGE, None, index=index_view), expected)
    torch.testing.assert_close(expected, paste_masks_reference(dense, boxes, IMAGE, None, index=index),
                               rtol=0, atol=2e-5)
    out_half = paste_masks([v.half() for v in views], boxes, IMAGE, None, index=index)
    ref_half = paste_masks_reference([v.half().float() for v in views], boxes, IMAGE, None, index=index)
    torch.testing.assert_close(out_half, ref_half, rtol=0, atol=2e-5)


def test_rle_with_index_equals_pycocotools_encode_of_dense():
    groups, boxes, index = interleaved([6, 6, 5, 3], seed=7)
    rles = paste_masks_rle(groups, boxes, IMAGE, threshold=0.5, index=index)
    dense = paste_masks(groups, boxes, IMAGE, threshold=0.5, index=index)
    expected = mask_util.encode(np.asfortranarray(dense.numpy().astype(np.uint8).transpose(1, 2, 0)))
    assert [r["counts"] for r in rles] == [e["counts"] for e in expected]


@pytest.mark.parametrize("op", [paste_masks, paste_masks_rle])
def test_bad_index_is_refused_naming_it(op):
    groups, boxes, index = interleaved([2, 3], seed=8)
    with pytest.raises(ValueError, match=r"index\[1\] is 5 but must be a mask row in \[0, 5\)"):
        op(groups, boxes, IMAGE, index=torch.tensor([0, 5, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"index\[0\] is -1 but must be a mask row in \[0, 5\)"):
        op(groups, boxes, IMAGE, index=torch.tensor([-1, 0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"index\[0\] is 0 but must be a mask row in \[0, 0\)"):
        op([torch.zeros(0, 14, 14)], boxes[:1], IMAGE, index=torch.tensor([0]))
    shape = r"index must be an int64 tensor of shape \[N\] = \[5\] \(one mask row per box\), got "
    with pytest.raises(ValueError, match=shape + "Long of shape \\[4\\]"):
        op(groups, boxes, IMAGE, index=index[:4])
    with pytest.raises(ValueError, match=shape + "Int of shape \\[5\\]"):
        op(groups, boxes, IMAGE, index=index.int())
    with pytest.raises(ValueError, match=shape + "Long of shape \\[5, 1\\]"):
        op(groups, boxes, IMAGE, index=index[:, None])
    with pytest.raises(ValueError, match="without an index there must be one box per mask"):
        op(groups, boxes[:4], IMAGE)


def test_full_checks_name_the_bad_row_in_python():
    groups, boxes, _ = interleaved([2, 3], seed=9)
    with ops.full_checks(), pytest.raises(ValueError, match=r"paste_masks: index\[2\] is 9 but must be a mask row"):
        paste_masks(groups, boxes, IMAGE, index=torch.tensor([0, 1, 9, 2, 3]))


@pytest.mark.parametrize("threshold", [0.5, None])
def test_opcheck_with_index(threshold):
    groups, boxes, index = interleaved([2, 3, 1], seed=10)
    args = (groups, boxes, 20, 30, threshold, index)
    torch.library.opcheck(torch.ops.dynamask.paste_masks.default, args)
    torch.library.opcheck(
        torch.ops.dynamask.paste_masks_rle.default, (groups, boxes, 20, 30, 0.5, index),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_compiled_paste_with_index_equals_eager():
    """Traced whole through the fake kernel (no graph break) and compiled by inductor, which checks the real
    output's layout against the fake one's: the same canvases as eager."""
    groups, boxes, index = interleaved([3, 2, 2], seed=11)

    def fn(groups, boxes, index):
        return paste_masks(groups, boxes * 1.0, (20, 30), None, index=index)

    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(groups, boxes, index), fn(groups, boxes, index))


# ---------------------------------------------------------------- CUDA (see test_paste_masks.py for the bound)


@pytest.mark.cuda
@pytest.mark.parametrize("threshold", [0.5, None])
def test_cuda_interleaved_matches_cpu(threshold):
    groups, boxes, index = interleaved([9, 7, 5, 3], seed=11)
    cpu = paste_masks(groups, boxes, IMAGE, threshold, index=index)
    gpu = paste_masks([g.cuda() for g in groups], boxes.cuda(), IMAGE, threshold, index=index.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype
    if threshold is None:
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=fma_bound(SIZES))
    else:
        compare_thresholded(gpu, in_box_order(groups, index), boxes, threshold)


@pytest.mark.cuda
def test_cuda_many_groups_with_index_and_non_contiguous():
    sizes = range(1, 40)  # 39 groups > one launch's table: every launch sweeps every box
    groups, boxes, index = interleaved([2] * 39, seed=12, sizes=sizes)
    half = [g.half() for g in groups]
    index_view = torch.stack([index, index], 1)[:, 0]
    out = paste_masks([g.cuda() for g in half], boxes.cuda().t().contiguous().t(), IMAGE, None,
                      index=index_view.cuda())
    torch.testing.assert_close(out.cpu(), paste_masks(half, boxes, IMAGE, None, index=index), rtol=0,
                               atol=fma_bound(sizes))


@pytest.mark.cuda
def test_cuda_zero_boxes_bad_index_and_opcheck():
    groups, boxes, index = interleaved([2, 3], seed=13)
    groups, boxes, index = [g.cuda() for g in groups], boxes.cuda(), index.cuda()
    none = torch.zeros(0, dtype=torch.int64, device="cuda")
    assert paste_masks(groups, boxes[:0], IMAGE, index=none).shape == (0, *IMAGE)
    with pytest.raises(ValueError, match=r"index must be an int64 tensor of shape \[N\] = \[5\]"):
        paste_masks(groups, boxes, IMAGE, index=index.int())
    # an entry out of range pastes nothing on CUDA (the kernel never asserts), and full checks refuse it
    bad = torch.tensor([0, 1, 7, 2, -1], device="cuda")
    out = paste_masks(groups, boxes, IMAGE, None, index=bad)
    assert not out[2].any() and not out[4].any()
    good = paste_masks(groups, boxes, IMAGE, None, index=torch.tensor([0, 1, 4, 2, 3], device="cuda"))
    assert torch.equal(out[[0, 1, 3]], good[[0, 1, 3]])
    assert not paste_masks([torch.zeros(0, 14, 14, device="cuda")], boxes[:2], IMAGE, None,
                           index=none[:0].new_zeros(2)).any()
    with ops.full_checks(), pytest.raises(ValueError, match=r"index\[2\] is 7 but must be a mask row"):
        paste_masks(groups, boxes, IMAGE, index=bad)
    for thr in (0.5, None):
        torch.library.opcheck(torch.ops.dynamask.paste_masks.default, (groups, boxes, 20, 30, thr, index))
    rles = paste_masks_rle(groups, boxes, IMAGE, index=index)
    assert rles == paste_masks_rle([g.cpu() for g in groups], boxes.cpu(), IMAGE, index=index.cpu())
