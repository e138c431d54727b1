"""What the trainers of :mod:`tokenreduce.models` share: the warm-up + cosine learning-rate schedule and a
temporary torch thread count."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads", "warmup_cosine"]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each step (a ``LambdaLR`` lambda): linear warm-up to 1 over
    ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps`` (held there afterwards)."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return fn


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
