"""Training (DDPM noise prediction, Ho et al. 2020: || eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t, y) ||^2)
and the checkpoint cache of the denoisers in :mod:`.denoisers`.

Checkpoints live in ``cache_dir("diffusion", "<kind>-v<version>-<config hash>")`` (EMA weights, config, metrics):
any change of the config, the training code version or the data generator selects another directory.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..._paths import cache_dir
from ..checkpoint import atomic_write
from .data import digit_images
from .denoisers import MODEL_VERSION, ClassConditional, DenoiserConfig, default_config

__all__ = ["checkpoint_dir", "load_denoiser", "train_denoiser"]

_CHUNK = 1024  # fresh training images generated per chunk


def checkpoint_dir(config: DenoiserConfig) -> Path:
    return cache_dir("diffusion", f"{config.kind}-v{MODEL_VERSION}-{config.config_hash()}")


def _lr(step: int, config: DenoiserConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def _batches(config: DenoiserConfig):
    """Fresh (images, labels) batches: new placements and textures every chunk."""
    k = 0
    while True:
        x, y = digit_images("train", _CHUNK, seed=config.seed * 1_000_003 + k)
        for i in range(0, _CHUNK - config.batch_size + 1, config.batch_size):
            yield x[i: i + config.batch_size], y[i: i + config.batch_size]
        k += 1


def train_denoiser(config: DenoiserConfig, progress: bool = True, log: Any = None) -> dict[str, Any]:
    """Train ``config`` from scratch, save the EMA weights to :func:`checkpoint_dir`, return the metrics."""
    from diffusers import DDPMScheduler

    prev = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        torch.manual_seed(config.seed)
        model = ClassConditional(config)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        noise = DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule=config.beta_schedule)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(config.seed + 1)
        history, t0, c0, loss_avg = [], time.perf_counter(), time.process_time(), None
        batches = _batches(config)
        for step in range(config.steps):
            x0, y = next(batches)
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, config.train_timesteps, (x0.shape[0],), generator=gen)
            drop = torch.rand(y.shape, generator=gen) < config.cfg_dropout
            y = torch.where(drop, torch.full_like(y, model.null_label), y)
            for g in opt.param_groups:
                g["lr"] = _lr(step, config)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                pred = model(noise.add_noise(x0, eps, t), t, y)
            loss = F.mse_loss(pred.float(), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            decay = min(config.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm, 1.0 - decay)
            loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
            if (step + 1) % 50 == 0 or step + 1 == config.steps:
                history.append({"step": step + 1, "loss": loss_avg, "seconds": time.perf_counter() - t0})
                if progress:
                    msg = f"{config.kind} step {step + 1}/{config.steps} loss {loss_avg:.4f} {time.perf_counter() - t0:.0f}s"
                    print(msg, file=log, flush=True)
        out = checkpoint_dir(config)
        metrics = {"kind": config.kind, "config_hash": config.config_hash(), "steps": config.steps,
                   "train_time_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0,
                   "final_loss": loss_avg, "history": history,
                   "num_params": sum(p.numel() for p in model.parameters()), "num_threads": config.num_threads,
                   "checkpoint": str(out / "model.pt"),
                   "versions": {"torch": torch.__version__, "python": platform.python_version()}}
        atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config.to_dict(), indent=2)))
        atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
        atomic_write(out / "model.pt", lambda p: torch.save(ema.state_dict(), p))
        return metrics
    finally:
        torch.set_num_threads(prev)


def load_denoiser(kind: str, train_if_missing: bool = False, config: DenoiserConfig | None = None,
                  progress: bool = True) -> tuple[ClassConditional, dict[str, Any]]:
    """The cached trained denoiser ``kind`` ("dit" | "unet") in eval mode and ``{"config", "metrics", "path"}``."""
    config = config or default_config(kind)
    path = checkpoint_dir(config) / "model.pt"
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"no trained {kind} at {path}; run `tokenreduce train {kind}` "
                                    f"(CPU, well under an hour) or pass train_if_missing=True")
        train_denoiser(config, progress=progress)
    model = ClassConditional(config)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    metrics_path = path.with_name("metrics.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return model.eval(), {"config": config, "metrics": metrics, "path": path}
