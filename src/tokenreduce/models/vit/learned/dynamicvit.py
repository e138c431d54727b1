"""Training DynamicViT's prediction modules (Rao et al., NeurIPS 2021, Sec. 3.3-3.4) on a frozen timm ViT."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ....core.learned import gumbel_keep
from ....core.state import TokenState
from ....methods.vit.dynamicvit import DynamicViT, Predictor, dynamicvit_layers
from .forward import embed, head, masked_attention_half, mlp_half

__all__ = ["DynamicViTTrainer", "target_ratios"]


def target_ratios(model: nn.Module, keep: float) -> list[float]:
    """The kept fraction of the patch tokens after each stage that ``tr.apply(model, "dynamicvit", keep=keep)``
    runs (the hierarchical rho^s fitted to the work fraction): the targets of the ratio loss (Eq. 10)."""
    depth, p = len(model.blocks), int(model.num_prefix_tokens)
    n = int(model.patch_embed.num_patches)
    method = DynamicViT(keep=keep, layers=dynamicvit_layers(depth))
    method.setup(depth)
    plan = method._fit_plan(TokenState.from_tensor(torch.zeros(1, n + p, 1), protected=p))
    return [c / n for c in plan[0].tolist()]


class DynamicViTTrainer:
    """The loss of DynamicViT (Eq. 13, the weights of the paper's DeiT code): L = L_cls + ``ratio_weight``
    L_ratio + ``distill_weight`` (L_KL + L_distill), with

    * L_ratio = 1/S sum_s mean_b (rho_s - mean_i D_i^s)^2 (Eq. 10), rho_s the kept fraction after stage s;
    * L_KL = KL(teacher || student) of the class distributions (Eq. 12), the teacher the unreduced model;
    * L_distill = mean squared error of the final tokens that the last decision keeps (Eq. 11, its code's
      ``mse_token``).

    Decisions are hard Gumbel-softmax samples with straight-through gradients (Eq. 6), accumulated over the
    stages (D^s = D^{s-1} * sample) and masking the attention of every later block (Eq. 8). Only the
    predictors train: the backbone is frozen so that the predictors apply to the model they were trained for.
    """

    uses_teacher = True

    def __init__(self, model: nn.Module, keep: float, config: Any) -> None:
        self.model = model
        self.layers = dynamicvit_layers(len(model.blocks))
        self.ratios = target_ratios(model, keep)
        self.p = int(model.num_prefix_tokens)
        self.predictors = nn.ModuleList(Predictor(int(model.embed_dim)) for _ in self.layers)
        self.ratio_weight, self.distill_weight = config.ratio_weight, config.distill_weight
        self.label_smoothing = config.label_smoothing
        self.generator = torch.Generator().manual_seed(config.seed)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.predictors.parameters())

    def loss(self, images: Tensor, labels: Tensor, teacher: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x = embed(self.model, images)
        B, N, _ = x.shape
        p = self.p
        prev = x.new_ones(B, N - p)
        policy = x.new_ones(B, N)
        decisions = []
        stage = {layer: i for i, layer in enumerate(self.layers)}
        for layer, block in enumerate(self.model.blocks):
            x, _ = masked_attention_half(block, x, policy)
            if layer in stage:
                logp = self.predictors[stage[layer]](x[:, p:], prev)
                prev = gumbel_keep(logp, self.generator) * prev
                decisions.append(prev)
                policy = torch.cat([x.new_ones(B, p), prev], 1)
            x = mlp_half(block, x)
        logits, feats = head(self.model, x)
        t_logits, t_feats = teacher
        cls = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        ratio = torch.stack([((d.mean(1) - r) ** 2).mean() for d, r in zip(decisions, self.ratios)]).mean()
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), reduction="batchmean", log_target=True)
        kept = prev.detach() > 0.5
        token = ((feats[:, p:] - t_feats[:, p:]) ** 2)[kept].mean() if bool(kept.any()) else feats.sum() * 0
        loss = cls + self.ratio_weight * ratio + self.distill_weight * (kl + token)
        parts = {"cls": cls.item(), "ratio": ratio.item(), "kl": kl.item(), "token": token.item(),
                 **{f"kept{i}": d.mean().item() for i, d in enumerate(decisions)}}
        return loss, parts

    def artifact(self) -> dict[str, Any]:
        return {"dim": int(self.model.embed_dim), "layers": list(self.layers), "ratios": list(self.ratios),
                "state_dict": {k: v.detach().clone() for k, v in self.predictors.state_dict().items()}}
