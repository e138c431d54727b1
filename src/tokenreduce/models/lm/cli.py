"""``tokenreduce train lm``: train (once) and cache the small decoder LM."""

from __future__ import annotations

import json
from typing import Any

from .config import LMConfig

__all__ = ["register_cli"]


def register_cli(train_app: Any) -> None:
    import typer

    @train_app.command("lm")
    def train_lm(
        force: bool = typer.Option(False, help="Retrain even if a cached checkpoint exists"),
        threads: int = typer.Option(LMConfig.num_threads, help="torch threads (speed only; not in the hash)"),
        steps: int = typer.Option(LMConfig.steps, help="optimiser steps (another value is another checkpoint)"),
        progress: bool = typer.Option(True, help="Show a progress bar"),
    ) -> None:
        """Train the small decoder LM (Llama architecture, 2.6 M parameters, byte-level BPE of 4,096) on the
        Wikipedia articles of gensim's test data; cached in ~/.cache/tokenreduce/small_lm. Prints the held-out
        perplexity."""
        from .train import train_or_load_metrics

        config = LMConfig(num_threads=threads, steps=steps)
        typer.echo(json.dumps(train_or_load_metrics(config, force=force, progress=progress), indent=2))
