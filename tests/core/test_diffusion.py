"""Pure token-map math of tokenreduce.core.diffusion (no model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenreduce.core.diffusion import (
    SliceMap,
    bipartite_map,
    downsample_index,
    merged_count,
    pool_map,
    stride_partition,
    window_bonus,
    window_map,
)


def test_stride_partition_one_destination_per_window():
    choice = torch.tensor([[0, 3], [1, 2]])
    src, dst = stride_partition(5, 4, 2, 2, choice)  # 5 rows: the last row is outside every whole window
    assert dst.tolist() == [0, 7, 9, 14]  # (0,0), (1,3), (2,1), (3,2) in row-major window order
    assert sorted(src.tolist() + dst.tolist()) == list(range(20)) and 16 in src.tolist()
    with pytest.raises(ValueError, match="no whole 2x2 stride window"):
        stride_partition(1, 4, 2, 2)


def test_merge_means_and_unmerge_restores_the_grid():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 5)
    src, dst = stride_partition(4, 4, 2, 2)
    mp = bipartite_map(x, src, dst, r=8)
    y = mp.merge(x)
    assert y.shape == (3, 8, 5) and mp.kept == 8 == 16 - merged_count(16, 0.5)
    back = mp.unmerge(y)
    slot = mp.token_slot(3)
    for b in range(3):
        for k in range(8):
            members = (slot[b] == k).nonzero().flatten()
            torch.testing.assert_close(y[b, k], x[b, members].mean(0))
            assert torch.equal(back[b, members], y[b, k].expand(len(members), -1))


def test_prune_keeps_destinations_and_mlerp_keeps_the_largest_norm():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 8)
    src, dst = stride_partition(4, 4, 2, 2)
    pruned = bipartite_map(x, src, dst, r=6, mode="prune")
    y = pruned.merge(x)
    torch.testing.assert_close(y[:, -4:], x[:, dst])
    ml = bipartite_map(x, src, dst, r=6, mode="mlerp")
    mean = bipartite_map(x, src, dst, r=6, mode="mean").merge(x)
    z, slot = ml.merge(x), ml.token_slot(2)
    for b in range(2):
        for k in range(z.shape[1]):
            members = x[b, (slot[b] == k).nonzero().flatten()]
            torch.testing.assert_close(z[b, k].norm(), members.norm(dim=-1).max())
            torch.testing.assert_close(F.normalize(z[b, k], dim=0), F.normalize(mean[b, k], dim=0))


def test_same_merge_as_tomesd_package():
    tomesd_merge = pytest.importorskip("tomesd.merge")
    torch.manual_seed(2)
    x, metric = torch.randn(2, 64, 6), torch.randn(2, 64, 6)
    m, u = tomesd_merge.bipartite_soft_matching_random2d(metric, 8, 8, 2, 2, 20, no_rand=True)
    src, dst = stride_partition(8, 8, 2, 2)
    ours = bipartite_map(metric, src, dst, 20)
    torch.testing.assert_close(ours.unmerge(ours.merge(x)), u(m(x)))


def test_window_and_pool_maps():
    src, dst = stride_partition(4, 4, 2, 2)
    mp = window_map(4, 4, 2, 2, src, dst, torch.tensor([[1, 4, 5]]))  # the other three of window (0, 0)
    x = torch.arange(16.0).view(1, 16, 1)
    assert mp.merge(x)[0, -4, 0] == (0 + 1 + 4 + 5) / 4
    pm = pool_map(4, 4, 0.25)
    torch.testing.assert_close(pm.merge(x).view(1, 2, 2), F.avg_pool2d(x.view(1, 1, 4, 4), 2).view(1, 2, 2))
    assert pool_map(32, 32, 0.5).kept == 23 * 23


@pytest.mark.parametrize("keep", [0.75, 0.5, 0.3, 0.25])
def test_downsample_index_is_nearest_exact_interpolation(keep):
    x = torch.randn(1, 3, 12, 10)
    idx = downsample_index(12, 10, keep)
    h, w = round(12 * keep**0.5), round(10 * keep**0.5)
    ref = F.interpolate(x, size=(h, w), mode="nearest-exact").flatten(2).transpose(1, 2)
    assert torch.equal(x.flatten(2).transpose(1, 2)[:, idx], ref)


def test_slice_map_restores_n_tokens():
    y = torch.randn(2, 3, 4)
    assert SliceMap(10, 3).unmerge(y).shape == (2, 10, 4)


def test_window_bonus():
    s = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]]).view(1, 8)  # a 2x4 grid, two 2x2 windows
    assert window_bonus(s, 2, 4, 0.5).view(2, 4).tolist() == [[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.5, 1.0]]
