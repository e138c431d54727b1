"""Token clustering on ViT layers: DPC-KNN cluster merge (see :class:`ClusterMerge`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core import strategies as S
from ...core.state import TokenState
from ...registry import register
from .base import VIT, StageMethod

__all__ = ["ClusterMerge"]


@register("cluster", modality="vision", integration=VIT, paper="Zeng et al., TCFormer (DPC-KNN token clustering), CVPR 2022",
          equation="rho_i=exp(-mean_kNN d^2), delta_i=min_{rho_j>rho_i} d_ij, centers=top rho*delta")
@dataclass
class ClusterMerge(StageMethod):
    """Token clustering (TCFormer's clustering-based token merge, Zeng et al., CVPR 2022, Eq. 1-4):
    DPC-KNN centers on the token features, each token merged into its nearest center (size-weighted),
    ``algo="kmeans"`` refines with k-means. Proportional attention on."""

    algo: str = "dpc-knn"
    k: int = 5
    prop_attn: bool = True

    def reduce(self, layer: int, state: TokenState, ctx: dict[str, Tensor]) -> TokenState:
        return S.cluster_merge(state, state.x, self.counts(layer, state), algo=self.algo, k=self.k)
