"""Distraction prompts: two labelled keys, look-alike numbers, the asked key at the swept depths."""

from __future__ import annotations

import pytest

from tokenreduce.data.distraction import make_distraction_samples


def _count(s: str) -> int:
    return len(s.split())


def test_samples_hold_both_keys_and_look_alikes_at_their_depths():
    samples = make_distraction_samples(10, 400, _count, depths=(0.1, 0.5, 0.9), similar=3, seed=1)
    assert [s.depth for s in samples[:4]] == [0.1, 0.5, 0.9, 0.1]
    assert {s.target_label for s in samples} == {"red", "blue"}
    for s in samples:
        other = "blue" if s.target_label == "red" else "red"
        assert f"The {s.target_label} pass key is {s.answer}." in s.context
        assert f"The {other} pass key is {s.distractor}." in s.context
        assert s.distractor_depth != s.depth and s.distractor != s.answer
        assert len(s.look_alikes) == 3
        for x in (*s.look_alikes, s.distractor):
            assert x in s.context and x[0] != "0" and 1 <= sum(a != b for a, b in zip(x, s.answer)) <= 2
        pos = s.context.index(f"The {s.target_label} pass key")
        assert abs(pos / len(s.context) - s.depth) < 0.2
        assert s.prompt.endswith(f"What is the {s.target_label} pass key?\nThe {s.target_label} pass key is")
        assert 0.8 * 400 < _count(s.context) <= 400
    assert make_distraction_samples(3, 400, _count, seed=1)[0] == make_distraction_samples(3, 400, _count, seed=1)[0]


def test_scoring():
    s = make_distraction_samples(1, 200, _count, seed=0)[0]
    assert s.score(f" {s.answer}.") == {"correct": True, "distracted": False, "look_alike": False}
    assert s.score(f" {s.distractor}.")["distracted"]
    assert s.score(f" {s.look_alikes[0]}")["look_alike"] or s.look_alikes[0] == s.distractor


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be >= 1"):
        make_distraction_samples(0, 400, _count)
    with pytest.raises(ValueError, match="target_tokens must be >= 100"):
        make_distraction_samples(1, 50, _count)
    with pytest.raises(ValueError, match="depths"):
        make_distraction_samples(1, 400, _count, depths=(1.5,))
