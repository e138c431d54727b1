"""Strategies P(X, E(X)): pure functions that reduce a :class:`TokenState`.

Every strategy takes the state, the criterion output (scores (B,N) or metric (B,N,C)) and per-sample
``counts`` (B,) of *reducible* tokens that survive, and returns a new state. Samples may keep different
counts (ragged); the output is padded to the largest count and carried by ``mask``. Protected leading
tokens (CLS) are always kept, first, untouched. Surviving tokens stay in their original order.

Merging strategies average features weighted by token size, so the size-weighted mean of the tokens
and the total size are conserved (ToMe, Bolya et al., ICLR 2023, Sec. 3 "merge_wavg").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .clustering import dpc_knn, dpc_knn_centers, kmeans_assign, nearest_center
from .errors import suggest
from .ops import NEG, compact, masked_topk, topk_last
from .state import TokenState, batched_index_add, batched_index_select, remap_origin

__all__ = [
    "STRATEGIES",
    "bipartite_assignment",
    "bipartite_merge",
    "check_counts",
    "cluster_merge",
    "dpc_knn_centers",
    "get_strategy",
    "grid_for_count",
    "importance_merge",
    "kmeans_assign",
    "merge_by_assignment",
    "pool",
    "pool1d",
    "prune",
    "prune_merge",
    "prune_package",
    "strategy",
    "topk_mask",
    "transform",
    "unmerge",
]



def check_counts(state: TokenState, counts: Tensor) -> Tensor:
    """``counts`` (B,) as long, or a ValueError unless each is in [0, reducible tokens of its sample]."""
    counts = counts.to(device=state.x.device, dtype=torch.long)
    avail = state.reducible_counts()
    if counts.shape != avail.shape:
        raise ValueError(f"counts must have shape {tuple(avail.shape)} (one per sample), got {tuple(counts.shape)}")
    if (counts < 0).any() or (counts > avail).any():
        raise ValueError(
            f"counts {counts.tolist()} out of range: each must be in [0, reducible tokens {avail.tolist()}]"
        )
    return counts


def _protected_and(keep_red: Tensor, state: TokenState) -> Tensor:
    keep = keep_red.clone()
    keep[:, : state.protected] = state.mask[:, : state.protected]
    return keep


# ---------------------------------------------------------------------------- pruning
def topk_mask(state: TokenState, scores: Tensor, counts: Tensor) -> Tensor:
    """(B,N) bool: the ``counts[b]`` best-scored reducible tokens of each sample (ties: lower index)."""
    return masked_topk(scores, state.reducible(), check_counts(state, counts))


def prune(state: TokenState, scores: Tensor, counts: Tensor) -> TokenState:
    """Top-k pruning: keep the ``counts`` highest-scoring reducible tokens per sample, in original order.

    Threshold pruning is this with a ``Keep(threshold=...)`` budget (counts from the scores).
    """
    keep = _protected_and(topk_mask(state, scores, counts), state)
    index, valid = compact(keep)
    return state.select(index, valid)


def prune_package(state: TokenState, scores: Tensor, counts: Tensor, normalize: bool = False) -> TokenState:
    """EViT (Liang et al., ICLR 2022), Sec. 3.2: keep the top-k attentive tokens and fuse the inattentive
    ones into one "package" token appended at the end: x_fused = sum_{i in inattentive} a_i x_i (Eq. 4),
    a_i = the CLS attention ``scores``. ``normalize=True`` divides by sum a_i (a weighted mean).
    The fused token's size is the sum of the fused sizes; a sample that prunes nothing gets no package.
    """
    keep_red = topk_mask(state, scores, counts)
    keep = _protected_and(keep_red, state)
    fused = state.reducible() & ~keep_red
    w = scores.float().masked_fill(~fused, 0.0).clamp(min=0).to(state.x.dtype)
    pkg = (w.unsqueeze(-1) * state.x).sum(1)
    if normalize:
        pkg = pkg / w.sum(1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
    has_pkg = fused.any(1)
    index, valid = compact(keep)
    out = state.select(index, valid)
    B, K = valid.shape
    n = valid.sum(1)
    slot = torch.where(has_pkg, n, torch.full_like(n, K))  # K = new extra column
    x = torch.cat([out.x, out.x.new_zeros(B, 1, out.x.shape[-1])], 1)
    x[torch.arange(B), slot] = torch.where(has_pkg.unsqueeze(-1), pkg, x[torch.arange(B), slot])
    size = torch.cat([out.size, out.size.new_zeros(B, 1)], 1)
    size[torch.arange(B), slot] = torch.where(has_pkg, (state.size * fused).sum(1), size[torch.arange(B), slot])
    mask = torch.cat([out.mask, out.mask.new_zeros(B, 1)], 1)
    mask[torch.arange(B), slot] = has_pkg | mask[torch.arange(B), slot]
    # package position/source: the first fused token (for plots); origin: fused tokens -> package slot
    first = torch.where(fused, torch.arange(state.num_tokens, device=fused.device), state.num_tokens).amin(1)
    first = first.clamp(max=state.num_tokens - 1)
    src = torch.cat([out.source, out.source.new_zeros(B, 1)], 1)
    src[torch.arange(B), slot] = torch.where(has_pkg, state.source.gather(1, first[:, None])[:, 0],
                                             src[torch.arange(B), slot])
    pos = torch.cat([out.pos, out.pos.new_zeros(B, 1)], 1)
    pos[torch.arange(B), slot] = torch.where(has_pkg, state.pos.gather(1, first[:, None])[:, 0],
                                             pos[torch.arange(B), slot])
    fused_orig = (state.origin >= 0) & fused.gather(1, state.origin.clamp(min=0))
    origin = torch.where(fused_orig, slot.unsqueeze(1).expand_as(out.origin), out.origin)
    res = TokenState(x=x, mask=mask, size=size, source=src, pos=pos, origin=origin, protected=state.protected)
    # drop the spare column when no sample uses it
    if not (mask[:, -1]).any():
        keepcols = torch.arange(K, device=x.device).expand(B, K)
        res = res.select(keepcols, mask[:, :K])
    return res


# ---------------------------------------------------------------------------- merging
def merge_by_assignment(state: TokenState, dst: Tensor) -> TokenState:
    """Merge every token into the representative token ``dst[b, i]`` (an index into the current tokens;
    representatives have ``dst[b, i] == i``; padding has -1). Features are size-weighted means:
    x'_c = sum_{i in c} s_i x_i / sum_{i in c} s_i, s'_c = sum_{i in c} s_i. Output keeps the
    representatives in their current order, so positions stay sorted.

    Cost: the representatives are gathered and only the merged-away tokens move, as ToMe's ``merge_wavg``
    touches only its destination set: with S_c = s'_c the same mean is x'_c = x_c + sum_{i in c, i != c}
    (s_i / S_c)(x_i - x_c), so a merge that removes r of N tokens makes one pass over the kept tokens'
    features (the gather) plus r rows, not three (gather, * s, / S).
    """
    _B, N, _D = state.x.shape
    ar = torch.arange(N, device=dst.device)
    valid_tok = state.mask & (dst >= 0)
    is_rep = (dst == ar) & state.mask
    is_src = valid_tok & ~is_rep
    rep_index, valid = compact(is_rep)  # (B, K) representatives in order
    K = rep_index.shape[1]
    slot_of_rep = torch.cumsum(is_rep.long(), 1) - 1
    new_idx = torch.where(valid_tok, slot_of_rep.gather(1, dst.clamp(min=0)), torch.full_like(dst, -1))
    s = (state.size * valid_tok).to(state.x.dtype)
    size = s.gather(1, rep_index) * valid
    x = batched_index_select(state.x, rep_index)  # (B, K, D), a fresh tensor: updated in place below
    if bool(is_src.any()):
        src_index, src_valid = compact(is_src)  # (B, R) tokens merged away
        src_s = s.gather(1, src_index) * src_valid
        src_slot = new_idx.gather(1, src_index).clamp(min=0)  # padding sources carry weight 0 into slot 0
        size = size.scatter_add(1, src_slot, src_s)
        w = src_s * size.gather(1, src_slot).clamp(min=torch.finfo(s.dtype).tiny).reciprocal()  # s_i / S_c
        delta = batched_index_select(state.x, src_index) - batched_index_select(x, src_slot)
        batched_index_add(delta * w.unsqueeze(-1), src_slot, K, out=x)
    if not bool(valid.all()):  # padding slots come out as exact zeros
        x = x * valid.unsqueeze(-1).to(x.dtype)
    origin = remap_origin(state.origin, new_idx)
    return TokenState(
        x=x,
        mask=valid,
        size=size,
        source=state.source.gather(1, rep_index),
        pos=state.pos.gather(1, rep_index),
        origin=origin,
        protected=state.protected,
    )


def bipartite_assignment(state: TokenState, metric: Tensor, r: Tensor) -> Tensor:
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023, Sec. 3, Fig. 1), per sample ``r[b]``.

    Alternate tokens into sets A (even) and B (odd); connect each A token to its most similar B token
    (cosine of ``metric``); keep the ``r`` most similar edges; merge those A tokens into their B partner.
    Protected and padding tokens are never merged, padding is never a destination.
    Returns ``dst`` (B,N) for :func:`merge_by_assignment`.
    """
    B, N, _ = metric.shape
    red = state.reducible()
    m = metric * metric.norm(dim=-1, keepdim=True).clamp(min=1e-12).reciprocal()
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # (B, Na, Nb): A = even, B = odd tokens (views)
    red_a, red_b = red[:, 0::2], red[:, 1::2]
    if not bool(red_b.all()):
        scores = scores.masked_fill(~red_b.unsqueeze(1), NEG)
    node_max = scores.amax(dim=-1)  # best similarity of each A token (amax: ~15x faster than max on CPU)
    node_max = node_max.float().masked_fill(~red_a, NEG)
    possible = torch.isfinite(node_max).sum(1)
    if bool((r > possible).any()):
        raise ValueError(
            f"bipartite merge can remove at most {possible.tolist()} tokens per step (one per A-token with a "
            f"partner), asked for r={r.tolist()}"
        )
    order = node_max.argsort(dim=1, descending=True, stable=True)
    Nb = scores.shape[2]
    rmax = int(r.max()) if r.numel() else 0
    top_a = order[:, :rmax]
    top = torch.arange(rmax, device=m.device).expand(B, rmax) < r.unsqueeze(1)
    # the partner (first best B token, as scores.max returns it) only for the r merged A tokens
    partner = scores.gather(1, top_a.unsqueeze(-1).expand(B, rmax, Nb)).argmax(-1)
    dst = torch.arange(N, device=m.device).expand(B, N).clone()
    dst[:, 0::2] = dst[:, 0::2].scatter(1, top_a, torch.where(top, 2 * partner + 1, 2 * top_a))
    return torch.where(state.mask, dst, torch.full_like(dst, -1))


