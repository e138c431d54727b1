"""Budgets: how many tokens survive a reduction step.

A ``keep`` is a **fraction** unless it says otherwise, so a sweep ``[1.0, 0.5, 0.25]`` can never silently
turn its first point into "one token":

* a **fraction** ``0.5`` / ``Keep(0.5)``: a float in (0, 1]; what it is a fraction *of* is fixed per
  integration point (``tr.methods()``, docs/design.md "What keep means"); ``1.0`` keeps everything;
* a **count** ``Keep(count=64)``: an int >= 1 of tokens that survive; larger than a sample's reducible tokens
  is an error;
* a **threshold** ``Keep(threshold=0.01)``: keep tokens whose score >= threshold (ragged: each sample keeps
  its own number, at least ``min_keep``);
* a **schedule** ``Keep([0.7, 0.7, 0.7])`` or ``Keep(count=[64, 32])``: one value per stage/layer, picked
  with ``stage=``.

A plain int is refused everywhere a keep is accepted (``keep=1`` would be "one token" in a count reading and
"everything" in a fraction reading): use ``1.0`` or ``Keep(count=1)``. Nothing is silently clipped: an
impossible budget raises ValueError naming the value and the accepted range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

__all__ = ["Keep", "KeepLike", "as_method_keep", "closest_plan", "layer_work", "validate_count", "validate_fraction",
           "validate_keep_value"]

Number = int | float
KeepLike = Union["Keep", float, Sequence[float]]

_INT_HINT = ("a plain int is ambiguous (keep=1 would mean 'one token' as a count and 'everything' as a "
             "fraction): pass a fraction as a float in (0, 1]{eg}, or a token count as tr.Keep(count={n})")


def _is_int(v: object) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(v, int) and not isinstance(v, bool) or type(v).__name__.startswith(("int", "uint"))


def validate_fraction(keep: object, name: str = "keep") -> float:
    """Validate a fraction: a float in (0, 1]. Ints are refused with the two unambiguous spellings."""
    if _is_int(keep):
        n = int(keep)  # type: ignore[call-overload]
        raise TypeError(f"{name}={keep!r}: " + _INT_HINT.format(eg=" (1.0 keeps everything)" if n == 1 else "", n=n))
    if isinstance(keep, bool) or not isinstance(keep, float):
        raise TypeError(f"{name} must be a float fraction in (0, 1] (or tr.Keep(count=...) for a token count), "
                        f"got {keep!r} ({type(keep).__name__})")
    if math.isnan(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(f"{name}={keep!r} is out of range: a fraction must be a float in (0, 1] "
                         f"(use tr.Keep(count=n) for a token count)")
    return float(keep)


def validate_count(count: object, name: str = "count") -> int:
    """Validate a token count: an int >= 1."""
    if not _is_int(count):
        raise TypeError(f"{name} must be an int >= 1 (a number of tokens), got {count!r} ({type(count).__name__})")
    if int(count) < 1:  # type: ignore[call-overload]
        raise ValueError(f"{name}={count!r} is out of range: a token count must be an int >= 1")
    return int(count)  # type: ignore[call-overload]


def validate_keep_value(keep: object, name: str = "keep") -> Number:
    """A method object's own ``keep``: a float fraction in (0, 1], or an int count >= 1 that only ever comes
    from ``Keep(count=n)`` (:func:`as_method_keep` converts it at the public entry points)."""
    return validate_count(keep, name) if _is_int(keep) else validate_fraction(keep, name)


def as_method_keep(keep: object) -> object:
    """What a public ``keep`` becomes inside a method object: a single-fraction ``Keep`` -> its float, a
    single-count ``Keep(count=n)`` -> the int ``n``, other ``Keep`` objects (schedules, thresholds) and
    callables (per-timestep schedules of the diffusion methods) unchanged; a float is validated; a plain int or a bool is refused (see the module docstring)."""
    if isinstance(keep, Keep):
        if keep.value is not None and keep.num_stages is None:
            return keep.value
        if keep.count is not None and keep.num_stages is None:
            return keep.count
        return keep
    if isinstance(keep, (list, tuple)):
        return Keep(tuple(keep))
    if callable(keep):  # a schedule keep(t) of the diffusion timestep; other methods refuse it themselves
        return keep
    return validate_fraction(keep)


@dataclass(frozen=True)
class Keep:
    """Token budget: fraction | count | threshold | per-stage schedule (see the module docstring).

    >>> Keep(0.5); Keep(count=64); Keep(threshold=0.01); Keep([0.7, 0.5]); Keep(count=[64, 32])
    """

    value: float | tuple[float, ...] | None = None
    threshold: float | None = None
    min_keep: int = 1
    count: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("value", "count", "threshold") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("Keep needs exactly one of a fraction (Keep(0.5)), a count (Keep(count=64)) or a "
                             f"threshold (Keep(threshold=0.01)); got {given or 'none'}")
        if self.value is not None:
            if isinstance(self.value, (list, tuple)):
                if len(self.value) == 0:
                    raise ValueError("a keep schedule must have at least one stage")
                object.__setattr__(self, "value", tuple(validate_fraction(v, "keep[stage]") for v in self.value))
            else:
                object.__setattr__(self, "value", validate_fraction(self.value))
        elif self.count is not None:
            if isinstance(self.count, (list, tuple)):
                if len(self.count) == 0:
                    raise ValueError("a count schedule must have at least one stage")
                object.__setattr__(self, "count", tuple(validate_count(v, "count[stage]") for v in self.count))
            else:
                object.__setattr__(self, "count", validate_count(self.count))
        elif not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) or \
                math.isnan(self.threshold):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        if self.min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {self.min_keep}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def of(cls, keep: KeepLike | int) -> Keep:
        """Coerce a method object's keep (float fraction, int count from ``Keep(count=n)``, a sequence of
        fractions, or a Keep) to a Keep."""
        if isinstance(keep, Keep):
            return keep
        if isinstance(keep, (list, tuple)):
            return cls(tuple(keep))
        if _is_int(keep):
            return cls(count=validate_count(keep))
        return cls(keep)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ queries
    @property
    def kind(self) -> str:
        """"fraction", "count" or "threshold"."""
        return "fraction" if self.value is not None else "count" if self.count is not None else "threshold"

    @property
    def _values(self) -> tuple[Number, ...]:
        v = self.value if self.value is not None else self.count
        return v if isinstance(v, tuple) else (v,)  # type: ignore[return-value]

    @property
    def fraction(self) -> float | None:
        """The single fraction of a fraction budget (None for counts, thresholds and schedules)."""
        return self.value if isinstance(self.value, float) else None

    @property
    def is_identity(self) -> bool:
        """True when every stage keeps everything (fraction 1.0)."""
        return self.value is not None and all(v == 1.0 for v in self._values)

    @property
    def num_stages(self) -> int | None:
        v = self.value if self.value is not None else self.count
        return len(v) if isinstance(v, tuple) else None

    def stage_value(self, stage: int = 0) -> Number:
        """A stage's fraction (float) or count (int)."""
        if self.threshold is not None:
            raise ValueError("a threshold budget has no fixed value")
        vals = self._values
        if self.num_stages is not None and not 0 <= stage < len(vals):
            raise ValueError(f"stage {stage} out of range for a schedule of {len(vals)} stages")
        return vals[stage] if self.num_stages is not None else vals[0]

    def counts(self, available: Tensor, scores: Tensor | None = None, valid: Tensor | None = None,
               stage: int = 0) -> Tensor:
        """Number of tokens that survive, per sample.

        available: (B,) reducible tokens per sample. scores/valid: (B, N), needed for a threshold budget.
        Returns (B,) long.
        """
        available = available.long()
        if self.threshold is not None:
            if scores is None or valid is None:
                raise ValueError("a threshold budget needs scores and a validity mask")
            n = ((scores >= self.threshold) & valid).sum(dim=1)
            return torch.minimum(n.clamp(min=self.min_keep), available)
        v = self.stage_value(stage)
        if isinstance(v, float):
            n = torch.round(available.double() * v).long().clamp(min=min(self.min_keep, 1))
            return torch.minimum(n, available)
        too_big = available < v
        if too_big.any():
            raise ValueError(
                f"Keep(count={v}) is larger than the sequence: a sample has only "
                f"{int(available[too_big].min())} reducible tokens (accepted: 1..{int(available.min())}, "
                f"or a fraction)"
            )
        return torch.full_like(available, v)

    def __repr__(self) -> str:
        if self.value is not None:
            return f"Keep({self.value!r})"
        if self.count is not None:
            return f"Keep(count={self.count!r})"
        return f"Keep(threshold={self.threshold!r}, min_keep={self.min_keep})"


