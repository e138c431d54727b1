"""Token maps for diffusion models: reduce a block's spatial tokens before an operation and map its output
back, so the feature map keeps its shape (merge before attention, unmerge after: Bolya & Hoffman 2023).

Pure tensor functions, no model knowledge. A :class:`MergeMap` sends the N tokens of a (h, w) grid to K
slots (one slot index per token): unmerged tokens keep a slot of their own, every destination keeps one and
absorbs the sources merged into it. :meth:`MergeMap.merge` (B, N, C) -> (B, K, C), :meth:`MergeMap.unmerge`
(B, K, C) -> (B, N, C): every token reads its slot's output. The builders:

* :func:`stride_partition` + :func:`bipartite_map`: ToMe for SD's matching, one destination per sx x sy
  window, each source merged into its most similar destination (cosine), the r most similar merged;
* :func:`window_map`: chosen sources merged into the destination of their own window (random baseline);
* :func:`pool_map`: every token into the cell of a coarser grid (average pooling baseline);
* :func:`downsample_index`: the kept grid of nearest-exact downsampling (ToDo's keys/values).

Why not ``strategies.bipartite_merge``/``merge_by_assignment``: those carry a :class:`TokenState` (sizes,
sources, positions, origins, padding, protected tokens) across layers; here a map lives for one operation
of one block, the partition is a 2D stride grid rather than even/odd tokens, and the cost of every extra pass
counts against the attention it saves (a merge here is one ``index_add`` and one multiply, the unmerge
one gather; the matching one similarity product, a vectorised argmax and a selection instead of a sort).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .state import batched_index_select

__all__ = ["MERGE_MODES", "IndexMap", "MergeMap", "SliceMap", "bipartite_map", "downsample_index",
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
    the last whole window are sources. Index bookkeeping in numpy (see :func:`bipartite_map`)."""
    corner, offset = _windows(h, w, sx, sy)
    dst = corner.copy() if choice is None else corner + offset[choice.cpu().numpy().ravel()]
    is_dst = np.zeros(h * w, dtype=bool)
    is_dst[dst] = True
    return torch.from_numpy(np.flatnonzero(~is_dst)).to(device), torch.from_numpy(dst).to(device)


