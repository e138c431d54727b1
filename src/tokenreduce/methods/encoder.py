"""Text-encoder methods (integration point ``encoder-layers``, BERT family via ``adapters/encoder.py``).

The vision methods work on any :class:`~tokenreduce.core.state.TokenState`, so ToMe, EViT and the random
baseline are the very classes of :mod:`.vit`; only pooling differs: text has no grid, so ``pool`` here
is the ragged 1D average pooling of :func:`tokenreduce.core.strategies.pool1d`, and EViT's fused token is the
attention-weighted mean of the tokens it absorbs (``normalize_fused=True``), because mean pooling weights it by
their number. ``keep`` has the same meaning as
for ViTs (ToMe: final fraction of the reducible tokens; stage methods: fraction kept at each stage, stages
after 1/4, 1/2, 3/4 of the depth). ``[CLS]`` is protected; padding is carried by masks, so every sample keeps
its own number of tokens. Pool sentence embeddings with :func:`tokenreduce.adapters.encoder.mean_pool`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core.state import TokenState
from ..core.strategies import pool1d
from ..registry import register
from .vit import EViT, RandomPrune, StageMethod, ToMe

__all__ = ["TextEViT", "TextPool"]

ENCODER = "encoder-layers"


@dataclass
class TextPool(StageMethod):
    """Average-pooling baseline for token sequences: at each stage, each sample's tokens (after [CLS]) are
    pooled in order into ``keep`` of their number of bins (ragged, size-weighted). Proportional attention."""

    prop_attn: bool = True

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        return pool1d(state, self.counts(layer, state))


@dataclass
class TextEViT(EViT):
    """EViT for text encoders: the fused token is the attention-weighted *mean* x = sum a_i x_i / sum a_i of the
    tokens it absorbs (``normalize_fused=True``; False = the paper's sum, Eq. 4), because the mean-pooled sentence
    embedding weights it by their number."""

    normalize_fused: bool = True


_TOME = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023 (applied to text encoders)"
register("tome", modality="language", integration=ENCODER, paper=_TOME, budget_knobs=("r",),
         equation="bipartite soft matching on keys; x=sum s_i x_i/sum s_i; softmax(QK^T/sqrt(d)+log s)")(ToMe)
register("evit", modality="language", integration=ENCODER,
         paper="Liang et al., EViT, ICLR 2022 (CLS-attention pruning applied to text encoders)",
         equation="top-k by mean_h A[cls,i]; x_fused=sum a_i x_i / sum a_i")(TextEViT)
register("random", modality="language", integration=ENCODER, paper="random pruning baseline",
         equation="keep a seeded random subset")(RandomPrune)
register("pool", modality="language", integration=ENCODER, paper="1D average pooling baseline",
         equation="consecutive bins, size-weighted")(TextPool)
