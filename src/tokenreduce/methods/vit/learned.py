"""What the learned ViT methods (``dynamicvit``, ``diffrate``) share: their trained parts (a predictor, the
rates) live in the cache, addressed by the method, a fingerprint of the model's weights and the keep they were
trained at, so ``tr.apply(model, name, keep=K)`` finds what was trained *for this model at this keep* and
nothing else. Without it, a FileNotFoundError names the command that trains it.

Layout: ``~/.cache/tokenreduce/learned/<method>-<fingerprint>/keep<K>/`` with ``artifact.pt`` (what the method
loads), ``config.json`` and ``metrics.json`` (written by ``tokenreduce.models.vit.learned``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..._paths import cache_dir

__all__ = ["ARTIFACT", "LearnedMethod", "artifact_dir", "train_command", "weights_fingerprint"]

ARTIFACT = "artifact.pt"


def weights_fingerprint(model: nn.Module) -> str:
    """12 hex digits of the sha256 of the model's state dict (names, shapes, values as float32): the same
    weights give the same fingerprint, any changed weight another one."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def artifact_dir(method: str, fingerprint: str, keep: float) -> Path:
    """Where the trained parts of ``method`` for the model ``fingerprint`` at ``keep`` live (not created)."""
    return cache_dir("learned") / f"{method}-{fingerprint}" / f"keep{float(keep)!r}"


def train_command(method: str, keep: float) -> str:
    """The command that trains ``method`` at ``keep`` on the reference ViT."""
    return f"tokenreduce train vit --reduce {method} --keep {float(keep)!r}"


class LearnedMethod:
    """Mixin of a vision method with trained parts: the adapter calls :meth:`bind` with the model before
    ``setup``; it loads the artifact trained for this model's weights at this keep (a float fraction only,
    the budget it was trained at) and hands it to :meth:`load`."""

    name: ClassVar[str]
    keep: Any

    def check_budget(self) -> None:
        if self.budget.fraction is None:  # type: ignore[attr-defined]
            raise ValueError(f"{self.name}: keep={self.keep!r} is invalid: a learned method runs at the float "
                             f"fraction in (0, 1] it was trained at (e.g. 0.5), not a count, threshold or schedule")

    def bind(self, model: nn.Module) -> None:
        if self.is_identity:  # type: ignore[attr-defined]
            return
        keep = float(self.budget.fraction)  # type: ignore[attr-defined]
        fp = weights_fingerprint(model)
        path = artifact_dir(self.name, fp, keep) / ARTIFACT
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.name}: no trained {self.what} for this model (weights {fp}) at keep={keep!r} "
                f"({path}); train it with `{train_command(self.name, keep)}` (the reference ViT) or "
                f"tokenreduce.models.vit.train_learned(model, {self.name!r}, keep={keep!r}) for another timm ViT")
        self.load(torch.load(path, map_location="cpu", weights_only=True))

    what: ClassVar[str] = "parameters"

    def load(self, artifact: dict[str, Any]) -> None:
        raise NotImplementedError