def bipartite_merge(state: TokenState, metric: Tensor, counts: Tensor) -> TokenState:
    """ToMe merge: remove ``r = reducible - counts`` tokens per sample by bipartite soft matching."""
    counts = check_counts(state, counts)
    r = state.reducible_counts() - counts
    return merge_by_assignment(state, bipartite_assignment(state, metric, r))



def importance_merge(state: TokenState, scores: Tensor, metric: Tensor, counts: Tensor) -> TokenState:
    """DiffRate's merge (Chen et al., ICCV 2023, Sec. 3.1, its ``get_merge_func``): the ``counts`` most
    important reducible tokens by ``scores`` stay; each other reducible token merges into its most similar
    kept one (cosine of ``metric``; protected tokens are never destinations), size-weighted as in ToMe. A
    bipartite matching whose two sets are split by importance instead of by position."""
    counts = check_counts(state, counts)
    red = state.reducible()
    dst_mask = topk_mask(state, scores, counts)
    src_mask = red & ~dst_mask
    if not bool(src_mask.any()):
        return state
    src_index, src_valid = compact(src_mask)
    dst_index, dst_valid = compact(dst_mask)
    m = metric * metric.norm(dim=-1, keepdim=True).clamp(min=1e-12).reciprocal()
    sim = batched_index_select(m, src_index) @ batched_index_select(m, dst_index).transpose(1, 2)  # (B, R, M)
    sim = sim.float().masked_fill(~dst_valid.unsqueeze(1), NEG)
    partner = dst_index.gather(1, sim.argmax(-1))  # (B, R)
    partner = torch.where(dst_valid.any(1, keepdim=True), partner, -1)  # no destination: the source is pruned
    B, N = state.mask.shape
    dst = torch.arange(N, device=scores.device).expand(B, N).clone()
    dst.scatter_(1, torch.where(src_valid, src_index, 0), torch.where(src_valid, partner, dst.gather(1, src_index)))
    return merge_by_assignment(state, torch.where(state.mask, dst, torch.full_like(dst, -1)))


