"""Budgets and TokenState: validation and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.strategies import unmerge


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_keep_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match=r"out of range"):
        tr.Keep(bad)


@pytest.mark.parametrize("bad", [0, -3])
def test_keep_count_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match=r"out of range"):
        tr.Keep(count=bad)


@pytest.mark.parametrize("bad", [1, 3, 0, np.int64(2)])
def test_keep_refuses_plain_ints_loudly(bad):
    """keep=1 as 'one token' silently wrecked the first point of a [1, 0.5, 0.25] sweep: ints are refused
    with the two unambiguous spellings."""
    with pytest.raises(TypeError, match=r"ambiguous.*tr.Keep\(count="):
        tr.Keep(bad)


def test_keep_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        tr.Keep(0.5, count=3)
    with pytest.raises(TypeError, match="an int >= 1"):
        tr.Keep(count=0.5)


@pytest.mark.parametrize("bad", [True, "0.5", None])
def test_keep_rejects_wrong_types(bad):
    with pytest.raises((TypeError, ValueError)):
        tr.Keep(bad) if bad is not None else tr.Keep()


def test_keep_ratio_count_schedule_threshold():
    avail = torch.tensor([10, 7])
    assert tr.Keep(0.5).counts(avail).tolist() == [5, 4]
    assert tr.Keep(count=3).counts(avail).tolist() == [3, 3]
    sched = tr.Keep([0.5, 0.2])
    assert sched.counts(avail, stage=0).tolist() == [5, 4]
    assert sched.counts(avail, stage=1).tolist() == [2, 1]
    assert tr.Keep(count=[4, 2]).counts(avail, stage=1).tolist() == [2, 2]
    scores = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.1, 0.0]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    assert tr.Keep(threshold=0.5).counts(torch.tensor([3, 3]), scores, valid).tolist() == [2, 1]
    assert tr.Keep(1.0).is_identity and not tr.Keep(0.99).is_identity


def test_keep_count_larger_than_sequence_errors():
    with pytest.raises(ValueError, match="larger than the sequence"):
        tr.Keep(count=20).counts(torch.tensor([10, 12]))


def test_keep_small_ratio_keeps_at_least_one():
    assert tr.Keep(0.01).counts(torch.tensor([10])).tolist() == [1]


def test_tokenstate_validation():
    with pytest.raises(ValueError, match="rank 2"):
        tr.TokenState.from_tensor(torch.randn(4, 5))
    with pytest.raises(ValueError, match="mask must have shape"):
        tr.TokenState.from_tensor(torch.randn(2, 4, 3), mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        tr.TokenState.from_tensor(torch.tensor([[[math.nan]]]))
    with pytest.raises(ValueError, match="grid"):
        tr.TokenState.from_tensor(torch.randn(1, 5, 3), protected=1, grid=(2, 3))
    s = tr.TokenState.from_tensor(torch.randn(2, 5, 3), mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool())
    s.validate()
    assert s.counts().tolist() == [3, 5]
    assert s.size.sum().item() == 8


def test_unmerge_identity_without_reduction():
    x = torch.randn(2, 6, 3)
    s = tr.TokenState.from_tensor(x)
    full, present = unmerge(s)
    torch.testing.assert_close(full, x)
    assert present.all()
