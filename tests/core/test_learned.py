"""The pure pieces of the learned reducers: DynamicViT's masked softmax and Gumbel decisions, DiffRate's
differentiable counts and its prune-then-merge strategy."""

from __future__ import annotations

import torch

from tokenreduce.core import strategies as S
from tokenreduce.core.learned import (
    expected_count,
    gumbel_keep,
    policy_softmax,
    rank_keep_probability,
    straight_through,
)
from tokenreduce.core.state import TokenState


def test_policy_softmax_dropped_tokens_influence_no_kept_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    policy = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 1, 1]], dtype=torch.float32)
    a = policy_softmax(logits, policy)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 6))
    dropped = policy == 0
    # off-diagonal attention to a dropped token is (numerically) zero, a dropped token attends to itself
    off = a.masked_fill(torch.eye(6, dtype=torch.bool), 0)
    assert off.permute(0, 1, 3, 2)[dropped.unsqueeze(1).expand(2, 3, 6)].abs().max() < 1e-5
    assert (a.diagonal(dim1=-2, dim2=-1).permute(0, 2, 1)[dropped] > 1e-3).all()
    # all-ones policy is the ordinary softmax (up to eps)
    torch.testing.assert_close(policy_softmax(logits, torch.ones(2, 6)), logits.softmax(-1), atol=1e-5, rtol=0)


def test_policy_softmax_passes_gradient_to_the_policy():
    logits = torch.randn(1, 1, 4, 4)
    hard = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    soft = torch.full((1, 4), 0.5, requires_grad=True)
    out = policy_softmax(logits, straight_through(hard, soft))
    (out[..., 0, :] * torch.arange(4.0)).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


def test_gumbel_keep_is_hard_and_seeded():
    logp = torch.log_softmax(torch.randn(3, 10, 2), -1).requires_grad_(True)
    d1 = gumbel_keep(logp, torch.Generator().manual_seed(1))
    d2 = gumbel_keep(logp, torch.Generator().manual_seed(1))
    assert set(d1.unique().tolist()) <= {0.0, 1.0} and torch.equal(d1, d2)
    d1.sum().backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0


def test_diffrate_counts_and_rank_probabilities():
    cands = torch.tensor([8.0, 6.0, 4.0, 2.0])
    logits = torch.zeros(4, requires_grad=True)
    n = expected_count(logits, cands)
    assert n.item() == 5.0  # ceil(mean 5)
    n.backward()
    assert logits.grad.abs().sum() > 0  # straight-through ceil
    p = rank_keep_probability(torch.zeros(4), cands, 8)
    assert torch.allclose(p, torch.tensor([1, 1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]))
    assert expected_count(torch.zeros(2, 4), cands).shape == (2,)


def test_prune_merge_counts_conservation_and_batch_consistency():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 8, generator=g)
    state = TokenState.from_tensor(x, protected=1)
    scores = torch.rand(3, 11, generator=g)
    out = S.prune_merge(state, scores, x, torch.tensor([7, 6, 10]), torch.tensor([4, 6, 3]))
    assert out.reducible_counts().tolist() == [4, 6, 3]
    # merging conserves the size of what survived pruning; the protected CLS is untouched
    assert out.size.sum(1).tolist() == [8.0, 7.0, 11.0]
    torch.testing.assert_close(out.x[:, 0], x[:, 0])
    for b in range(3):
        one = S.prune_merge(TokenState.from_tensor(x[b:b + 1], protected=1), scores[b:b + 1], x[b:b + 1],
                            torch.tensor([[7, 6, 10][b]]), torch.tensor([[4, 6, 3][b]]))
        n = int(one.mask.sum())
        torch.testing.assert_close(out.x[b, :n], one.x[0, :n])


def test_importance_merge_keeps_the_most_important_as_destinations():
    x = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    state = TokenState.from_tensor(x, protected=1)
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.8, 0.2]])
    out = S.importance_merge(state, scores, x, torch.tensor([2]))
    assert out.source[0].tolist() == [0, 1, 3]  # CLS + the two most important
    assert out.size[0].tolist() == [1.0, 2.0, 2.0]  # token 2 -> token 1, token 4 -> token 3 (most similar)
