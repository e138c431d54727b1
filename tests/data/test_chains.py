"""The multi-step arithmetic task of the reasoning LM: deterministic splits, correct chains, clear errors."""

from __future__ import annotations

import re

import pytest

from tokenreduce.data.chains import OPS, ChainProblem, ChainTaskConfig, make_problems, parse_chain, solve


def test_problems_are_deterministic_and_splits_differ():
    a = make_problems("test", 50, seed=0)
    assert a == make_problems("test", 50, seed=0)
    assert make_problems("test", 20, seed=0) == a[:20]  # a longer call extends a shorter one
    assert a != make_problems("test", 50, seed=1)
    assert {p.question for p in a}.isdisjoint({p.question for p in make_problems("train", 2000, seed=0)})
    c = ChainTaskConfig(min_ops=2, max_ops=3, ops="+*")
    ps = make_problems("val", 200, config=c)
    assert {len(p.steps) for p in ps} == {2, 3} and {op for p in ps for op, _ in p.steps} == {"+", "*"}


def test_chain_writes_every_step_and_ends_at_the_answer():
    for p in make_problems("train", 300, seed=3):
        steps = parse_chain(p.chain)
        assert len(steps) == len(p.steps)
        prev = p.start
        for (a, op, b, c), (qop, qb) in zip(steps, p.steps):
            assert (a, op, b) == (prev, qop, qb)
            assert c == OPS[op](a, b) % p.modulus
            prev = c
        assert str(prev) == p.answer == str(solve(p.question))
        assert [p.chain[i] for i in p.result_positions()] == [str(r) for r in p.results]


def test_known_example():
    p = ChainProblem(7, (("+", 3), ("*", 2), ("-", 5)))
    assert (p.question, p.chain, p.answer) == ("7+3*2-5", "7+3=0;0*2=0;0-5=5;", "5")


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="min_ops=5 must be <= max_ops=3"):
        ChainTaskConfig(min_ops=5, max_ops=3)
    with pytest.raises(ValueError, match="modulus=12 is out of range"):
        ChainTaskConfig(modulus=12)
    with pytest.raises(ValueError, match=re.escape("ops='+/' is invalid")):
        ChainTaskConfig(ops="+/")
    with pytest.raises(ValueError, match="split='dev'"):
        make_problems("dev", 3)
    with pytest.raises(ValueError, match="not of the form"):
        parse_chain("7+3=0;03;")
