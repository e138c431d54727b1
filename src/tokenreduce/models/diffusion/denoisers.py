"""The two class-conditional denoisers trained here: a small DiT and a small SD-style conditional UNet.

Both are the real diffusers classes (:class:`diffusers.DiTTransformer2DModel`,
:class:`diffusers.UNet2DConditionModel`), so token-reduction methods reach them through the code path they use
on real Stable Diffusion / DiT checkpoints:

* DiT (Peebles & Xie 2023): patch 2 on 32x32 (16x16 = 256 tokens), adaLN-Zero blocks conditioned on the
  timestep and the class label; label 10 is DiT's own "null" class for classifier-free guidance.
* UNet: Stable Diffusion's layout at toy width: a cross-attention down block at full resolution (32x32 = 1,024
  tokens), a plain down block, the cross-attention mid block, mirrored up blocks. The class enters as a short
  sequence of learned context tokens through cross-attention, as a prompt does in SD (``null_label`` gives the
  unconditional context).

:class:`ClassConditional` wraps either behind one ``eps = model(x_t, t, labels)`` call; ``.net`` is the diffusers
model to pass to ``tr.apply``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ...core.errors import check_int
from ..checkpoint import short_hash
from .data import IMAGE_SIZE, NUM_CLASSES, data_version

__all__ = ["KINDS", "MODEL_VERSION", "ClassConditional", "DenoiserConfig", "default_config"]

#: the denoisers this module builds
KINDS = ("dit", "unet")
#: bump when the training code changes in a way that changes the weights
MODEL_VERSION = 1
_HASH_EXCLUDED = frozenset({"num_threads"})


@dataclass(frozen=True)
class DenoiserConfig:
    """Architecture (``kind`` + the fields of that kind) and training of one denoiser.

    DiT: ``width`` = heads x head_dim, ``depth`` blocks, ``patch``. UNet: ``channels`` per level,
    ``heads`` per attention, ``context_tokens`` class tokens of ``context_dim``, and with ``class_embed`` the
    class embedding diffusers adds to the timestep embedding as well (``num_class_embeds``).
    Training: ``steps`` of ``batch_size`` fresh images, AdamW at ``lr`` (linear warm-up over ``warmup`` steps,
    cosine to 10%), EMA of the weights (``ema``), class label dropped to the null label with probability
    ``cfg_dropout`` (classifier-free guidance), bf16 autocast when ``bf16`` (fp32 master weights).
    ``num_threads`` only changes speed (not in the hash).
    """

    kind: str
    depth: int = 6
    width: int = 96
    heads: int = 4
    patch: int = 2
    channels: tuple[int, ...] = (32, 64)
    context_tokens: int = 4
    context_dim: int = 32
    class_embed: bool = False
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.999
    cfg_dropout: float = 0.1
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    bf16: bool = True
    seed: int = 0
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is invalid: must be one of {KINDS}")
        for name in ("depth", "width", "heads", "patch", "context_tokens", "context_dim", "steps", "batch_size",
                     "train_timesteps", "num_threads"):
            check_int(name, getattr(self, name))
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads} must divide width={self.width}")
        if not 0.0 <= self.cfg_dropout < 1.0 or not 0.0 <= self.ema < 1.0 or not 0.0 < self.lr <= 1.0:
            raise ValueError(f"need 0 <= cfg_dropout < 1, 0 <= ema < 1, 0 < lr <= 1; got {self.cfg_dropout}, "
                             f"{self.ema}, {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Short stable hash of everything that determines the trained weights."""
        payload = {k: v for k, v in self.to_dict().items() if k not in _HASH_EXCLUDED}
        payload["_versions"] = {"model": MODEL_VERSION, "data": data_version()}
        return short_hash(payload, compact=True)


def default_config(kind: str, **overrides: Any) -> DenoiserConfig:
    """The trained configurations: DiT 96 wide x 6 blocks, 3,000 steps of 32 images; UNet (32, 64) channels,
    2 heads, class context tokens + class embedding, 2,500 steps of 16 (a UNet step costs about twice a DiT
    step per image). The first trained pair (1,000 steps each, the UNet conditioned through cross-attention
    only) drew the asked digit in 26% (DiT) and 19% (UNet) of samples: see docs/diffusion.md."""
    base = {"steps": 3000} if kind == "dit" else {"heads": 2, "batch_size": 16, "steps": 2500, "class_embed": True}
    return DenoiserConfig(kind=kind, **{**base, **overrides})


class ClassConditional(nn.Module):
    """``eps = model(x_t, t, labels)`` for either denoiser; label ``null_label`` (= 10) is unconditional."""

    null_label = NUM_CLASSES

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        self.kind = config.kind
        self.context: nn.Embedding | None = None
        if config.kind == "dit":
            from diffusers import DiTTransformer2DModel

            self.net = DiTTransformer2DModel(
                num_attention_heads=config.heads, attention_head_dim=config.width // config.heads, in_channels=1,
                out_channels=1, num_layers=config.depth, sample_size=IMAGE_SIZE, patch_size=config.patch,
                num_embeds_ada_norm=NUM_CLASSES)
        else:
            from diffusers import UNet2DConditionModel

            ch = tuple(config.channels)
            self.net = UNet2DConditionModel(
                sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, block_out_channels=ch, layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(ch) - 1),
                up_block_types=("UpBlock2D",) * (len(ch) - 1) + ("CrossAttnUpBlock2D",),
                cross_attention_dim=config.context_dim, attention_head_dim=config.heads,  # diffusers: = heads
                norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1 if config.class_embed else None)
            self.context = nn.Embedding(NUM_CLASSES + 1, config.context_tokens * config.context_dim)
            nn.init.normal_(self.context.weight, std=0.5)

    def encode(self, labels: Tensor) -> Tensor:
        """The UNet's cross-attention context for ``labels`` (B, context_tokens, context_dim)."""
        assert self.context is not None
        return self.context(labels).view(labels.shape[0], self.config.context_tokens, self.config.context_dim)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        if self.kind == "dit":
            return self.net(x, timestep=t, class_labels=labels).sample
        return self.net(x, t, encoder_hidden_states=self.encode(labels).to(x.dtype),
                        class_labels=labels if self.config.class_embed else None).sample
