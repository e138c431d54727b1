"""``tokenreduce train vit``: train (once) and cache the reference ViT."""

from __future__ import annotations

import json
from typing import Any

from .config import TrainConfig
from .train import train_or_load_metrics

__all__ = ["register_cli"]


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
