"""POPE probes (balanced, three ways of drawing absent digits) and CHAIR counts on digit scenes."""

from __future__ import annotations

import pytest

from tokenreduce.data.existence import LOOK_ALIKE, POPE_SETTINGS, chair_scores, pope_probes
from tokenreduce.data.vqa import Scene

S1 = Scene((3, -1, 7, -1, -1, -1, -1, 1, -1), -1, ((0, 0, 16),) * 9)
S2 = Scene((-1, 8, -1, -1, 5, -1, -1, -1, 2), 8, ((0, 0, 16),) * 9)


@pytest.mark.parametrize("setting", POPE_SETTINGS)
def test_probes_are_balanced_and_correct(setting):
    probes = pope_probes([S1, S2], setting, per_scene=2, seed=0)
    for i, s in enumerate((S1, S2)):
        mine = [p for p in probes if p.scene == i]
        present = {v for v in s.digits if v >= 0}
        assert sum(p.answer == "yes" for p in mine) == sum(p.answer == "no" for p in mine) == 2
        assert all((p.digit in present) == (p.answer == "yes") for p in mine)
        assert all(p.question == f"is there the digit {p.digit} ?" for p in mine)


def test_adversarial_probes_look_like_a_present_digit():
    probes = pope_probes([S1], "adversarial", per_scene=2)
    alike = {x for d in (3, 7, 1) for x in LOOK_ALIKE[d]}
    assert all(p.digit in alike for p in probes if p.answer == "no")
    assert all(a in LOOK_ALIKE[b] for a, bs in LOOK_ALIKE.items() for b in bs)  # symmetric
    with pytest.raises(ValueError, match="accepted: random, popular, adversarial"):
        pope_probes([S1], "frequent")


def test_chair_counts():
    words = ["3", "top", "left", ",", "9", "center", ",", "small", "7", "</s>", "4"]
    assert chair_scores(words, S1) == {"mentions": 3, "hallucinated": 1, "named_present": 2, "present": 3}
    assert chair_scores([], S2) == {"mentions": 0, "hallucinated": 0, "named_present": 0, "present": 3}
