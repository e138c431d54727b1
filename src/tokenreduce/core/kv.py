"""Pure KV-cache scoring and selection functions (no model knowledge; used by ``methods/kv/`` and the LLM
adapter).

Conventions (one attention layer, one forward):

* ``keys`` (B, Hkv, N, D): cached keys per KV head (RoPE already applied), ``query`` (B, Hq, Q, D) with
  ``Hq = G * Hkv`` (grouped-query attention, G query heads share a KV head);
* ``allowed`` (B, Hkv, Q, N) bool: which key each query may see (causal, padding, sliding window);
* scores are (B, H, N) with H = Hkv (per-head selection) or 1 (one selection shared by the heads);
  higher = more worth keeping;
* ``eligible`` (B, H, N) bool marks the entries a method may choose from, ``forced`` (B, H, N) the entries it
  must keep (attention sinks, observation window); ``counts`` (B, H) how many entries survive in total.

Selections are returned in **positional order** (ascending logical position), never in score order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import attention_probs, smooth1d

__all__ = [
    "accumulated_attention",
    "gemfilter_scores",
    "head_soft_vote",
    "key_norm_scores",
    "last_query_attention",
    "order_key",
    "positional_random_scores",
    "pyramid_ratios",
    "select_in_order",
    "snapkv_votes",
    "visible",
]


def snapkv_votes(window_probs: Tensor, kernel_size: int = 5, pooling: str = "avgpool",
                 exclude: Tensor | None = None) -> Tensor:
    """SnapKV's voting (Li et al. 2024, Alg. 1): attention of the observation-window queries summed over
    the window, ``C_i = sum_{q in window} A[q, i]``, averaged over the query heads that share a KV head, then
    pooled along the sequence, ``S = smooth1d(C, kernel_size)`` (stride 1, same length) to keep clusters.
    ``exclude`` (B, 1|Hkv, N): entries whose votes are zeroed before pooling (the window itself: the reference
    code pools the prefix only, with zero padding at its end).

    window_probs (B, Hkv, G, W, N) -> (B, Hkv, N).
    """
    votes = accumulated_attention(window_probs)  # (B, Hkv, N)
    if exclude is not None:
        votes = votes.masked_fill(exclude, 0.0)
    return smooth1d(votes, kernel_size, pooling)


def gemfilter_scores(query: Tensor, keys: Tensor, eligible: Tensor, fill: float = 0.0) -> Tensor:
    """GemFilter's relevance (Shi et al. 2024, Alg. 1): the filter layer's un-normalised attention logits of the
    last query (or of an observation window of queries, summed) over the prompt, summed over every query head,
    ``s_i = sum_{t in window} sum_h q_{h,t} . k_{h,i}`` (the reference code takes the raw inner products, no
    softmax or scaling). query (B, Hq, W, D), keys (B, Hkv, N, D), eligible (B, 1, N) -> (B, 1, N); ineligible
    entries (padding) get ``fill``: 0 before an average pool (as the zero padding at the sequence's ends), -inf
    before a max pool, so a sample scores the same alone or inside a left-padded batch."""
    B, Hq, W, D = query.shape
    Hkv = keys.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    q = query.float().reshape(B, Hkv, (Hq // Hkv) * W, D).sum(dim=2, keepdim=True)  # (B, Hkv, 1, D)
    s = (q @ keys.float().transpose(-1, -2)).sum(dim=1)  # (B, 1, N): sum over KV heads of their groups' sums
    return s.masked_fill(~eligible, fill)


def accumulated_attention(probs: Tensor) -> Tensor:
    """H2O's accumulated attention (Zhang et al. 2023, Eq. 2/Alg. 1): ``F_i = sum_q A[q, i]`` summed over
    the queries of this forward, averaged over the query heads sharing a KV head. probs (B,Hkv,G,Q,N) -> (B,Hkv,N)."""
    return probs.sum(dim=3).mean(dim=2)


def last_query_attention(probs: Tensor) -> Tensor:
    """TOVA's score (Oren et al. 2024, Sec. 3): attention of the current (last) query averaged over all heads,
    ``s_i = mean_h A_h[t, i]``. probs (B,Hkv,G,Q,N) -> (B, 1, N) (one selection shared by all heads)."""
    return probs[:, :, :, -1, :].mean(dim=(1, 2)).unsqueeze(1)


def key_norm_scores(keys: Tensor) -> Tensor:
    """Knorm (Devoto et al. 2024): keep low-norm keys, ``s_i = -||k_i||_2``. keys (B,H,N,D) -> (B,H,N)."""
    return -keys.float().norm(dim=-1)


def positional_random_scores(rel_pos: Tensor, seed: int, salt: int = 0) -> Tensor:
    """Seeded uniform scores in [0, 1) that depend only on (seed, salt, head, relative position), so a sample
    gets the same scores alone or inside a padded batch (an integer hash, not a stateful generator).
    rel_pos (B, H, N) long (>= 0 for real entries)."""
    H = rel_pos.shape[1]
    head = torch.arange(H, device=rel_pos.device).view(1, H, 1)
    x = rel_pos.clamp(min=0) * 2654435761 + head * 40503 + (int(seed) % 1_000_003) * 97 + int(salt) * 7919
    x = x % 4294967296  # 32-bit words in int64: no overflow below
    for mult in (73244475, 2246822519 % 4294967296):
        x = ((x ^ (x >> 16)) * mult) % 4294967296
    x = x ^ (x >> 16)
    return x.double().div(4294967296.0).float()


def head_soft_vote(query: Tensor, keys: Tensor, eligible: Tensor) -> Tensor:
    """TokenSelect's head soft vote (Wu et al. 2025, Eq. 7-8): per-head criticality ``q_h . k_{h,i}``,
    normalised by a softmax over tokens per head, then summed over all heads,
    ``S_i = sum_h softmax_i(q_h k_{h,i}^T)`` (the reference code uses unscaled dot products; the queries of
    one forward are averaged first). query (B,Hq,Q,D), keys (B,Hkv,N,D), eligible (B,1,N) -> (B, 1, N)."""
    q = query.float().mean(dim=2, keepdim=True)  # (B, Hq, 1, D)
    probs = attention_probs(q, keys, 1.0, eligible.unsqueeze(2))  # (B, Hkv, G, 1, N), unscaled logits
    return probs[:, :, :, 0].sum(dim=(1, 2)).unsqueeze(1)


def pyramid_ratios(keep: float, num_layers: int, beta: float = 20.0) -> list[float]:
    """PyramidKV's layer budgets (Cai et al. 2024, Eq. 6-7) as keep ratios with mean ``keep``: an arithmetic
    sequence from ``r_0 = 2 keep - r_{L-1}`` down to ``r_{L-1} = keep / beta``; if ``r_0`` would exceed 1 it is
    capped at 1 and ``r_{L-1} = 2 keep - 1`` keeps the mean (what the reference code does with token counts)."""
    if num_layers == 1:
        return [keep]
    low = keep / beta
    high = 2 * keep - low
    if high > 1.0:
        high, low = 1.0, 2 * keep - 1.0
    step = (high - low) / (num_layers - 1)
    return [high - i * step for i in range(num_layers)]


def order_key(scores: Tensor, mantissa_bits: int = 12) -> Tensor:
    """Monotone int64 key of float scores, rounded to ``mantissa_bits`` bits of relative precision (2.4e-4):
    float noise (~1e-7, e.g. a batch vs one sample) cannot reorder two entries unless they are that close;
    near-ties are then broken by position by the caller. Order-preserving for all finite values."""
    x = scores.float().contiguous()
    x = torch.where(x == 0, torch.zeros_like(x), x)  # -0.0 -> 0.0
    bits = x.view(torch.int32).long()
    mono = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))  # IEEE order -> integer order
    shift = 23 - mantissa_bits
    return torch.div(mono, 1 << shift, rounding_mode="floor")


def visible(pos: Tensor, valid: Tensor, qpos: Tensor, window: int | None = None) -> Tensor:
    """(B, H, Q, N) which entries the queries at columns ``qpos`` (Q,) may see: real ones (``valid`` (B, H, N)),
    not after the query (causal, by the entries' logical positions ``pos`` (B, H, N)) and, in a sliding-window
    layer, fewer than ``window`` columns before it."""
    p = pos.unsqueeze(2)  # (B, H, 1, N)
    q = qpos.view(1, 1, -1, 1)
    ok = valid.unsqueeze(2) & (p <= q)
    if window is not None:
        ok = ok & (q - p < window)
    return ok


def select_in_order(scores: Tensor, eligible: Tensor, forced: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Top-``counts`` entries per row by ``scores`` among ``eligible``, ``forced`` ones always included, returned
    as indices in **positional order** plus a validity mask (rows keep different numbers: ragged).

    Scores are compared at 12 bits of relative precision (:func:`order_key`), ties going to the later entry, so
    selections do not depend on float noise (a sample alone or in a padded batch keeps the same entries).
    scores/eligible/forced (B, H, N); counts (B, H) long (<= eligible per row). Returns idx (B,H,K) long and
    ok (B,H,K) bool with K = max(counts); invalid slots point at index 0 and must be masked by the caller.
    """
    B, H, N = scores.shape
    K = int(counts.max().item()) if counts.numel() else 0
    if K == 0:
        z = torch.zeros(B, H, 0, dtype=torch.long, device=scores.device)
        return z, z.bool()
    ar = torch.arange(N, device=scores.device)
    s = scores.float().masked_fill(~eligible, 0.0)
    key = order_key(s) * N + ar  # ties -> later position
    big = 1 << 60
    key = key.masked_fill(~eligible, -big)
    key = torch.where(forced & eligible, big + ar, key)
    top = key.topk(K, dim=-1).indices  # (B, H, K)
    rank = torch.arange(K, device=scores.device)
    ok = (rank.view(1, 1, K) < counts.unsqueeze(-1)) & eligible.gather(2, top)
    skey = torch.where(ok, top, top + N)  # valid first, in positional order
    order = skey.argsort(dim=-1)
    idx = top.gather(2, order)
    ok = ok.gather(2, order)
    return torch.where(ok, idx, torch.zeros_like(idx)), ok