@functools.lru_cache(maxsize=64)
def _windows(h: int, w: int, sx: int, sy: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-left token of every whole ``sy x sx`` window (row-major) and the token offset of each cell of
    a window from its top-left one (row-major in the window): per grid, computed once (read-only)."""
    hs, ws = h // sy, w // sx
    if hs < 1 or ws < 1:
        raise ValueError(f"a {h}x{w} token grid has no whole {sy}x{sx} stride window")
    corner = (np.arange(hs)[:, None] * (sy * w) + np.arange(ws)[None, :] * sx).ravel()
    cell = np.arange(sx * sy)
    offset = (cell // sx) * w + cell % sx
    corner.flags.writeable = offset.flags.writeable = False
    return corner, offset


@dataclass
class MergeMap:
    """N tokens -> K slots by ``slot`` (B|1, N), the slot of every token: a slot holds one token of its own
    (an unmerged token or a destination) and the sources merged into it. ``mode`` in :data:`MERGE_MODES`;
    ``rep`` (B|1, K), the token each slot keeps, is needed by ``prune`` only.

    Merge (``mean``): one ``index_add_`` of all N tokens into their slots and one multiply by 1/count
    (counts cached per batch size): fewer passes than gathering the kept tokens and adding the sources.
    Unmerge: one gather, every token reads its slot."""

    n: int
    slot: Tensor
    kept: int
    mode: str = "mean"
    rep: Tensor | None = None
    _flat: Tensor | None = field(default=None, repr=False)
    _inv: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MERGE_MODES:
            raise ValueError(f"mode={self.mode!r} is invalid: accepted {MERGE_MODES}")
        if self.mode == "prune" and self.rep is None:
            raise ValueError("a prune map needs rep= (the token each slot keeps)")

    @classmethod
    def from_parts(cls, n: int, unm: Tensor, dst: Tensor, src: Tensor, slot: Tensor, mode: str = "mean") -> MergeMap:
        """From ``unm`` (B|1, U) tokens with a slot each (slots 0..U-1), ``dst`` (D,) tokens (slots U..U+D-1)
        and ``src`` (B|1, R) tokens merged into destination ``slot`` (B|1, R) (0..D-1)."""
        B, U, D = max(unm.shape[0], src.shape[0]), unm.shape[1], dst.shape[0]
        out = torch.empty(B, n, dtype=torch.long, device=dst.device)
        out[:, dst] = torch.arange(U, U + D, device=dst.device)
        if U:
            out.scatter_(1, unm.expand(B, -1), torch.arange(U, device=dst.device).expand(B, U))
        if src.shape[1]:
            out.scatter_(1, src.expand(B, -1), slot.expand(B, -1) + U)
        rep = torch.cat([unm.expand(B, -1), dst.expand(B, D)], 1) if mode == "prune" else None
        return cls(n, out, U + D, mode, rep)

    def token_slot(self, batch: int) -> Tensor:
        """(B, N) slot of every token."""
        return self.slot.expand(batch, -1)

    def _index(self, batch: int) -> tuple[Tensor, Tensor]:
        """``(flat, inv)``: the slot of every token in the flattened (B * K) slots (B * N,) and the reciprocal
        token count of every slot (B * K, 1) (float32); computed in numpy, cached per batch size."""
        if self._flat is None or self._flat.shape[0] != batch * self.n:
            slot = self.slot.cpu().numpy()
            flat = (slot + np.arange(batch)[:, None] * self.kept).ravel()
            inv = (1.0 / np.bincount(flat, minlength=batch * self.kept)).astype(np.float32)[:, None]
            self._flat = torch.from_numpy(flat).to(self.slot.device)
            self._inv = torch.from_numpy(inv).to(self.slot.device)
        return self._flat, self._inv

    def merge(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, K, C): each slot the mean (``mlerp``: rescaled mean; ``prune``: its own token)."""
        B, N, C = x.shape
        if self.mode == "prune":
            return batched_index_select(x, self.rep.expand(B, -1))
        (flat, inv), xf = self._index(B), x.reshape(B * N, C)
        out = x.new_zeros(B * self.kept, C).index_add_(0, flat, xf)
        out.mul_(inv.to(out.dtype))
        if self.mode == "mlerp":
            out.mul_(self._mlerp_scale(xf, out, flat, inv))
        return out.view(B, self.kept, C)

    @staticmethod
    def _mlerp_scale(xf: Tensor, out: Tensor, flat: Tensor, inv: Tensor) -> Tensor:
        """(B * K, 1) factors that give each slot's mean ``out`` the largest norm of its tokens ``xf`` (ToFu's
        MLERP: the mean's direction, the largest norm; 1 for a slot of one token). Two norms in torch, the
        per-slot maximum and ratio in numpy (small arrays: one call each instead of ~8 torch calls)."""
        f32 = torch.float32
        token_norm = torch.linalg.vector_norm(xf, dim=-1, dtype=f32).cpu().numpy()
        slot_norm = torch.linalg.vector_norm(out, dim=-1, dtype=f32).cpu().numpy()
        peak = np.zeros_like(slot_norm)
        np.maximum.at(peak, flat.cpu().numpy(), token_norm)  # norms are >= 0: the maximum over the slot's tokens
        merged = inv.cpu().numpy()[:, 0] < 1
        scale = np.where(merged, peak / np.maximum(slot_norm, np.finfo(np.float32).tiny), np.float32(1.0))
        return torch.from_numpy(scale.astype(np.float32)[:, None]).to(out.device, out.dtype)

    def unmerge(self, y: Tensor) -> Tensor:
        """(B, K, C) -> (B, N, C): every token reads its slot."""
        B, K, C = y.shape
        return y.reshape(B * K, C).index_select(0, self._index(B)[0]).view(B, self.n, C)


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
    with the most similar best destination are merged into it, the rest keep their slot (ties: lower index).
    Slots: the unmerged sources in ascending token order, then the destinations in ``dst`` order.

    The similarities are one batched product in torch; the rest is index bookkeeping on (B, N) arrays, done in
    numpy: inside a denoiser forward every torch call runs with cold caches (~20-30 us each, measured in the
    sampling loop) against ~1-3 us for a numpy call, and numpy's ``argmax`` is vectorised where torch's CPU
    ``max`` with indices is not (~3x slower here). Off the CPU the small index arrays make one round trip."""
    S, D = src.shape[0], dst.shape[0]
    if not 0 <= r <= S:
        raise ValueError(f"r={r} out of range: a partition with {S} sources merges 0..{S}")
    N = metric.shape[1]
    U = S - r
    src_np, dst_np = src.cpu().numpy(), dst.cpu().numpy()
    if r:
        metric = metric.contiguous()  # UNet blocks hand over a transposed (B, C, N) layout
        ab = metric.index_select(1, torch.cat([src, dst]).to(metric.device))
        norm = torch.linalg.vector_norm(ab, dim=-1, keepdim=True, dtype=torch.float32)  # (B, S + D, 1)
        # the destinations unit-normed before the product (D rows, not the S x D similarities: on the UNet's
        # 32x32 grid dividing the (B, 768, 256) product cost more than the product itself)
        dst_unit = ab[:, S:] / norm[:, S:].to(ab.dtype)
        sim = torch.bmm(ab[:, :S], dst_unit.transpose(1, 2)).float().cpu().numpy()  # (B, S, D) cos * ||x_src||
        B = sim.shape[0]
        partner = sim.argmax(-1)  # first index on ties, like torch's max
        # a source's best destination does not depend on its own norm: divide only the best score by it (read
        # at flat offsets: one take instead of take_along_axis's index broadcasting)
        best = sim.reshape(-1)[_row_offsets(B * S, D) + partner.ravel()].reshape(B, S)
        best /= norm.cpu().numpy()[:, :S, 0]
        merged = _top_mask(best, r)
        # merged sources: their destination's slot; the others: their rank among the unmerged
        src_slot = np.where(merged, partner + U, np.cumsum(~merged, -1) - 1)
    else:  # nothing to merge: no matching
        merged = np.zeros((1, S), dtype=bool)
        src_slot = np.arange(S)[None]
    slot = np.empty((src_slot.shape[0], N), dtype=np.int64)
    slot[:, src_np] = src_slot
    slot[:, dst_np] = np.arange(U, U + D)
    rep = None
    if mode == "prune":
        unm = np.broadcast_to(src_np, merged.shape)[~merged].reshape(-1, U)
        kept = np.concatenate([unm, np.broadcast_to(dst_np, (unm.shape[0], D))], 1)
        rep = torch.from_numpy(kept).to(metric.device)
    return MergeMap(N, torch.from_numpy(slot).to(metric.device), U + D, mode, rep)


@functools.lru_cache(maxsize=16)
def _row_offsets(rows: int, width: int) -> np.ndarray:
    """Flat offset of the first element of each of ``rows`` rows of ``width`` (read-only, per shape)."""
    out = np.arange(rows) * width
    out.flags.writeable = False
    return out


def _top_mask(score: np.ndarray, r: int) -> np.ndarray:
    """(B, S) bool: the ``r`` highest scores of each row, ties to the lower index (a selection, not a sort:
    the r-th largest by ``np.partition``; rows with ties at it, or NaN, take a stable sort's first r)."""
    S = score.shape[-1]
    thr = np.partition(score, S - r, axis=-1)[:, S - r: S - r + 1]
    mask = score >= thr
    if (mask.sum(-1) != r).any():
        order = np.argsort(-score, axis=-1, kind="stable")
        mask = np.zeros_like(mask)
        np.put_along_axis(mask, order[:, :r], True, -1)
    return mask


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
    return MergeMap.from_parts(h * w, unm.nonzero()[:, 1].view(merged.shape[0], U), dst, merged, slot, mode)


def pool_map(h: int, w: int, keep: float, device: torch.device | None = None) -> MergeMap:
    """Average pooling of a ``h x w`` grid to about ``keep`` of its tokens: an ``h' x w'`` grid (each side
    scaled by sqrt(keep), rounded), token (i, j) in cell (floor(i h'/h), floor(j w'/w)) (every cell holds at
    least one token: h' <= h, w' <= w)."""
    hp, wp = max(1, round(h * math.sqrt(keep))), max(1, round(w * math.sqrt(keep)))
    ci = torch.arange(h, device=device) * hp // h
    cj = torch.arange(w, device=device) * wp // w
    return MergeMap(h * w, (ci[:, None] * wp + cj[None, :]).flatten().unsqueeze(0), hp * wp, "mean")


def downsample_index(h: int, w: int, keep: float, device: torch.device | None = None) -> Tensor:
    """Token indices (ascending) of nearest-exact downsampling of a ``h x w`` grid to about ``keep`` of its
    tokens (each side scaled by sqrt(keep), rounded): the tokens ``F.interpolate(mode="nearest-exact")``
    reads, row ``floor((i + 1/2) h / h')``."""
    hp, wp = max(1, round(h * math.sqrt(keep))), max(1, round(w * math.sqrt(keep)))
    rows = ((torch.arange(hp, device=device) + 0.5) * (h / hp)).floor().long().clamp(max=h - 1)
    cols = ((torch.arange(wp, device=device) + 0.5) * (w / wp)).floor().long().clamp(max=w - 1)
    return (rows[:, None] * w + cols[None, :]).flatten()


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
