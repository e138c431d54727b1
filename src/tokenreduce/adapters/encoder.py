"""Text-encoder adapter: the block-split machinery of :mod:`.blocks` on transformers BERT-family encoders
(``BertModel``, ``RobertaModel``, ``XLMRobertaModel``, ``ElectraModel`` and their task heads), integration
point ``encoder-layers``.

A BERT layer is post-norm: ``a = LN(x + attn(x))`` (``layer.attention``), ``y = LN(a + ffn(a))``
(``layer.output(layer.intermediate(a), a)``); the reduction runs between the two, as in ToMe/EViT.
Text batches are padded: the adapter reads the padding from the 4D mask block 0 receives (bool for SDPA,
additive for eager), carries it in the :class:`~tokenreduce.core.state.TokenState` mask (samples keep
different numbers of tokens), and from then on gives every block its own additive bias (padding + log
size for proportional attention). ``[CLS]`` is protected (never merged or pruned, stays first), so the
pooler and CLS pooling keep working; for mean pooling use :func:`mean_pool` -- a size-weighted mean
over the surviving tokens, which equals the usual masked mean of the unreduced model at keep=1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Handle, register_adapter
from .blocks import QK, BlockFamily, attach_blocks, hf_encoder_layers
from .vit import VitAdapter

__all__ = ["BERT_FAMILY", "EncoderAdapter", "mean_pool", "padding_from_4d"]

LAYER_CLASSES = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "CamembertLayer")


def _bert_layers(m: nn.Module) -> list[nn.Module] | None:
    for name in LAYER_CLASSES:
        layers = hf_encoder_layers(m, name)
        if layers is not None:
            return layers
    return None


def _bert_matches(m: nn.Module) -> bool:
    layers = _bert_layers(m)
    return layers is not None


def _bert_blocks(m: nn.Module) -> list[nn.Module]:
    layers = _bert_layers(m)
    assert layers is not None
    for i, b in enumerate(layers):
        if getattr(b, "is_decoder", False) or getattr(b.attention.self, "is_causal", False):
            raise TypeError(f"{type(m).__name__} layer {i} is a causal decoder layer: the encoder adapter supports "
                            f"bidirectional BERT-family encoders only")
    return layers


def _bert_attn_half(b: nn.Module, x: Tensor, bias: Tensor | None, kw: dict) -> Tensor:
    kw = {k: v for k, v in kw.items() if k not in ("encoder_hidden_states", "encoder_attention_mask")}
    return b.attention(x, attention_mask=bias, **kw)[0]  # LN(x + attn(x)) inside BertAttention


def _bert_mlp_half(b: nn.Module, x: Tensor) -> Tensor:
    return b.output(b.intermediate(x), x)  # LN(x + ffn(x))


def _bert_qk(b: nn.Module) -> QK:
    a = b.attention.self
    return QK(a.query, a.key, None, None, a.num_attention_heads, a.attention_head_size, a.scaling)


def padding_from_4d(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """(B, N) bool real-token mask from the attention mask an encoder layer receives.

    Accepts None (no padding), a 2D 0/1 mask, or the 4D (B, 1, Q|1, K) mask transformers builds: bool
    (True = attend, SDPA) or additive float (0 = attend, dtype-min = masked, eager). A key is a real token
    if any query may attend to it.
    """
    if mask is None:
        return None
    B, N = x.shape[:2]
    if mask.dim() == 2:
        real = mask.bool()
    elif mask.dim() == 4:
        ok = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        real = ok.any(dim=-2)[:, 0] if ok.shape[-2] > 1 else ok[:, 0, 0]
        real = real.expand(B, N) if real.shape[0] == 1 and B > 1 else real
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)} for tokens {(B, N)}")
    if real.shape != (B, N):
        raise ValueError(f"attention mask covers {tuple(real.shape)} tokens, the hidden states have {(B, N)}")
    return real


BERT_FAMILY = BlockFamily(
    "transformers BERT-family encoders (BertModel, RobertaModel, XLMRobertaModel, ElectraModel, + task heads)",
    _bert_matches, _bert_blocks, lambda m: 1, lambda m: None, _bert_attn_half, _bert_mlp_half, _bert_qk,
    "attention_mask", padding_mask=padding_from_4d,
)


class EncoderAdapter(VitAdapter):
    """The ViT block-split adapter on text encoders (integration point ``encoder-layers``)."""

    integration = "encoder-layers"

    def attach(self, model: nn.Module, method: Any, method_name: str) -> Handle:
        return attach_blocks(model, method, method_name, self.family, None)[0]


def mean_pool(handle: Handle | None, last_hidden_state: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Size-aware mean pooling of an encoder's output tokens (B, K, D) -> (B, D).

    With an active ``handle`` (from ``tr.apply`` on the encoder) the last forward's token sizes and mask weight
    the mean: sum_i s_i y_i / sum_i s_i over the surviving tokens, so a merged token counts for the tokens it
    absorbed and sentence embeddings stay calibrated. Without a handle, the usual masked mean over
    ``attention_mask`` (B, N).
    """
    y = last_hidden_state
    if handle is not None and handle.active:
        getter = handle._extras.get("state")
        if getter is None:
            raise TypeError(f"mean_pool needs a handle from the encoder adapter, got one for {handle.method_name!r} "
                            f"on {type(handle.model).__name__}")
        st = getter()
        if st is None:
            raise RuntimeError("mean_pool: the model has not run a forward pass since tr.apply")
        if st.x.shape[:2] != y.shape[:2]:
            raise ValueError(f"hidden states {tuple(y.shape)} do not match the last forward's tokens "
                             f"{tuple(st.x.shape[:2])}: pool the output of the same forward")
        w = (st.size * st.mask).to(y.dtype)
    else:
        if attention_mask is None:
            raise ValueError("mean_pool without an active handle needs the attention_mask (B, N)")
        if attention_mask.shape != y.shape[:2]:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match tokens {tuple(y.shape[:2])}")
        w = attention_mask.to(y.dtype)
    return (y * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-9)


register_adapter(EncoderAdapter(BERT_FAMILY))
