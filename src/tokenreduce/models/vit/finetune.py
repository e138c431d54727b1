"""Reduction-aware fine-tuning of the reference ViT: a registered vision method is active in the forward pass
while the cached reference ViT trains on (fresh) cluttered digits, as EViT (Liang et al., ICLR 2022, Sec. 3.3)
and ToMe (Bolya et al., ICLR 2023, Sec. 4) fine-tune their models. ToMe's merge is a weighted average of
token features (differentiable in them; the bipartite matching itself is not), EViT's top-k gather keeps the
gradients of the kept tokens and of the fused one.

The result is cached like the base model, under ``reference_vit/finetune-<hash>`` where the hash covers the
base model's hash and every setting that changes the weights (:class:`FinetuneConfig`), and loads with
:func:`load_finetuned_vit` (an unpatched model: apply the method with ``tr.apply(model, method, keep=keep)``
to run it as it was trained) or, in ``tokenreduce bench vit``, with ``--model finetune:<method>:<keep>``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from tokenreduce._paths import cache_dir

from ..checkpoint import JsonFields, StoredConfig, short_hash
from ..training import ensure_trained, load_checkpoint, torch_threads
from .config import MODEL_VERSION, TrainConfig, check_positive_ints
from .evaluation import evaluate, reference_eval_set
from .model import build_reference_vit
from .train import TrainLog, TrainRun, _save, load_reference_vit, train_steps

__all__ = ["FINETUNE_VERSION", "FinetuneConfig", "checked_train_steps", "finetune_dir", "finetune_reference_vit",
           "load_finetuned_vit", "parse_finetune_spec"]

#: Bump when the fine-tuning code changes in a way that changes the weights.
FINETUNE_VERSION = 1
#: The training-image seeds of fine-tuning use epochs from here on, so they never repeat the base model's
#: (whose epochs count from 0; see ``train._train_chunks``).
_EPOCH_OFFSET = 500
_SPEC_HELP = "finetune:<method>:<keep>, e.g. finetune:tome:0.4"


def _vision_methods() -> list[str]:
    import tokenreduce as tr

    return [r["name"] for r in tr.methods("vit-layers") if not r["trained_by"]]  # learned ones: models/vit/learned


@dataclass(frozen=True)
class FinetuneConfig(StoredConfig):
    """Fine-tuning of the reference ViT ``base`` with vision method ``method`` at budget ``keep`` (a fraction
    of the token-block work in (0, 1], as everywhere for ``vit-layers``) and ``method_kw`` active.

    ``steps`` AdamW steps of ``batch_size`` freshly generated images (seeded by ``seed``), learning rate
    ``lr`` with linear warm-up over ``warmup_fraction`` of the steps then cosine decay to ``lr *
    min_lr_ratio``; weight decay, label smoothing and gradient clipping as the base model's training.
    ``num_threads``/``eval_batch_size`` only change speed and are not hashed.
    """

    method: str = "tome"
    keep: float = 0.4
    method_kw: dict[str, Any] = field(default_factory=dict)
    base: TrainConfig = field(default_factory=TrainConfig)
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4
    min_lr_ratio: float = 0.01
    warmup_fraction: float = 0.05
    seed: int = 1
    num_threads: int = 2
    eval_batch_size: int = 250

    _HASH_EXCLUDED: ClassVar[frozenset[str]] = frozenset({"num_threads", "eval_batch_size", "base"})
    _JSON_FIELDS: ClassVar[JsonFields] = {"base": (dict, TrainConfig.from_dict)}

    def __post_init__(self) -> None:
        methods = _vision_methods()
        from .learned import LEARNED

        if self.method in LEARNED:
            raise ValueError(f"method={self.method!r} is a learned method: its parts train on the frozen model with "
                             f"`tokenreduce train vit --reduce {self.method} --keep K` (models/vit/learned), not by "
                             f"fine-tuning the model")
        if self.method not in methods:
            raise ValueError(f"method={self.method!r} cannot fine-tune the reference ViT: must be a vision "
                             f"(vit-layers) method, one of {methods}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, float) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep={self.keep!r} is invalid: fine-tuning takes a float fraction in (0, 1] "
                             "(e.g. 0.4)")
        check_positive_ints(self, ("steps", "batch_size", "num_threads", "eval_batch_size"))
        for name, value in (("lr", self.lr), ("min_lr_ratio", self.min_lr_ratio),
                            ("warmup_fraction", self.warmup_fraction)):
            if not 0.0 <= value <= 1.0 or (name == "lr" and value == 0.0):
                raise ValueError(f"{name}={value!r} is out of range: must be in {'(' if name == 'lr' else '['}0, 1]")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed!r} is invalid: must be a non-negative int")

    def config_hash(self) -> str:
        """Short stable hash of the base model's hash and every fine-tuning setting that changes the weights."""
        payload = self.hash_payload()
        payload["base_hash"] = self.base.config_hash()
        payload["_versions"] = {"model": MODEL_VERSION, "finetune": FINETUNE_VERSION}
        return short_hash(payload, compact=True)

    def train_config(self) -> TrainConfig:
        """The base config with this fine-tuning's seed and image count: the source of its training images."""
        return dataclasses.replace(self.base, seed=self.seed, samples_per_epoch=self.steps * self.batch_size,
                                   num_threads=self.num_threads)

    def train_run(self) -> TrainRun:
        """The run of :func:`~.train.train_steps` this fine-tuning is (images from epoch 500 on)."""
        return TrainRun(self.train_config(), self.steps, self.batch_size, self.lr, self.warmup_fraction,
                        self.min_lr_ratio, _EPOCH_OFFSET, self.method, self.keep, dict(self.method_kw))


