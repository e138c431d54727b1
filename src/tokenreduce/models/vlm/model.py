"""The small VLM's modules: a real :class:`transformers.LlavaForConditionalGeneration` (CLIP vision tower with
a convolutional stem, LLaVA's projector plus a learned 2-D position embedding, a Llama decoder) and its
word-level tokenizer."""

from __future__ import annotations

import math

import torch

from tokenreduce.data.vqa import SPECIAL_TOKENS, VOCAB

from .config import VLMTrainConfig

__all__ = ["ConvStemPatchEmbed", "GridPositionProjector", "build_small_vlm", "build_tokenizer", "grid_sincos"]


class ConvStemPatchEmbed(torch.nn.Module):
    """Convolutional stem in place of CLIP's linear patch embedding (Xiao et al., 2021, "Early Convolutions
    Help Transformers See Better"): 3x3 stride-2 convs (``channels``, doubled), one 3x3 stride-1 conv and a
    final ``k x k`` stride-``k`` conv to ``dim``, so the token grid is exactly CLIP's (``patch_size`` px per
    token) while each token describes its neighbourhood (receptive field ~19 px at patch 8) instead of one
    raw patch. A ViT with a linear patch embedding learned the digits of :mod:`tokenreduce.data.vqa` far
    more slowly on this CPU (``docs/experiments/small_vlm.md``). ``weight`` is the first conv's (CLIP reads
    the embedding's ``weight.dtype``)."""

    def __init__(self, patch_size: int, dim: int, channels: int = 32) -> None:
        super().__init__()
        if patch_size < 4 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size={patch_size} is invalid for the conv stem: need a power of 2 >= 4")
        layers: list[torch.nn.Module] = []
        cin, ch, stride = 3, channels, patch_size
        while stride > 2:
            layers += [torch.nn.Conv2d(cin, ch, 3, 2, 1), torch.nn.GELU()]
            cin, ch, stride = ch, ch * 2, stride // 2
        layers += [torch.nn.Conv2d(cin, cin, 3, 1, 1), torch.nn.GELU(), torch.nn.Conv2d(cin, dim, stride, stride)]
        self.proj = torch.nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        return self.proj[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def flops(self, image_size: int) -> float:
        """Forward FLOPs (2 x multiply-adds) for one ``image_size`` square image."""
        h, total = image_size, 0.0
        for layer in self.proj:
            if isinstance(layer, torch.nn.Conv2d):
                h = (h + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
                total += 2.0 * h * h * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
        return total


def grid_sincos(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sine-cosine position code of a row-major patch grid (MAE's
    ``get_2d_sincos_pos_embed``, He et al., 2022): half the channels encode the row, half the column, each as
    sin/cos at ``dim / 4`` frequencies ``10000^(-i / (dim / 4))``. ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"dim={dim} is invalid for a 2-D sine-cosine code: need a multiple of 4")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    row, col = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                              indexing="ij")

    def code(p: torch.Tensor) -> torch.Tensor:
        a = p.flatten()[:, None] * omega
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([code(row), code(col)], 1).float()


class GridPositionProjector(torch.nn.Module):
    """LLaVA's two-layer GELU projector (same ``linear_1``/``linear_2`` weights) plus a learned 2-D position
    embedding added to its output, one row per patch of the grid, initialised to :func:`grid_sincos` at
    RMS ``scale``. RoPE in the LLM marks where a key sits, which lets a query find a *place* (identity:
    cell -> value), but it never enters the attention *values*, so a query that finds a digit by its content
    reads back no position (value -> cell, which ``spatial`` needs) unless the visual token carries it. The
    CLIP tower's features do, but weakly; with this embedding a one-head look-up probe on the projected
    tokens finds a digit's cell (``docs/experiments/small_vlm.md``, "the look-up probe"). The embedding is
    added *after* the projector so that the projector cannot learn to squash it.

    ``source_patches`` (b, k) gives the grid patch of each of ``k`` < grid^2 input tokens (a token
    reduction before the projector, :mod:`tokenreduce.adapters.vlm`); -1 adds nothing (a CLS token)."""

    takes_source_patches = True

    def __init__(self, config, grid: int, scale: float = 1.0) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        dim = config.text_config.hidden_size
        self.linear_1 = torch.nn.Linear(config.vision_config.hidden_size, dim, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = torch.nn.Linear(dim, dim, bias=config.multimodal_projector_bias)
        self.position = torch.nn.Parameter(grid_sincos(grid, dim) * (scale / math.sqrt(0.5)))

    def forward(self, image_features: torch.Tensor, source_patches: torch.Tensor | None = None) -> torch.Tensor:
        y = self.linear_2(self.act(self.linear_1(image_features)))
        n = self.position.shape[0]
        if source_patches is None:
            if y.shape[-2] != n:
                raise ValueError(f"{y.shape[-2]} visual tokens but the position embedding has {n} patches; "
                                 f"pass source_patches for a reduced token set")
            return y + self.position.to(y.dtype)
        if source_patches.shape != y.shape[:-1]:
            raise ValueError(f"source_patches has shape {tuple(source_patches.shape)}, expected {tuple(y.shape[:-1])}")
        pos = self.position.to(y.dtype)[source_patches.clamp_min(0)]
        return y + pos * (source_patches >= 0)[..., None].to(y.dtype)


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` over :data:`~tokenreduce.data.vqa.VOCAB` (left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL_TOKENS["pad"], bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"], unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]}, padding_side="left")
    return fast


def build_small_vlm(config: VLMTrainConfig | None = None, attn_implementation: str = "sdpa"):
    """Untrained :class:`LlavaForConditionalGeneration` of ``config``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    c = config or VLMTrainConfig()
    ids = {name: VOCAB.index(tok) for name, tok in SPECIAL_TOKENS.items()}
    vision = CLIPVisionConfig(image_size=c.scene.image_size, patch_size=c.patch_size, hidden_size=c.vision_dim,
                              intermediate_size=4 * c.vision_dim, num_hidden_layers=c.vision_layers,
                              num_attention_heads=c.vision_heads, projection_dim=c.vision_dim)
    text = LlamaConfig(vocab_size=len(VOCAB), hidden_size=c.text_dim, intermediate_size=3 * c.text_dim,
                       num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
                       num_key_value_heads=c.text_kv_heads, max_position_embeddings=512, rms_norm_eps=1e-6,
                       pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["image"],
                      image_seq_length=c.num_image_tokens, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"])
    cfg.vqa_prompt = c.prompt  # read back by answer_questions / the benchmark
    cfg.vqa_rationale = c.rationale
    cfg.vqa_rationale_axis = c.rationale_axis
    cfg.vqa_existence = c.existence_form
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    if c.visual_position:
        model.model.multi_modal_projector = GridPositionProjector(cfg, c.scene.image_size // c.patch_size,
                                                                  c.visual_position)
    if c.stem_channels:
        model.model.vision_tower.embeddings.patch_embedding = ConvStemPatchEmbed(c.patch_size, c.vision_dim,
                                                                                 c.stem_channels)
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.bos_token_id = ids["bos"]
    return model
