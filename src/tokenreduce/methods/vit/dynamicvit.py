"""DynamicViT on ViT layers: a learned prediction module per stage, hard top-k at inference (see
:class:`DynamicViT`); trained by ``tokenreduce train vit --reduce dynamicvit --keep K``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VIT, StageMethod
from .learned import LearnedMethod

__all__ = ["DynamicViT", "Predictor", "dynamicvit_layers"]


def dynamicvit_layers(depth: int) -> tuple[int, ...]:
    """DynamicViT's stages, before blocks 4, 7 and 10 of 12 (after 1/4, 1/2 and 3/4 of the depth), at the
    reduction points here, inside a block after its attention: the last one not later than the paper's, block
    floor(f * depth - 1/2) (0-based) for f = 1/4, 1/2, 3/4. ``depth=6`` (the reference ViT): blocks 1, 2, 4,
    after 1.5, 2.5 and 4.5 blocks (the paper's, scaled: 1.5, 3, 4.5)."""
    return tuple(sorted({max(0, math.floor(f * depth - 0.5)) for f in (0.25, 0.5, 0.75)}))


class Predictor(nn.Module):
    """DynamicViT's prediction module (Rao et al., NeurIPS 2021, Sec. 3.2, Eqs. 3-5): z = MLP(LN(x)) split
    into a local half and a global half averaged over the kept tokens (weighted by the current decision D),
    [z_local, z_global] -> MLP -> log-probabilities of (keep, drop) per token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                 nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        """``x`` (B, N, C) the reducible tokens, ``policy`` (B, N) their decision so far (1 kept, 0 dropped or
        padding); returns (B, N, 2) log-probabilities, index 0 = keep."""
        z = self.inp(x)
        half = z.shape[-1] // 2
        d = policy.to(z.dtype).unsqueeze(-1)
        glob = (z[..., half:] * d).sum(1, keepdim=True) / d.sum(1, keepdim=True).clamp(min=1e-6)
        return self.out(torch.cat([z[..., :half], glob.expand(-1, z.shape[1], -1)], -1))


@register("dynamicvit", modality="vision", integration=VIT,
          paper="Rao et al., DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification, NeurIPS 2021",
          equation="keep top-k of pi_keep = MLP([z_local, mean_D z_global]); training: Gumbel-softmax D, masked "
                   "softmax (Eq. 8), L = CE + 2 L_ratio + 0.5 KL + 0.5 L_token",
          trained_by="tokenreduce train vit --reduce dynamicvit --keep K")
@dataclass
class DynamicViT(LearnedMethod, StageMethod):
    """DynamicViT (Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
    NeurIPS 2021).

    At S = 3 stages (:func:`dynamicvit_layers`; blocks 1, 2, 4 of the 6-block reference ViT) a light
    :class:`Predictor` scores each token's keep log-probability from its own feature and the mean feature of
    the kept tokens; at inference the top-k by that score survive and the rest are removed (hard, no masks:
    the blocks really run on fewer tokens). ``keep`` (the fraction of the token-block work, as for every ViT
    method) is fitted to the paper's hierarchical keep ratios rho, rho^2, rho^3.

    The predictors are trained for one model and one keep (``tokenreduce train vit --reduce dynamicvit --keep
    K``, ``tokenreduce.models.vit.learned``) with the backbone frozen, and loaded from the cache by the model's
    weights fingerprint; without them ``tr.apply`` raises a FileNotFoundError naming that command.
    """

    name: ClassVar[str] = "dynamicvit"
    what: ClassVar[str] = "prediction modules"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_budget()
        self.predictors: nn.ModuleList | None = None
        self._trained_layers: tuple[int, ...] | None = None

    def load(self, artifact: dict[str, Any]) -> None:
        preds = nn.ModuleList(Predictor(int(artifact["dim"])) for _ in artifact["layers"])
        preds.load_state_dict(artifact["state_dict"])
        self.predictors = preds.eval().requires_grad_(False)
        self._trained_layers = tuple(int(i) for i in artifact["layers"])

    def setup(self, depth: int) -> None:
        if self.layers is None:
            self.layers = self._trained_layers or dynamicvit_layers(depth)
        super().setup(depth)
        if self._trained_layers is not None and tuple(sorted(self._stage)) != self._trained_layers:
            raise ValueError(f"dynamicvit: layers={list(self.layers)} differ from the trained stages "
                             f"{list(self._trained_layers)}; leave layers= out")

    def scores(self, layer: int, state: TokenState) -> Tensor:
        """(B, N) keep log-probabilities of the reducible tokens at ``layer`` (0 for protected tokens)."""
        assert self.predictors is not None
        pred = self.predictors[self._stage[layer]]
        w = pred.out[0].weight
        if w.device != state.x.device or w.dtype != state.x.dtype:
            self.predictors.to(device=state.x.device, dtype=state.x.dtype)
        p = state.protected
        logp = pred(state.x[:, p:], state.reducible()[:, p:])
        return torch.cat([logp.new_zeros(state.batch, p), logp[..., 0]], 1)

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        scores = self.scores(layer, state)
        return S.prune(state, scores, self.counts(layer, state, scores))
