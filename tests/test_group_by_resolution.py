"""group_by_resolution against a stable torch.sort, hand-derived cases, errors and opcheck."""

import pytest
import torch

from dynamask.ops import group_by_resolution
from dynamask.ops._reference.group_by_resolution import group_by_resolution_reference


def check(choice, K):
    perm, counts = group_by_resolution(choice, K)
    ref_perm, ref_counts = group_by_resolution_reference(choice.cpu(), K)
    assert perm.dtype == counts.dtype == torch.int64
    assert perm.device == counts.device == choice.device
    assert perm.shape == choice.shape and counts.shape == (K,)
    torch.testing.assert_close(perm.cpu(), ref_perm, rtol=0, atol=0)
    torch.testing.assert_close(counts.cpu(), ref_counts, rtol=0, atol=0)


def test_hand_derived():
    perm, counts = group_by_resolution(torch.tensor([1, 3, 0, 3, 1, 2]), 4)
    assert perm.tolist() == [1, 3, 5, 0, 4, 2]
    assert counts.tolist() == [1, 2, 1, 2]


@pytest.mark.parametrize("R", [1, 7, 31, 32, 33, 100, 1000, 5000])
@pytest.mark.parametrize("K", [1, 4, 9])
def test_random_against_stable_sort(R, K):
    check(torch.randint(0, K, (R,)), K)


def test_empty_all_same_and_unused_resolutions():
    check(torch.zeros(0, dtype=torch.int64), 4)
    check(torch.full((50,), 2, dtype=torch.int64), 4)
    perm, counts = group_by_resolution(torch.full((5,), 3, dtype=torch.int64), 4)
    assert perm.tolist() == [0, 1, 2, 3, 4] and counts.tolist() == [0, 0, 0, 5]


def test_prefixes_serve_the_stages():
    choice = torch.randint(0, 4, (300,))
    perm, counts = group_by_resolution(choice, 4)
    sorted_choice = choice[perm]
    for s in range(4):
        n = int(counts[s:].sum())
        assert bool((sorted_choice[:n] >= s).all()) and bool((sorted_choice[n:] < s).all())


def test_non_contiguous_input():
    base = torch.randint(0, 4, (200,))
    check(base[::2], 4)


@pytest.mark.parametrize("bad", [-1, 4, 100])
def test_out_of_range_names_the_value(bad):
    choice = torch.tensor([0, 1, bad, 2])
    with pytest.raises(ValueError, match=rf"choice\[2\] is {bad}"):
        group_by_resolution(choice, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="int64"):
        group_by_resolution(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_by_resolution(torch.zeros(2, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="num_resolutions"):
        group_by_resolution(torch.zeros(2, dtype=torch.int64), 0)


def test_opcheck():
    for choice in (torch.randint(0, 4, (40,)), torch.zeros(0, dtype=torch.int64)):
        torch.library.opcheck(torch.ops.dynamask.group_by_resolution.default, (choice, 4))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        perm, counts = group_by_resolution(torch.empty(12, dtype=torch.int64), 4)
    assert perm.shape == (12,) and counts.shape == (4,) and perm.dtype == torch.int64


@pytest.mark.cuda
@pytest.mark.parametrize("R", [0, 1, 33, 1000, 1024, 1025, 20000])
@pytest.mark.parametrize("K", [1, 4, 200])
def test_cuda_against_stable_sort(R, K):
    check(torch.randint(0, K, (R,), device="cuda"), K)


@pytest.mark.cuda
def test_cuda_matches_cpu_and_opcheck():
    choice = torch.randint(0, 4, (777,))
    p_cpu, c_cpu = group_by_resolution(choice, 4)
    p_gpu, c_gpu = group_by_resolution(choice.cuda(), 4)
    assert torch.equal(p_cpu, p_gpu.cpu()) and torch.equal(c_cpu, c_gpu.cpu())
    torch.library.opcheck(torch.ops.dynamask.group_by_resolution.default, (choice.cuda(), 4))