# ---------------------------------------------------------------------------- keep as a fraction of work
def layer_work(protected: int, start: int, after: Sequence[int]) -> float:
    """The fraction of the token-layer work a schedule keeps: the mean over the layers' two halves (attention,
    then MLP, with the reduction between them) of the tokens they process, over the input tokens.

    ``start`` reducible tokens enter layer 0; ``after[l]`` remain after layer l's reduction (unchanged where
    layer l does not reduce); ``protected`` tokens (CLS) are processed everywhere."""
    if not after:
        return 1.0
    total, prev = 0, start
    for n in after:
        total += 2 * protected + prev + n
        prev = n
    return total / (2 * len(after) * (protected + start))


def closest_plan(work: Callable[[float], float], target: float, lo: float, hi: float,
                 steps: int = 48) -> tuple[float, float]:
    """For a non-decreasing ``work(p)`` on [lo, hi] (a schedule's kept work as a function of its knob), the
    knob whose work is closest to ``target`` and that work: bisection for the boundary, then the nearer side."""
    if work(hi) <= target:
        return hi, work(hi)
    if work(lo) >= target:
        return lo, work(lo)
    a, b = lo, hi  # work(a) < target <= work(b)
    for _ in range(steps):
        m = (a + b) / 2
        a, b = (m, b) if work(m) < target else (a, m)
    wa, wb = work(a), work(b)
    return (a, wa) if target - wa < wb - target else (b, wb)
