"""Training the learned vision methods (``dynamicvit``, ``diffrate``) and caching what they load.

``tokenreduce train vit --reduce dynamicvit --keep 0.5`` (or ``diffrate``) trains the method's parts on the
cached reference ViT, frozen, on freshly generated cluttered digits, and stores them where ``tr.apply(model,
method, keep=0.5)`` finds them: under the model's weights fingerprint and the keep
(:func:`~tokenreduce.methods.vit.learned.artifact_dir`), with ``config.json`` and ``metrics.json``. The same
config trains the same parts (seeded data, init and Gumbel noise; one thread); a cached result is reused unless
the config changed or ``force``. :func:`train_learned` trains any timm ViT on any batches (tests, other models).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...checkpoint import JsonFields, StoredConfig, atomic_write, save_checkpoint, short_hash
from ...training import torch_threads, warmup_cosine
from ..config import TrainConfig, check_positive_ints
from .diffrate import DiffRateTrainer
from .dynamicvit import DynamicViTTrainer

__all__ = ["LEARNED", "LearnedConfig", "learned_dir", "train_learned", "train_learned_reference"]

#: learned method -> (trainer class, its default learning rate): DynamicViT's predictors 1e-3 (AdamW at our
#: batch of 32), DiffRate's rates 0.05, 5x its code's ``--arch-lr`` 0.01 for a run of 80 steps instead of 3
#: ImageNet epochs (~3,700 steps of 1,024)
LEARNED: dict[str, tuple[type, float]] = {"dynamicvit": (DynamicViTTrainer, 1e-3), "diffrate": (DiffRateTrainer, 5e-2)}
#: bump when the training code changes what it learns
LEARNED_VERSION = 1
#: training images come from epochs numbered from here (never the base model's or fine-tuning's images)
_EPOCH_OFFSET = 700


@dataclass(frozen=True)
class LearnedConfig(StoredConfig):
    """Training of a learned method's parts at ``keep`` on a frozen ViT.

    ``steps`` AdamW steps (no weight decay) of ``batch_size`` images, learning rate ``lr`` (None: the method's,
    :data:`LEARNED`) with linear warm-up over ``warmup_fraction`` of the steps, cosine decay to ``lr *
    min_lr_ratio``; ``label_smoothing`` as the base model's training. DynamicViT: ``ratio_weight``,
    ``distill_weight`` (the paper's 2 and 0.5). DiffRate: ``flops_weight`` (the paper's lambda on the FLOPs
    fraction, see :class:`DiffRateTrainer`), ``granularity`` (the gap between candidate counts, its code's 4).
    ``base``: the reference ViT whose training images (generator config) are used. ``num_threads`` and
    ``eval_batch_size`` only change speed.
    """

    method: str = "dynamicvit"
    keep: float = 0.5
    steps: int = 80
    batch_size: int = 32
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    flops_weight: float = 100.0
    granularity: int = 4
    seed: int = 1
    base: TrainConfig = field(default_factory=TrainConfig)
    num_threads: int = 1
    eval_batch_size: int = 250

    _HASH_EXCLUDED: ClassVar[frozenset[str]] = frozenset({"num_threads", "eval_batch_size", "base"})
    _JSON_FIELDS: ClassVar[JsonFields] = {"base": (dict, TrainConfig.from_dict)}

    def __post_init__(self) -> None:
        if self.method not in LEARNED:
            raise ValueError(f"method={self.method!r} is not a learned vision method; accepted: {sorted(LEARNED)}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, float) or not 0.0 < self.keep < 1.0:
            raise ValueError(f"keep={self.keep!r} is invalid: a learned method trains at a float fraction in (0, 1) "
                             f"(1.0 is the unreduced model, nothing to learn)")
        check_positive_ints(self, ("steps", "batch_size", "granularity", "num_threads", "eval_batch_size"))
        if self.lr is None:
            object.__setattr__(self, "lr", LEARNED[self.method][1])
        for name in ("lr", "min_lr_ratio", "warmup_fraction", "label_smoothing"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0 or (name == "lr" and v == 0.0):
                raise ValueError(f"{name}={v!r} is out of range: must be in {'(' if name == 'lr' else '['}0, 1]")
        for name in ("ratio_weight", "distill_weight", "flops_weight", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 0")

    def config_hash(self) -> str:
        return short_hash({**self.hash_payload(), "_version": LEARNED_VERSION}, compact=True)

    def train_config(self) -> TrainConfig:
        """The base config with this training's seed and image count: the source of its training images."""
        return dataclasses.replace(self.base, seed=self.seed, samples_per_epoch=self.steps * self.batch_size,
                                   num_threads=self.num_threads)


def learned_dir(model: nn.Module, config: LearnedConfig) -> Path:
    """Where ``config``'s trained parts for ``model`` are cached (the place ``tr.apply`` loads them from)."""
    from ....methods.vit.learned import artifact_dir, weights_fingerprint

    return artifact_dir(config.method, weights_fingerprint(model), config.keep)


@torch.no_grad()
def _teacher(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The unreduced model's (logits, final normalised tokens): DynamicViT's distillation targets."""
    feats = model.forward_features(images)
    return model.forward_head(feats), feats


def train_learned(model: nn.Module, config: LearnedConfig, batches: Iterable[tuple[Tensor, Tensor]],
                  progress: bool = False, evaluate: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train ``config.method``'s parts for the timm ViT ``model`` (frozen: its weights, and so its fingerprint,
    do not change) on ``batches`` (at least ``config.steps`` of them), save them where ``tr.apply`` finds them,
    and return the metrics (``evaluate()``'s result merged in, run after saving; ``train_cpu_s``: the process
    CPU time of training, its cost on a shared machine)."""
    from tqdm.auto import tqdm

    from ....methods.vit.learned import ARTIFACT, weights_fingerprint

    trainer_cls, _ = LEARNED[config.method]
    fingerprint = weights_fingerprint(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    with torch_threads(config.num_threads):
        t_start, cpu_start = time.perf_counter(), time.process_time()
        torch.manual_seed(config.seed)
        model.eval().requires_grad_(False)  # frozen backbone; eval: batch-norm statistics stay
        try:
            trainer = trainer_cls(model, config.keep, config)
            params = trainer.parameters()
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(
                config.steps, max(1, round(config.warmup_fraction * config.steps)), config.min_lr_ratio))
            history: list[dict[str, float]] = []
            bar = tqdm(total=config.steps, desc=f"train {config.method}@{config.keep}", disable=not progress,
                       dynamic_ncols=True)
            for step, (x, y) in zip(range(config.steps), batches):
                teacher = _teacher(model, x) if trainer.uses_teacher else None
                loss, parts = trainer.loss(x, y, teacher)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                sched.step()
                history.append({"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), **parts})
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.close()
            if len(history) < config.steps:
                raise ValueError(f"batches ran out after {len(history)} of steps={config.steps}")
            train_time, train_cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(grads[n])
            model.train(was_training)
        if weights_fingerprint(model) != fingerprint:  # pragma: no cover - a frozen backbone cannot change
            raise RuntimeError("the backbone's weights changed while training a learned method")
        out = learned_dir(model, config)
        out.mkdir(parents=True, exist_ok=True)
        artifact = trainer.artifact()
        atomic_write(out / ARTIFACT, lambda p: torch.save(artifact, p))
        window = max(1, len(history) // 10)
        metrics: dict[str, Any] = {
            "method": config.method, "keep": config.keep, "steps": config.steps, "fingerprint": fingerprint,
            "config_hash": config.config_hash(), "train_time_s": train_time,
            "train_cpu_s": train_cpu, "num_threads": config.num_threads,
            "first_loss": sum(h["loss"] for h in history[:window]) / window,
            "last_loss": sum(h["loss"] for h in history[-window:]) / window,
            "learned": {k: v for k, v in artifact.items() if isinstance(v, list)},
            "history": history[:: max(1, len(history) // 50)], "torch": torch.__version__,
        }
        if evaluate is not None:
            metrics.update(evaluate())
        metrics["total_time_s"] = time.perf_counter() - t_start
        save_checkpoint(out, config, metrics)
        return metrics


def train_learned_reference(config: LearnedConfig, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``config`` on the cached reference ViT (fresh training images), evaluate it with the method applied
    on the val/test sets, cache it; or return the cached metrics if this config was trained (``cached``)."""
    import tokenreduce as tr

    from ..evaluation import evaluate, reference_eval_set
    from ..train import load_reference_vit, train_batches

    model, _ = load_reference_vit(config=config.base)
    out = learned_dir(model, config)
    metrics_path = out / "metrics.json"
    if metrics_path.is_file() and not force:
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("config_hash") == config.config_hash():
            return {**_summary(metrics), "cached": True}

    def evaluate_val() -> dict[str, Any]:
        """Validation accuracy with the method applied (loaded from the cache, as a user would); the test set is
        the benchmark's (``tokenreduce bench vit``), against the unreduced model in the same run."""
        x, y = reference_eval_set("val", config.base)
        with tr.apply(model, config.method, keep=config.keep) as h:
            red = evaluate(model, x, y, config.eval_batch_size)
            st = h.stats
        return {"val_acc": red["acc"], "val_loss": red["loss"], "keep_achieved": st.keep_achieved,
                "tokens_attn": st.tokens_attn, "tokens_mlp": st.tokens_mlp,
                "flops_fraction": st.flops["gflops"] / st.flops["gflops_unreduced"] if st.flops else None}

    batches = train_batches(config.train_config(), _EPOCH_OFFSET, config.batch_size)
    metrics = train_learned(model, config, batches, progress=progress, evaluate=evaluate_val)
    return {**_summary(metrics), "cached": False}


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "history"}
