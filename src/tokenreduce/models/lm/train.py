"""Training decoder LMs: a generic loop (:func:`train_causal_lm`: any Hugging Face causal LM, any batches of
token ids, a pluggable loss such as :func:`tokenreduce.rho1_loss`) and the small LM built on it
(:func:`train_small_lm`, cached; :func:`load_small_lm`)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...core.loss import token_cross_entropy
from ..checkpoint import atomic_write, save_checkpoint
from ..training import cached_metrics, ensure_trained, load_checkpoint, make_optimizer, torch_threads
from .config import LMConfig, OptimConfig, checkpoint_dir
from .data import Batch, corpus_splits, encode_documents, eval_windows, random_window_batches
from .evaluation import perplexity
from .model import build_lm
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = ["LossFn", "TrainLog", "causal_lm_loss", "load_small_lm", "train_causal_lm", "train_or_load_metrics",
           "train_small_lm"]

_TRAIN_HINT = "build it once with `tokenreduce train lm` (about 10 minutes on one CPU thread)"
#: ``loss_fn(model, batch) -> loss`` or ``(loss, {name: value})``: extra values are logged per step
LossFn = Callable[[torch.nn.Module, Batch], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The ordinary loss: mean cross-entropy of every valid next token (HF shift convention, -100 ignored)."""
    losses, valid = token_cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    return losses.sum() / valid.sum().clamp(min=1)


@dataclass
class TrainLog:
    """Per step: the loss optimised, the global gradient norm before clipping, the learning rate, and the extra
    values the loss returned; ``evals``: ``(step, values)`` of the periodic evaluation; ``tokens``: input tokens
    seen; ``seconds``: the loop's wall-clock (evaluations excluded)."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    extras: dict[str, list[float]] = field(default_factory=dict)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


def train_causal_lm(model: torch.nn.Module, batches: Iterable[Batch], steps: int, optim: OptimConfig,
                    loss_fn: LossFn = causal_lm_loss, evaluate: Callable[[], dict[str, float]] | None = None,
                    eval_every: int = 0, progress: bool = False, desc: str = "train LM") -> TrainLog:
    """Train ``model`` in place for ``steps`` optimiser steps on the first ``steps`` of ``batches``.

    AdamW with warm-up + cosine decay and gradient clipping (``optim``); ``loss_fn(model, batch)`` gives the
    loss (default :func:`causal_lm_loss`; e.g. a closure calling :func:`tokenreduce.rho1_loss` with a reference
    model's logits). ``evaluate()`` runs every ``eval_every`` steps and after the last one (model in eval mode,
    then back to train mode). Returns the :class:`TrainLog`.
    """
    from tqdm.auto import tqdm

    opt, sched = make_optimizer(model, optim.lr, optim.weight_decay, steps, optim.warmup_fraction,
                                optim.min_lr_ratio)
    log = TrainLog()
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
    it = iter(batches)
    t_loop = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(it)
        out = loss_fn(model, batch)
        loss, extras = out if isinstance(out, tuple) else (out, {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        log.lr.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        log.loss.append(loss.item())
        log.grad_norm.append(norm.item())
        for k, v in extras.items():
            log.extras.setdefault(k, []).append(float(v))
        log.tokens += batch["input_ids"].numel()
        bar.update(1)
        bar.set_postfix(loss=f"{log.loss[-1]:.3f}")
        if evaluate is not None and (step == steps or (eval_every and step % eval_every == 0)):
            log.seconds += time.perf_counter() - t_loop
            values = evaluate()
            model.train()
            log.evals.append((step, values))
            bar.write(f"{desc} step {step}/{steps}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
            t_loop = time.perf_counter()
    log.seconds += time.perf_counter() - t_loop
    bar.close()
    return log


def _save(out: Path, model: torch.nn.Module, tokenizer: Any, config: LMConfig, metrics: dict[str, Any]) -> None:
    atomic_write(out / "tokenizer.json", lambda p: tokenizer.backend_tokenizer.save(str(p)))
    save_checkpoint(out, config, metrics, model)


def train_small_lm(config: LMConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the tokenizer and the small LM of ``config`` on the ``train`` split, evaluate perplexity on the
    ``stream`` split while training (a curve only: nothing is selected on it) and on the held-out ``test``
    split at the end, cache everything in :func:`~.config.checkpoint_dir`, return the metrics."""
    import transformers

    config = config or LMConfig()
    with torch_threads(config.num_threads):
        t0 = time.perf_counter()
        splits = corpus_splits()
        tok = train_tokenizer(splits["train"], config.vocab_size)
        ids = {k: encode_documents(tok, v) for k, v in splits.items()}
        val = eval_windows(ids["stream"], config.seq_len, 256)
        torch.manual_seed(config.seed)
        model = build_lm(config)
        batches = random_window_batches(ids["train"], config.batch_size, config.seq_len, config.seed)
        log = train_causal_lm(model, batches, config.steps, config.optim,
                              evaluate=lambda: {"val_ppl": perplexity(model, val, config.eval_batch_size)},
                              eval_every=config.eval_every, progress=progress, desc="train small LM")
        test = eval_windows(ids["test"], config.seq_len)
        out = checkpoint_dir(config)
        metrics: dict[str, Any] = {
            "test_ppl": perplexity(model, test, config.eval_batch_size),
            "test_tokens": int(test.numel()),
            "val_ppl": log.evals[-1][1]["val_ppl"],
            "train_tokens_corpus": int(ids["train"].numel()),
            "split_tokens": {k: int(v.numel()) for k, v in ids.items()},
            "split_documents": {k: len(v) for k, v in splits.items()},
            "tokens_seen": log.tokens,
            "epochs": log.tokens / ids["train"].numel(),
            "final_train_loss": sum(log.loss[-50:]) / len(log.loss[-50:]),
            "history": [{"step": s, **v} for s, v in log.evals],
            "train_time_s": log.seconds,
            "total_time_s": time.perf_counter() - t0,
            "num_params": sum(p.numel() for p in model.parameters()),
            "num_threads": config.num_threads,
            "config_hash": config.config_hash(),
            "checkpoint": str(out / "model.pt"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
        }
        _save(out, model.eval(), tok, config, metrics)
        return metrics


def load_small_lm(train_if_missing: bool = False, config: LMConfig | None = None,
                  progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, info)`` of the cached small LM (eval mode); ``info``: config, metrics, path.

    Raises:
        FileNotFoundError: If it is not cached and ``train_if_missing`` is False (names the command).
    """
    config = config or LMConfig()
    path = checkpoint_dir(config) / "model.pt"
    ensure_trained(path, train_if_missing, lambda: train_small_lm(config, progress=progress),
                   f"no trained small LM at {path}; {_TRAIN_HINT}, or call load_small_lm(train_if_missing=True)")
    model = build_lm(config)
    metrics = load_checkpoint(model, path)
    return model.eval(), load_tokenizer(path.with_name("tokenizer.json")), {"config": config, "metrics": metrics,
                                                                              "path": path}


def train_or_load_metrics(config: LMConfig | None = None, force: bool = False, progress: bool = True) -> dict:
    """Metrics summary of the cached small LM of ``config``, training it first if missing or ``force``."""
    config = config or LMConfig()
    metrics = cached_metrics(checkpoint_dir(config) / "model.pt", lambda: train_small_lm(config, progress=progress),
                             force)
    keys = ("test_ppl", "val_ppl", "test_tokens", "split_tokens", "epochs", "num_params", "train_time_s",
            "total_time_s", "num_threads", "checkpoint", "cached")
    return {k: metrics.get(k) for k in keys}
