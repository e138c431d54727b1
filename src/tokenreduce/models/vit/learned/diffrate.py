"""Learning DiffRate's per-block pruning and merging counts (Chen et al., ICCV 2023, Sec. 3) on a frozen timm
ViT, under a FLOPs target."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ....accounting.flops import block_flops, timm_vit_dims
from ....core.learned import expected_count, rank_keep_probability, straight_through
from .forward import embed, head, masked_attention_half, mlp_half

__all__ = ["DiffRateTrainer", "ste_min"]


def ste_min(n: Tensor, *counts: Tensor) -> Tensor:
    """min(n, counts...) whose gradient goes to every one of ``counts`` and not to ``n`` (DiffRate's
    ``ste_min``: a rate that is not yet active still feels the FLOPs loss)."""
    value = torch.stack([n.detach(), *[c.detach() for c in counts]]).amin(0)
    return value + sum(c - c.detach() for c in counts)


class DiffRateTrainer:
    """DiffRate's differentiable discrete proxy and loss, L = CE + ``flops_weight`` (F / F_0 - keep)^2.

    Per block l >= 1 (block 0 never compresses, as in the paper's code): logits over the candidate kept counts
    N_k = n, n - g, ..., g of the n patch tokens (g = ``granularity``) for pruning and for merging. In the
    forward pass the tokens are sorted by CLS attention; the count P_l = ceil(sum_k p_k N_k) (straight-through)
    keeps the first P_l, the merge count M_l merges ranks M_l..P_l-1 into their most similar token among the
    first M_l (cosine of the features, size-weighted); the compressed tokens stay in the sequence with a mask
    that is hard (0/1) in the forward pass and has the gradient of P(rank i survives) = sum_{N_k > i} p_k
    (straight-through), masking the attention of later blocks (Eq. 8 of DynamicViT, as DiffRate's code). F is
    the blocks' FLOPs (``accounting.flops.block_flops``) at the differentiable counts, F_0 unreduced.

    The paper's lambda = 5 weighs (GFLOPs - target)^2 of DeiT-S (4.6 GFLOPs), i.e. about 100 (F / F_0 -
    target)^2; ``flops_weight`` is that, on the fraction, so the constraint weighs the same on any model size.
    """

    uses_teacher = False

    def __init__(self, model: nn.Module, keep: float, config: Any) -> None:
        self.model, self.keep = model, keep
        self.p = int(model.num_prefix_tokens)
        self.n = int(model.patch_embed.num_patches)
        self.depth = len(model.blocks)
        self.candidates = torch.arange(self.n, 0, -config.granularity, dtype=torch.float32)
        k = self.candidates.numel()
        self.prune_logits = nn.Parameter(torch.zeros(self.depth - 1, k))
        self.merge_logits = nn.Parameter(torch.zeros(self.depth - 1, k))
        self.flops_weight = config.flops_weight
        self.label_smoothing = config.label_smoothing
        self.dims = timm_vit_dims(model)
        self.full = self.depth * block_flops(self.n + self.p, self.n + self.p, self.dims.dim,
                                             self.dims.mlp_hidden)["total"]

    def parameters(self) -> list[nn.Parameter]:
        return [self.prune_logits, self.merge_logits]

    def counts(self) -> tuple[Tensor, Tensor]:
        """The expected (straight-through ceiled) prune and merge counts of blocks 1.., (depth - 1,) each."""
        return expected_count(self.prune_logits, self.candidates), expected_count(self.merge_logits, self.candidates)

    def _mask(self, logits: Tensor, lo: int, hi: int) -> Tensor:
        """(n,) the straight-through mask that compresses ranks lo..hi-1 (hard 0 there, 1 elsewhere)."""
        ranks = torch.arange(self.n)
        hard = ((ranks < lo) | (ranks >= hi)).float()
        return straight_through(hard, rank_keep_probability(logits, self.candidates, self.n))

    def _merge(self, x: Tensor, size: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Merge the tokens at ranks lo..hi-1 into their most similar among ranks 0..lo-1 (size-weighted);
        the merged-away tokens stay in place (masked by the caller)."""
        p = self.p
        src, dst = x[:, p + lo:p + hi], x[:, p:p + lo]
        s_src, s_dst = size[:, p + lo:p + hi], size[:, p:p + lo]
        with torch.no_grad():
            partner = (F.normalize(src, dim=-1) @ F.normalize(dst, dim=-1).transpose(1, 2)).argmax(-1)
        total = s_dst.scatter_add(1, partner, s_src)
        summed = (dst * s_dst.unsqueeze(-1)).scatter_add(1, partner.unsqueeze(-1).expand_as(src),
                                                           src * s_src.unsqueeze(-1))
        x = torch.cat([x[:, :p], summed / total.unsqueeze(-1), x[:, p + lo:]], 1)
        return x, torch.cat([size[:, :p], total, size[:, p + lo:]], 1)

    def loss(self, images: Tensor, labels: Tensor, teacher: Any) -> tuple[Tensor, dict[str, float]]:
        x = embed(self.model, images)
        B, N, _ = x.shape
        p = self.p
        mask, size = x.new_ones(B, N), x.new_ones(B, N)
        prune, merge = self.counts()
        cur = torch.tensor(float(self.n))  # differentiable count of reducible tokens in the sequence
        hard = self.n  # the same count, hard
        flops = x.new_zeros(())
        for layer, block in enumerate(self.model.blocks):
            n_attn = cur
            x, cls = masked_attention_half(block, x, mask, size.log())
            if layer > 0:
                # sort the patch tokens by importance (compressed ones last), as the paper's code
                order = (mask[:, p:].detach() * 2 + cls[:, p:].detach()).argsort(1, descending=True) + p
                idx = torch.cat([torch.arange(p).expand(B, p), order], 1)
                x = x.gather(1, idx.unsqueeze(-1).expand_as(x))
                mask, size = mask.gather(1, idx), size.gather(1, idx)
                kp, km = prune[layer - 1], merge[layer - 1]
                if int(kp) < hard:
                    mask = mask * torch.cat([mask.new_ones(p), self._mask(self.prune_logits[layer - 1], int(kp), hard)])
                mid = min(hard, int(kp))
                if int(km) < mid:
                    x, size = self._merge(x, size, int(km), mid)
                    mask = mask * torch.cat([mask.new_ones(p), self._mask(self.merge_logits[layer - 1], int(km), mid)])
                hard = min(mid, int(km))
                cur = ste_min(cur, kp, km)
            flops = flops + block_flops(n_attn + p, cur + p, self.dims.dim, self.dims.mlp_hidden)["total"]
            x = mlp_half(block, x)
        logits, _ = head(self.model, x)
        cls_loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        frac = flops / self.full
        loss = cls_loss + self.flops_weight * (frac - self.keep) ** 2
        return loss, {"cls": cls_loss.item(), "flops": frac.item(), "tokens_last": float(hard)}

    def artifact(self) -> dict[str, Any]:
        """Per block, the kept counts as fractions of the patch tokens (block 0: 1.0): what inference runs."""
        with torch.no_grad():
            prune, merge = self.counts()
        return {"prune": [1.0] + [float(c) / self.n for c in prune], "merge": [1.0] + [float(c) / self.n for c in merge],
                "prune_logits": self.prune_logits.detach().clone(), "merge_logits": self.merge_logits.detach().clone(),
                "patches": self.n}
