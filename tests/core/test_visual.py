"""Pure functions behind the VLM methods (tokenreduce.core.visual, ops, criteria.divprune_order), checked against naive versions of the
papers' algorithms and for their conservation / budget properties."""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokenreduce.core import ops
from tokenreduce.core import visual as V
from tokenreduce.core.criteria import divprune_order


def _divprune_official(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune's released loop (Alg. 1), written out naively for one image, on the same exactly symmetric
    distances as ours (ops.cosine_distances): with d_ij != d_ji by rounding, two mutual nearest neighbours
    that tie in exact arithmetic are ordered by rounding noise, differently by each matrix product."""
    d = ops.cosine_distances(x[None])[0]
    sel: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(d, 2, dim=0, largest=False).values[1]
        else:
            scores = d[sel].min(0).values
        sel.append(int(scores.argmax()))
    return sel


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 20), k=st.integers(1, 20), seed=st.integers(0, 10_000))
@example(n=4, k=1, seed=466)  # failed on a fresh clone when the two sides rounded d_ij and d_ji differently
def test_divprune_matches_official_greedy(n, k, seed):
    k = min(k, n)
    x = torch.randn(1, n, 6, generator=torch.Generator().manual_seed(seed))
    s = divprune_order(x, torch.ones(1, n, dtype=torch.bool))
    ours = s[0].argsort(descending=True)[:k].tolist()
    assert ours == _divprune_official(x[0], k)


def test_divprune_ignores_invalid_and_is_batch_independent():
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False
    s = divprune_order(x, valid)
    assert torch.isinf(s[1, 7:]).all()
    alone = divprune_order(x[1:, :7], valid[1:, :7])
    assert s[1, :7].argsort(descending=True).tolist() == alone[0].argsort(descending=True).tolist()


@settings(max_examples=20, deadline=None)
@given(n=st.integers(4, 30), dom=st.integers(0, 10), ctx=st.integers(0, 10), seed=st.integers(0, 1000))
def test_visionzip_conserves_tokens(n, dom, ctx, seed):
    dom, ctx = min(dom, n), min(ctx, n - min(dom, n))
    if dom + ctx == 0:
        return
    g = torch.Generator().manual_seed(seed)
    x, a, k = torch.randn(2, n, 5, generator=g), torch.rand(2, n, generator=g), torch.randn(2, n, 3, generator=g)
    tok, src, size = V.visionzip_merge(x, a, k, dom, ctx)
    assert tok.shape[1] == src.shape[1] == size.shape[1] <= dom + ctx
    if ctx:
        assert torch.allclose(size.sum(1), torch.full((2,), float(n)))  # every patch accounted for once
    assert (src.diff(dim=1) > 0).all()  # original order of representatives
    top = a.argsort(1, descending=True)[:, :dom]
    for b in range(2):
        assert set(top[b].tolist()) <= set(src[b].tolist())  # dominant tokens survive unchanged
        for j, sidx in enumerate(src[b].tolist()):
            if sidx in top[b].tolist():
                assert torch.equal(tok[b, j], x[b, sidx])


def test_hiprune_budget_and_neighbours():
    g = torch.Generator().manual_seed(0)
    shallow, deep = torch.rand(3, 36, generator=g), torch.rand(3, 36, generator=g)
    for count in (1, 5, 12, 36):
        keep = V.hiprune_keep(shallow, deep, (6, 6), count, alpha=0.5)
        assert keep.sum(1).tolist() == [count] * 3
    keep = V.hiprune_keep(shallow, deep, (6, 6), 20, alpha=0.5)  # 2 anchors + their 4-neighbours
    for b in range(3):
        a = int(shallow[b].argmax())
        r, c = divmod(a, 6)
        for rr, cc in ((r, c), (r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < 6 and 0 <= cc < 6:
                assert keep[b, rr * 6 + cc]


def test_attention_probs_rows_are_distributions():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    allowed = torch.rand(2, 3, 10, generator=g) > 0.3
    allowed[1, 2] = False
    p = ops.attention_probs(q, k, 8 ** -0.5, allowed[:, None]).flatten(1, 2)
    assert p.shape == (2, 4, 3, 10)
    assert torch.allclose(p.sum(-1)[0], torch.ones(4, 3)) and (p[~allowed[:, None].expand_as(p)] == 0).all()
    assert (p[1, :, 2] == 0).all()


def test_visual_work_is_the_layer_mean_over_the_unreduced_tokens():
    assert V.visual_work(16, (), (), 6) == 1.0
    assert V.visual_work(16, (2,), (4,), 6) == (2 * 16 + 4 * 4) / (6 * 16)  # FastV K=2, 4 kept
    assert V.visual_work(16, (2, 3, 4), (8, 4, 2), 6) == (2 * 16 + 8 + 4 + 2 * 2) / 96
    assert V.visual_work(16, (3,), (0,), 6) == 0.5  # ToDRE: everything dropped at the middle layer
    assert V.visual_work(0, (1,), (0,), 6) == 1.0  # no visual tokens: nothing to reduce


@given(n0=st.integers(1, 600), fr=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), floor=st.integers(1, 3))
@settings(max_examples=50, deadline=None)
def test_staged_counts_never_below_the_floor_nor_growing(n0, fr, floor):
    counts = V.staged_counts(n0, fr, floor)
    prev = n0
    for f, c in zip(fr, counts):
        assert c <= prev and (c >= min(floor, prev))
        assert c == prev or c == max(floor, round(n0 * f))
        prev = c


def test_sparsevlm_after_counts_the_merged_recycled_tokens():
    n_rec, n_clu = V.sparsevlm_recycled(torch.tensor([0, 5, 40, 100]), 0.3)
    assert n_rec.tolist() == [0, 2, 13, 31] and n_clu.tolist() == [0, 1, 2, 4]
    assert V.sparsevlm_recycled(torch.tensor([40]), 0.0)[1].tolist() == [0]
    # 576 -> 66 (510 deleted: 154 recycled -> 16 merged) -> 30 of 82 (52 deleted: 16 -> 2) -> 17 of 32 (15: 5 -> 1)
    assert V.sparsevlm_after(576, (66, 30, 17), 0.3) == (82, 32, 18)
    assert V.sparsevlm_after(576, (66, 30, 17), 0.0) == (66, 30, 17)


def test_sparsevlm_raters_above_mean():
    vis = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    text = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [0.0, 0.0]]])
    r = V.sparsevlm_raters(vis, text, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool))
    assert r.tolist() == [[True, False, False]]
