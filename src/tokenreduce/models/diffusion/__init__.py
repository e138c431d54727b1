"""Diffusion models trained here (no pretrained diffusion model can be downloaded): a small class-conditional
DiT and a small SD-style conditional UNet on 32x32 real handwritten digits, DDIM sampling with classifier-free
guidance, and a small digit network trained here for FID features and class accuracy.

    model, info = load_denoiser("dit")                     # ~/.cache/tokenreduce/diffusion/dit-v1-<hash>
    images = sample(model, labels, steps=20, guidance=2.0, seed=0)
    with tr.apply(model.net, "tomesd", keep=0.5):
        reduced = sample(model, labels, steps=20, guidance=2.0, seed=0)

Train with ``tokenreduce train dit`` / ``tokenreduce train unet`` / ``tokenreduce train digit-features``.
"""

from __future__ import annotations

import json
from typing import Any

from .data import DIGITS32, NUM_CLASSES, digit_images
from .denoisers import KINDS, ClassConditional, DenoiserConfig, default_config
from .features import DigitFeatures, FeatureConfig, load_features, sample_quality
from .sampling import ddim_scheduler, initial_noise, sample
from .train import checkpoint_dir, load_denoiser, train_denoiser

__all__ = ["DIGITS32", "KINDS", "NUM_CLASSES", "ClassConditional", "DenoiserConfig", "DigitFeatures",
           "FeatureConfig", "checkpoint_dir", "ddim_scheduler", "default_config", "digit_images", "initial_noise",
           "load_denoiser", "load_features", "register_cli", "sample", "sample_quality", "train_denoiser"]


def _train_command(kind: str, steps: int | None, threads: int, force: bool, evaluate: int) -> dict[str, Any]:
    over = {"num_threads": threads} | ({"steps": steps} if steps else {})
    config = default_config(kind, **over)
    path = checkpoint_dir(config) / "model.pt"
    if force or not path.is_file():
        train_denoiser(config)
    model, info = load_denoiser(kind, config=config)
    out = {k: info["metrics"].get(k) for k in ("config_hash", "steps", "train_time_s", "train_cpu_s", "final_loss",
                                               "num_params")}
    if evaluate:
        out["quality"] = sample_quality(model, n=evaluate)
    return out


def register_cli(train_app: Any) -> None:
    """``tokenreduce train dit|unet|digit-features``."""
    import typer

    def make(kind: str) -> None:
        @train_app.command(kind)
        def train(steps: int = typer.Option(0, help="optimisation steps (0: the default config's)"),
                  threads: int = typer.Option(1, help="torch threads (speed only; not in the checkpoint hash)"),
                  force: bool = typer.Option(False, help="retrain even if a cached checkpoint exists"),
                  evaluate: int = typer.Option(256, help="samples for the unreduced FID / class accuracy (0: skip)"),
                  ) -> None:
            typer.echo(json.dumps(_train_command(kind, steps or None, threads, force, evaluate), indent=2))

        train.__doc__ = f"Train the class-conditional {kind.upper()} on 32x32 digits (cached in ~/.cache/tokenreduce)."

    for kind in KINDS:
        make(kind)

    @train_app.command("digit-features")
    def features(force: bool = typer.Option(False, help="retrain even if cached")) -> None:
        """Train the digit network whose features give FID and whose logits give class accuracy."""
        _net, info = load_features(train_if_missing=True, force=force)
        typer.echo(json.dumps(info["metrics"], indent=2))
