"""The small VLM's training losses: the auxiliary per-patch vision loss, word grounding of the projected visual
tokens, routing (attention) supervision and the answer tokens' LM loss."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tokenreduce.data.vqa import VOCAB, cell_of_patch

from .config import VLMTrainConfig
from .targets import LOOKUP, LOSS_TYPES, N_WHAT, RELATION, patch_value

__all__ = ["RouteProbe", "aux_loss", "grounding_loss", "lm_loss", "routing_loss"]


def aux_loss(head: torch.nn.Module, patches: torch.Tensor, labels: torch.Tensor, c: VLMTrainConfig
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary vision loss, per patch token: (a) which digit (regular, in which cell / small) or background
    it shows (:func:`~tokenreduce.models.vlm.targets.patch_labels`), (b) its own scene cell (0..8), so visual tokens carry *what* and *where*
    explicitly, and conjoined (a "3 in the top left" feature, which the LLM can read from a plain average
    of the visual tokens instead of having to learn position-routing attention first).
    With ``c.aux_value`` (model v3) two more targets per patch: (c) the digit *value* alone (background or
    0-9, the same class for a regular and a small digit) and (d) its *size* (background, regular, small), so
    "digit d" is one direction shared by every cell and both sizes (without them a digit read-out learned on
    regular digits did not transfer to small ones: ``docs/experiments/small_vlm.md``, model v2).
    ``head`` maps D -> :data:`~tokenreduce.models.vlm.targets.N_AUX` (or 101 + 9). Returns (loss, what
    logits (n, P, 101))."""
    cell = torch.from_numpy(cell_of_patch(c.scene.image_size // c.patch_size, c.scene.image_size))
    out = head(patches)
    what, where = out[..., :N_WHAT], out[..., N_WHAT:N_WHAT + 9]
    loss = F.cross_entropy(what.flatten(0, 1), labels.flatten()) + \
        F.cross_entropy(where.flatten(0, 1), cell.expand(patches.shape[0], -1).flatten())
    if c.aux_value:
        value = torch.where(labels == 0, 0, patch_value(labels) + 1)
        size = torch.where(labels == 0, 0, torch.where(labels >= 91, 2, 1))
        loss = loss + F.cross_entropy(out[..., N_WHAT + 9:N_WHAT + 20].flatten(0, 1), value.flatten()) + \
            F.cross_entropy(out[..., N_WHAT + 20:].flatten(0, 1), size.flatten())
    return loss, what


_DIGIT_IDS = [VOCAB.index(str(v)) for v in range(10)]
_COLUMN_IDS = [VOCAB.index(w) for w in ("left", "center", "right")]
_ROW_IDS = [VOCAB.index(w) for w in ("top", "center", "bottom")]


def grounding_loss(tokens: torch.Tensor, embedding: torch.Tensor, labels: torch.Tensor, c: VLMTrainConfig
                   ) -> torch.Tensor:
    """Word grounding of the projected visual tokens (``ground_weight``): each token (b, P, D) is read
    through the LLM's input embedding matrix (V, D) -- logits ``x E^T`` over closed word sets -- and must
    name (a) its digit's value word (``0``..``9``; inked patches only, regular and small alike) and (b) its
    cell's column word (``left``/``center``/``right``) and row word (``top``/``center``/``bottom``).
    A digit's visual tokens then share a direction with the word the question names it by, so finding
    "the 3" among the visual tokens is the same-token match a copy head makes in text, and the token's
    place is carried by place words the LM already writes. The mean of the three cross-entropies."""
    g = c.scene.image_size // c.patch_size
    cell = torch.from_numpy(cell_of_patch(g, c.scene.image_size)).to(tokens.device)
    row, col = (cell // 3).expand(tokens.shape[0], -1), (cell % 3).expand(tokens.shape[0], -1)
    logits = tokens.float() @ embedding.float().T
    ink = labels != 0
    value = patch_value(labels)
    terms = [F.cross_entropy(logits[..., _COLUMN_IDS].flatten(0, 1), col.flatten()),
             F.cross_entropy(logits[..., _ROW_IDS].flatten(0, 1), row.flatten())]
    if ink.any():
        terms.append(F.cross_entropy(logits[..., _DIGIT_IDS][ink], value[ink]))
    return torch.stack(terms).mean()


class RouteProbe:
    """Captures the inputs of the supervised LLM layers' attention during a training forward (a forward
    pre-hook on ``self_attn``) for :func:`routing_loss`."""

    def __init__(self, model, layers: Sequence[int]) -> None:
        self.inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        lm = model.model.language_model
        self.attn = {k: lm.layers[k].self_attn for k in layers}
        self.handles = [a.register_forward_pre_hook(self._hook(k), with_kwargs=True) for k, a in self.attn.items()]

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[layer] = (h, kwargs["position_embeddings"])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def routing_loss(probe: RouteProbe, route: tuple[torch.Tensor, ...], mask: torch.Tensor, head: int
                 ) -> torch.Tensor:
    """Routing supervision (attention supervision, as in Qiao et al., 2018, "Exploring Human-like Attention
    Supervision in Visual Question Answering", here with the scene's ground-truth cells instead of human
    maps): for each query position r, -log of the share of head ``head``'s attention (softmax over every key
    it may see) that falls on the visual tokens of r's target cells, averaged over rows and supervised
    layers. Without it the LLM reads digits well (identity 0.93 when it sees only the asked cell's tokens)
    but does not learn to find a cell among 144 tokens (0.39)."""
    b, start, qpos, target = route
    if b.numel() == 0:
        return torch.zeros(())
    losses = []
    for layer, (h, (cos, sin)) in probe.inputs.items():
        attn = probe.attn[layer]
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
        cos, sin = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)
        hd = attn.head_dim
        group = attn.config.num_attention_heads // attn.config.num_key_value_heads
        q = attn.q_proj(h[b, qpos]).view(len(b), 1, -1, hd)[:, :, head]  # (R, 1, hd)
        k = attn.k_proj(h).view(h.shape[0], 1, h.shape[1], -1, hd)[..., head // group, :]  # (B, 1, L, hd)
        q, _ = rope(q, q, cos[b, qpos], sin[b, qpos])
        k, _ = rope(k, k, cos, sin)
        scores = torch.einsum("rd,rld->rl", q[:, 0], k[b, 0]) * attn.scaling
        L = h.shape[1]
        allowed = (torch.arange(L)[None] <= qpos[:, None]) & mask[b].bool()
        logp = scores.float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
        cols = (start[:, None] + torch.arange(target.shape[1])[None]).clamp(max=L - 1)  # reduced images: fewer
        tgt = logp.gather(1, cols).masked_fill(~target, float("-inf"))
        losses.append(-tgt.logsumexp(-1).mean())
    return torch.stack(losses).mean()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, per_type: bool,
            relation_term: bool = False, lookup_term: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on the answer tokens: the mean over tokens, or (``per_type``) the mean over
    question types of each type's mean, so a type's weight does not depend on how often the sampler draws
    it or how many tokens its answers have (``describe`` answers are ~10 tokens, a ``detail`` turn is in
    ~5% of turns). ``relation_term``: the answer word after a rationale (tagged ``relation``) is a term of
    its own instead of one of its turn's ~8 tokens; ``lookup_term``: likewise the rationale's place words
    (tagged ``lookup``). Also returns each tag's mean (for logging; ``relation`` and ``lookup`` always
    separately)."""
    y, t = labels[:, 1:], types[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y.flatten(), reduction="none",
                         ignore_index=-100).view(y.shape)
    per = {name: ce[t == k].mean() for k, name in enumerate(LOSS_TYPES) if (t == k).any()}
    if per_type:
        spatial = LOSS_TYPES.index("spatial")
        tl = t if relation_term else torch.where(t == RELATION, spatial, t)
        tl = tl if lookup_term else torch.where(tl == LOOKUP, spatial, tl)
        terms = [ce[tl == k].mean() for k in range(len(LOSS_TYPES)) if (tl == k).any()]
        loss = torch.stack(terms).mean()
    else:
        loss = ce[y != -100].mean()
    return loss, {k: v.item() for k, v in per.items()}
