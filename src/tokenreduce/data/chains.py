"""Multi-step modular arithmetic with its chain of thought: the task of the small reasoning LM
(:mod:`tokenreduce.models.reasoning`) and of the ``reasoning-length`` study (TokenSkip, Xia et al. 2025).

A problem is a start digit and ``k`` operations applied left to right modulo ``modulus`` (no precedence):
``7+3*2-5`` means ((7 + 3) * 2 - 5) mod 10 = 5. Its chain of thought writes every step out, operands restated and
the intermediate result after ``=``, steps ended by ``;``::

    question  7+3*2-5
    chain     7+3=0;0*2=0;0-5=5;
    answer    5

Every character is one token of the model (:mod:`tokenreduce.models.reasoning.tokenizer`). The chain is what a
step-by-step solver writes, with the redundancy TokenSkip removes: the restated operands and the separators are
predictable from the question, the results are the computation. Without the chain a small transformer has to
compose all ``k`` steps in one forward pass (the ``no-chain`` model of the trainer measures how much worse it
does).

Splits draw from disjoint seed streams (:data:`SPLIT_SEEDS`): the same ``(split, n, seed, config)`` always gives
the same problems.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

__all__ = ["OPS", "SPLIT_SEEDS", "ChainProblem", "ChainTaskConfig", "make_problems", "parse_chain", "solve"]

#: the operations and how each combines the running value with the operand (before the modulus)
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
#: split -> offset of its seed stream (train problems come from their own stream, see ``make_problems``)
SPLIT_SEEDS = {"train": 0, "val": 7_000_001, "test": 9_000_011}


@dataclass(frozen=True)
class ChainTaskConfig:
    """``min_ops``..``max_ops`` operations per problem (uniform), operands and start in ``0..modulus-1``,
    operations drawn uniformly from ``ops``. ``modulus`` <= 10 keeps every number one character."""

    min_ops: int = 4
    max_ops: int = 8
    modulus: int = 10
    ops: str = "+-*"

    def __post_init__(self) -> None:
        for name in ("min_ops", "max_ops", "modulus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid: an int >= 1")
        if self.min_ops > self.max_ops:
            raise ValueError(f"min_ops={self.min_ops} must be <= max_ops={self.max_ops}")
        if not 2 <= self.modulus <= 10:
            raise ValueError(f"modulus={self.modulus} is out of range: 2..10 (one character per number)")
        bad = [c for c in self.ops if c not in OPS] or ([] if self.ops else ["(empty)"])
        if bad or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops={self.ops!r} is invalid: distinct characters among {''.join(OPS)}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ChainProblem:
    """``start`` and ``steps`` ((op, operand) pairs); the text forms are properties."""

    start: int
    steps: tuple[tuple[str, int], ...]
    modulus: int = 10

    @property
    def question(self) -> str:
        return str(self.start) + "".join(f"{op}{v}" for op, v in self.steps)

    @property
    def results(self) -> tuple[int, ...]:
        """The running value after each step."""
        out, x = [], self.start
        for op, v in self.steps:
            x = OPS[op](x, v) % self.modulus
            out.append(x)
        return tuple(out)

    @property
    def chain(self) -> str:
        prev = [self.start, *self.results]
        return "".join(f"{prev[i]}{op}{v}={prev[i + 1]};" for i, (op, v) in enumerate(self.steps))

    @property
    def answer(self) -> str:
        return str(self.results[-1])

    def result_positions(self) -> list[int]:
        """Character offsets of the intermediate results in :attr:`chain` (the digit after each ``=``)."""
        return [i + 1 for i, c in enumerate(self.chain) if c == "="]


def solve(question: str, modulus: int = 10) -> int:
    """The answer of a question string (left to right, modulo ``modulus``): the reference the tests check
    chains against."""
    x = int(question[0])
    for i in range(1, len(question), 2):
        x = OPS[question[i]](x, int(question[i + 1])) % modulus
    return x


def parse_chain(chain: str) -> list[tuple[int, str, int, int]]:
    """``"7+3=0;0*2=0;"`` -> ``[(7, "+", 3, 0), (0, "*", 2, 0)]``: the full steps of a chain (a compressed or
    malformed step raises ValueError naming it)."""
    out = []
    for step in chain.split(";")[:-1] if chain.endswith(";") else chain.split(";"):
        if len(step) != 5 or step[3] != "=" or step[1] not in OPS:
            raise ValueError(f"chain step {step!r} is not of the form <a><op><b>=<c>")
        out.append((int(step[0]), step[1], int(step[2]), int(step[4])))
    return out


def make_problems(split: str, n: int, seed: int = 0, config: ChainTaskConfig | None = None) -> list[ChainProblem]:
    """``n`` problems of ``split`` (train | val | test), deterministic in ``(split, n, seed, config)``; the first
    ``m`` problems of a call with ``n > m`` are the problems of the call with ``m``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split={split!r} is invalid: one of {', '.join(SPLIT_SEEDS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} is invalid: an int >= 0")
    c = config or ChainTaskConfig()
    rng = random.Random(SPLIT_SEEDS[split] + 1_000_003 * seed)
    out = []
    for _ in range(n):
        k = rng.randint(c.min_ops, c.max_ops)
        start = rng.randrange(c.modulus)
        steps = tuple((rng.choice(c.ops), rng.randrange(c.modulus)) for _ in range(k))
        out.append(ChainProblem(start, steps, c.modulus))
    return out
