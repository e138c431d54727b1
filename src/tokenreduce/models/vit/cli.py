"""``tokenreduce train vit``: train (once) and cache the reference ViT, or fine-tune it with a vision method
active (``--reduce METHOD --keep K``)."""

from __future__ import annotations

import json
from typing import Any

from .config import TrainConfig
from .train import train_or_load_metrics

__all__ = ["register_cli"]


def register_cli(train_app: Any) -> None:
    """``tokenreduce train vit``: train (once) and cache the reference ViT."""
    import typer

    from .finetune import FinetuneConfig
    from .learned import LEARNED, LearnedConfig, train_learned_reference

    learned_lrs = ", ".join(f"{m} {lr:g}" for m, (_, lr) in LEARNED.items())

    @train_app.command("vit")
    def train_vit(
        force: bool = typer.Option(False, help="Retrain even if a cached checkpoint exists"),
        threads: int = typer.Option(TrainConfig.num_threads, help="torch threads (speed only; not part of the checkpoint hash)"),
        progress: bool = typer.Option(True, help="Show a progress bar"),
        reduce: str = typer.Option(None, help="Fine-tune the cached reference ViT with this vision method active "
                                   "(tokenreduce list --integration vit)"),
        keep: float = typer.Option(None, help="With --reduce: the method's keep, a fraction in (0, 1]"),
        steps: int = typer.Option(None, help=f"With --reduce: training steps (default: fine-tuning "
                                  f"{FinetuneConfig.steps}, learned methods {LearnedConfig.steps})"),
        lr: float = typer.Option(None, help=f"With --reduce: peak learning rate (default: fine-tuning "
                                 f"{FinetuneConfig.lr}, learned methods their paper's: {learned_lrs})"),
    ) -> None:
        """Train the reference ViT on cluttered digits (cached in ~/.cache/tokenreduce/reference_vit), or
        fine-tune it with --reduce METHOD --keep K (cached in reference_vit/finetune-<hash>), or, for a learned
        method (dynamicvit, diffrate), train its parts on the frozen reference ViT (cached in learned/, where
        tr.apply(model, METHOD, keep=K) loads them)."""
        if reduce is None:
            if keep is not None:
                raise ValueError("--keep needs --reduce METHOD (the vision method to fine-tune with)")
            config = TrainConfig(num_threads=threads)
            typer.echo(json.dumps(train_or_load_metrics(config, force=force, progress=progress), indent=2))
            return
        if keep is None:
            raise ValueError(f"--reduce {reduce} needs --keep K, a fraction in (0, 1]")
        given = {k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None}
        if reduce in LEARNED:
            config = LearnedConfig(method=reduce, keep=keep, num_threads=threads, **given)
            typer.echo(json.dumps(train_learned_reference(config, force=force, progress=progress), indent=2))
            return
        typer.echo(json.dumps(_finetune(FinetuneConfig(method=reduce, keep=keep, num_threads=threads, **given),
                                        force, progress), indent=2))


def _finetune(config: Any, force: bool, progress: bool) -> dict[str, Any]:
    """The metrics of the cached fine-tuned checkpoint of ``config``, fine-tuning it first if missing or ``force``."""
    from .finetune import finetune_dir, finetune_reference_vit

    out = finetune_dir(config)
    if (out / "model.pt").is_file() and (out / "metrics.json").is_file() and not force:
        return {**json.loads((out / "metrics.json").read_text()), "cached": True}
    return {**finetune_reference_vit(config, progress=progress), "cached": False}
