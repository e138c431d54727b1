"""Pure tensor functions behind the visual-token methods for VLMs (:mod:`tokenreduce.methods.vlm`).

Model-free: they take tensors and masks and return scores, selections or merged tokens. The adapter
(:mod:`tokenreduce.adapters.vlm`) computes the few attention rows they need from a layer's own q/k
projections (never switching the model to eager attention) and applies their decisions to the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import NEG, compact, masked_topk

__all__ = [
    "hiprune_keep",
    "neighbours4",
    "sparsevlm_after",
    "sparsevlm_raters",
    "sparsevlm_recycled",
    "staged_counts",
    "visionzip_merge",
    "visual_work",
]



# ---------------------------------------------------------------------------- VisionZip
def visionzip_merge(x: Tensor, cls_attn: Tensor, keys: Tensor, dominant: int, contextual: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """VisionZip (Yang et al., CVPR 2025), Sec. 3.2, on one layer's patch tokens.

    Dominant tokens: the ``dominant`` patches with the largest attention from [CLS] summed over heads.
    Contextual tokens: the remaining patches, compared by their attention keys (averaged over heads,
    L2-normalised), take ``contextual`` uniformly spaced targets (every ``step = max(1, n // contextual)``-th
    remaining token, as in the official code); every other remaining token joins its most similar target;
    contextual token = target + mean of its assigned tokens (the official code's merge).

    x: (B, N, D) features, cls_attn: (B, N), keys: (B, N, C). Returns (tokens (B, dominant + contextual, D)
    in original order of their representative, source index (B, K) of each token's representative patch,
    size (B, K) = patches each token stands for).
    """
    B, N, D = x.shape
    if not 0 <= dominant <= N or not 0 <= contextual <= N - dominant:
        raise ValueError(f"visionzip needs 0 <= dominant ({dominant}) and dominant + contextual "
                         f"({dominant + contextual}) <= {N} patches")
    dom = masked_topk(cls_attn, torch.ones(B, N, dtype=torch.bool, device=x.device),
                       torch.full((B,), dominant, device=x.device))
    rest_idx, _ = compact(~dom)  # (B, N - dominant) the remaining patches, in order
    dom_idx, _ = compact(dom)
    n_rest = N - dominant
    if contextual == 0 or n_rest == 0:
        src = dom_idx
        return x.gather(1, src[..., None].expand(-1, -1, D)), src, torch.ones(B, dominant, device=x.device)
    step = max(1, n_rest // contextual)
    tgt_pos = torch.arange(0, n_rest, step, device=x.device)[:contextual]
    contextual = tgt_pos.numel()
    is_tgt = torch.zeros(n_rest, dtype=torch.bool, device=x.device)
    is_tgt[tgt_pos] = True
    m = F.normalize(keys.float(), dim=-1).gather(1, rest_idx[..., None].expand(-1, -1, keys.shape[-1]))
    xr = x.gather(1, rest_idx[..., None].expand(-1, -1, D))
    sim = m[:, ~is_tgt] @ m[:, is_tgt].transpose(1, 2)  # (B, n_rest - ctx, ctx)
    assign = F.one_hot(sim.argmax(-1), contextual).to(x.dtype)  # (B, M, ctx)
    counts = assign.sum(1).clamp(min=1)[..., None]
    agg = assign.transpose(1, 2) @ xr[:, ~is_tgt] / counts
    ctx_tokens = xr[:, is_tgt] + agg
    ctx_src = rest_idx[:, is_tgt]
    ctx_size = 1.0 + assign.sum(1)
    tokens = torch.cat([x.gather(1, dom_idx[..., None].expand(-1, -1, D)), ctx_tokens], 1)
    src = torch.cat([dom_idx, ctx_src], 1)
    size = torch.cat([torch.ones(B, dominant, device=x.device), ctx_size.float()], 1)
    order = src.argsort(1)
    return tokens.gather(1, order[..., None].expand(-1, -1, D)), src.gather(1, order), size.gather(1, order)


# ---------------------------------------------------------------------------- ToDRE
# ---------------------------------------------------------------------------- HiPrune
def neighbours4(idx: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, 5k) the tokens ``idx`` (B, k) and their up/down/left/right neighbours on an (h, w) grid (the
    anchor itself repeated where a neighbour falls off the grid)."""
    h, w = grid
    r, c = idx // w, idx % w
    out = [idx]
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        rr, cc = r + dr, c + dc
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        out.append(torch.where(ok, rr * w + cc, idx))
    return torch.cat(out, 1)


def hiprune_keep(shallow: Tensor, deep: Tensor, grid: tuple[int, int], count: int, alpha: float = 0.1) -> Tensor:
    """HiPrune (Liu et al., 2025), Sec. 3: hierarchical attention inside the vision encoder.

    Anchors: the round(alpha * count / 5) patches with the largest attention in the middle ("object")
    layer ``shallow`` (B, N); buffers: their 4-neighbours on the patch grid (spatial context); registers:
    the remaining budget filled by the largest attention in the output layer ``deep`` (B, N) among the
    other patches (global context). Returns the (B, N) keep mask with exactly ``count`` patches.
    """
    B, N = shallow.shape
    if not 1 <= count <= N:
        raise ValueError(f"hiprune count {count} out of range: accepted 1..{N}")
    n_anchor = min(max(round(count * alpha / 5), 0), count)
    keep = torch.zeros(B, N, dtype=torch.bool, device=shallow.device)
    if n_anchor:
        anchors = shallow.float().topk(n_anchor, dim=1).indices
        spread = neighbours4(anchors, grid)
        keep.scatter_(1, spread, True)
        # more buffers than budget (tiny counts): keep the anchors and the best-scored buffers
        over = keep.sum(1) > count
        if over.any():
            s = shallow.float().masked_fill(~keep, NEG)
            keep = torch.where(over[:, None], masked_topk(s, keep, torch.full((B,), count, device=keep.device)), keep)
    rest = count - keep.sum(1)
    reg = masked_topk(deep, ~keep, rest)
    return keep | reg


# ---------------------------------------------------------------------------- SparseVLM
def sparsevlm_raters(vis: Tensor, text: Tensor, vis_valid: Tensor, text_valid: Tensor) -> Tensor:
    """SparseVLM (Zhang et al., ICML 2025), Sec. 3.2 "relevant text raters" (official code):
    R = softmax_text(V T^T) averaged over visual tokens; raters are the text tokens with R_j > mean_j R_j.

    vis: (B, Nv, D), text: (B, Nt, D) input embeddings; masks mark real tokens. Returns (B, Nt) bool.
    """
    logits = vis.float() @ text.float().transpose(1, 2)  # (B, Nv, Nt)
    logits = logits.masked_fill(~text_valid[:, None, :], NEG)
    p = torch.nan_to_num(torch.softmax(logits, -1), nan=0.0)
    w = vis_valid.float()[..., None]
    r = (p * w).sum(1) / w.sum(1).clamp(min=1)  # (B, Nt)
    mean = (r * text_valid).sum(1, keepdim=True) / text_valid.sum(1, keepdim=True).clamp(min=1)
    raters = (r > mean) & text_valid
    # a sample whose scores are all equal gets every text token as rater
    return torch.where(raters.any(1, keepdim=True), raters, text_valid)


#: Visual tokens kept after SparseVLM's pruning layers (2, 6, 15) of LLaVA-1.5-7B's 576 (official code's
#: ``sparse_token_list_64/128/192``); the 64-token list is the shape its schedule follows.
SPARSEVLM_LISTS = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}


def sparsevlm_recycled(deleted: Tensor, recycle: float) -> tuple[Tensor, Tensor]:
    """SparseVLM's recycling sizes for ``deleted`` (B,) pruned visual tokens: the top ``recycle`` share of them
    (floor + 1, at most all) are recycled and clustered into (recycled // 10 + 1) merged tokens (official code).
    Returns (recycled (B,), clusters (B,)), both 0 where nothing was deleted (and everywhere for recycle=0)."""
    if recycle <= 0:
        return torch.zeros_like(deleted), torch.zeros_like(deleted)
    n_rec = torch.where(deleted > 0, (deleted.float() * recycle).long() + 1, 0).clamp(max=deleted)
    n_clu = torch.where(n_rec > 0, n_rec // 10 + 1, 0).clamp(max=n_rec)
    return n_rec, n_clu


# ---------------------------------------------------------------------------- keep as visual-token work
def visual_work(n0: int, layers: Sequence[int], after: Sequence[int], depth: int) -> float:
    """The fraction of the visual-token work a ``depth``-layer LLM keeps: the mean over its layers of the
    visual tokens each processes, over ``n0`` (the visual tokens of the unreduced prompt), when ``after[s]``
    visual tokens remain from layer ``layers[s]`` on (``n0`` enter the layers before ``layers[0]``)."""
    if n0 <= 0 or depth <= 0:
        return 1.0
    total, cur, prev = 0, n0, 0
    for n, layer in zip(after, layers):
        total += cur * (layer - prev)
        cur, prev = n, layer
    total += cur * (depth - prev)
    return total / (depth * n0)


def staged_counts(n0: int, fractions: Sequence[float], floor: int) -> tuple[int, ...]:
    """Visual tokens kept at each stage: round(n0 * fraction), never fewer than ``floor`` (one per image) nor
    more than the previous stage kept."""
    out, prev = [], n0
    for f in fractions:
        prev = min(prev, max(floor, round(n0 * f)))
        out.append(prev)
    return tuple(out)


def sparsevlm_after(n0: int, kept: Sequence[int], recycle: float) -> tuple[int, ...]:
    """Visual tokens after each SparseVLM stage: the ``kept[s]`` selected (of what the previous stage left,
    merged tokens included) plus the merged tokens recycled from the ones it deleted."""
    out, prev = [], n0
    for k in kept:
        k = min(k, prev)
        _, clu = sparsevlm_recycled(torch.tensor([prev - k]), recycle)
        prev = k + int(clu[0])
        out.append(prev)
    return tuple(out)