def prune_merge(state: TokenState, scores: Tensor, metric: Tensor, prune_counts: Tensor,
                merge_counts: Tensor) -> TokenState:
    """DiffRate's compression of one block (Chen et al., ICCV 2023, Sec. 3.1): keep the ``prune_counts``
    highest-``scores`` reducible tokens (the rest are pruned), then merge all but the ``merge_counts`` most
    important of those into their most similar important token (:func:`importance_merge`)."""
    merge_counts = check_counts(state, merge_counts)
    if bool((merge_counts > check_counts(state, prune_counts)).any()):
        raise ValueError(f"merge counts {merge_counts.tolist()} must not exceed prune counts {prune_counts.tolist()}")
    keep = _protected_and(topk_mask(state, scores, prune_counts), state)
    index, valid = compact(keep)
    kept = state.select(index, valid)
    return importance_merge(kept, scores.gather(1, index).masked_fill(~valid, NEG),
                            batched_index_select(metric, index), merge_counts)

def cluster_merge(state: TokenState, metric: Tensor, counts: Tensor, algo: str = "dpc-knn", k: int = 5,
                  iters: int = 10) -> TokenState:
    """Cluster the reducible tokens into ``counts[b]`` clusters and merge each (size-weighted mean).

    ``algo="dpc-knn"``: centers by density-peaks score, every token to its nearest center (TCFormer's
    CTM). ``algo="kmeans"``: the same centers refined by weighted k-means. Each cluster is represented
    by the position of its center token.
    """
    counts = check_counts(state, counts)
    if algo not in ("dpc-knn", "kmeans"):
        raise ValueError(f"cluster algo {algo!r} not supported; accepted: 'dpc-knn', 'kmeans'")
    red = state.reducible()
    dpc = dpc_knn(metric, red, k=k)
    is_center = topk_mask(state, dpc.score, counts)
    B, N, _C = metric.shape
    ar = torch.arange(N, device=metric.device).expand(B, N)
    if algo == "kmeans":
        cid = kmeans_assign(metric, red, is_center, state.size, iters=iters)
    else:
        cid = nearest_center(dpc, is_center[:, dpc.lead:]) + dpc.lead
        if dpc.lead:
            cid = torch.cat([ar[:, :dpc.lead], cid], 1)
    dst = torch.where(red, cid, torch.where(state.mask, ar, torch.full_like(ar, -1)))
    # samples that keep 0 reducible tokens: drop their reducible tokens
    dst = torch.where(red & (counts == 0).unsqueeze(1), torch.full_like(dst, -1), dst)
    # make every cluster's representative its center (the center maps to itself)
    dst = torch.where(is_center, ar, dst)
    return merge_by_assignment(state, dst)


