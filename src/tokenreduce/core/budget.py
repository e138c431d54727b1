"""Budgets: how many tokens survive a reduction step.

``Keep`` is one of

* a **ratio** ``Keep(0.5)``: float in (0, 1], fraction of the reducible tokens of each sample that survive
  (rounded to the nearest count, at least 1);
* a **count** ``Keep(64)``: int >= 1, tokens that survive; larger than a sample's reducible tokens is an error;
* a **threshold** ``Keep(threshold=0.01)``: keep tokens whose score >= threshold (ragged: each sample keeps
  its own number, at least ``min_keep``);
* a **schedule** ``Keep([0.7, 0.7, 0.7])``: one ratio or count per stage/layer, picked with ``stage=``.

Nothing is silently clipped: an impossible budget raises ValueError naming the value and the accepted range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

__all__ = ["Keep", "KeepLike", "validate_keep_value"]

Number = int | float
KeepLike = Union["Keep", int, float, Sequence[Number]]


def validate_keep_value(keep: object, name: str = "keep") -> Number:
    """Validate one keep value: float in (0, 1] or int >= 1 (bools are rejected)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1] or an int >= 1, got {keep!r} ({type(keep).__name__})")
    if isinstance(keep, float):
        if math.isnan(keep) or not 0.0 < keep <= 1.0:
            raise ValueError(
                f"{name}={keep!r} is out of range: a ratio must be a float in (0, 1] "
                f"(use an int >= 1 for a token count)"
            )
    elif keep < 1:
        raise ValueError(f"{name}={keep!r} is out of range: a token count must be an int >= 1")
    return keep


@dataclass(frozen=True)
class Keep:
    """Token budget (ratio | count | threshold | per-stage schedule). See module docstring."""

    value: Number | tuple[Number, ...] | None = None
    threshold: float | None = None
    min_keep: int = 1

    def __post_init__(self) -> None:
        if (self.value is None) == (self.threshold is None):
            raise ValueError("Keep needs exactly one of a value (ratio/count/schedule) or threshold=")
        if self.value is not None:
            if isinstance(self.value, (list, tuple)):
                if len(self.value) == 0:
                    raise ValueError("a keep schedule must have at least one stage")
                object.__setattr__(self, "value", tuple(validate_keep_value(v, "keep[stage]") for v in self.value))
            else:
                validate_keep_value(self.value)
        elif self.threshold is not None and (not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold)):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        if self.min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {self.min_keep}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def of(cls, keep: KeepLike) -> Keep:
        """Coerce a float, int, sequence or Keep to a Keep."""
        if isinstance(keep, Keep):
            return keep
        if isinstance(keep, (list, tuple)):
            return cls(tuple(keep))
        return cls(keep)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ queries
    @property
    def is_identity(self) -> bool:
        """True when every stage keeps everything (ratio 1.0)."""
        vals = self.value if isinstance(self.value, tuple) else (self.value,)
        return self.threshold is None and all(isinstance(v, float) and v == 1.0 for v in vals)

    @property
    def num_stages(self) -> int | None:
        return len(self.value) if isinstance(self.value, tuple) else None

    def stage_value(self, stage: int = 0) -> Number:
        if isinstance(self.value, tuple):
            if not 0 <= stage < len(self.value):
                raise ValueError(f"stage {stage} out of range for a schedule of {len(self.value)} stages")
            return self.value[stage]
        if self.value is None:
            raise ValueError("a threshold budget has no fixed value")
        return self.value

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
                f"keep={v} tokens is larger than the sequence: a sample has only "
                f"{int(available[too_big].min())} reducible tokens (accepted: 1..{int(available.min())})"
            )
        return torch.full_like(available, v)
