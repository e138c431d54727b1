"""Pass-key retrieval with distractors (long-context "distraction" prompts, after the pass-key test of
Mohtashami & Jaggi 2023 and the multi-needle / "lost in the middle" setting of Liu et al. 2024).

Real English filler (Lee corpus, as :mod:`.passcode`) holding **two labelled keys**,
``The red pass key is 48213. Remember it. 48213 is the red pass key.`` and the same for ``blue``; the question
asks for one of them (the *target*, at a relative ``depth`` swept over the context); the other (the *distractor*)
sits at another depth. The filler also holds ``similar`` **look-alike numbers**: 5-digit numbers that differ from
the target in one or two digits, in neutral sentences (``Invoice 48218 was filed on time.``). A sample is correct
when the target's 5 digits appear in the continuation; ``distracted`` when the distractor key does instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .passcode import _sentences

__all__ = ["LABELS", "DistractionSample", "look_alike", "make_distraction_samples"]

LABELS = ("red", "blue")
_TEMPLATES = ("Invoice {} was filed on time.", "The archive lists item {} as missing.",
              "Order number {} shipped last week.", "Room {} was booked for the meeting.",
              "Case {} was closed by the clerk.", "The report cites reference {} twice.")


@dataclass(frozen=True)
class DistractionSample:
    context: str
    target_label: str
    answer: str
    distractor: str
    look_alikes: tuple[str, ...]
    depth: float
    distractor_depth: float
    target_tokens: int

    @property
    def question(self) -> str:
        return f"Now answer the quiz. What is the {self.target_label} pass key?"

    @property
    def answer_prefix(self) -> str:
        return f"The {self.target_label} pass key is"

    @property
    def prompt(self) -> str:
        """Context, question and answer prefix as one string."""
        return f"{self.context}\n{self.question}\n{self.answer_prefix}"

    def score(self, generated: str) -> dict[str, bool]:
        """``correct``: the target's digits appear; ``distracted``: the distractor key's do (and not the
        target's); ``look_alike``: a look-alike number's do (and not the target's)."""
        ok = self.answer in generated
        return {"correct": ok, "distracted": not ok and self.distractor in generated,
                "look_alike": not ok and any(x in generated for x in self.look_alikes)}


def look_alike(code: str, rng: random.Random, changes: int) -> str:
    """``code`` with ``changes`` of its digits replaced by other digits (the first stays non-zero)."""
    digits = list(code)
    for i in rng.sample(range(len(digits)), changes):
        options = [d for d in "0123456789" if d != digits[i] and (i or d != "0")]
        digits[i] = rng.choice(options)
    return "".join(digits)


def _needle(label: str, code: str) -> str:
    return f"The {label} pass key is {code}. Remember it. {code} is the {label} pass key."


def make_distraction_samples(n: int, target_tokens: int, count_tokens: Callable[[str], int],
                             depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), similar: int = 4,
                             seed: int = 0) -> list[DistractionSample]:
    """``n`` samples of about ``target_tokens`` context tokens (by ``count_tokens``); the target's depth cycles
    through ``depths``, the distractor goes to one of the other depths, ``similar`` look-alike numbers to random
    places; which label is asked alternates with the sample index (half red, half blue)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if target_tokens < 100:
        raise ValueError(f"target_tokens must be >= 100 (room for filler, two keys and look-alikes), got "
                         f"{target_tokens}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {list(depths)}")
    if not 0 <= similar <= 20:
        raise ValueError(f"similar must be in [0, 20], got {similar}")
    rng = random.Random(seed * 7919 + 17)
    out = []
    for i in range(n):
        code = str(rng.randint(10000, 99999))
        other = look_alike(code, rng, 2)
        looks = tuple(look_alike(code, rng, rng.choice((1, 2))) for _ in range(similar))
        extra = [rng.choice(_TEMPLATES).format(x) for x in looks]
        depth = float(depths[i % len(depths)])
        d_depth = float(rng.choice([d for d in depths if d != depth] or [1 - depth]))
        target, distractor = (LABELS[0], LABELS[1]) if i % 2 == 0 else (LABELS[1], LABELS[0])
        reserve = count_tokens(" ".join([_needle(target, code), _needle(distractor, other), *extra])) + 30
        sents = _sentences(seed * 1000 + i)
        filler: list[str] = []
        j = 0
        while count_tokens(" ".join(filler)) < target_tokens - reserve and j < len(sents):
            filler.extend(sents[j: j + 8])
            j += 8
        while len(filler) > 1 and count_tokens(" ".join(filler)) > target_tokens - reserve:
            filler.pop()
        for x in extra:  # look-alikes at random places of the filler
            filler.insert(rng.randint(0, len(filler)), x)
        inserts = sorted([(round(depth * len(filler)), 0, _needle(target, code)),
                          (round(d_depth * len(filler)), 1, _needle(distractor, other))], reverse=True)
        for pos, _, text in inserts:  # later position first: the earlier index stays valid
            filler.insert(pos, text)
        out.append(DistractionSample(" ".join(filler), target, code, other, looks, depth, d_depth, target_tokens))
    return out