# ---------------------------------------------------------------------------- pooling
def grid_for_count(grid: tuple[int, int], count: int) -> tuple[int, int]:
    """Output grid (h', w') for about ``count`` tokens, keeping the aspect ratio of ``grid``."""
    h, w = grid
    if not 1 <= count <= h * w:
        raise ValueError(f"pool count {count} out of range: accepted 1..{h * w} for grid {grid}")
    oh = max(1, min(h, round(math.sqrt(count * h / w))))
    ow = max(1, min(w, round(count / oh)))
    return oh, ow


def pool(state: TokenState, counts: Tensor) -> TokenState:
    """Spatial average pooling of the token grid to about ``counts`` cells (adaptive, non-overlapping
    bins: cell (floor(i h'/h), floor(j w'/w))), size-weighted. Needs ``state.grid`` and the same count
    for every sample (a grid cannot be ragged)."""
    counts = check_counts(state, counts)
    if state.grid is None:
        raise ValueError("pool needs tokens laid out on a grid (TokenState.grid); only pool may run before pool")
    if (counts != counts[0]).any():
        raise ValueError(f"pool needs the same count for every sample, got {counts.tolist()}")
    h, w = state.grid
    oh, ow = grid_for_count(state.grid, int(counts[0]))
    B, N, _ = state.x.shape
    P = state.protected
    ii = torch.arange(h, device=state.x.device).repeat_interleave(w) * oh // h
    jj = torch.arange(w, device=state.x.device).repeat(h) * ow // w
    cell = ii * ow + jj  # (h*w,)
    # representative of a cell: its first token; map cell id -> first token index
    first = torch.full((oh * ow,), h * w, device=state.x.device, dtype=torch.long)
    first = first.scatter_reduce(0, cell, torch.arange(h * w, device=state.x.device), reduce="amin")
    dst_grid = first[cell] + P
    ar = torch.arange(N, device=state.x.device)
    dst = torch.cat([ar[:P], dst_grid]).expand(B, N)
    dst = torch.where(state.mask, dst, torch.full_like(dst, -1))
    out = merge_by_assignment(state, dst)
    out.grid = (oh, ow)
    return out


