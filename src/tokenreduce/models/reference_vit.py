"""A small reference ViT trained here, on CPU, on the cluttered-digits dataset.

No pretrained vision weights can be downloaded, so tokenreduce trains its own
model to measure accuracy against token-keep ratio. The model is a real
:class:`timm.models.vision_transformer.VisionTransformer` (``class_token=True``,
``global_pool="token"``) on 64x64 images with ``patch_size=4``: 16x16 = 256 patch
tokens + CLS = 257 tokens, so per-image compute is dominated by the transformer
blocks, which is what token reduction accelerates.

Typical use::

    from tokenreduce.models.reference_vit import load_reference_vit, reference_eval_set
    model, info = load_reference_vit(train_if_missing=True)
    images, labels = reference_eval_set("test")

Measured (default config ``v1-a8d0854ae2``: 192 wide, 6 blocks, 768 steps; 1,435 s of training on 2
threads, partly shared): val 0.980, held-out test 0.9775 (2,000 images; 0.979 on the benchmark's first 1,000).

Checkpoints live in ``cache_dir("reference_vit", "v<VERSION>-<config hash>")`` so
that any change of the config (or of the dataset generator) never loads stale
weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from tokenreduce._paths import cache_dir
from tokenreduce.data.digits import (
    DATASET_VERSION,
    NUM_CLASSES,
    ClutteredDigitsConfig,
    generate_cluttered_digits,
)

__all__ = [
    "MODEL_VERSION",
    "ConvStemPatchEmbed",
    "TrainConfig",
    "build_reference_vit",
    "checkpoint_dir",
    "evaluate",
    "load_reference_vit",
    "reference_eval_set",
    "register_cli",
    "train_or_load_metrics",
    "train_reference_vit",
]

#: Bump when the training code changes in a way that changes the weights.
MODEL_VERSION = 1
_TRAIN_HINT = "run `tokenreduce train vit` or `python scripts/train_reference_vit.py`"
# fields that do not change the learned weights and are left out of the config hash
_HASH_EXCLUDED = frozenset({"num_threads", "eval_batch_size"})


@dataclass(frozen=True)
class TrainConfig:
    """Architecture, data and optimisation settings of the reference ViT.

    Architecture: ``image_size``/``patch_size`` (257 tokens by default), ``embed_dim``,
    ``depth``, ``num_heads``, ``mlp_ratio``, ``drop_path_rate``; ``stem`` ("conv":
    :class:`ConvStemPatchEmbed` with ``stem_channels``/``stem_extra_convs``, or
    "patch": timm's linear patch embedding).
    Data: ``data`` (generator config; its ``image_size`` must equal ``image_size``),
    ``epochs`` x ``samples_per_epoch`` freshly generated training images (new random
    placements and clutter every epoch), ``val_samples``/``test_samples`` fixed
    held-out images drawn with ``eval_seed``.
    Optimisation: AdamW (``lr``, ``weight_decay``; no decay on norms, biases,
    position embedding and CLS token), linear warmup over ``warmup_fraction`` of the
    steps then cosine decay to ``lr * min_lr_ratio``, ``label_smoothing``,
    gradient clipping at ``grad_clip``. ``seed`` seeds init and training data.
    ``num_threads`` and ``eval_batch_size`` only affect speed.

    Width: DeiT-Tiny's 192 with its 3 heads of 64 (6 blocks instead of 12, for CPU training time). The first
    reference ViT was 96 wide, narrower than any ViT in use: a block's cost grows as N*C^2 while a reducer's
    bookkeeping grows as N*C and DPC-KNN's distances as N^2*C, so at C=96 every reducer's overhead was measured
    against blocks ~3x cheaper, relative to their work, than DeiT-Tiny's (DPC-KNN: N/(12C+2N) = 15% of a block's
    FLOPs per stage at C=96, 9% at C=192). Six epochs (768 steps): the 192-wide model's training loss fell
    faster than the 96-wide one's, and ten epochs (1280 steps) ran at ~8 s per step on one loaded thread.
    """

    image_size: int = 64
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    stem: str = "conv"
    stem_channels: int = 24
    stem_extra_convs: int = 2
    data: ClutteredDigitsConfig = field(default_factory=ClutteredDigitsConfig)
    epochs: int = 6
    samples_per_epoch: int = 4096
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_samples: int = 1000
    test_samples: int = 2000
    eval_seed: int = 12345
    num_threads: int = 2
    eval_batch_size: int = 250

    def __post_init__(self) -> None:
        _validate_train_config(self)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`build_reference_vit` for this config."""
        return {
            "img_size": self.image_size,
            "patch_size": self.patch_size,
            "in_chans": self.data.channels,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "drop_path_rate": self.drop_path_rate,
            "stem": self.stem,
            "stem_channels": self.stem_channels,
            "stem_extra_convs": self.stem_extra_convs,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (nested dataclasses become dicts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; accepted: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("data"), dict):
            d["data"] = ClutteredDigitsConfig.from_dict(d["data"])
        return cls(**d)

    def config_hash(self) -> str:
        """Short stable hash of everything that determines the trained weights."""
        payload = {k: v for k, v in self.to_dict().items() if k not in _HASH_EXCLUDED}
        payload["_versions"] = {"model": MODEL_VERSION, "dataset": DATASET_VERSION}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _validate_train_config(c: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first invalid field of ``c``."""
    positive_ints = ("patch_size", "embed_dim", "depth", "num_heads", "stem_channels", "epochs",
                     "samples_per_epoch", "batch_size", "val_samples", "test_samples", "num_threads",
                     "eval_batch_size")
    for name in positive_ints:
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")
    if isinstance(c.stem_extra_convs, bool) or not isinstance(c.stem_extra_convs, int) or c.stem_extra_convs < 0:
        raise ValueError(f"stem_extra_convs={c.stem_extra_convs!r} is invalid: must be an int >= 0")
    if c.stem not in STEMS:
        raise ValueError(f"stem={c.stem!r} is invalid: must be one of {STEMS}")
    if c.image_size != c.data.image_size:
        raise ValueError(f"image_size={c.image_size} must equal data.image_size={c.data.image_size}")
    if c.image_size % c.patch_size:
        raise ValueError(f"patch_size={c.patch_size} must divide image_size={c.image_size}")
    if c.embed_dim % c.num_heads:
        raise ValueError(f"num_heads={c.num_heads} must divide embed_dim={c.embed_dim}")
    checks = {
        "mlp_ratio": (c.mlp_ratio, 0.0, 64.0, False),
        "drop_path_rate": (c.drop_path_rate, 0.0, 1.0, True),
        "lr": (c.lr, 0.0, 1.0, False),
        "min_lr_ratio": (c.min_lr_ratio, 0.0, 1.0, True),
        "weight_decay": (c.weight_decay, 0.0, 10.0, True),
        "warmup_fraction": (c.warmup_fraction, 0.0, 1.0, True),
        "label_smoothing": (c.label_smoothing, 0.0, 1.0, True),
        "grad_clip": (c.grad_clip, 0.0, math.inf, False),
    }
    for name, (value, lo, hi, lo_inclusive) in checks.items():
        ok = (lo <= value if lo_inclusive else lo < value) and value <= hi
        if not ok:
            bracket = "[" if lo_inclusive else "("
            raise ValueError(f"{name}={value!r} is out of range: must be in {bracket}{lo}, {hi}]")
    if c.seed < 0 or c.eval_seed < 0:
        raise ValueError(f"seed={c.seed!r} and eval_seed={c.eval_seed!r} must be non-negative ints")


# --------------------------------------------------------------------------- model


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose projection is a small convolutional stem.

    Same interface, token grid and attributes as ``PatchEmbed`` (``patch_size``,
    ``grid_size``, ``num_patches``, ...). ``proj`` is: 3x3 stride-2 convs (BatchNorm
    + ReLU; ``stem_channels``, doubling) whose strides multiply to ``patch_size``,
    ``extra_convs`` 3x3 stride-1 convs at token resolution (same width), then a 1x1
    conv to ``embed_dim``. Early convolutions make ViTs train far faster on small
    data (Xiao et al., 2021): each token then describes a local shape (receptive
    field 23 px by default) instead of a raw 4x4 patch. On this dataset a linear
    patch embedding learned far more slowly (about 21% val accuracy after 8k
    training images, vs 66% with this stem). The stem costs about 6% of the
    reference model's FLOPs (see :meth:`flops`).
    """

    def __init__(self, *args: Any, stem_channels: int = 24, extra_convs: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stride = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or stride & (stride - 1) or stride < 2:
            raise ValueError(f"patch_size={self.patch_size} is invalid for the conv stem: need a square power of 2")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        layers: list[torch.nn.Module] = []
        ch = stem_channels
        while stride > 1:
            layers += _conv_bn_relu(in_chans, ch, stride=2)
            in_chans, stride = ch, stride // 2
            ch = ch * 2 if stride > 1 else ch
        for _ in range(extra_convs):
            layers += _conv_bn_relu(ch, ch, stride=1)
        layers.append(torch.nn.Conv2d(ch, embed_dim, 1))
        self.proj = torch.nn.Sequential(*layers)

    def flops(self) -> float:
        """Forward FLOPs (2 x multiply-adds) of the stem for one image at ``img_size``."""
        if self.img_size is None:
            raise ValueError("flops() needs a fixed img_size")
        h, w = self.img_size
        total = 0.0
        for layer in self.proj:
            if isinstance(layer, torch.nn.Conv2d):
                h, w = -(-h // layer.stride[0]), -(-w // layer.stride[1])
                k = layer.kernel_size[0] * layer.kernel_size[1]
                total += 2.0 * h * w * layer.in_channels * k * layer.out_channels
        return total


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[torch.nn.Module]:
    """3x3 conv (no bias) + BatchNorm + ReLU."""
    return [torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True)]


#: Patch-embedding variants: a timm ``PatchEmbed`` (linear patches) or the conv stem.
STEMS = ("conv", "patch")


def build_reference_vit(
    stem: str | None = None, stem_channels: int | None = None, stem_extra_convs: int | None = None, **overrides: Any
) -> VisionTransformer:
    """Untrained reference architecture; ``overrides`` replace VisionTransformer kwargs.

    Every default comes from :class:`TrainConfig` (64x64, patch 4 -> 257 tokens,
    conv stem, 10 classes) with ``class_token=True`` and ``global_pool="token"``.
    ``stem="conv"`` uses :class:`ConvStemPatchEmbed` (``stem_channels``,
    ``stem_extra_convs``), ``stem="patch"`` timm's linear patch embedding.
    E.g. ``build_reference_vit(embed_dim=32, depth=2, num_heads=2)`` for tests, or
    ``build_reference_vit(**config.model_kwargs())`` for a given config.

    Raises:
        ValueError: On an unknown stem or a keyword ``VisionTransformer`` does not accept.
    """
    defaults = TrainConfig().model_kwargs()
    stem = defaults.pop("stem") if stem is None else stem
    stem_channels = defaults.pop("stem_channels") if stem_channels is None else stem_channels
    stem_extra_convs = defaults.pop("stem_extra_convs") if stem_extra_convs is None else stem_extra_convs
    defaults = {k: v for k, v in defaults.items() if not k.startswith("stem")}
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r} is invalid: must be one of {STEMS}")
    accepted = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self", "kwargs"}
    unknown = set(overrides) - accepted
    if unknown:
        raise ValueError(f"unknown VisionTransformer arguments {sorted(unknown)}; accepted: {sorted(accepted)}")
    kwargs: dict[str, Any] = dict(defaults, num_classes=NUM_CLASSES, class_token=True, global_pool="token")
    if stem == "conv":
        kwargs["embed_layer"] = functools.partial(
            ConvStemPatchEmbed, stem_channels=stem_channels, extra_convs=stem_extra_convs
        )
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


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


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to ``min_ratio`` (multiplier of the base lr)."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return fn


# --------------------------------------------------------------------------- evaluation


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


# --------------------------------------------------------------------------- training


def checkpoint_dir(config: TrainConfig | None = None) -> Path:
    """Cache directory of the checkpoint of ``config`` (created if missing)."""
    config = config or TrainConfig()
    return cache_dir("reference_vit", f"v{MODEL_VERSION}-{config.config_hash()}")


def _train_chunks(config: TrainConfig, epoch: int, chunk_size: int):
    """Yield freshly generated ``(images, labels)`` chunks covering one epoch."""
    n_chunks = -(-config.samples_per_epoch // chunk_size)
    for k in range(n_chunks):
        n = min(chunk_size, config.samples_per_epoch - k * chunk_size)
        seed = config.seed * 1_000_003 + epoch * 1_000 + k
        batch = generate_cluttered_digits("train", n, seed=seed, config=config.data)
        yield batch.images, batch.labels


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file then rename, so readers never see partial files."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save(out: Path, model: torch.nn.Module, config: TrainConfig, metrics: dict[str, Any]) -> None:
    """Save ``model.pt`` (state_dict), ``config.json`` and ``metrics.json`` into ``out``."""
    _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config.to_dict(), indent=2)))
    _atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
    _atomic_write(out / "model.pt", lambda p: torch.save(model.state_dict(), p))


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
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        t_start = time.perf_counter()
        torch.manual_seed(config.seed)
        model = build_reference_vit(**config.model_kwargs())
        steps_per_epoch = -(-config.samples_per_epoch // config.batch_size)
        total_steps = config.epochs * steps_per_epoch
        warmup = max(1, round(config.warmup_fraction * total_steps))
        opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total_steps, warmup, config.min_lr_ratio))
        val_x, val_y = reference_eval_set("val", config)
        history: list[dict[str, float]] = []
        train_time = 0.0
        bar = tqdm(total=total_steps, desc="train reference ViT", disable=not progress, dynamic_ncols=True)
        chunk = config.batch_size * 16
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            model.train()
            loss_sum, n_seen = 0.0, 0
            for xs, ys in _train_chunks(config, epoch, chunk):
                for i in range(0, xs.shape[0], config.batch_size):
                    x, y = xs[i : i + config.batch_size], ys[i : i + config.batch_size]
                    loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    opt.step()
                    sched.step()
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
    finally:
        torch.set_num_threads(prev_threads)


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
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(
                f"no trained reference ViT at {path}; {_TRAIN_HINT} (CPU only; tens of minutes), "
                "or call load_reference_vit(train_if_missing=True)"
            )
        train_reference_vit(config, progress=progress)
    model = build_reference_vit(**config.model_kwargs())
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    metrics_path = path.with_name("metrics.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return model, {"config": config, "metrics": metrics, "path": path}


def register_cli(train_app: Any) -> None:
    """``tokenreduce train vit``: train (once) and cache the reference ViT."""
    import typer

    @train_app.command("vit")
    def train_vit(
        force: bool = typer.Option(False, help="Retrain even if a cached checkpoint exists"),
        threads: int = typer.Option(TrainConfig.num_threads, help="torch threads (speed only; not part of the checkpoint hash)"),
        progress: bool = typer.Option(True, help="Show a progress bar"),
    ) -> None:
        """Train the reference ViT on cluttered digits (cached in ~/.cache/tokenreduce/reference_vit)."""
        config = TrainConfig(num_threads=threads)
        typer.echo(json.dumps(train_or_load_metrics(config, force=force, progress=progress), indent=2))


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
