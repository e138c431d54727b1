"""POPE-style existence probes on digit scenes (Li et al., "Evaluating Object Hallucination in Large
Vision-Language Models", EMNLP 2023), and CHAIR-style scoring of scene descriptions (Rohrbach et al.,
"Object Hallucination in Image Captioning", EMNLP 2018), for the scenes of :mod:`tokenreduce.data.vqa`.

**POPE.** Per scene, up to ``per_scene`` digits that are present (answer ``yes``) and as many that are absent
(``no``), the absent ones drawn three ways: ``random`` (uniformly among the absent digits), ``popular`` (the
absent digits most frequent over the whole set of scenes) and ``adversarial`` (absent digits that look like a
present one, :data:`LOOK_ALIKE`: handwritten 1/7, 3/8, 5/6, 4/9, 0/6, 2/7 ...). The question uses the VQA
vocabulary only: ``is there the digit 7 ?``.

**CHAIR.** A description (``3 top left , 7 center , small 5``) names digits; a named digit not in the scene is
a hallucinated mention. ``CHAIR_i`` = hallucinated mentions / mentions, ``CHAIR_s`` = descriptions with at least
one hallucinated mention / descriptions; ``recall`` = present digits named / present digits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .vqa import Scene, existence_question

__all__ = ["LOOK_ALIKE", "POPE_SETTINGS", "Probe", "chair_scores", "existence_question", "pope_probes"]

POPE_SETTINGS = ("random", "popular", "adversarial")
#: digits a handwritten digit is commonly confused with (symmetric)
LOOK_ALIKE: dict[int, tuple[int, ...]] = {0: (6, 8, 9), 1: (7, 4), 2: (7, 3), 3: (8, 5, 2), 4: (9, 1), 5: (6, 3, 8),
                                          6: (5, 0, 8), 7: (1, 2), 8: (3, 0, 6, 5), 9: (4, 0)}


class Probe(NamedTuple):
    scene: int
    setting: str
    digit: int
    answer: str  # "yes" | "no"

    @property
    def question(self) -> str:
        return existence_question(self.digit)


def pope_probes(scenes: Sequence[Scene], setting: str, per_scene: int = 2, seed: int = 0) -> list[Probe]:
    """Balanced probes of one ``setting`` (:data:`POPE_SETTINGS`): per scene, ``per_scene`` present digits and
    as many absent ones (fewer when the scene has fewer of either)."""
    if setting not in POPE_SETTINGS:
        raise ValueError(f"setting {setting!r} is not a POPE setting; accepted: {', '.join(POPE_SETTINGS)}")
    if per_scene < 1:
        raise ValueError(f"per_scene must be >= 1, got {per_scene}")
    rng = np.random.default_rng([seed, POPE_SETTINGS.index(setting)])
    freq = Counter(v for s in scenes for v in s.present)
    out: list[Probe] = []
    for i, s in enumerate(scenes):
        present = sorted(s.present)
        absent = [d for d in range(10) if d not in present]
        k = min(per_scene, len(present), len(absent))
        if setting == "random":
            neg = list(rng.permutation(absent)[:k])
        elif setting == "popular":
            neg = sorted(absent, key=lambda d: (-freq[d], d))[:k]
        else:
            similar = [d for d in dict.fromkeys(x for p in present for x in LOOK_ALIKE[p]) if d in absent]
            rest = [d for d in rng.permutation(absent).tolist() if d not in similar]
            neg = (similar + rest)[:k]
        pos = list(rng.permutation(present)[:k])
        out += [Probe(i, setting, int(d), "yes") for d in pos] + [Probe(i, setting, int(d), "no") for d in neg]
    return out


def chair_scores(words: Sequence[str], scene: Scene) -> dict[str, int]:
    """Counts of one description (its words up to ``</s>``): ``mentions`` (digit words), ``hallucinated``
    (named digits not in the scene), ``named_present`` (distinct present digits named), ``present``."""
    words = list(words[: words.index("</s>")] if "</s>" in words else words)
    named = [int(w) for w in words if w.isdigit() and len(w) == 1]
    present = scene.present
    return {"mentions": len(named), "hallucinated": sum(d not in present for d in named),
            "named_present": len(present & set(named)), "present": len(present)}
