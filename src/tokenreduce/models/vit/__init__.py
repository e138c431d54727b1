"""A small reference ViT trained here, on CPU, on the cluttered-digits dataset.

No pretrained vision weights can be downloaded, so tokenreduce trains its own
model to measure accuracy against token-keep ratio. The model is a real
:class:`timm.models.vision_transformer.VisionTransformer` (``class_token=True``,
``global_pool="token"``) on 64x64 images with ``patch_size=4``: 16x16 = 256 patch
tokens + CLS = 257 tokens, so per-image compute is dominated by the transformer
blocks, which is what token reduction accelerates.

Typical use::

    from tokenreduce.models.vit import load_reference_vit, reference_eval_set
    model, info = load_reference_vit(train_if_missing=True)
    images, labels = reference_eval_set("test")

Train it once with ``tokenreduce train vit`` (or ``python scripts/train_reference_vit.py``).

Measured (default config ``v1-a8d0854ae2``: 192 wide, 6 blocks, 768 steps; 1,435 s of training on 2
threads, partly shared): val 0.980, held-out test 0.9775 (2,000 images; 0.979 on the benchmark's first 1,000).
Design measurements: ``docs/experiments/reference_vit.md``.

Modules: :mod:`~tokenreduce.models.vit.config` (:class:`TrainConfig`, checkpoint address),
:mod:`~tokenreduce.models.vit.model` (the network), :mod:`~tokenreduce.models.vit.train` (training, loading; the
one training loop, also for runs from scratch with a method active: ``TrainRun``, ``train_steps``),
:mod:`~tokenreduce.models.vit.evaluation` (held-out sets, accuracy), :mod:`~tokenreduce.models.vit.cli`
(``tokenreduce train vit``), :mod:`~tokenreduce.models.vit.finetune` (fine-tuning with a vision method active:
``tokenreduce train vit --reduce METHOD --keep K``, :func:`load_finetuned_vit`).
"""

from __future__ import annotations

from .config import MODEL_VERSION, STEMS, TrainConfig, checkpoint_dir
from .evaluation import evaluate, reference_eval_set
from .finetune import FinetuneConfig, finetune_dir, finetune_reference_vit, load_finetuned_vit, parse_finetune_spec
from .model import ConvStemPatchEmbed, build_reference_vit
from .train import load_reference_vit, train_or_load_metrics, train_reference_vit

__all__ = [
    "MODEL_VERSION",
    "STEMS",
    "ConvStemPatchEmbed",
    "FinetuneConfig",
    "TrainConfig",
    "build_reference_vit",
    "checkpoint_dir",
    "evaluate",
    "finetune_dir",
    "finetune_reference_vit",
    "load_finetuned_vit",
    "load_reference_vit",
    "parse_finetune_spec",
    "reference_eval_set",
    "train_or_load_metrics",
    "train_reference_vit",
]