def finetune_dir(config: FinetuneConfig) -> Path:
    """Cache directory of the fine-tuned checkpoint of ``config`` (not created: fine-tuning creates it)."""
    return cache_dir("reference_vit") / f"finetune-{config.config_hash()}"


def parse_finetune_spec(spec: str, **overrides: Any) -> FinetuneConfig:
    """``"finetune:<method>:<keep>"`` -> :class:`FinetuneConfig` (``overrides``: its other fields)."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "finetune":
        raise ValueError(f"model={spec!r} is invalid: must be 'reference' or {_SPEC_HELP}")
    try:
        keep = float(parts[2])
    except ValueError:
        raise ValueError(f"keep={parts[2]!r} in model={spec!r} is not a number: {_SPEC_HELP}") from None
    return FinetuneConfig(method=parts[1], keep=keep, **overrides)


def checked_train_steps(model: torch.nn.Module, run: TrainRun, progress: bool = False,
                        desc: str = "train") -> TrainLog:
    """:func:`~.train.train_steps`, with an error naming the method if its forward pass is not differentiable."""
    try:
        return train_steps(model, run, progress, desc)
    except RuntimeError as e:
        if "grad" not in str(e) and "in-place" not in str(e) and "inplace" not in str(e):
            raise
        raise RuntimeError(f"method {run.method!r} cannot be fine-tuned (nor trained with): its forward pass is not "
                           f"differentiable ({e})") from e


def finetune_reference_vit(config: FinetuneConfig | None = None, progress: bool = True,
                           model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Fine-tune the cached reference ViT ``config.base`` with ``config.method`` at ``config.keep`` active in
    every forward pass, evaluate it (with the method) on val/test, cache it, return the metrics.

    ``model``: start from this model instead of loading the cached base (tests). Raises ``FileNotFoundError``
    if the base model is not cached, ``RuntimeError`` naming the method if it cannot be differentiated.
    """
    import tokenreduce as tr

    config = config or FinetuneConfig()
    with torch_threads(config.num_threads):
        t_start = time.perf_counter()
        if model is None:
            model, _ = load_reference_vit(config=config.base)
        torch.manual_seed(config.seed)
        val_x, val_y = reference_eval_set("val", config.base)
        test_x, test_y = reference_eval_set("test", config.base)
        t0 = time.perf_counter()
        losses = checked_train_steps(model, config.train_run(), progress,
                                     f"fine-tune reference ViT ({config.method}@{config.keep})").losses
        train_time = time.perf_counter() - t0
        with tr.apply(model, config.method, keep=config.keep, **config.method_kw):
            val, test = evaluate(model, val_x, val_y, config.eval_batch_size), evaluate(
                model, test_x, test_y, config.eval_batch_size)
        out = finetune_dir(config)
        out.mkdir(parents=True, exist_ok=True)
        window = max(1, len(losses) // 10)
        metrics: dict[str, Any] = {
            "method": config.method, "keep": config.keep, "steps": len(losses),
            "val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"], "test_loss": test["loss"],
            "first_train_loss": sum(losses[:window]) / window, "last_train_loss": sum(losses[-window:]) / window,
            "train_time_s": train_time, "total_time_s": time.perf_counter() - t_start,
            "num_threads": config.num_threads, "config_hash": config.config_hash(),
            "base_hash": config.base.config_hash(), "checkpoint": str(out / "model.pt"),
            "evaluated_with": f"{config.method}@{config.keep}", "torch": torch.__version__,
        }
        _save(out, model.eval(), config, metrics)
        return metrics


def load_finetuned_vit(method: str | None = None, keep: float | None = None, config: FinetuneConfig | None = None,
                       train_if_missing: bool = False, progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The cached fine-tuned reference ViT of ``config`` (or of the default config with ``method``/``keep``),
    eval mode and *unpatched* (apply ``tr.apply(model, method, keep=keep)`` to run it as trained), and
    ``{"config", "metrics", "path"}``. Fine-tunes it first if missing and ``train_if_missing``, else raises
    ``FileNotFoundError`` naming the command that builds it."""
    if config is None:
        if method is None or keep is None:
            raise ValueError("load_finetuned_vit needs config= or both method= and keep=")
        config = FinetuneConfig(method=method, keep=keep)
    path = finetune_dir(config) / "model.pt"
    ensure_trained(path, train_if_missing, lambda: finetune_reference_vit(config, progress=progress),
                   f"no fine-tuned reference ViT at {path}; build it with `tokenreduce train vit --reduce "
                   f"{config.method} --keep {config.keep} --steps {config.steps}`")
    model = build_reference_vit(**config.base.model_kwargs())
    return model.eval(), {"config": config, "metrics": load_checkpoint(model, path), "path": path}
