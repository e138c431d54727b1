"""``tokenreduce train vlm``: train (once) and cache the small VLM."""

from __future__ import annotations

import json

from .config import VLMTrainConfig, checkpoint_dir
from .train import train_small_vlm

__all__ = ["register_cli"]


def register_cli(train_app) -> None:
    import typer

    @train_app.command("vlm")
    def train_vlm(
        steps: int = typer.Option(VLMTrainConfig.steps, help="Optimisation steps"),
        batch_size: int = typer.Option(VLMTrainConfig.batch_size, help="Scenes per step"),
        threads: int = typer.Option(VLMTrainConfig.num_threads, help="torch threads (1 is fastest on a busy 2-core box)"),
        restart_steps: int = typer.Option(VLMTrainConfig.restart_steps,
                                          help="Continue the --steps model for this many more steps (warm restart)"),
        restart_lr: float = typer.Option(VLMTrainConfig.restart_lr, help="Peak learning rate of the warm restart"),
        restart_drop: float = typer.Option(VLMTrainConfig.restart_drop,
                                           help="Share of warm-restart images reduced (token-reduction augmentation; "
                                                "0 with --restart-steps 600 = model v3)"),
        rationale: bool = typer.Option(VLMTrainConfig.rationale,
                                       help="Train spatial answers with their rationale first (--no-rationale: v3)"),
        route_weight: float = typer.Option(VLMTrainConfig.route_weight,
                                           help="Weight of the routing (attention) supervision; 0 = off"),
        ground_weight: float = typer.Option(VLMTrainConfig.ground_weight,
                                            help="Weight of the visual tokens' word grounding; 0 = off "
                                                 "(the previous default, v3-d705f465f1)"),
        existence: bool = typer.Option(VLMTrainConfig.existence,
                                       help="The warm restart also trains POPE-style existence questions "
                                            "('is there the digit 7 ?'; the hallucination study's POPE part)"),
        existence_rationale: bool = typer.Option(VLMTrainConfig.existence_rationale, help=(
            "With --existence: the scene's description before its answers ('3 top left , 7 center , yes')")),
        existence_text: int = typer.Option(VLMTrainConfig.existence_text, help=(
            "With --existence-rationale: text-only sequences of existence turns per batch; 0 = off")),
        existence_lookup: bool = typer.Option(VLMTrainConfig.existence_lookup, help=(
            "With --existence: the asked digit's place before its answers ('7 center , yes'; absent: '7 , no')")),
        force: bool = typer.Option(False, help="Retrain even if a cached checkpoint exists"),
    ) -> None:
        """Train the small LLaVA-style VLM on digit-scene VQA (cached in ~/.cache/tokenreduce/small_vlm)."""
        c = VLMTrainConfig(steps=steps, batch_size=batch_size, num_threads=threads, restart_steps=restart_steps,
                           restart_lr=restart_lr, restart_drop=restart_drop, rationale=rationale,
                           route_weight=route_weight, ground_weight=ground_weight, existence=existence,
                           existence_rationale=existence_rationale, existence_text=existence_text,
                           existence_lookup=existence_lookup)
        path = checkpoint_dir(c) / "model.pt"
        if path.is_file() and not force:
            m = json.loads(path.with_name("metrics.json").read_text())
            typer.echo(f"cached: {path}\ntest acc {m['test_acc']:.3f} by type {m['test_acc_by_type']}"
                       + (f"\nexistence {m['existence_test_acc']:.3f} yes-rate {m.get('existence_yes_rate', float('nan')):.3f}"
                          if "existence_test_acc" in m else ""))
            return
        m = train_small_vlm(c)
        typer.echo(json.dumps({k: m[k] for k in ("test_acc", "test_acc_by_type", "chance_by_type", "train_time_s",
                                                   "checkpoint", "existence_test_acc", "existence_yes_rate") if k in m}, indent=2))
