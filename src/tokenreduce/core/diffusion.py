"""Token maps for diffusion models: reduce a block's spatial tokens before an operation and map its output
back, so the feature map keeps its shape (merge before attention, unmerge after: Bolya & Hoffman 2023).

Pure tensor functions, no model knowledge. A :class:`MergeMap` sends the N tokens of a (h, w) grid to K
slots: ``unm`` tokens keep a slot of their own, every ``dst`` token keeps one and absorbs the ``src`` tokens
assigned to it (``slot``). :meth:`MergeMap.merge` (B, N, C) -> (B, K, C), :meth:`MergeMap.unmerge`
(B, K, C) -> (B, N, C): every token reads its slot's output. The builders:

* :func:`stride_partition` + :func:`bipartite_map`: ToMe for SD's matching, one destination per sx x sy
  window, each source merged into its most similar destination (cosine), the r most similar merged;
* :func:`window_map`: chosen sources merged into the destination of their own window (random baseline);
* :func:`pool_map`: every token into the cell of a coarser grid (average pooling baseline);
* :func:`downsample_index`: the kept grid of nearest-exact downsampling (ToDo's keys/values).

Why not ``strategies.bipartite_merge``/``merge_by_assignment``: those carry a :class:`TokenState` (sizes,
sources, positions, origins, padding, protected tokens) across layers; here a map lives for one operation
of one block, the partition is a 2D stride grid rather than even/odd tokens, and the cost of every extra pass
counts against the attention it saves (a merge here is a few gathers and one ``index_add``, the unmerge
one gather).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .ops import attention_probs
from .state import batched_index_add, batched_index_select

__all__ = ["MERGE_MODES", "IndexMap", "MergeMap", "SliceMap", "attention_received", "bipartite_map", "downsample_index",
           "grid_shape", "merged_count", "pool_map", "stride_partition", "window_bonus", "window_map"]

#: ``mean``: the slot is the mean of its tokens (ToMe); ``prune``: sources are dropped, the destination keeps
#: its value (ToFu's pruning); ``mlerp``: the mean's direction with the largest norm of its tokens (ToFu's MLERP)
MERGE_MODES = ("mean", "prune", "mlerp")


def merged_count(n: int, keep: float) -> int:
    """Tokens removed from ``n`` at ``keep``: ``int(n * (1 - keep))``, the count ToMe for SD removes at
    ``ratio = 1 - keep`` (so the same settings keep the same number of tokens)."""
    return int(n * (1.0 - keep))


def grid_shape(n: int, n0: int, h0: int, w0: int) -> tuple[int, int, int]:
    """``(downsample, h, w)`` of a level with ``n`` tokens when the top level is ``h0 x w0 = n0`` tokens:
    ToMe for SD's ``downsample = ceil(sqrt(n0 // n))``, ``h = ceil(h0 / downsample)`` (same for w)."""
    d = math.ceil(math.sqrt(n0 // max(n, 1))) if n <= n0 else 1
    return d, math.ceil(h0 / d), math.ceil(w0 / d)


def stride_partition(h: int, w: int, sx: int, sy: int, choice: Tensor | None = None,
                     device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``(src, dst)`` token indices of a ``h x w`` grid with one destination per ``sy x sx`` window (ToMe for
    SD, Sec. 3 "a 2D stride"): window (i, j)'s destination is its cell ``choice[i, j]`` (row-major in the
    window; ``None``: the top-left cell). ``src`` ascending, ``dst`` in row-major window order. Cells outside
    the last whole window are sources."""
    hs, ws = h // sy, w // sx
    if hs < 1 or ws < 1:
        raise ValueError(f"a {h}x{w} token grid has no whole {sy}x{sx} stride window")
    c = torch.zeros(hs, ws, dtype=torch.long, device=device) if choice is None else choice.to(device)
    rows = torch.arange(hs, device=device)[:, None] * sy + c // sx
    cols = torch.arange(ws, device=device)[None, :] * sx + c % sx
    dst = (rows * w + cols).flatten()
    is_dst = torch.zeros(h * w, dtype=torch.bool, device=device)
    is_dst[dst] = True
    return (~is_dst).nonzero().flatten(), dst


@dataclass
class MergeMap:
    """N tokens -> K = U + D slots: ``unm`` (B|1, U) token indices with a slot each (slots 0..U-1), ``dst``
    (D,) token indices (slots U..U+D-1), ``src`` (B|1, R) tokens absorbed by destination ``slot`` (B|1, R)
    (0..D-1). ``mode`` in :data:`MERGE_MODES`."""

    n: int
    unm: Tensor
    dst: Tensor
    src: Tensor
    slot: Tensor
    mode: str = "mean"
    _inv: Tensor | None = field(default=None, repr=False)
    _token_slot: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MERGE_MODES:
            raise ValueError(f"mode={self.mode!r} is invalid: accepted {MERGE_MODES}")

    @property
    def kept(self) -> int:
        return self.unm.shape[1] + self.dst.shape[0]

    def _counts(self, batch: int) -> Tensor:
        """(B, D, 1) reciprocal of 1 + sources per destination (float32)."""
        if self._inv is None or self._inv.shape[0] != batch:
            s = self.slot.expand(batch, -1)
            cnt = torch.ones(batch, self.dst.shape[0], device=s.device).scatter_add_(
                1, s, torch.ones(s.shape, device=s.device))
            self._inv = cnt.reciprocal_().unsqueeze(-1)
        return self._inv

    def merge(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, K, C): [unmerged tokens, destinations with their sources merged in]."""
        B = x.shape[0]
        dst = x.index_select(1, self.dst)
        if self.src.shape[1] and self.mode != "prune":
            src = batched_index_select(x, self.src.expand(B, -1))
            slot = self.slot.expand(B, -1)
            if self.mode == "mlerp":
                peak = dst.norm(dim=-1).float().scatter_reduce(1, slot, src.norm(dim=-1).float(), "amax")
            batched_index_add(src, slot, dst.shape[1], out=dst)
            inv = self._counts(B)
            dst.mul_(inv.to(dst.dtype))
            if self.mode == "mlerp":  # MLERP: mean direction, largest norm of the merged tokens
                scale = peak / dst.norm(dim=-1).float().clamp(min=torch.finfo(torch.float32).tiny)
                dst.mul_(torch.where(inv[..., 0] < 1, scale, 1.0).unsqueeze(-1).to(dst.dtype))
        if not self.unm.shape[1]:
            return dst
        return torch.cat([batched_index_select(x, self.unm.expand(B, -1)), dst], 1)

    def token_slot(self, batch: int) -> Tensor:
        """(B, N) slot of every token (cached)."""
        if self._token_slot is None or self._token_slot.shape[0] != batch:
            U = self.unm.shape[1]
            out = torch.empty(batch, self.n, dtype=torch.long, device=self.dst.device)
            ar = torch.arange(U, U + self.dst.shape[0], device=out.device)
            out[:, self.dst] = ar
            if U:
                out.scatter_(1, self.unm.expand(batch, -1), torch.arange(U, device=out.device).expand(batch, U))
            if self.src.shape[1]:
                out.scatter_(1, self.src.expand(batch, -1), self.slot.expand(batch, -1) + U)
            self._token_slot = out
        return self._token_slot

    def unmerge(self, y: Tensor) -> Tensor:
        """(B, K, C) -> (B, N, C): every token reads its slot."""
        return batched_index_select(y, self.token_slot(y.shape[0]))


@dataclass
class IndexMap:
    """Keep the tokens ``index`` (K,) of N (keys/values only: no way back)."""

    n: int
    index: Tensor

    @property
    def kept(self) -> int:
        return self.index.shape[0]

    def merge(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)


@dataclass
class SliceMap:
    """The zero-overhead reference: the first ``k`` of ``n`` tokens (a view), and back by repeating the
    outputs up to ``n`` tokens (one copy: the cheapest way to an ``n``-token output)."""

    n: int
    k: int

    @property
    def kept(self) -> int:
        return self.k

    def merge(self, x: Tensor) -> Tensor:
        return x[:, : self.k]

    def unmerge(self, y: Tensor) -> Tensor:
        return torch.cat([y] * (self.n // self.k) + [y[:, : self.n % self.k]], 1)


def bipartite_map(metric: Tensor, src: Tensor, dst: Tensor, r: int, mode: str = "mean") -> MergeMap:
    """ToMe's bipartite soft matching on a fixed partition (Bolya & Hoffman 2023, Sec. 3; Bolya et al. 2023,
    Sec. 3): each source's best destination by cosine similarity of ``metric`` (B, N, C); the ``r`` sources
    with the most similar best destination are merged into it, the rest keep their slot (ties: lower index)."""
    if not 0 <= r <= src.shape[0]:
        raise ValueError(f"r={r} out of range: a partition with {src.shape[0]} sources merges 0..{src.shape[0]}")
    metric = metric.contiguous()  # UNet blocks hand over a transposed (B, C, N) layout
    a, b = metric.index_select(1, src), metric.index_select(1, dst)
    b = b * b.norm(dim=-1, keepdim=True).reciprocal()
    # a source's best destination does not depend on its own norm: divide only the best score by it
    best, partner = (a @ b.transpose(1, 2)).max(-1)  # values + indices in one pass (argmax: ~3x slower on CPU)
    best = best * a.norm(dim=-1).reciprocal()  # cosine similarity of each source to its best destination
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged = order[:, :r]
    return MergeMap(metric.shape[1], src[order[:, r:]], dst, src[merged], partner.gather(1, merged), mode)


def window_map(h: int, w: int, sx: int, sy: int, src: Tensor, dst: Tensor, merged: Tensor,
               mode: str = "mean") -> MergeMap:
    """Sources ``merged`` (B|1, R) (token indices, a subset of ``src``) go to the destination of their own
    ``sy x sx`` window (sources outside the whole windows go to the nearest window's)."""
    rows, cols = merged // w, merged % w
    wi = (rows // sy).clamp(max=h // sy - 1)
    wj = (cols // sx).clamp(max=w // sx - 1)
    slot = wi * (w // sx) + wj  # dst holds one token per window, in row-major window order
    keep = torch.ones(h * w, dtype=torch.bool, device=src.device)
    keep[dst] = False
    unm = keep.unsqueeze(0).expand(merged.shape[0], -1).clone()
    unm.scatter_(1, merged, False)
    U = src.shape[0] - merged.shape[1]
    return MergeMap(h * w, unm.nonzero()[:, 1].view(merged.shape[0], U), dst, merged, slot, mode)


def pool_map(h: int, w: int, keep: float, device: torch.device | None = None) -> MergeMap:
    """Average pooling of a ``h x w`` grid to about ``keep`` of its tokens: an ``h' x w'`` grid (each side
    scaled by sqrt(keep), rounded), token (i, j) in cell (floor(i h'/h), floor(j w'/w)); each cell's first
    token is its destination, the others its sources."""
    hp, wp = max(1, round(h * math.sqrt(keep))), max(1, round(w * math.sqrt(keep)))
    ci = torch.arange(h, device=device) * hp // h
    cj = torch.arange(w, device=device) * wp // w
    cell = (ci[:, None] * wp + cj[None, :]).flatten()
    first = torch.full((hp * wp,), h * w, dtype=torch.long, device=device)
    first.scatter_reduce_(0, cell, torch.arange(h * w, device=device), "amin")
    is_dst = torch.zeros(h * w, dtype=torch.bool, device=device)
    is_dst[first] = True
    src = (~is_dst).nonzero().flatten()
    return MergeMap(h * w, src[:0].unsqueeze(0), first, src.unsqueeze(0), cell[src].unsqueeze(0), "mean")


def downsample_index(h: int, w: int, keep: float, device: torch.device | None = None) -> Tensor:
    """Token indices (ascending) of nearest-exact downsampling of a ``h x w`` grid to about ``keep`` of its
    tokens (each side scaled by sqrt(keep), rounded): the tokens ``F.interpolate(mode="nearest-exact")``
    reads, row ``floor((i + 1/2) h / h')``."""
    hp, wp = max(1, round(h * math.sqrt(keep))), max(1, round(w * math.sqrt(keep)))
    rows = ((torch.arange(hp, device=device) + 0.5) * (h / hp)).floor().long().clamp(max=h - 1)
    cols = ((torch.arange(wp, device=device) + 0.5) * (w / wp)).floor().long().clamp(max=w - 1)
    return (rows[:, None] * w + cols[None, :]).flatten()


def attention_received(q: Tensor, k: Tensor, heads: int, scaling: float, chunk: int = 8) -> Tensor:
    """(B, N) attention each token receives, sum_i softmax(q_i k^T * scaling)_j averaged over heads, from
    projected queries/keys (B, N, heads * d); computed ``chunk`` samples at a time (the maps are N x N)."""
    B, N, D = q.shape
    out = []
    for i in range(0, B, chunk):
        qq = q[i: i + chunk].view(-1, N, heads, D // heads).transpose(1, 2)
        kk = k[i: i + chunk].view(-1, N, heads, D // heads).transpose(1, 2)
        allowed = torch.ones(1, 1, 1, N, dtype=torch.bool, device=q.device)
        p = attention_probs(qq, kk, scaling, allowed)  # (b, H, 1, N, N)
        out.append(p.sum(-2).mean((1, 2)))
    return torch.cat(out)


def window_bonus(score: Tensor, h: int, w: int, bonus: float, size: int = 2) -> Tensor:
    """ToCa's uniform spatial distribution: in every ``size x size`` window of the ``h x w`` grid the
    best-scored token gets ``bonus`` times its score added, so selections spread over the image (windows
    must tile the grid; otherwise ``score`` is returned unchanged)."""
    B = score.shape[0]
    if h % size or w % size:
        return score
    v = score.view(B, h // size, size, w // size, size).permute(0, 1, 3, 2, 4).reshape(B, -1, size * size)
    best, arg = v.max(-1, keepdim=True)
    v = v.scatter_add(-1, arg, best * bonus)
    return v.view(B, h // size, w // size, size, size).permute(0, 1, 3, 2, 4).reshape(B, h * w)
