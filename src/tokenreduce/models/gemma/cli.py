"""``tokenreduce convert gemma``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .convert import convert_gemma

__all__ = ["register_cli"]


def register_cli(convert_app: Any) -> None:
    """``tokenreduce convert gemma``: the one-off GGUF -> cached HF checkpoint conversion."""
    import typer

    @convert_app.command("gemma")
    def gemma(
        force: bool = typer.Option(False, help="rebuild even if a valid cache exists"),
        out: Path = typer.Option(None, help="output directory (default: ~/.cache/tokenreduce/gemma3-270m)"),
    ) -> None:
        """Convert Gemma 3 270M from its GGUF package to a cached HF checkpoint with a correct tokenizer."""
        print(convert_gemma(out, force=force, progress=True))
