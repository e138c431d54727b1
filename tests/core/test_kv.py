"""Pure KV scoring/selection functions (tokenreduce.core.kv): shapes, order, ragged counts, equations."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.core import kv as K
from tokenreduce.core import ops


def test_select_in_order_is_positional_ragged_and_forced():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 3.0, 2.0, 0.0]], [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]])
    eligible = torch.ones(2, 1, 6, dtype=torch.bool)
    eligible[1, 0, 5] = False  # padding
    forced = torch.zeros(2, 1, 6, dtype=torch.bool)
    forced[0, 0, 5] = True  # a sink/window entry with the lowest score
    counts = torch.tensor([[3], [2]])
    idx, ok = K.select_in_order(scores, eligible, forced, counts)
    assert idx.shape == (2, 1, 3)
    assert idx[0, 0].tolist() == [0, 2, 5] and ok[0, 0].all()  # top-2 + forced, in positional order
    assert idx[1, 0, :2].tolist() == [3, 4] and ok[1, 0].tolist() == [True, True, False]  # ragged; padding never


def test_select_ignores_float_noise_and_breaks_ties_by_recency():
    base = torch.tensor([[[0.7, 0.7, 0.3, 0.7]]])
    noisy = base + torch.tensor([[[3e-7, -2e-7, 0.0, 1e-7]]])
    e = torch.ones(1, 1, 4, dtype=torch.bool)
    f = torch.zeros(1, 1, 4, dtype=torch.bool)
    a, _ = K.select_in_order(base, e, f, torch.tensor([[2]]))
    b, _ = K.select_in_order(noisy, e, f, torch.tensor([[2]]))
    assert a.tolist() == b.tolist() == [[[1, 3]]]  # ties -> the later positions


def test_order_key_is_monotone():
    x = torch.tensor([-5.0, -1.0, -1e-6, 0.0, 1e-6, 0.3, 2.0, float("inf")])
    k = K.order_key(x)
    assert torch.all(k[1:] >= k[:-1]) and k[0] < k[3] < k[-1]


def test_attention_probs_matches_reference_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8)
    allowed = torch.rand(2, 2, 3, 5) > 0.3
    allowed[..., 0] = True
    p = ops.attention_probs(q, k, 0.35, allowed)
    assert p.shape == (2, 2, 2, 3, 5)
    kr = k.repeat_interleave(2, dim=1)
    logits = (q @ kr.transpose(-1, -2)) * 0.35
    logits = logits.masked_fill(~allowed.repeat_interleave(2, dim=1), float("-inf"))
    ref = logits.softmax(-1).view(2, 2, 2, 3, 5)
    torch.testing.assert_close(p, ref)


def test_snapkv_votes_sum_window_mean_group_and_pool():
    p = torch.zeros(1, 1, 2, 3, 9)
    p[0, 0, :, :, 4] = 1.0  # every window query of both heads attends position 4
    v = K.snapkv_votes(p, kernel_size=3, pooling="avgpool")
    torch.testing.assert_close(v[0, 0, 3:6], torch.full((3,), 1.0))  # 3 votes, pooled over 3 neighbours
    assert v[0, 0, 0] == 0
    m = K.snapkv_votes(p, kernel_size=5, pooling="maxpool")
    assert torch.all(m[0, 0, 2:7] == 3.0)
    ex = torch.zeros(1, 1, 9, dtype=torch.bool)
    ex[..., 4] = True
    assert K.snapkv_votes(p, kernel_size=3, exclude=ex).abs().sum() == 0
    with pytest.raises(ValueError, match="pooling"):
        K.snapkv_votes(p, pooling="median")


def test_pyramid_ratios_mean_and_shape():
    for keep in (0.1, 0.25, 0.5, 0.8):
        r = K.pyramid_ratios(keep, 18, beta=20)
        assert sum(r) / len(r) == pytest.approx(keep)
        assert r == sorted(r, reverse=True) and max(r) <= 1.0 + 1e-9
    assert K.pyramid_ratios(0.25, 18)[-1] == pytest.approx(0.25 / 20)


def test_other_scores():
    keys = torch.tensor([[[[3.0, 4.0], [0.0, 1.0]]]])
    assert K.key_norm_scores(keys).tolist() == [[[-5.0, -1.0]]]
    p = torch.rand(1, 2, 2, 4, 6).softmax(-1)
    assert K.accumulated_attention(p).shape == (1, 2, 6)
    torch.testing.assert_close(K.last_query_attention(p)[0, 0], p[0, :, :, -1].mean((0, 1)))
    rel = torch.arange(6).view(1, 1, 6).expand(1, 2, 6)
    r1 = K.positional_random_scores(rel, seed=3, salt=1)
    r2 = K.positional_random_scores(torch.arange(20).view(1, 1, 20).expand(2, 2, 20), seed=3, salt=1)
    assert torch.equal(r1[0], r2[1, :, :6]) and not torch.equal(r1, K.positional_random_scores(rel, seed=4, salt=1))
    hv = K.head_soft_vote(torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.ones(1, 1, 6, dtype=torch.bool))
    assert hv.shape == (1, 1, 6) and hv.sum().item() == pytest.approx(4.0)  # one softmax per query head
