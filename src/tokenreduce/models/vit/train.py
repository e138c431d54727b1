"""Training the reference ViT (AdamW, warm-up + cosine schedule, freshly generated images every epoch) and
loading the cached result."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from tokenreduce.data.digits import generate_cluttered_digits

from ..checkpoint import atomic_write
from ..training import ensure_trained, load_checkpoint, make_optimizer, torch_threads
from .config import TrainConfig, checkpoint_dir
from .evaluation import evaluate, reference_eval_set
from .model import build_reference_vit

__all__ = ["load_reference_vit", "make_optimizer", "train_batches", "train_or_load_metrics", "train_reference_vit",
           "train_step"]

_TRAIN_HINT = "build it once with `tokenreduce train vit`"


def _train_chunks(config: TrainConfig, epoch: int, chunk_size: int):
    """Yield freshly generated ``(images, labels)`` chunks covering one epoch."""
    n_chunks = -(-config.samples_per_epoch // chunk_size)
    for k in range(n_chunks):
        n = min(chunk_size, config.samples_per_epoch - k * chunk_size)
        seed = config.seed * 1_000_003 + epoch * 1_000 + k
        batch = generate_cluttered_digits("train", n, seed=seed, config=config.data)
        yield batch.images, batch.labels


def train_batches(config: TrainConfig, epoch: int, batch_size: int):
    """Yield the ``(images, labels)`` training batches of one epoch of ``config`` (fresh images, generated
    in chunks of 16 batches)."""
    for xs, ys in _train_chunks(config, epoch, batch_size * 16):
        for i in range(0, xs.shape[0], batch_size):
            yield xs[i : i + batch_size], ys[i : i + batch_size]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor, y: torch.Tensor,
               label_smoothing: float, grad_clip: float) -> torch.Tensor:
    """One optimisation step on ``(x, y)`` (label-smoothed cross-entropy, gradient clipping); returns the
    loss (detached)."""
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    return loss.detach()


def _save(out: Path, model: torch.nn.Module, config: Any, metrics: dict[str, Any]) -> None:
    """Save ``model.pt`` (state_dict), ``config.json`` and ``metrics.json`` into ``out``."""
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config.to_dict(), indent=2)))
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
    atomic_write(out / "model.pt", lambda p: torch.save(model.state_dict(), p))


def train_reference_vit(config: TrainConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the reference ViT, evaluate it on val/test, cache it, return the metrics.

    Every epoch regenerates its training images (new placements, clutter and base
    digit order), which acts as strong augmentation. Uses ``config.num_threads``
    torch threads (restored afterwards). Shows a tqdm bar if ``progress``.

    Returns:
        Metrics dict: ``val_acc``, ``test_acc``, ``val_loss``, ``test_loss``,
        ``train_time_s`` (training loop only), ``total_time_s``, ``steps``,
        ``history`` (per-epoch train loss and val accuracy), ``config_hash``,
        ``checkpoint`` and library versions.
    """
    import timm
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    with torch_threads(config.num_threads):
        t_start = time.perf_counter()
        torch.manual_seed(config.seed)
        model = build_reference_vit(**config.model_kwargs())
        steps_per_epoch = -(-config.samples_per_epoch // config.batch_size)
        total_steps = config.epochs * steps_per_epoch
        opt, sched = make_optimizer(model, config.lr, config.weight_decay, total_steps, config.warmup_fraction,
                                    config.min_lr_ratio)
        val_x, val_y = reference_eval_set("val", config)
        history: list[dict[str, float]] = []
        train_time = 0.0
        bar = tqdm(total=total_steps, desc="train reference ViT", disable=not progress, dynamic_ncols=True)
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            model.train()
            loss_sum, n_seen = 0.0, 0
            for x, y in train_batches(config, epoch, config.batch_size):
                loss = train_step(model, opt, sched, x, y, config.label_smoothing, config.grad_clip)
                loss_sum += loss.item() * x.shape[0]
                n_seen += x.shape[0]
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            train_time += time.perf_counter() - t0
            val = evaluate(model, val_x, val_y, config.eval_batch_size)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / n_seen, "val_acc": val["acc"],
                            "val_loss": val["loss"], "train_time_s": train_time})
            bar.set_postfix(epoch=epoch + 1, train_loss=f"{loss_sum / n_seen:.3f}", val_acc=f"{val['acc']:.4f}")
            if not progress:
                continue
            bar.write(f"epoch {epoch + 1}/{config.epochs}: train_loss={loss_sum / n_seen:.4f} "
                      f"val_acc={val['acc']:.4f} ({train_time:.0f}s)")
        bar.close()
        test_x, test_y = reference_eval_set("test", config)
        test = evaluate(model, test_x, test_y, config.eval_batch_size)
        out = checkpoint_dir(config)
        metrics: dict[str, Any] = {
            "val_acc": history[-1]["val_acc"],
            "val_loss": history[-1]["val_loss"],
            "test_acc": test["acc"],
            "test_loss": test["loss"],
            "n_val": int(val_y.shape[0]),
            "n_test": int(test_y.shape[0]),
            "train_time_s": train_time,
            "total_time_s": time.perf_counter() - t_start,
            "steps": total_steps,
            "train_samples_seen": config.epochs * config.samples_per_epoch,
            "num_params": sum(p.numel() for p in model.parameters()),
            "num_threads": config.num_threads,
            "history": history,
            "config_hash": config.config_hash(),
            "checkpoint": str(out / "model.pt"),
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        }
        _save(out, model.eval(), config, metrics)
        return metrics


def load_reference_vit(
    train_if_missing: bool = False, config: TrainConfig | None = None, progress: bool = True
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Load the cached reference ViT (eval mode) and an info dict.

    Args:
        train_if_missing: Train (and cache) it if no checkpoint exists.
        config: Which model (default :class:`TrainConfig`); selects the checkpoint by hash.
        progress: Progress bar when training.

    Returns:
        ``(model, info)`` with ``info = {"config": TrainConfig, "metrics": dict, "path": Path}``.

    Raises:
        FileNotFoundError: If the checkpoint is missing and ``train_if_missing`` is False.
    """
    config = config or TrainConfig()
    path = checkpoint_dir(config) / "model.pt"
    ensure_trained(path, train_if_missing, lambda: train_reference_vit(config, progress=progress),
                   f"no trained reference ViT at {path}; {_TRAIN_HINT} (CPU only; tens of minutes), "
                   "or call load_reference_vit(train_if_missing=True)")
    model = build_reference_vit(**config.model_kwargs())
    metrics = load_checkpoint(model, path)
    return model.eval(), {"config": config, "metrics": metrics, "path": path}


def train_or_load_metrics(config: TrainConfig | None = None, force: bool = False, progress: bool = True) -> dict:
    """Metrics summary of the cached checkpoint of ``config``, training it first if missing or ``force``."""
    config = config or TrainConfig()
    out = checkpoint_dir(config)
    if (out / "model.pt").is_file() and (out / "metrics.json").is_file() and not force:
        metrics = json.loads((out / "metrics.json").read_text())
        metrics["cached"] = True
    else:
        metrics = train_reference_vit(config, progress=progress)
        metrics["cached"] = False
    keys = ("val_acc", "test_acc", "n_val", "n_test", "train_time_s", "total_time_s", "num_threads", "checkpoint",
            "cached")
    return {k: metrics.get(k) for k in keys}
