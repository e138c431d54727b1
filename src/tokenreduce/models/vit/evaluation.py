"""The reference ViT's held-out sets and its accuracy on them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenreduce.data.digits import generate_cluttered_digits

from .config import TrainConfig

__all__ = ["evaluate", "reference_eval_set"]


def reference_eval_set(split: str, config: TrainConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact held-out images/labels behind the reported ``val``/``test`` metrics."""
    config = config or TrainConfig()
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r} is invalid: must be 'val' or 'test'")
    n = config.val_samples if split == "val" else config.test_samples
    batch = generate_cluttered_digits(split, n, seed=config.eval_seed, config=config.data)
    return batch.images, batch.labels


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (put in eval mode) on a set."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length")
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i : i + batch_size])
        y = labels[i : i + batch_size]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    n = max(1, images.shape[0])
    return {"acc": correct / n, "loss": loss_sum / n}
