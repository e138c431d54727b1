"""Pure tensor pieces of the learned reducers (DynamicViT, DiffRate): hard masks with straight-through
gradients, the differentiable kept count of a distribution over candidate counts, and the masked softmax
that keeps dropped tokens from influencing kept ones. Nothing here knows a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["expected_count", "gumbel_keep", "policy_softmax", "rank_keep_probability", "ste_ceil",
           "straight_through"]


def policy_softmax(logits: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked softmax (Rao et al., NeurIPS 2021, Eq. 8), also DiffRate's training attention:
    A_ij = exp(P_ij) G_ij / sum_k exp(P_ik) G_ik with G_ij = 1 if i == j else D_j, so a dropped token
    (D_j = 0) influences no other token while it still attends to itself. ``logits`` (B, H, N, N),
    ``policy`` D (B, N) in [0, 1] (hard 0/1 in the forward pass, differentiable: the gradient reaches D).
    Computed in float32 with the paper's ``eps`` smoothing; returns the logits' dtype."""
    B, _, N, _ = logits.shape
    if policy.shape != (B, N):
        raise ValueError(f"policy must have shape {(B, N)} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(policy.shape)}")
    d = policy.float().reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=d.dtype, device=d.device).view(1, 1, N, N)
    g = d + (1.0 - d) * eye
    a = (logits.float() - logits.float().amax(-1, keepdim=True)).exp() * g
    return ((a + eps / N) / (a.sum(-1, keepdim=True) + eps)).to(logits.dtype)


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """``hard`` in the forward pass, the gradient of ``soft`` in the backward pass."""
    return hard + (soft - soft.detach())


def gumbel_keep(log_probs: Tensor, generator: torch.Generator | None = None, tau: float = 1.0) -> Tensor:
    """DynamicViT's training decision (Sec. 3.3, Eq. 6): a hard Gumbel-softmax sample of the keep/drop
    log-probabilities ``log_probs`` (..., 2) (index 0 = keep), straight-through: 1.0 = keep, 0.0 = drop in the
    forward pass, the gradient of the relaxed sample in the backward pass. ``generator`` seeds the noise."""
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=torch.float32)
    g = -torch.log(-torch.log(u.clamp(min=1e-10, max=1.0 - 1e-7)))
    soft = F.softmax((log_probs.float() + g) / tau, dim=-1)[..., 0]
    return straight_through((soft >= 0.5).to(soft.dtype), soft).to(log_probs.dtype)


class _CeilSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


def ste_ceil(x: Tensor) -> Tensor:
    """ceil(x) with the identity gradient (DiffRate's ``ste_ceil``)."""
    return _CeilSTE.apply(x)


def expected_count(logits: Tensor, candidates: Tensor) -> Tensor:
    """DiffRate's kept count (Chen et al., ICCV 2023, Sec. 3.2): ceil(sum_k p_k N_k) of the distribution
    p = softmax(``logits``) over the candidate kept counts ``candidates`` (K,), with a straight-through ceil
    so the FLOPs of the count stay differentiable in p."""
    return ste_ceil((logits.softmax(-1) * candidates.to(logits.dtype)).sum(-1))


def rank_keep_probability(logits: Tensor, candidates: Tensor, n: int) -> Tensor:
    """DiffRate's differentiable discrete proxy: the probability that the token at importance rank i
    (0 = most important) of ``n`` survives, P(N_k > i) = sum_{k: N_k > i} p_k, p = softmax(``logits``) over the
    candidate kept counts ``candidates`` (K,). Returns (n,)."""
    ranks = torch.arange(n, device=logits.device)
    survives = (candidates.to(logits.device).unsqueeze(0) > ranks.unsqueeze(1)).to(logits.dtype)  # (n, K)
    return survives @ logits.softmax(-1)
