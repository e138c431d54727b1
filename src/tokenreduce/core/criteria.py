"""Criteria E(X): pure functions that score tokens (higher = more worth keeping) or give a metric to compare.

Two kinds, declared by ``kind``:

* ``"score"`` -> (B, N) float, used by pruning/selection strategies;
* ``"metric"`` -> (B, N, C) float features, used by merging/clustering strategies (cosine similarity).

Every criterion takes the :class:`TokenState` plus context tensors the integration point provides
(``attn``, ``cls_attn``, ``metric``, ``keys``, ``query``, ``logprobs``); it never changes the state.
Padding tokens get ``-inf`` scores so no budget can pick them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import suggest
from .ops import NEG, cosine_distances
from .state import TokenState

__all__ = [
    "CRITERIA",
    "QUESTION_POOLS",
    "Attention",
    "Criterion",
    "Diversity",
    "Norm",
    "QueryRelevance",
    "Random",
    "SelfInformation",
    "Similarity",
    "cls_attention",
    "divprune_order",
    "get_criterion",
    "masked_scores",
    "mean_attention",
    "question_similarity",
]


class Criterion(Protocol):
    kind: str

    def __call__(self, state: TokenState, **ctx: Tensor) -> Tensor: ...


def masked_scores(scores: Tensor, state: TokenState) -> Tensor:
    """Set scores of padding tokens to -inf (protected tokens are handled by strategies)."""
    return scores.masked_fill(~state.mask, float("-inf"))


def _need(ctx: dict, name: str, who: str) -> Tensor:
    if ctx.get(name) is None:
        raise ValueError(f"criterion {who!r} needs the context tensor {name!r}; got only {sorted(ctx)}")
    return ctx[name]


# ---------------------------------------------------------------------------- pure tensor functions
def cls_attention(attn: Tensor, query: int = 0) -> Tensor:
    """Attention paid by one query token (default CLS) averaged over heads: attn (B,H,Nq,N) -> (B,N).

    EViT (Liang et al., ICLR 2022), Eq. 3: token attentiveness = mean_h A_h[cls, i].
    """
    return attn[:, :, query, :].float().mean(dim=1)


def mean_attention(attn: Tensor, query_mask: Tensor | None = None) -> Tensor:
    """Attention received by each key, averaged over heads and (valid) queries: (B,H,Nq,N) -> (B,N)."""
    a = attn.float().mean(dim=1)  # (B, Nq, N)
    if query_mask is None:
        return a.mean(dim=1)
    w = query_mask.float().unsqueeze(-1)
    return (a * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)


#: how :func:`question_similarity` pools the question's token embeddings
QUESTION_POOLS = ("mean", "max")


def question_similarity(x: Tensor, text: Tensor, mask: Tensor, pool: str = "mean") -> Tensor:
    """TRIM's score of each visual token (B, N, D) against its question's token embeddings (B, L, D) with
    ``mask`` (B, L): the softmax over the image's tokens of cos(x_i, t), t the mean of the question's
    embeddings (``pool="mean"``, TRIM's pooled text feature), or of max_j cos(x_i, t_j) (``"max"``: the
    best-matching word). A prompt without text tokens scores every token equally."""
    if pool not in QUESTION_POOLS:
        raise ValueError(f"pool={pool!r} is invalid: accepted {QUESTION_POOLS}")
    xn = F.normalize(x.float(), dim=-1)
    m = mask.to(xn.dtype)[..., None]
    if pool == "mean":
        t = (text.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        sim = torch.einsum("bnd,bd->bn", xn, F.normalize(t, dim=-1))
    else:
        cos = torch.einsum("bnd,bld->bnl", xn, F.normalize(text.float(), dim=-1))
        sim = cos.masked_fill(~mask.bool()[:, None, :], NEG).amax(-1)
    sim = torch.where(mask.any(1, keepdim=True), sim, torch.zeros_like(sim))
    return sim.softmax(-1)


def divprune_order(metric: Tensor, valid: Tensor, first: Tensor | None = None) -> Tensor:
    """DivPrune (Alvar et al., CVPR 2025), Alg. 1: greedy max-min diversity, as prefix-consistent scores.

    Over cosine distances d_ij = 1 - cos(x_i, x_j) (:func:`~tokenreduce.core.ops.cosine_distances`, exactly
    symmetric so exact ties stay ties): the first token is the one whose nearest other token is farthest,
    argmax_i min_{j != i} d_ij; then repeatedly s_t = argmax_{i not in S} min_{j in S} d_ij (ties: lower
    index, as the reference code's ``argmax``). The token picked at step t scores N - t, so a top-k of the
    scores is exactly the greedy selection of k tokens for every k. metric (B, N, C), valid (B, N) ->
    (B, N) scores, invalid tokens -inf. ``first`` (B,): start the greedy there instead (ToDRE starts at the
    token [CLS] attends to most; the rest is the same k-center greedy).
    """
    B, N, _ = metric.shape
    dist = cosine_distances(metric)
    big = torch.finfo(dist.dtype).max
    eye = torch.eye(N, dtype=torch.bool, device=metric.device)
    nearest = dist.masked_fill(~valid[:, None, :] | eye, big).amin(-1)  # distance to the nearest other token
    nearest = torch.where(nearest >= big, torch.zeros_like(nearest), nearest)
    neg = torch.finfo(dist.dtype).min
    cur = nearest.masked_fill(~valid, neg).argmax(1) if first is None else first.to(metric.device)
    scores = torch.full((B, N), float("-inf"), device=metric.device)
    mind = torch.full((B, N), float("inf"), device=metric.device)
    picked = torch.zeros(B, N, dtype=torch.bool, device=metric.device)
    n_valid = valid.sum(1)
    ar = torch.arange(B, device=metric.device)
    for step in range(int(n_valid.max()) if N else 0):
        live = step < n_valid
        scores[ar[live], cur[live]] = float(N - step)
        picked[ar[live], cur[live]] = True
        mind = torch.minimum(mind, dist[ar, cur])
        cur = mind.masked_fill(picked | ~valid, neg).argmax(1)
    return scores


# ---------------------------------------------------------------------------- criterion objects
@dataclass
class Attention:
    """Attention-based importance. ``query``: "cls" (EViT), "mean" (received attention), or an int index.

    Uses ``cls_attn`` (B,N) from the context when the integration point computed only that row
    (cheap under SDPA), else ``attn`` (B,H,Nq,N).
    """

    query: str | int = "cls"
    kind: str = "score"

    def __call__(self, state: TokenState, **ctx: Tensor) -> Tensor:
        if self.query == "cls" and ctx.get("cls_attn") is not None:
            return masked_scores(ctx["cls_attn"].float(), state)
        attn = _need(ctx, "attn", "attention")
        if self.query == "cls":
            s = cls_attention(attn, 0)
        elif self.query == "mean":
            s = mean_attention(attn, state.mask if attn.shape[2] == state.num_tokens else None)
        elif isinstance(self.query, int):
            s = cls_attention(attn, self.query)
        else:
            raise ValueError(f"Attention(query={self.query!r}): accepted 'cls', 'mean' or an int index")
        return masked_scores(s, state)


@dataclass
class Similarity:
    """Features for cosine-similarity matching (ToMe uses the attention keys averaged over heads, Sec. 3).

    Returns ``metric`` from the context if present, else the token features ``state.x``.
    """

    kind: str = "metric"

    def __call__(self, state: TokenState, **ctx: Tensor) -> Tensor:
        m = ctx.get("metric")
        return state.x if m is None else m


@dataclass
class Diversity:
    """Max-min diversity (DivPrune): see :func:`divprune_order`. Protected tokens are excluded."""

    kind: str = "score"

    def __call__(self, state: TokenState, **ctx: Tensor) -> Tensor:
        m = ctx.get("metric")
        return divprune_order(state.x if m is None else m, state.reducible())


@dataclass
class Norm:
    """L2 norm of token features (or of ``keys`` when ``of="keys"``). ``largest=False`` keeps small norms
    (Knorm, Devoto et al. 2024: low key norm <-> high attention)."""

    of: str = "x"
    largest: bool = True
    kind: str = "score"

    def __call__(self, state: TokenState, **ctx: Tensor) -> Tensor:
        t = state.x if self.of == "x" else _need(ctx, self.of, "norm")
        n = t.float().norm(dim=-1)
        return masked_scores(n if self.largest else -n, state)


@dataclass
class Random:
    """Uniform random scores from a seeded generator (the random baseline).

    The scores depend only on (seed, token index), not on the batch: every sample sees the same random
    draw, so a sample scores the same alone or inside a padded batch (docs/design.md, invariants 2 and 4).
    """

    seed: int = 0
    kind: str = "score"

    def __call__(self, state: TokenState, **ctx: Tensor) -> Tensor:
        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        s = torch.rand(state.num_tokens, generator=g).to(state.x.device).expand(state.batch, -1)
        return masked_scores(s, state)


@dataclass
class QueryRelevance:
    """Cosine relevance of each token to query embeddings ``query`` (B,Q,D) (max over queries)."""

    kind: str = "score"

    def __call__(self, state: TokenState, **ctx: Tensor) -> Tensor:
        q = F.normalize(_need(ctx, "query", "query").float(), dim=-1)
        x = F.normalize(state.x.float(), dim=-1)
        return masked_scores((x @ q.transpose(1, 2)).amax(dim=-1), state)


@dataclass
class SelfInformation:
    """Self-information I(x_t) = -log p(x_t | x_<t) from ``logprobs`` (B,N) (Selective Context, Li et al. 2023)."""

    kind: str = "score"

    def __call__(self, state: TokenState, **ctx: Tensor) -> Tensor:
        return masked_scores(-_need(ctx, "logprobs", "self-information").float(), state)


CRITERIA: dict[str, Callable[..., Criterion]] = {
    "attention": Attention,
    "similarity": Similarity,
    "diversity": Diversity,
    "norm": Norm,
    "random": Random,
    "query": QueryRelevance,
    "self-information": SelfInformation,
}


def get_criterion(spec: str | Criterion) -> Criterion:
    """Resolve a criterion name (see ``CRITERIA``) or pass an object through."""
    if isinstance(spec, str):
        if spec not in CRITERIA:
            raise ValueError(f"unknown criterion {spec!r}{suggest(spec, CRITERIA)}; accepted: {sorted(CRITERIA)}")
        return CRITERIA[spec]()
    if not callable(spec) or not hasattr(spec, "kind"):
        raise TypeError(f"a criterion must be a name or a callable with a `kind`, got {spec!r}")
    return spec
