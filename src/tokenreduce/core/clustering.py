"""Density-peaks clustering with k-NN density (DPC-KNN; Du et al. 2016, as TCFormer uses it, Zeng et al., CVPR
2022) and size-weighted k-means: the pure tensor functions behind the ``cluster`` strategy
(:func:`tokenreduce.core.strategies.cluster_merge`). Distances are computed once per call and reused by the
assignment step, as TCFormer reuses its distance matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .ops import NEG, compact, k_smallest

__all__ = ["DpcKnn", "dpc_knn", "dpc_knn_centers", "kmeans_assign", "nearest_center"]



def _pairwise_sqdist(a: Tensor, b: Tensor) -> Tensor:
    """Squared euclidean distances (B, N, M) divided by the feature dim (TCFormer's d_ij / sqrt(C), squared).

    ``|a|^2 + |b|^2 - 2 a.b`` in one ``baddbmm`` (3x faster than ``torch.cdist`` on CPU, which also takes
    the square root that DPC-KNN does not need until the end)."""
    a, b = a.float(), b.float()
    inv_c = 1.0 / a.shape[-1]  # folded into the norms and alpha: no extra pass over the (B, N, M) result
    na, nb = (a * a).sum(-1, keepdim=True) * inv_c, (b * b).sum(-1) * inv_c
    return torch.baddbmm(na, a, b.transpose(1, 2), alpha=-2 * inv_c).add_(nb[:, None]).clamp_(min=0)


def _self_sqdist(x: Tensor) -> Tensor:
    """:func:`_pairwise_sqdist` of ``x`` with itself, made exactly symmetric: the blocked GEMM gives d_ij and
    d_ji ~1e-7 apart, as large as DPC-KNN's density tie-break, so two mutual nearest neighbours (equal
    density in exact arithmetic) could rank differently on the masked and the suffix path."""
    d2 = _pairwise_sqdist(x, x)
    return d2.add(d2.mT).mul_(0.5)


def dpc_knn_centers(metric: Tensor, valid: Tensor, k: int = 5) -> Tensor:
    """Density-peaks clustering with k-NN density (Du et al. 2016; TCFormer, Zeng et al., CVPR 2022, Eq. 1-3).

    rho_i = exp(-mean_{j in kNN(i)} d_ij^2);  delta_i = min_{j: rho_j > rho_i} d_ij (max_j d_ij for the
    densest token); center score = rho_i * delta_i, with d_ij = ||x_i - x_j|| / sqrt(C).
    Returns (B,N) center scores (-inf for invalid). Everything runs on squared distances (one square root
    per token at the end); when the valid tokens are a common suffix (protected prefix, no padding) the
    N x N work runs on that block only, without masks.
    """
    return dpc_knn(metric, valid, k).score


class DpcKnn(NamedTuple):
    """DPC-KNN scores and what the assignment step reuses (as TCFormer reuses its distance matrix), all
    over tokens ``lead:`` (``lead`` = 0 on the masked path, where they cover all N tokens): squared
    distances ``d2`` and each token's nearest neighbours (``near`` ascending, ``near_idx``)."""

    score: Tensor
    d2: Tensor
    near: Tensor
    near_idx: Tensor
    lead: int


def dpc_knn(metric: Tensor, valid: Tensor, k: int) -> DpcKnn:
    B, N, _ = metric.shape
    lead = int((~valid).sum(1).max()) if N else 0
    if 0 < lead < N and bool(valid[:, lead:].all()) and not bool(valid[:, :lead].any()):
        sub, *rest = _dpc_knn_scores(metric[:, lead:], None, k, N)
        return DpcKnn(torch.cat([sub.new_full((B, lead), NEG), sub], 1), *rest, lead)
    return DpcKnn(*_dpc_knn_scores(metric, None if bool(valid.all()) else valid, k, N), 0)