def pool1d(state: TokenState, counts: Tensor) -> TokenState:
    """Average-pool each sample's reducible tokens, in order, into ``counts[b]`` consecutive bins (the
    sequence counterpart of :func:`pool`, for text encoders: no grid needed, ragged batches allowed).

    Sample b with n_b reducible tokens puts its j-th one into bin floor(j k_b / n_b), so bins differ in
    length by at most one and padding never mixes in. Bins are merged size-weighted (conserves the
    size-weighted mean and the total size); each bin is represented by its first token (its position).
    """
    counts = check_counts(state, counts)
    red = state.reducible()
    B, N = red.shape
    n = red.sum(1)
    rank = torch.cumsum(red.long(), 1) - 1  # rank of each reducible token among the reducible ones
    k = counts.unsqueeze(1)
    nn_ = n.clamp(min=1).unsqueeze(1)
    bin_ = torch.div(rank.clamp(min=0) * k, nn_, rounding_mode="floor")
    first_rank = torch.div(bin_ * nn_ + k - 1, k.clamp(min=1), rounding_mode="floor")  # ceil(bin * n / k)
    ar = torch.arange(N, device=red.device).expand(B, N)
    idx_of_rank = torch.zeros(B, N + 1, dtype=torch.long, device=red.device)
    idx_of_rank.scatter_(1, torch.where(red, rank, torch.full_like(rank, N)), ar)
    rep = idx_of_rank.gather(1, first_rank.clamp(min=0, max=N))  # rows that keep 0 tokens: unused below
    dst = torch.where(state.mask, ar, torch.full_like(ar, -1))
    dst = torch.where(red, torch.where(k > 0, rep, torch.full_like(rep, -1)), dst)
    return merge_by_assignment(state, dst)


# ---------------------------------------------------------------------------- many-to-many transform
def transform(state: TokenState, metric: Tensor, counts: Tensor, scores: Tensor, topk: int = 4,
              tau: float = 0.1) -> TokenState:
    """Token Transforming (Zeng et al., 2025, arXiv:2506.05709): reduction as X' = T X with a many-to-many
    matrix T (K x N). Targets: the ``counts`` most informative tokens by ``scores``; each target keeps
    itself (T_jj = 1); every other token i spreads its mass over its ``topk`` most similar targets with
    weights softmax_j(cos(m_i, m_j) / tau), so columns of T sum to 1. With token sizes s:
    x'_j = sum_i T_ji s_i x_i / sum_i T_ji s_i and s'_j = sum_i T_ji s_i — total size and the
    size-weighted mean are conserved. topk=1 reduces to a hard (many-to-one) merge.
    """
    counts = check_counts(state, counts)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    red = state.reducible()
    is_tgt = topk_mask(state, scores, counts)
    tidx, tval = compact(_protected_and(is_tgt, state))  # (B, K) targets incl. protected
    sidx, sval = compact(red & ~is_tgt)  # (B, R) tokens that are spread
    B, N, _D = state.x.shape
    K, R = tidx.shape[1], sidx.shape[1]
    P = state.protected
    s = state.size.to(state.x.dtype)
    # targets (and protected tokens) keep themselves with weight 1: T_jj = 1
    size = s.gather(1, tidx) * tval
    num = batched_index_select(state.x, tidx) * size.unsqueeze(-1)
    best = torch.full((B, N + 1), -1, dtype=torch.long, device=state.x.device)  # strongest target per token
    best.scatter_(1, torch.where(tval, tidx, N), torch.arange(K, device=best.device).expand(B, K))
    if R and K > P:
        m = metric.to(torch.promote_types(metric.dtype, torch.float32))
        m = m * m.norm(dim=-1, keepdim=True).clamp(min=1e-12).reciprocal()  # F.normalize, minus its slow `/`
        # cosine similarity to the non-protected targets only (protected tokens are not targets): (B, R, K-P)
        sim = batched_index_select(m, sidx) @ batched_index_select(m, tidx[:, P:]).transpose(1, 2)
        if not bool(tval.all()):
            sim = sim.masked_fill(~tval[:, P:].unsqueeze(1), NEG)
        val, arg = topk_last(sim, min(topk, K - P))  # 1/tau > 0 does not change the order: applied after
        arg = arg + P
        wts = torch.softmax(val * (1.0 / tau), dim=-1).nan_to_num(0.0) * sval.unsqueeze(-1)  # no valid target -> 0
        mass = (wts * s.gather(1, sidx).unsqueeze(-1)).to(state.x.dtype)  # (B, R, t)
        xs = batched_index_select(state.x, sidx)
        for q in range(arg.shape[-1]):  # one index_add per rank: (B,R,D) rows, no (B,R,t,D) outer product
            batched_index_add(xs * mass[..., q:q + 1], arg[..., q], K, out=num)
        size = size.scatter_add(1, arg.flatten(1), mass.flatten(1))
        spread = sval & (wts.sum(-1) > 0)
        best.scatter_(1, torch.where(spread, sidx, N), arg[..., 0])
    x = num * size.clamp(min=torch.finfo(size.dtype).tiny).reciprocal().unsqueeze(-1)
    return TokenState(x=x, mask=tval, size=size, source=state.source.gather(1, tidx),
                      pos=state.pos.gather(1, tidx), origin=remap_origin(state.origin, best[:, :N]),
                      protected=state.protected)


