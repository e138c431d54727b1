"""``tokenreduce train reasoner``: train (once) and cache the reasoning LM, its no-chain control
(``--no-chain``) or its TokenSkip fine-tune (``--tokenskip``)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["register_cli"]

_SUMMARY = ("val_acc", "val_gen_tokens", "val", "train_chain_tokens", "kept_by_role", "n_val", "num_params", "train_time_s",
            "total_time_s", "num_threads", "checkpoint", "cached")


def register_cli(train_app: Any) -> None:
    import typer

    from .config import ReasonerConfig, TokenSkipConfig

    @train_app.command("reasoner")
    def train_reasoner_cmd(
        tokenskip: bool = typer.Option(False, help="Fine-tune the cached full-chain model with TokenSkip (chains "
                                       "compressed to gamma 1.0/0.8/0.6/0.4, gamma in the prompt)"),
        no_chain: bool = typer.Option(False, help="Train the control that answers without a chain of thought"),
        force_keep: str = typer.Option("", help="With --tokenskip: characters every compressed chain keeps (e.g. "
                                       "';=', the step markers, as TokenSkip's force_tokens=['Step', ':'])"),
        lr: float = typer.Option(TokenSkipConfig.lr, help="With --tokenskip: the fine-tune's peak learning rate"),
        force: bool = typer.Option(False, help="Retrain even if a cached checkpoint exists"),
        threads: int = typer.Option(1, help="torch threads (speed only; not part of the checkpoint hash)"),
        progress: bool = typer.Option(True, help="Show a progress bar"),
    ) -> None:
        """Train the small reasoning LM (Llama, character vocabulary) on multi-step modular arithmetic with
        chain of thought (cached in ~/.cache/tokenreduce/reasoner; one thread, about 15 minutes)."""
        from ..training import cached_metrics
        from .config import checkpoint_dir, tokenskip_dir
        from .tokenskip import finetune_tokenskip
        from .train import train_reasoner

        if lr != TokenSkipConfig.lr and not tokenskip:
            raise ValueError(f"--lr {lr:g} sets the TokenSkip fine-tune's learning rate: it needs --tokenskip")
        if tokenskip and no_chain:
            raise ValueError("--tokenskip compresses chains of thought: it cannot go with --no-chain")
        if tokenskip:
            ts = TokenSkipConfig(base=ReasonerConfig(num_threads=threads), num_threads=threads, force_keep=force_keep,
                                 lr=lr)
            path = tokenskip_dir(ts) / "model.pt"
            metrics = cached_metrics(path, lambda: finetune_tokenskip(ts, progress), force)
        else:
            cfg = ReasonerConfig(chain=not no_chain, num_threads=threads)
            path = checkpoint_dir(cfg) / "model.pt"
            metrics = cached_metrics(path, lambda: train_reasoner(cfg, progress), force)
        typer.echo(json.dumps({k: metrics[k] for k in _SUMMARY if k in metrics}, indent=2))