def _dpc_knn_scores(metric: Tensor, valid: Tensor | None, k: int, n_full: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, N, _ = metric.shape
    d2 = _self_sqdist(metric)
    big = torch.finfo(d2.dtype).max
    dv = d2 if valid is None else d2.masked_fill(~valid.unsqueeze(1), big).masked_fill(~valid.unsqueeze(2), big)
    kk = max(1, min(k, N - 1)) if N > 1 else 1
    if N > 1:  # the k nearest other tokens: drop the smallest (the token itself)
        near, near_idx = k_smallest(dv, kk + 1 if N > kk else kk)
        knn = near[..., 1:]
    else:
        near, near_idx = dv.new_zeros(B, N, 1), torch.zeros(B, N, 1, dtype=torch.long, device=d2.device)
        knn = near
    if valid is not None:  # fewer than k valid neighbours: average over those that exist
        real = knn < big
        rho = torch.exp(-torch.where(real, knn, 0).sum(-1) / real.sum(-1).clamp(min=1))
    else:
        rho = torch.exp(-knn.mean(-1))
    # deterministic tie-break: tiny index-dependent offset (TCFormer adds random noise instead)
    rho = rho + torch.arange(n_full, n_full - N, -1, device=d2.device, dtype=rho.dtype) * 1e-7
    delta2 = _nearest_denser_sq(d2, near, near_idx, rho, valid, big)
    d2max = (d2 if valid is None else d2.masked_fill(~valid.unsqueeze(1), 0)).amax(-1)
    delta = torch.where(delta2 >= big, d2max, delta2).sqrt()
    score = rho * delta
    return (score if valid is None else score.masked_fill(~valid, NEG)), d2, near, near_idx


def _at(per_token: Tensor, idx: Tensor) -> Tensor:
    """``per_token`` (B, N) read at the (B, N, m) neighbour indices ``idx``."""
    return per_token.gather(1, idx.flatten(1)).view_as(idx)


def _nearest_denser_sq(d2: Tensor, near: Tensor, near_idx: Tensor, rho: Tensor, valid: Tensor | None,
                       big: float) -> Tensor:
    """delta_i^2 = min_{j: rho_j > rho_i} d2_ij (``big`` where no valid denser token exists).

    The nearest denser token is usually among the nearest neighbours already found for the density: if a
    denser token is among the m nearest (``near``, ascending, ``near_idx``), the first such one is the
    nearest denser token overall (every other token is at least as far as the m-th). Only the rows with no
    denser token among them (the local density peaks) scan their whole row.
    """
    denser = _at(rho, near_idx) > rho.unsqueeze(-1)
    if valid is not None:
        denser &= _at(valid, near_idx)
    delta2 = torch.where(denser, near, big).amin(-1)
    peak = delta2 >= big
    if bool(peak.any()):
        bi, ii = peak.nonzero(as_tuple=True)
        cond = rho[bi] > rho[bi, ii].unsqueeze(1)  # (P, N)
        if valid is not None:
            cond &= valid[bi]
        delta2[bi, ii] = torch.where(cond, d2[bi, ii], big).amin(-1)
    return delta2


def nearest_center(dpc: DpcKnn, is_center: Tensor) -> Tensor:
    """Index (into tokens ``lead:``) of each token's nearest center, the lowest index among equally near
    ones (``argmin`` over the center columns of ``d2``, TCFormer's assignment).

    Read off the nearest-neighbour lists where they decide it: when the nearest listed center is strictly
    nearer than the list's farthest entry, no unlisted token can be nearer or tie. The other rows (no
    center, or a tie, at the list's edge) scan the center columns of their whole row.
    """
    big = torch.finfo(dpc.d2.dtype).max
    n = is_center.shape[1]
    cen = _at(is_center, dpc.near_idx)
    dist = torch.where(cen, dpc.near, big)
    dmin = dist.amin(-1, keepdim=True)
    best = torch.where(cen & (dist == dmin), dpc.near_idx, n).amin(-1)
    unsure = dmin.squeeze(-1) >= dpc.near[..., -1]
    if bool(unsure.any()):
        bi, ii = unsure.nonzero(as_tuple=True)
        best[bi, ii] = torch.where(is_center[bi], dpc.d2[bi, ii], big).argmin(-1)
    return best


def kmeans_assign(metric: Tensor, valid: Tensor, center_mask: Tensor, weight: Tensor, iters: int = 10) -> Tensor:
    """Weighted Lloyd k-means initialised at ``center_mask`` tokens; returns per-token cluster ids (B,N),
    ids are indices of the initial center tokens (-1 for invalid)."""
    B, _N, C = metric.shape
    x = metric.float()
    cidx, cval = compact(center_mask, min_slots=1)
    cent = x.gather(1, cidx.unsqueeze(-1).expand(-1, -1, C))
    w = (weight.float() * valid).unsqueeze(-1)
    for _ in range(iters):
        d = _pairwise_sqdist(x, cent).masked_fill(~cval.unsqueeze(1), float("inf"))
        a = d.argmin(-1)
        num = torch.zeros_like(cent).scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, C), x * w)
        den = torch.zeros(B, cent.shape[1], 1, device=x.device).scatter_add_(1, a.unsqueeze(-1), w)
        cent = torch.where(den > 0, num / den.clamp(min=1e-12), cent)
    d = _pairwise_sqdist(x, cent).masked_fill(~cval.unsqueeze(1), float("inf"))
    a = d.argmin(-1)
    return torch.where(valid, cidx.gather(1, a), torch.full_like(a, -1))
