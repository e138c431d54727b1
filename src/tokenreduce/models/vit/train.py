"""Training the reference ViT (AdamW, warm-up + cosine schedule, freshly generated images every epoch) and
loading the cached result.

One loop serves every trainer: :func:`run_steps` (a batch stream -> optimizer steps, logging each step's loss,
global gradient norm and CPU time in a :class:`TrainLog`). :func:`train_reference_vit` runs it once per epoch;
:func:`train_steps` runs one :class:`TrainRun` -- a number of steps on fresh images with a registered vision
method optionally active in every forward pass -- and serves fine-tuning (:mod:`.finetune`: from the cached
model) and training from scratch with reduction (``tokenreduce study train-reduction``: from :func:`init_model`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from tokenreduce.data.digits import generate_cluttered_digits

from ..checkpoint import atomic_write
from ..training import cached_metrics, ensure_trained, load_checkpoint, make_optimizer, torch_threads
from .config import TrainConfig, checkpoint_dir
from .evaluation import evaluate, reference_eval_set
from .model import build_reference_vit

__all__ = ["TrainLog", "TrainRun", "init_model", "load_reference_vit", "make_optimizer", "run_steps", "train_batches",
           "train_or_load_metrics", "train_reference_vit", "train_step", "train_steps"]

_TRAIN_HINT = "build it once with `tokenreduce train vit`"
#: training images are generated in chunks of this many batches
_CHUNK_BATCHES = 16


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
    for xs, ys in _train_chunks(config, epoch, batch_size * _CHUNK_BATCHES):
        for i in range(0, xs.shape[0], batch_size):
            yield xs[i : i + batch_size], ys[i : i + batch_size]


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor, y: torch.Tensor,
          label_smoothing: float, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    return loss.detach(), norm.detach()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor, y: torch.Tensor,
               label_smoothing: float, grad_clip: float) -> torch.Tensor:
    """One optimisation step on ``(x, y)`` (label-smoothed cross-entropy, gradient clipping); returns the
    loss (detached)."""
    return _step(model, opt, sched, x, y, label_smoothing, grad_clip)[0]


@dataclass
class TrainLog:
    """Per optimizer step: the loss, the global gradient norm (L2 over all parameters, before clipping) and the
    process CPU seconds of the step (forward, backward, update; data generation excluded); ``wall_s``: the
    steps' wall-clock seconds."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def cpu_s(self) -> float:
        return sum(self.step_cpu_s)

    def mean_loss(self, start: int = 0, stop: int | None = None) -> float:
        part = self.losses[start:stop]
        return sum(part) / max(1, len(part))


def run_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
              batches: Iterable[tuple[torch.Tensor, torch.Tensor]], label_smoothing: float, grad_clip: float,
              log: TrainLog | None = None, bar: Any = None, before_step: Callable[[int], None] | None = None) -> TrainLog:
    """One optimizer step (:func:`train_step`) per batch, appended to ``log`` (a new :class:`TrainLog` if None);
    ``before_step(i)`` runs before step ``i`` (counted in ``log``); ``bar``: a tqdm bar updated every step."""
    log = log if log is not None else TrainLog()
    for x, y in batches:
        if before_step is not None:
            before_step(len(log.losses))
        c0, w0 = time.process_time(), time.perf_counter()
        loss, norm = _step(model, opt, sched, x, y, label_smoothing, grad_clip)
        log.losses.append(loss.item())
        log.grad_norms.append(norm.item())
        log.step_cpu_s.append(time.process_time() - c0)
        log.wall_s += time.perf_counter() - w0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{log.losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    return log


@dataclass(frozen=True)
class TrainRun:
    """``steps`` AdamW steps of ``batch_size`` fresh images of ``data`` (its generator, seed, weight decay,
    label smoothing and gradient clipping; images from epoch ``epoch`` on, so a fine-tuning run never repeats
    the base model's), learning rate ``lr`` with linear warm-up over ``warmup_fraction`` of the steps then
    cosine decay to ``lr * min_lr_ratio``; ``method`` (a registered vision method, None: the full model)
    active at ``keep`` with ``method_kw`` in every forward pass. ``fresh_draws``: a stochastic method (one with
    a ``seed``, e.g. ``random``) draws anew at every step (seed ``data.seed * 1_000_003 + step``) instead of
    dropping the same positions all run long. ``same_prefix``: images generated in whole chunks of 16 batches,
    so that runs of one seed share their first batches whatever their length (otherwise the last, partial chunk
    is drawn at its own size)."""

    data: TrainConfig
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.01
    epoch: int = 0
    method: str | None = None
    keep: float = 1.0
    method_kw: dict[str, Any] = field(default_factory=dict)
    fresh_draws: bool = False
    same_prefix: bool = False

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The run's ``steps`` batches (same ``data.seed``: same images in the same order)."""
        chunk = _CHUNK_BATCHES if self.same_prefix else 1
        n = -(-self.steps // chunk) * chunk * self.batch_size
        data = dataclasses.replace(self.data, samples_per_epoch=n)
        return itertools.islice(train_batches(data, self.epoch, self.batch_size), self.steps)


def init_model(config: TrainConfig) -> torch.nn.Module:
    """The reference ViT of ``config`` at its random initialisation (``torch.manual_seed(config.seed)``)."""
    torch.manual_seed(config.seed)
    return build_reference_vit(**config.model_kwargs())


def train_steps(model: torch.nn.Module, run: TrainRun, progress: bool = False, desc: str = "train") -> TrainLog:
    """Train ``model`` (in place, train mode) for ``run``; returns the :class:`TrainLog`. The method, if any, is
    applied for the run and removed afterwards (the model comes back unpatched)."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    import tokenreduce as tr

    opt, sched = make_optimizer(model, run.lr, run.data.weight_decay, run.steps, run.warmup_fraction,
                                run.min_lr_ratio)
    bar = tqdm(total=run.steps, desc=desc, disable=not progress, dynamic_ncols=True)
    handle = tr.apply(model, run.method, keep=run.keep, **run.method_kw) if run.method else nullcontext()
    before = None
    if run.fresh_draws and run.method and hasattr(handle.method, "seed"):
        def before(i: int) -> None:
            handle.method.seed = run.data.seed * 1_000_003 + i
    with handle:
        model.train()
        log = run_steps(model, opt, sched, run.batches(), run.data.label_smoothing, run.data.grad_clip, bar=bar,
                        before_step=before)
    bar.close()
    return log


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
        model = init_model(config)
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
            epoch_log = run_steps(model, opt, sched, train_batches(config, epoch, config.batch_size),
                                  config.label_smoothing, config.grad_clip, bar=bar)
            train_loss = epoch_log.mean_loss()
            train_time += time.perf_counter() - t0
            val = evaluate(model, val_x, val_y, config.eval_batch_size)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val["acc"],
                            "val_loss": val["loss"], "train_time_s": train_time})
            bar.set_postfix(epoch=epoch + 1, train_loss=f"{train_loss:.3f}", val_acc=f"{val['acc']:.4f}")
            if not progress:
                continue
            bar.write(f"epoch {epoch + 1}/{config.epochs}: train_loss={train_loss:.4f} "
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
    metrics = cached_metrics(checkpoint_dir(config) / "model.pt", lambda: train_reference_vit(config, progress=progress),
                             force)
    keys = ("val_acc", "test_acc", "n_val", "n_test", "train_time_s", "total_time_s", "num_threads", "checkpoint",
            "cached")
    return {k: metrics.get(k) for k in keys}