# ---------------------------------------------------------------------------- unmerge
def unmerge(state: TokenState, y: Tensor | None = None, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """Map reduced tokens ``y`` (B,K,D) (default ``state.x``) back to the original N0 tokens (dense outputs).

    Merged tokens copy their cluster's value to all members; pruned tokens get ``fill``.
    Returns (out (B,N0,D), present (B,N0) bool).
    """
    y = state.x if y is None else y
    if y.shape[:2] != state.x.shape[:2]:
        raise ValueError(f"y must have shape {tuple(state.x.shape[:2])} + (D,), got {tuple(y.shape)}")
    present = state.origin >= 0
    idx = state.origin.clamp(min=0)
    out = y.gather(1, idx.unsqueeze(-1).expand(*idx.shape, y.shape[-1]))
    return out.masked_fill(~present.unsqueeze(-1), fill), present


# ---------------------------------------------------------------------------- registry of strategies
STRATEGIES: dict[str, Callable[..., TokenState]] = {}

#: what a strategy takes besides ``state`` and ``counts``: "scores" (B,N) from a score criterion, "metric"
#: (B,N,C) features to compare. ``Reducer`` passes exactly these, by keyword.
STRATEGY_INPUTS = ("scores", "metric")


def strategy(name: str, needs: tuple[str, ...]) -> Callable[[Callable[..., TokenState]], Callable[..., TokenState]]:
    """Register a strategy under ``name``; ``needs`` names its inputs (a subset of :data:`STRATEGY_INPUTS`)."""
    bad = [n for n in needs if n not in STRATEGY_INPUTS]
    if bad:
        raise ValueError(f"strategy {name!r}: unknown inputs {bad}; accepted: {list(STRATEGY_INPUTS)}")

    def deco(fn: Callable[..., TokenState]) -> Callable[..., TokenState]:
        fn.needs = tuple(needs)  # type: ignore[attr-defined]
        STRATEGIES[name] = fn
        return fn

    return deco


strategy("prune", ("scores",))(prune)
strategy("package", ("scores",))(prune_package)
strategy("merge", ("metric",))(bipartite_merge)
strategy("cluster", ("metric",))(cluster_merge)
strategy("pool", ())(pool)
strategy("pool1d", ())(pool1d)
strategy("transform", ("metric", "scores"))(transform)
strategy("importance-merge", ("scores", "metric"))(importance_merge)


def get_strategy(spec: str | Callable[..., TokenState]) -> Callable[..., TokenState]:
    """Resolve a strategy name (see ``STRATEGIES``) or pass a callable through."""
    if isinstance(spec, str):
        if spec not in STRATEGIES:
            raise ValueError(f"unknown strategy {spec!r}{suggest(spec, STRATEGIES)}; accepted: {sorted(STRATEGIES)}")
        return STRATEGIES[spec]
    if not callable(spec):
        raise TypeError(f"a strategy must be a name or a callable, got {spec!r}")
    return spec
