"""What the trainers of :mod:`tokenreduce.models` share: AdamW with the warm-up + cosine learning-rate schedule,
a temporary torch thread count and loading a checkpoint's weights and metrics."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["cached_metrics", "ensure_trained", "load_checkpoint", "make_optimizer", "torch_threads", "warmup_cosine"]


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


def load_checkpoint(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Load the state dict at ``path`` (``model.pt``) into ``model``; return the ``metrics.json`` beside it
    (``{}`` if there is none)."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    metrics_path = path.with_name("metrics.json")
    return json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}


def cached_metrics(path: Path, train: Callable[[], dict[str, Any]], force: bool = False) -> dict[str, Any]:
    """The ``metrics.json`` beside the checkpoint ``path`` (``model.pt``) with ``cached=True``, or, when either file
    is missing or ``force``, the metrics ``train()`` returns with ``cached=False`` (a ``train`` command's summary)."""
    metrics_path = path.with_name("metrics.json")
    if path.is_file() and metrics_path.is_file() and not force:
        return {**json.loads(metrics_path.read_text()), "cached": True}
    return {**train(), "cached": False}


def ensure_trained(path: Path, train_if_missing: bool, train: Callable[[], object], missing: str) -> None:
    """Make sure the checkpoint ``path`` exists: call ``train()`` if it is missing and ``train_if_missing``,
    else raise ``FileNotFoundError(missing)`` (which should name the command that builds it)."""
    if path.is_file():
        return
    if not train_if_missing:
        raise FileNotFoundError(missing)
    train()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-d params (norms, biases), pos_embed, cls_token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in ("pos_embed", "cls_token") or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int,
                   warmup_fraction: float, min_lr_ratio: float):
    """AdamW (no decay on norms, biases, position embedding, CLS token) and its warm-up + cosine schedule."""
    warmup = max(1, round(warmup_fraction * total_steps))
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, warmup, min_lr_ratio))
    return opt, sched
