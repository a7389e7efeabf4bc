"""The ops' shared argument forms (dynamask/ops/_args.py): sizes as S or (S_h, S_w), boxes per image."""

import numpy as np
import pytest
import torch

from dynamask import ops
from dynamask.ops._args import as_rois, pair, to_rois


def test_pair_takes_an_int_or_two():
    assert pair(7, op="op", name="size") == (7, 7)
    assert pair((3, 5), op="op", name="size") == (3, 5)
    assert pair([np.int64(2), 4], op="op", name="size") == (2, 4)
    assert pair(torch.Size([6, 1]), op="op", name="size") == (6, 1)
    assert all(type(v) is int for v in pair((np.int64(2), torch.tensor(4)), op="op", name="size"))


@pytest.mark.parametrize("bad", [2.5, (7.0, 7.0), (1, 2, 3), "77", None, torch.tensor([7, 7])])
def test_pair_names_the_op_and_argument(bad):
    with pytest.raises(TypeError, match=r"^op: size must be an int or a pair of ints, got "):
        pair(bad, op="op", name="size")


def test_the_ops_use_it():
    x, off, w = torch.rand(1, 2, 5, 5), torch.zeros(1, 18, 5, 5), torch.rand(3, 2, 3, 3)
    with pytest.raises(TypeError, match="deform_conv2d: stride must be an int or a pair of ints"):
        ops.deform_conv2d(x, off, w, stride=1.5, padding=1)
    feats = [torch.rand(1, 2, 8, 8)]
    with pytest.raises(TypeError, match="roi_align_multilevel: output_size must be an int or a pair"):
        ops.roi_align_multilevel(feats, torch.zeros(0, 5), (2.0, 2.0), [1.0], levels=torch.zeros(0, dtype=torch.long))


def test_to_rois_numbers_the_images_in_order():
    boxes = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.zeros(0, 4), torch.tensor([[5.0, 6, 7, 8], [9, 9, 9, 9]])]
    rois = to_rois(boxes)
    assert rois.tolist() == [[0, 1, 2, 3, 4], [2, 5, 6, 7, 8], [2, 9, 9, 9, 9]]
    assert rois.dtype == torch.float32
    assert to_rois([b.double() for b in boxes]).dtype == torch.float64


def test_as_rois_passes_tensors_and_names_bad_input():
    t = torch.zeros(2, 5)
    assert as_rois(t) is t
    assert torch.equal(as_rois([torch.ones(1, 4)]), torch.tensor([[0.0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="boxes: an empty list of boxes has no dtype/device"):
        as_rois([], name="boxes")
    with pytest.raises(TypeError, match=r"rois must be a \[R, 5\] tensor or a list of \[n_i, 4\] tensors, got str"):
        as_rois("boxes")
